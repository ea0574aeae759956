"""Review (dec06) of the LLM backend adapters against what real servers send: failing tests for
shapes of llama.cpp's / OpenAI-compatible servers' and Ollama's answers that the service misreads.

Each upstream here is raw bytes on a loopback socket (``tests/raw_upstream.py``), read through
the service's own client and adapters, and where the client's view matters through the whole
server (the lifespan builds the adapter from the settings, as in production)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from service.errors import ContextLengthExceeded
from service.settings import BackendKind, Settings

from ..raw_upstream import call_raw, json_response, serve_routes
from ..servers import running_server

GUARD = 20  # seconds: no wait here may take longer


def _answer(status: str, body: bytes) -> Callable[[trio.SocketStream], Any]:
    async def respond(stream: trio.SocketStream) -> None:
        await stream.send_all(json_response(status, body))
    return respond


# What a server answers each path with (the request's path, without the query): raw bytes.
Routes = dict[str, bytes]


@asynccontextmanager
async def _server_on(settings: Settings, kind: str, routes: Routes) -> AsyncIterator[Any]:
    """The service (its backend built from the settings) on a raw ``kind`` upstream."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_routes, routes)
        conf = settings.model_copy(update={
            "backend": BackendKind(kind), f"{kind}_url": f"http://127.0.0.1:{port}"})
        async with running_server(conf, from_settings=True) as server, server.client() as c:
            yield c
        nursery.cancel_scope.cancel()


LLAMA_MODELS = json_response("200 OK", json.dumps({
    "object": "list",
    "data": [{"id": "sim-model", "object": "model", "created": 1, "owned_by": "llamacpp"}],
}).encode())
LLAMA_HEALTH = json_response("200 OK", b'{"status":"ok"}')


# -- OpenAI-compatible servers: a prompt over the context, said by OpenAI's error code ---------

# OpenAI's own shape of it (the code is the machine-readable part; the message varies by
# server and some give no words about the context at all: Groq's below).
OPENAI_CONTEXT_ERROR = json.dumps({"error": {
    "message": "Please reduce the length of the messages or completion.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
}}).encode()


async def test_openai_context_length_code_is_a_context_error_at_the_adapter() -> None:
    """Defect: an OpenAI-compatible server saying a prompt is over the model's context the way
    OpenAI's API says it -- HTTP 400 ``{"error": {"message": ..., "type":
    "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}`` (Groq's
    answer as quoted in OpenDevin/OpenDevin#1902: ``Error code: 400 - {'error': {'message':
    'Please reduce the length of the messages or completion.', 'type':
    'invalid_request_error', 'param': 'messages', 'code': 'context_length_exceeded'}}``) -- is
    read as a generic ``BackendRejectedRequest``: ``_error_message`` keeps the ``type`` but
    drops the ``code``, and the message has no "context" words. The module says the adapter
    serves "any OpenAI-compatible server" and ``ContextLengthExceeded`` says it recognises
    "OpenAI with its code"."""
    with trio.fail_after(GUARD):
        out = await call_raw(_answer("400 Bad Request", OPENAI_CONTEXT_ERROR))
    assert isinstance(out.error, ContextLengthExceeded), repr(out.error)


async def test_openai_context_length_code_reaches_the_v1_client_as_context_length_exceeded(
    settings: Settings,
) -> None:
    """Defect (the client's view of the one above): API.md says "a prompt over the model's
    context is 400 ``context_length_exceeded``"; an OpenAI-compatible upstream that answers
    OpenAI's ``"code": "context_length_exceeded"`` (400, see above) reaches a ``/v1`` client
    as 400 ``backend_rejected_request``, which an SDK cannot tell from a bad field."""
    routes = {"/v1/chat/completions": json_response("400 Bad Request", OPENAI_CONTEXT_ERROR),
              "/v1/models": LLAMA_MODELS, "/health": LLAMA_HEALTH}
    with trio.fail_after(GUARD):
        async with _server_on(settings, "llamacpp", routes) as client:
            r = await client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": [{"role": "user", "content": "hi " * 50}]})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            calls = (await client.get("/api/llm-calls",
                                      params={"run_id": error["run_id"]})).json()["data"]
    # The client: OpenAI's type and code for it (API.md), and the param it names.
    assert (error["type"], error["code"], error["param"]) == (
        "context_length_exceeded", "context_length_exceeded", "messages"), error
    # The store: the call's record says what it was (not "a field the backend refused").
    assert [c["error"].split(":")[0] for c in calls] == ["ContextLengthExceeded"], calls


async def test_vllm_maximum_context_length_message_is_a_context_error() -> None:
    """Defect: vLLM (an OpenAI-compatible server) refuses a prompt over the model's context
    with HTTP 400 ``{"object": "error", "message": "This model's maximum context length is
    16384 tokens. However, you requested 122946 tokens (112946 in the messages, 10000 in the
    completion). Please reduce the length of the messages or completion.", "type":
    "BadRequestError", "param": null, "code": 400}`` (the message as in vllm-project/vllm#20409,
    the body's shape as in vllm-project/vllm#4667: ``{'object': 'error', 'message': ...,
    'type': 'BadRequestError', 'param': None, 'code': 400}``) -- OpenAI's own wording of it.
    ``ContextLengthExceeded._WORDS`` knows "exceeds ... context" but not "maximum context
    length is N tokens. However, you requested M", so it is a ``BackendRejectedRequest``:
    the client gets ``backend_rejected_request``, and ``auto`` fails it over to every other
    member instead of answering at once."""
    body = json.dumps({
        "object": "error",
        "message": "This model's maximum context length is 16384 tokens. However, you "
                   "requested 122946 tokens (112946 in the messages, 10000 in the completion). "
                   "Please reduce the length of the messages or completion.",
        "type": "BadRequestError", "param": None, "code": 400,
    }).encode()
    with trio.fail_after(GUARD):
        out = await call_raw(_answer("400 Bad Request", body))
    assert isinstance(out.error, ContextLengthExceeded), repr(out.error)
