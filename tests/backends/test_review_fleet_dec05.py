"""Failover, fleets and the interceptor (a review of 2026-12-05): each test fails on the code it
was written against because of the defect its docstring names, with real adapters over the
simulator or raw loopback sockets."""

from __future__ import annotations

import httpx
import trio
from trio.testing import MockClock

from service.backends.auto import AutoBackend
from service.backends.http import make_client
from service.backends.openai_compat import OpenAICompatBackend
from service.backends.router import FleetBackend
from service.errors import BackendError
from service.sim import Reply, Simulator, mock_transport

from ..backend_helpers import BUDGETS, mock_client, req
from ..raw_upstream import END, SSE_HEAD, chunk, serve_raw

GUARD = 10


# -- a llama.cpp context overflow reported in the stream ----------------------------------------

# llama.cpp's server (before it answered the first error as an HTTP status) sends a prompt over
# the context as an ``error:`` line after its 200 (tests/backends/test_protocols.py reads it).
CONTEXT_ERROR_LINE = (
    b'error: {"code":400,"message":"the request (40 tokens) exceeds the available context size '
    b'(20 tokens), try increasing it","type":"exceed_context_size_error","n_prompt_tokens":40,'
    b'"n_ctx":20}\n\ndata: [DONE]\n\n')


async def _context_overflow(stream: trio.SocketStream) -> None:
    await stream.send_all(SSE_HEAD + chunk(CONTEXT_ERROR_LINE) + END)


async def test_a_context_overflow_in_the_stream_is_not_failed_over_nor_a_503() -> None:
    """A prompt over the model's context that llama.cpp reports in its stream (``error:``
    line, ``code`` 400, ``type`` ``exceed_context_size_error``) before any token is not
    recognised as the request's fault: auto fails it over to every other server (each gets the
    same too-long prompt) and ends with 503 ``all_backends_failed``, a status OpenAI SDKs retry.
    The same error as an HTTP 400 is 400 ``context_length_exceeded`` (architecture.md, "What
    an upstream failure becomes"). Expected the same here: a 400 ``context_length_exceeded``,
    held against no server.

    (Since: the other members are asked about such a prompt, as a fleet's may have larger
    contexts, but not one whose own refusal said it takes fewer tokens than the prompt has:
    the second time, only the first server is asked.)"""
    seen_a: list[dict[str, str]] = []
    seen_b: list[dict[str, str]] = []
    errors: list[BackendError] = []
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port_a = await nursery.start(serve_raw, _context_overflow, seen_a)
            port_b = await nursery.start(serve_raw, _context_overflow, seen_b)
            async with make_client(BUDGETS) as client:
                auto = AutoBackend([
                    OpenAICompatBackend("gpu-a", f"http://127.0.0.1:{port_a}", client, BUDGETS),
                    OpenAICompatBackend("gpu-b", f"http://127.0.0.1:{port_b}", client, BUDGETS)])
                for _ in range(2):
                    try:
                        async with auto.stream(req(" ".join(["word"] * 40))) as chunks:
                            async for _ in chunks:
                                pass
                    except BackendError as exc:
                        errors.append(exc)
            nursery.cancel_scope.cancel()
    assert len(errors) == 2
    for error in errors:
        assert (error.status, error.type) == (400, "context_length_exceeded"), (
            f"{error.status} {error.type}: {error.message}")
    assert len(seen_a) == 2
    assert len(seen_b) == 1, "a server that said it takes 19 tokens was asked about 40"
    assert all(auto.member_status(b).failures == 0 for b in auto.backends)


# -- a server whose model list answers, but not as expected ------------------------------------


class _ModelListNotJSON(httpx.AsyncBaseTransport):
    """The simulator, except that ``GET /v1/models`` answers 200 with a page that is not JSON
    (a gateway's catch-all in front of an OpenAI-compatible server that serves chats fine)."""

    def __init__(self, sim: Simulator) -> None:
        self.inner = mock_transport(sim)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, headers={"content-type": "text/html"},
                                  content=b"<html><body>gateway</body></html>")
        return await self.inner.handle_async_request(request)


async def test_a_server_whose_model_list_is_malformed_is_not_set_aside_for_good(
    autojump_clock: MockClock,
) -> None:
    """A fleet marks a server not ready (as a failed health probe would) whenever reading its
    model list fails with anything but ModelNotFound / BackendResponseError, so also when the
    server *answered* and the answer was not a model list (BackendProtocolError: not JSON, no
    ``data`` list). Every refresh (each ``inventory_ttl``) renews the mark before its
    ``health_ttl`` runs out, so the server, whose ``/health`` says ready and which serves chats
    fine, gets no call for as long as the other one is up, and its real health is never probed
    again. Expected: a server that answers is not "unreachable" (router.py's own rule, "It
    answers, but not this question"): it stays among the servers a call may go to."""
    a, b = Simulator(default=Reply(tokens=2)), Simulator(default=Reply(tokens=2))
    fleet = FleetBackend(
        [OpenAICompatBackend("gpu-a", "http://a", mock_client(a), BUDGETS),
         OpenAICompatBackend("gpu-b", "http://b",
                             make_client(BUDGETS, transport=_ModelListNotJSON(b)), BUDGETS)],
        inventory_ttl=1.0, health_ttl=5.0)
    served: list[str] = []
    with trio.fail_after(60):
        for _ in range(12):
            served.append((await fleet.chat(req())).backend)
            await trio.sleep(1)
        # It stays among the servers a call may go to (second while gpu-a, whose loaded
        # models are known, has room: "warm" first, by design); set aside, it was left out.
        await fleet.refresh_if_stale()
        order = [b.name for b in fleet.route(req())]
        healths = await fleet.health_all(fresh=True)
    assert healths[1].ready  # its own probe: ready
    assert "gpu-b" in order, f"gpu-b left out ({order}, served {served}); " \
        f"{fleet.inventories[1].error}"
