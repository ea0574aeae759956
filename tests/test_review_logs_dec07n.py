"""Review (2026-12-07): the logs as an operator on call reads them (each test failed on the
tree it was written against)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from service.logs import RUN_ID, JsonFormatter, TextFormatter, _ContextFilter
from service.settings import load_settings
from service.sim import Reply, Simulator
from service.sim.server import open_simulator

from .servers import running_server

GUARD = 10


_QUIETED = ("httpx", "hpack", "h2")


class _Lines(logging.Handler):
    """The service's json handler (its context filter runs at emit time, in the task that
    logs), keeping each line parsed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addFilter(_ContextFilter())
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in _QUIETED and record.levelno < logging.WARNING:
            return  # service/logs.py configure_logging holds these at WARNING
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def log_lines(caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    handler = _Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)


def _about_run(lines: list[dict[str, object]], run_id: str) -> list[dict[str, object]]:
    return [x for x in lines
            if x.get("run_id") == run_id or run_id in str(x.get("msg", ""))]


async def _run_against(reply: Reply, tmp_path: Path, *,
                       stream: bool) -> tuple[str, list[str]]:
    """A run on a simulator answering ``reply``: its id, and what its client got (the SSE
    lines; the error body of a non-streamed one, a 5xx)."""
    async with open_simulator(Simulator(("sim-model",))) as sim:
        sim.default = reply
        settings = load_settings(db=tmp_path / "s.db", backend="llamacpp",
                                 llamacpp_url=sim.url, default_model="sim-model")
        async with running_server(settings, from_settings=True) as srv, srv.client() as c:
            conv = (await c.post("/api/conversations", json={})).json()["id"]
            with trio.fail_after(GUARD):
                if not stream:
                    r = await c.post(f"/api/conversations/{conv}/messages",
                                     json={"content": "hi"})
                    assert r.status_code >= 500, r.text
                    return str(r.json()["error"]["run_id"]), [r.text]
                async with c.stream("POST", f"/api/conversations/{conv}/messages",
                                    json={"content": "hi", "stream": True}) as s:
                    assert s.status_code == 200
                    body = (await s.aread()).decode()
    run_id = json.loads(body.split("data: ", 2)[1].split("\n", 1)[0])["run_id"]
    return str(run_id), body.splitlines()


@pytest.mark.parametrize("reply", [
    Reply(status=500, error="upstream exploded"),
    Reply(die_after=2),
], ids=["upstream-500", "upstream-died-mid-stream"])
async def test_a_run_failed_by_its_upstream_leaves_a_log_line(
        reply: Reply, tmp_path: Path, log_lines: list[dict[str, object]]) -> None:
    """Event: a streamed run fails because its backend failed (an upstream 500; an upstream
    that dies mid-answer). The client got an `error` event (`backend_response_error` /
    `upstream_broken`) and the run is stored `failed`.

    Log shows: only the access line `POST /api/conversations/.../messages 200`; nothing at
    WARNING or above, nothing with the run's id. An operator paged for "runs are failing"
    finds no trace of it in the log (only /api/llm-calls has it).
    Needs: one WARNING line per failed run, with `run_id` and the error type/message (docs:
    operations.md "Failure modes": a backend unreachable/broken is a failure mode).

    Code: service/runs/supervisor.py `_execute`: `if not isinstance(exc, BackendError):
    log.warning("run failed: ...")` -- a BackendError, the commonest failure, is never logged.
    """
    run_id, body = await _run_against(reply, tmp_path, stream=True)
    assert any("event: error" in line for line in body), body
    _assert_logged(run_id, log_lines)


