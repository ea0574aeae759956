"""Structured logging: one JSON object per line, each with the request id of its request."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

__all__ = ["REQUEST_ID", "RUN_ID", "JsonFormatter", "TextFormatter", "configure_logging",
           "get_logger"]

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
RUN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_id", default=None)

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()) | {
    "message", "asctime", "request_id", "run_id",
}


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.run_id = RUN_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, pid: bool = False) -> None:
        super().__init__()
        self._pid = pid  # the process's in each record: several workers write one stream

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if self._pid:
            out["pid"] = record.process
        run_id = getattr(record, "run_id", None)
        if run_id:
            out["run_id"] = run_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            # Tracebacks go to the log (for the operator), never into an HTTP response.
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """One line per record: its time, level, logger (and ``pid``: the process's, with several
    workers), ids (the request's, the run's when it has one), message, then its fields as
    ``key=value`` (as JSON has them); a traceback follows on lines of its own."""

    def __init__(self, pid: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s" + (
            " pid=%(process)d" if pid else "") + " [%(ids)s] %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        run_id = getattr(record, "run_id", None)
        record.ids = getattr(record, "request_id", None) if not run_id else (
            f"{getattr(record, 'request_id', None)} {run_id}")
        fields = "".join(f" {key}={value}" for key, value in record.__dict__.items()
                         if key not in _RESERVED and key != "ids" and not key.startswith("_"))
        # One record, one line: a newline from a client (a request path with %0a) would
        # otherwise forge a line of its own, and ESC (%1b) or a C1 CSI (%c2%9b) would drive
        # the operator's terminal.
        return (super().formatMessage(record) + fields).translate(_ESCAPED)

    def formatException(self, ei: Any) -> str:
        # Its lines stay lines (text is the format people read; JSON keeps it in the record);
        # a control character from a client in an exception's message is escaped as in the
        # message.
        return super().formatException(ei).translate(_ESCAPED_BUT_NEWLINES)


# C0 controls, DEL and C1 controls, each written as an escape (\n, \r, \t, \x1b, \x9b).
_ESCAPED = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPED_BUT_NEWLINES = {c: e for c, e in _ESCAPED.items() if c != ord("\n")}


def configure_logging(level: str = "INFO", fmt: str = "json", *, pid: bool = False) -> None:
    """Route the service's and hypercorn's loggers to stderr in the chosen format; ``pid``:
    each line names its process (``--workers N``: the workers' and their parent's lines
    interleave on one stream)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter(pid) if fmt == "json" else TextFormatter(pid))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("hypercorn.error", "hypercorn.access", "quart.app", "quart.serving"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # httpx logs every upstream request at INFO; the interceptor records calls already.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # HTTP/2's header codec logs every header it decodes at DEBUG, an Authorization's key
    # with them: never below WARNING, whatever SERVICE_LOG_LEVEL says.
    for name in ("hpack", "h2"):
        logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
