"""The service's exception tree.

Every error the service raises on purpose derives from :class:`ServiceError`. Lower layers'
exceptions (httpx, sqlite3, json) are mapped once, at the adapter boundary, to the most specific
type here, keeping the original as ``__cause__``.

    ServiceError
    ├── ConfigError                    a setting is invalid (start-up)
    ├── StoreError                     the store failed
    │   ├── StoreUnavailable           it cannot read or write now (full, locked, away)  (503)
    │   └── NotFound                   no such conversation / run / message
    ├── BackendError                   an LLM backend failed            (HTTP 502)
    │   ├── BackendUnavailable         refused, unreachable, 503, loading  (503)
    │   │   ├── AllBackendsFailed      auto backend: every backend failed, with each cause
    │   │   └── BackendBusy            no backend slot within SERVICE_BACKEND_QUEUE_TIMEOUT
    │   ├── BackendRateLimited         the backend answered 429 (its Retry-After passed on)
    │   ├── ContextLengthExceeded      the prompt is longer than the model's context (400)
    │   ├── UpstreamBroken             it answered, then the connection broke (502)
    │   ├── BackendTimeout             a time budget ran out            (504)
    │   │   ├── ConnectTimeout         connecting took too long
    │   │   ├── FirstChunkTimeout      no first chunk within the idle budget
    │   │   ├── ChunkGapTimeout        a gap between chunks exceeded the idle budget
    │   │   └── CallTimeout            the whole call exceeded its budget
    │   ├── BackendProtocolError       malformed or unexpected answer (502)
    │   ├── BackendResponseError       the backend answered with an error (status or body)
    │   │   ├── BackendRejectedRequest the backend refused the request as invalid (400)
    │   │   └── BackendAuthFailed      the backend refused the service's credentials (401, 403)
    │   └── ModelNotFound              the model is unknown to the backend (404)
    ├── ToolError                      a tool failed (the model sees it as an observation)
    │   └── ToolArgumentsError         arguments do not match the tool's schema
    ├── RunError                       run lifecycle errors
    │   ├── IllegalTransition          a run status change that the lifecycle forbids
    │   ├── TooManyRuns                SERVICE_MAX_RUNS reached (429)
    │   ├── RunTimeout                 the run's deadline passed (504)
    │   └── RunCancelled               the run was cancelled (explicitly or by disconnect) (409)
    └── ShuttingDown                   the service is draining; no new work (503)

Each class says its HTTP status (``status``) and its error code (``type``, the JSON error's
``type`` and OpenAI's ``code``); whatever answers an error takes them from here, also for a run
known only by its stored error type (:func:`status_of_type`). A run that ended ``timed_out`` or
``cancelled`` is answered as :class:`RunTimeout` or :class:`RunCancelled` (or
:class:`ShuttingDown`, when a shutdown cancelled it) would be.

Errors the *model* should see (tool failures) are separate from errors the *operator* should see
(backend down, a bug): the former become observations, the latter end a run ``failed``.
"""

from __future__ import annotations

import re

import trio

__all__ = [
    "AllBackendsFailed",
    "BackendAuthFailed",
    "BackendBusy",
    "BackendError",
    "BackendProtocolError",
    "BackendRateLimited",
    "BackendRejectedRequest",
    "BackendResponseError",
    "BackendTimeout",
    "BackendUnavailable",
    "CallTimeout",
    "ChunkGapTimeout",
    "ConfigError",
    "ConnectTimeout",
    "ContextLengthExceeded",
    "FirstChunkTimeout",
    "IllegalTransition",
    "ModelNotFound",
    "NotFound",
    "RunCancelled",
    "RunError",
    "RunTimeout",
    "ServiceError",
    "ShuttingDown",
    "StoreError",
    "StoreUnavailable",
    "TooManyRuns",
    "ToolArgumentsError",
    "ToolError",
    "UpstreamBroken",
    "first_leaf",
    "internal_message",
    "is_interrupt",
    "retry_after_of_type",
    "split_cancelled",
    "status_of_type",
    "worth_retry_of_type",
]