async def test_a_non_streamed_run_failed_by_its_upstream_leaves_a_log_line(
        tmp_path: Path, log_lines: list[dict[str, object]]) -> None:
    """Event: a non-streamed native request whose upstream answers 500: the client gets 502
    `backend_response_error` naming the run (`error.run_id`).

    Log shows: one INFO access line `POST /api/conversations/.../messages 502` -- no run id,
    no error type, no upstream message, and at INFO (a level filter at WARNING, the usual
    alert rule, sees nothing). The same for `/v1/chat/completions` (streamed or not: 502
    before the first byte).
    Needs: a WARNING line with `run_id`, `request_id` and the error's type and message.

    Code: service/runs/supervisor.py `_execute` skips every BackendError; the handlers answer
    with the stored error rather than raising, so service/api/errors.py `_service`'s
    "request failed" WARNING never runs for them either.
    """
    run_id, _ = await _run_against(Reply(status=500, error="upstream exploded"), tmp_path,
                                   stream=False)
    _assert_logged(run_id, log_lines)


def _assert_logged(run_id: str, log_lines: list[dict[str, object]]) -> None:
    lines = _about_run(log_lines, run_id)
    loud = [x for x in lines if x["level"] in ("WARNING", "ERROR", "CRITICAL")]
    assert loud, f"no WARNING+ line for failed run {run_id}: {log_lines}"


def test_text_format_lines_carry_the_run_id() -> None:
    """Event: a run crashes on a bug (or fails, or its store refuses its events) with
    `SERVICE_LOG_FORMAT=text`.

    Log shows: `... ERROR service.runs.supervisor [req_...] run crashed` + traceback: the
    text format's pattern is `%(asctime)s %(levelname)s %(name)s [%(request_id)s]
    %(message)s`: the run id the filter sets on every record is dropped. A run-scoped line
    ("run crashed", "run failed: ...", "an abandoned tool call failed") cannot be tied to its
    run; with `on_disconnect: continue` or a re-join, the request id does not name it either.
    Doc: operations.md "the text and traceback are logged with the run's and the request's
    ids" (no format excepted).

    Code: service/logs.py `TextFormatter.__init__` (no `%(run_id)s`).
    """
    rec = logging.LogRecord("service.runs.supervisor", logging.ERROR, __file__, 1,
                            "run crashed", None, None)
    token = RUN_ID.set("run_0123abcd")
    try:
        _ContextFilter().filter(rec)
    finally:
        RUN_ID.reset(token)
    assert json.loads(JsonFormatter().format(rec))["run_id"] == "run_0123abcd"
    line = TextFormatter().format(rec)
    assert "run_0123abcd" in line, line



async def test_a_websocket_session_and_its_refused_handshake_leave_a_log_line(
        tmp_path: Path, log_lines: list[dict[str, object]]) -> None:
    """Event: a WebSocket client connects to `/api/ws`, runs a message (its upstream fails:
    an `error` event on the socket) and leaves; another's handshake is refused (401, a
    wrong key).

    Log shows: nothing at all for either -- no access line (the request log is an
    `after_request` hook, which Quart never calls for a WebSocket; `accesslog = None`
    turns hypercorn's off), no line for the failed run. The request id the handshake was
    given (`X-Request-ID` / `req_...`) appears nowhere, so a browser user's "the chat page
    keeps failing" has no trace; a flood of refused handshakes (a page with a stale key)
    neither.
    Needs: one line per WebSocket session (path without query, status/close code,
    duration, request id), and per refused handshake.

    Code: service/factory.py `_end` (`@app.after_request` only; no `after_websocket`),
    service/server.py `config.accesslog = None`.
    """
    from trio_websocket import ConnectionRejected, open_websocket_url

    async with open_simulator(Simulator(("sim-model",))) as sim:
        sim.default = Reply(status=500, error="upstream exploded")
        settings = load_settings(db=tmp_path / "s.db", backend="llamacpp",
                                 llamacpp_url=sim.url, default_model="sim-model",
                                 api_keys=["sk-test-KEY1"])
        async with running_server(settings, from_settings=True) as srv, srv.client() as c:
            h = {"Authorization": "Bearer sk-test-KEY1"}
            conv = (await c.post("/api/conversations", json={}, headers=h)).json()["id"]
            url = srv.url.replace("http://", "ws://") + "/api/ws"
            with trio.fail_after(GUARD):
                async with open_websocket_url(
                        url, extra_headers=[("Authorization", "Bearer sk-test-KEY1"),
                                            ("X-Request-ID", "ws-session-1")]) as ws:
                    await ws.send_message(json.dumps(
                        {"type": "message", "conversation_id": conv, "content": "hi"}))
                    while True:
                        frame = json.loads(await ws.get_message())
                        if frame.get("type") == "error":
                            break
                with pytest.raises(ConnectionRejected):
                    async with open_websocket_url(
                            url, extra_headers=[("Authorization", "Bearer wrong-key"),
                                                ("X-Request-ID", "ws-refused-1")]):
                        pass
    session = [x for x in log_lines if x.get("request_id") == "ws-session-1"]
    refused = [x for x in log_lines if x.get("request_id") == "ws-refused-1"]
    assert (bool(session), bool(refused)) == (True, True), log_lines



async def test_a_refused_final_write_is_not_an_error_line_per_retry(
        tmp_path: Path, log_lines: list[dict[str, object]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Event: the store refuses writes (a full volume, the database away) as a run ends; its
    final state is tried again, 0.1 s doubling to 2 s, for FINAL_WRITE_BUDGET (15 s), then
    its client gets 503 `store_unavailable`.

    Log shows: `ERROR could not store the final state of run X (trying again): ...` on
    every attempt: ~11 ERROR lines per run in the 15 s (6 in the 4 s used here), times every
    run ending meanwhile (200 streams: ~2,000 ERROR lines for one outage), before the
    "still not stored" lines of each 2 s pass. One event, one cause, the same text; the
    lines that matter (which runs' clients were told `store_unavailable`) drown.
    Needs: one line when a run's final write is first refused, one when it is given up /
    kept (or lands), at most; the retries at DEBUG or counted.

    Code: service/runs/committer.py `_store_final` (`log.error(... "(trying again)")` in
    the retry loop).
    """
    from service.errors import StoreUnavailable
    from service.runs import committer

    from .fakes import Reply as FReply
    from .fakes import ScriptedBackend

    monkeypatch.setattr(committer, "FINAL_WRITE_BUDGET", 4.0)
    backend = ScriptedBackend(lambda req: FReply("a b c d"))
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, backend) as srv, srv.client() as client:
        store = srv.services.store
        write = store._write
        refusing = True

        async def refuse_final_states(op: str, fn: object) -> object:
            if refusing and op == "finish_run":
                raise StoreUnavailable("the store refused the write (injected)")
            return await write(op, fn)

        conv = (await client.post("/api/conversations", json={})).json()["id"]
        store._write = refuse_final_states
        with trio.fail_after(GUARD + 4):
            r = await client.post(f"/api/conversations/{conv}/messages",
                                  json={"content": "hi"})
        refusing = False
        told = list(log_lines)
    assert r.status_code == 503, r.text
    run_id = str(r.json()["error"].get("run_id") or "")
    about = [x for x in told if x["level"] == "ERROR"
             and ("final state" in str(x["msg"]) or x.get("run_id") == run_id)]
    assert len(about) <= 2, [x["msg"] for x in about]



async def test_a_run_past_the_service_deadline_leaves_a_warning_line(
        tmp_path: Path, log_lines: list[dict[str, object]]) -> None:
    """Event: a run hits `SERVICE_RUN_TIMEOUT` (its model stalled mid-answer); the client
    gets 504 `run_timeout`, the run is stored `timed_out`.

    Log shows: one INFO access line `POST .../messages 504` -- no run id, no reason, nothing
    at WARNING. (Streamed: the access line says 200, then nothing.) The service's own
    deadline cutting runs is exactly what an operator needs to see (a stuck backend, a
    deadline set too low).
    Needs: a WARNING line with `run_id`, `request_id`, "timed out after N s".

    Code: service/runs/supervisor.py `_execute`: the `cancelled_caught` -> `_timed_out`
    branch logs nothing.
    """
    from .fakes import Reply as FReply
    from .fakes import ScriptedBackend

    backend = ScriptedBackend(lambda req: FReply("a b c d", hang_after=1))
    settings = load_settings(db=tmp_path / "s.db", run_timeout=0.5)
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        with trio.fail_after(GUARD):
            r = await client.post(f"/api/conversations/{conv}/messages",
                                  json={"content": "hi"})
    assert r.status_code == 504, r.text
    _assert_logged(str(r.json()["error"]["run_id"]), log_lines)


def test_a_text_records_traceback_follows_its_line_with_the_ids() -> None:
    """Event: a run crashes (or any `log.exception`) with `SERVICE_LOG_FORMAT=text`.

    (Reviewed as: the docs said "a `text` log record is always one line", and a traceback
    adds 10-30 lines. Decided: text is the format people read, so a traceback keeps its lines
    (tests/api/test_bad_input.py pins it); the docs now say so, and the record's own line
    carries the ids.)
    """
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys
        rec = logging.LogRecord("service.runs", logging.ERROR, __file__, 1, "run crashed",
                                None, sys.exc_info())
    rec.request_id = "req_1"
    rec.run_id = "run_1"
    first, *rest = TextFormatter().format(rec).split("\n")
    assert "[req_1 run_1] run crashed" in first, first
    assert rest[0].startswith("Traceback"), rest


def test_text_format_keeps_the_fields_a_record_carries() -> None:
    """Event: start-up, shutdown and worker recovery with `SERVICE_LOG_FORMAT=text`.

    Log shows: `... INFO service.lifespan [None] store open` -- which store, and how many
    runs a crash left `running` and the start closed (`interrupted_runs`), are dropped;
    likewise `draining runs` without `in_flight`, `closed 2 run(s) of a worker that is gone`
    without `run_ids`, `request failed: ...` without `error_type`, every access line without
    `ms`. JSON has them all (JsonFormatter writes every extra); text writes only the
    message. docs/operations.md offers `text` as the other format with no word that it holds
    less.

    Code: service/logs.py `TextFormatter` (a fixed pattern; `record.__dict__`'s extras are
    never appended, as JsonFormatter does).
    """
    rec = logging.LogRecord("service.lifespan", logging.INFO, __file__, 1, "store open",
                            None, None)
    rec.db = "/var/lib/service/service.db"
    rec.interrupted_runs = 3
    rec.request_id = None
    assert json.loads(JsonFormatter().format(rec))["interrupted_runs"] == 3
    line = TextFormatter().format(rec)
    assert "/var/lib/service/service.db" in line, line
    assert "interrupted_runs=3" in line.replace(": ", "=").replace(" = ", "="), line



async def test_a_request_whose_client_left_leaves_a_log_line(
        tmp_path: Path, log_lines: list[dict[str, object]]) -> None:
    """Event: a non-streamed `POST .../messages` whose client gives up (its HTTP timeout, a
    load balancer's idle cut) while the model is slow; `on_disconnect: cancel` cancels the
    run (stored `cancelled`).

    Log shows: nothing at all with its request id -- no access line (the after_request hook
    never runs for a handler cancelled by the disconnect), no "run cancelled" line. A user's
    "my request hung and failed" (their 60 s timeout against a stalled model) leaves no
    trace; the metrics (`service_http_requests`) do not count it either.
    Needs: an access line for every request, with the status it ended with (nginx's 499
    "client closed request") and its duration; at least the run's cancellation at INFO.

    Code: service/factory.py `_end` (`@app.after_request`: the only access log; no
    `teardown_request`/ASGI-level line for cancelled requests).
    """
    import httpx

    from .fakes import Reply as FReply
    from .fakes import ScriptedBackend

    backend = ScriptedBackend(lambda req: FReply("a b c d", hang_after=1))
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"/api/conversations/{conv}/messages",
                              headers={"X-Request-ID": "rid-client-left"},
                              json={"content": "hi"}, timeout=0.5)
        with trio.fail_after(GUARD):
            while True:  # the run ends (cancelled) once its request is gone
                msgs = (await client.get(f"/api/conversations/{conv}")).json()["messages"]
                if any(m["role"] == "assistant" and m["status"] != "streaming"
                       and m["status"] != "pending" for m in msgs):
                    break
                await trio.sleep(0.05)
    # The server has shut down: every line it would write for the request is written.
    assert [x for x in log_lines if x.get("request_id") == "rid-client-left"], log_lines


async def test_a_readyz_503_says_why_in_the_log(
        tmp_path: Path, log_lines: list[dict[str, object]]) -> None:
    """Event: the backend goes down; `/readyz` answers 503 and the load balancer / Kubernetes
    takes the instance out of rotation (with keys set, the probe's body says only "down").

    Log shows: `INFO GET /readyz 503` on every probe -- never what is down or why
    ("backend: down: ConnectError: all attempts to connect to ... failed"). The reason is
    only in the body given to a caller with a key; the operator must curl each instance.
    Needs: a WARNING line naming the failing check and its reason (at least when it changes
    from ok to down, and back).

    Code: service/api/ops.py `readyz` (the checks' texts go to the response only).
    """
    settings = load_settings(db=tmp_path / "s.db", api_keys="k1", backend="ollama",
                             ollama_url="http://127.0.0.1:1")
    async with running_server(settings, from_settings=True) as srv, srv.client() as client:
        r = await client.get("/readyz", headers={"X-Request-ID": "rid-probe"})
    assert r.status_code == 503
    why = [x for x in log_lines if x["level"] in ("WARNING", "ERROR")
           and ("backend" in str(x["msg"]) or "127.0.0.1:1" in str(x["msg"]))]
    assert why, log_lines


async def test_probe_and_scrape_successes_are_debug_lines(
        tmp_path: Path, log_lines: list[dict[str, object]]) -> None:
    """Fixed (helper-147's note): every `/healthz`, `/readyz` and `/metrics` answer was an
    INFO access line: a load balancer's and Kubernetes' probes every few seconds, and each
    scrape, buried the lines an operator reads. A success is a DEBUG line now; a refusal (a
    503 readiness) stays at INFO, and any other request's line too."""
    settings = load_settings(db=tmp_path / "s.db", backend="ollama",
                             ollama_url="http://127.0.0.1:1")
    async with running_server(settings, from_settings=True) as srv, srv.client() as client:
        for path in ("/healthz", "/metrics", "/readyz", "/api/tools"):
            await client.get(path)
    access = {str(x["msg"]) for x in log_lines if x["logger"] == "service.app"
              and str(x["msg"]).startswith("GET ")}
    assert access == {"GET /readyz 503", "GET /api/tools 200"}, access


async def test_a_refused_event_batch_line_names_its_runs(
        tmp_path: Path, log_lines: list[dict[str, object]]) -> None:
    """Fixed (helper-147's note): "could not store N run events (will retry)" named no run:
    which users' streams were held (a stream shows no event the store has not taken) could
    not be told from the log. The line now carries its batch's runs (the first ten) and how
    many."""
    from service.errors import StoreUnavailable

    from .fakes import Reply as FReply
    from .fakes import ScriptedBackend

    backend = ScriptedBackend(lambda req: FReply("a b c d"))
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, backend) as srv, srv.client() as client:
        store = srv.services.store
        write = store._write
        refused = 0

        async def refuse_one_batch(op: str, fn: object) -> object:
            nonlocal refused
            if op == "append_run_events" and not refused:
                refused += 1
                raise StoreUnavailable("the store refused the write (injected)")
            return await write(op, fn)

        conv = (await client.post("/api/conversations", json={})).json()["id"]
        store._write = refuse_one_batch
        with trio.fail_after(GUARD):
            r = await client.post(f"/api/conversations/{conv}/messages",
                                  json={"content": "hi"})
        store._write = write
    assert r.status_code == 200, r.text
    assert refused == 1
    run_id = r.json()["run"]["id"]
    (line,) = [x for x in log_lines if "could not store" in str(x["msg"])]
    assert (line["runs"], line["n_runs"]) == ([run_id], 1), line