class ServiceError(Exception):
    """Base of every error the service raises on purpose.

    ``status`` and ``type`` drive the JSON error model of the HTTP API.
    """

    status: int = 500
    type: str = "internal_error"
    retry_after: int | None = None  # seconds, sent as Retry-After: worth a retry then
    worth_retry = True  # False: the same on a retry (x-should-retry: false, which SDKs obey)

    def __init__(self, message: str = "", **details: object) -> None:
        super().__init__(message)
        self.message = message or self.__class__.__name__
        self.details = details

    def to_dict(self) -> dict[str, object]:
        return {"type": self.type, "message": self.message, **self.details}

    def to_event(self) -> dict[str, object]:
        """As a stream's ``error`` (an SSE event, a WebSocket frame): with ``retry_after``
        (seconds) when a retry is worth it then, as an HTTP answer's Retry-After says."""
        error = self.to_dict()
        if self.retry_after is not None:
            error["retry_after"] = self.retry_after
        return error


class ConfigError(ServiceError):
    type = "config_error"


class StoreError(ServiceError):
    type = "store_error"


class StoreUnavailable(StoreError):
    """The store cannot take a write (or answer a read) now: a full disk, a lock held too long,
    a database away. Nothing that was stored is lost; a retry later is worth it."""

    status = 503
    type = "store_unavailable"
    retry_after = 5


class NotFound(StoreError):
    status = 404
    type = "not_found"


# What this process sends upstream and must never show (a fleet server's ``headers`` values,
# credentials from a backend URL): an upstream that echoes one in its error text ("invalid
# api key: Bearer ...", as many gateways do) has it replaced before the text is shown (a
# client's error, the stored run, /api/llm-calls, /api/backends, the log).
_UPSTREAM_SECRETS: set[str] = set()
_SECRET_MIN = 4  # shorter values are not taken for secrets (they would mask ordinary text)


def register_upstream_secret(value: str) -> None:
    """Never show ``value`` (nor its token after an auth scheme: "Bearer <token>")."""
    for part in (value, value.partition(" ")[2]):
        if len(part) >= _SECRET_MIN:
            _UPSTREAM_SECRETS.add(part)


def scrub_upstream_secrets(text: str) -> str:
    for secret in sorted(_UPSTREAM_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


class BackendError(ServiceError):
    status = 502
    type = "backend_error"

    def __init__(self, message: str = "", *, backend: str | None = None, **details: object) -> None:
        if backend is not None:
            details["backend"] = backend
        super().__init__(scrub_upstream_secrets(message) if _UPSTREAM_SECRETS else message,
                         **details)
        self.backend = backend


class BackendUnavailable(BackendError):
    status = 503
    type = "backend_unavailable"


class AllBackendsFailed(BackendUnavailable):
    type = "all_backends_failed"

    def __init__(self, causes: list[BackendError]) -> None:
        self.causes = causes
        summary = "; ".join(f"{c.backend or '?'}: {c.message}" for c in causes) or "no backends"
        super().__init__(
            f"all backends failed: {summary}",
            causes=[c.to_dict() for c in causes],
        )


class BackendBusy(BackendUnavailable):
    """Every slot of the backend (SERVICE_BACKEND_CONCURRENCY) stayed taken for the whole
    queue wait (SERVICE_BACKEND_QUEUE_TIMEOUT): worth a retry a little later."""

    type = "backend_busy"
    retry_after = 5
    # No call on the backend gave a chunk during the whole wait: its slots are held by calls
    # its server does not answer (a wedged GPU, a load that never ends), not by answers.
    stalled = False


class BackendRateLimited(BackendError):
    """The backend said 429 Too Many Requests; its Retry-After (if any) is passed on."""

    status = 429
    type = "backend_rate_limited"


class ContextLengthExceeded(BackendError):
    """The prompt does not fit the model's context (llama.cpp's ``exceed_context_size_error``):
    the request's fault, as OpenAI answers it; retrying it, or elsewhere, gives the same."""

    status = 400
    type = "context_length_exceeded"
    # (the prompt's tokens, the most it may have) when the refusal says them (llama.cpp's
    # ``n_prompt_tokens`` and ``n_ctx``, the answer-room check's count): a history is then
    # shortened by what is over, not by a half. Not shown to clients.
    tokens: tuple[int, int] | None = None
    # Refused here, before it was sent (the answer-room check): no LLM call, so neither
    # recorded nor counted as one.
    unsent: bool = False
    # How an upstream says it: llama.cpp's server with its error type (an HTTP 400, or an
    # ``error:`` line in its stream), OpenAI with its code; Ollama (when it does not truncate)
    # and others only in words.
    _TYPES = frozenset({"exceed_context_size_error", "context_length_exceeded"})
    _WORDS = re.compile(
        r"(exceeds?|longer than|larger than|too long|too large).{0,60}\bcontext"
        r"|\bcontext (length|size|window) (exceeded|is too small)|context_length_exceeded"
        # OpenAI's and vLLM's: "This model's maximum context length is 16384 tokens. However,
        # you requested 122946 tokens (...)".
        r"|\bmaximum context length is \d+ tokens\b",
        re.IGNORECASE | re.DOTALL)

    # ... and in a server fault (a 500: Ollama's runner refusing an over-long prompt, in some
    # versions), only in so many words about the input: "the KV cache exceeds free GPU memory;
    # lower the context size" is the server's trouble, failed over.
    _INPUT_WORDS = re.compile(
        r"\b(input|prompt|request)\b[^.;]{0,40}\bexceeds?\b[^.;]{0,20}\bcontext"
        r"|context_length_exceeded",
        re.IGNORECASE)

    @classmethod
    def said(cls, message: str, kind: str | None = None, *, fault: bool = False) -> bool:
        """Whether an upstream's error (its message, its type) says this; ``fault``: said with
        a server-fault status (500), where only the plainest words count."""
        if kind in cls._TYPES:
            return True
        return bool((cls._INPUT_WORDS if fault else cls._WORDS).search(_unquoted(message)))


def _unquoted(message: str) -> str:
    """An upstream's error without the model's own output it quotes: Ollama's "error parsing
    tool call: raw='...', err=..." holds what the model wrote, in which "too long for the
    context window" is the model's text, not the server's verdict (a context error there was a
    400 telling the client to cut its history, for a malformed tool call)."""
    at = message.find("raw='")
    if at < 0:
        return message
    end = message.rfind("', err=")
    return message[:at] + (message[end + 2:] if end > at else "")


class UpstreamBroken(BackendError):
    """The backend answered (its status and headers came), then the connection broke: not
    "no backend reachable" (503) but a bad answer (502)."""

    type = "upstream_broken"


class BackendTimeout(BackendError):
    status = 504
    type = "backend_timeout"
    budget: str = "call"


class ConnectTimeout(BackendTimeout):
    type = "connect_timeout"
    budget = "connect"


class FirstChunkTimeout(BackendTimeout):
    type = "first_chunk_timeout"
    budget = "first_chunk"


class ChunkGapTimeout(BackendTimeout):
    type = "chunk_gap_timeout"
    budget = "chunk_gap"


class CallTimeout(BackendTimeout):
    type = "call_timeout"
    budget = "call"


class BackendProtocolError(BackendError):
    type = "backend_protocol_error"


class BackendResponseError(BackendError):
    type = "backend_response_error"


class BackendRejectedRequest(BackendResponseError):
    """The backend refused the request as invalid (400, 422): most often a field passed on as
    the client sent it (``response_format``, ``tool_choice``, ``logit_bias``). As far as anyone
    can tell the request's fault, and the same again on a retry: 400, not a 502 that OpenAI
    SDKs retry (three runs for one bad request)."""

    status = 400
    type = "backend_rejected_request"


class BackendAuthFailed(BackendResponseError):
    """The backend refused the service's credentials (401, 403: its API key, wrong or expired):
    the same on every try until an operator fixes it. A 502 (the service's fault, not the
    client's) that is not worth a retry: answered with ``x-should-retry: false``."""

    type = "backend_auth_failed"
    worth_retry = False


class ModelNotFound(BackendError):
    status = 404
    type = "model_not_found"


class ToolError(ServiceError):
    type = "tool_error"


class ToolArgumentsError(ToolError):
    status = 422
    type = "tool_arguments_error"


class RunError(ServiceError):
    type = "run_error"


class IllegalTransition(RunError):
    status = 409
    type = "illegal_transition"


class TooManyRuns(RunError):
    status = 429
    type = "too_many_runs"
    retry_after = 1


class RunTimeout(RunError):
    """The run's deadline (``SERVICE_RUN_TIMEOUT`` or the request's ``timeout``) passed."""

    status = 504
    type = "run_timeout"


class RunCancelled(RunError):
    """The run was cancelled by its client (a cancel, or leaving): final, so 409, which a client
    does not retry (a shutdown's cancel is :class:`ShuttingDown`, worth a retry elsewhere)."""

    status = 409
    type = "cancelled"


class AlreadyBegun(ServiceError):
    """A run was begun on the conversation with this ``Idempotency-Key`` already: ``run_id``,
    asked with ``content`` (the request's endpoint answers with that run, or refuses a key
    reused for another request)."""

    status = 409
    type = "idempotency_key_in_use"

    def __init__(self, run_id: str, content: str | None) -> None:
        super().__init__(f"a run was begun with this Idempotency-Key already: {run_id}",
                         run_id=run_id)
        self.run_id, self.content = run_id, content


class ShuttingDown(ServiceError):
    status = 503
    type = "shutting_down"


def _class_of_type(type_: str) -> type[ServiceError] | None:
    pending: list[type[ServiceError]] = [ServiceError]
    while pending:
        cls = pending.pop()
        if cls.type == type_:
            return cls
        pending.extend(cls.__subclasses__())
    return None


def status_of_type(type_: str) -> int | None:
    """The HTTP status of an error known only by its ``type`` (a run's stored error type), as
    its exception class says; None for a type no class has."""
    cls = _class_of_type(type_)
    return None if cls is None else cls.status


def worth_retry_of_type(type_: str) -> bool:
    """Whether a retry may fare better, for an error known only by its ``type``."""
    cls = _class_of_type(type_)
    return True if cls is None else cls.worth_retry


def retry_after_of_type(type_: str) -> int | None:
    """The seconds after which a retry is worth it for an error known only by its ``type``, as
    its exception class says (``store_unavailable``: 5); None if it says none."""
    cls = _class_of_type(type_)
    return None if cls is None else cls.retry_after


def is_interrupt(exc: BaseException | None) -> bool:
    """Whether ``exc`` is, or holds, a KeyboardInterrupt (SIGINT): the process's, not a run's
    or a request's. trio hands it out of a nursery inside an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


def split_cancelled(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """``exc`` as (its trio.Cancelled part, the rest) of an exception or exception group:
    either may be None."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)
    if isinstance(exc, trio.Cancelled):
        return exc, None
    return None, exc


def first_leaf(exc: BaseException) -> BaseException:
    """The first leaf of (nested) exception groups: what actually went wrong."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def internal_message(exc: BaseException) -> str:
    """What a client is told of a bug: its kind only. Its text (paths, hosts, data) and the
    traceback are in the log, with the run's and the request's ids."""
    return f"internal error ({type(exc).__name__}); the details are in the service's log"
