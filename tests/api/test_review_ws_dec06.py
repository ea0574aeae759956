"""A review of ``GET /api/ws`` (service/api/ws.py, service/wsclose.py, service/wsping.py and what
they call) against /work/shared/API.md and docs/api.md (2026-12-06): each test fails on the
code it was written against, because of the defect its docstring names.

Real servers on 127.0.0.1:0 (the app under hypercorn's trio worker, tests/servers.py) with the
in-memory scripted backend; the client is the raw wsproto socket of
tests/api/test_ws_and_v1_faults.py (a test decides what goes on the wire and when it reads).
Nothing here depends on wall-clock time (the helpers' ``fail_after`` are only guards).

Checked and found sound (no test kept): 100 message/cancel cycles on one socket (every run
ends ``cancelled``, the socket's run table empties and its 32 slots come back); a socket's
``cancel`` run is cancelled at once when its client sends a frame with invalid UTF-8 (1007),
half-closes its TCP connection, or sends a close frame and reads nothing more; deep JSON
nesting in a field cannot reach the validators' recursion (json.loads gives up first on this
Python); odd but valid messages (``null`` fields, ``""`` ids, a lone surrogate in a key or an
id, JSON that is not an object) each get an error reply and the socket goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from wsproto.events import CloseConnection, TextMessage

import service.api.ws as ws_mod
from service.errors import TooManyRuns
from service.settings import load_settings

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server
from ..test_ws_protocol_edges import MAX_BODY, MAX_MESSAGE, _read_to_close
from .test_ws_and_v1_faults import RawWS, _conversation


async def _first_error(ws: RawWS) -> dict[str, Any]:
    """Skips the runs' events: the first error reply (the helpers' guard bounds the wait)."""
    while True:
        m = await ws.recv()
        assert isinstance(m, dict), f"the socket ended instead of answering: {m!r}"
        if m.get("type") == "error" and "run_id" not in m:
            return m


# -- 1. the socket's own too_many_runs carries no retry_after -----------------------------------


async def test_a_start_refused_past_the_sockets_32_runs_says_when_to_retry(
    tmp_path: Path,
) -> None:
    """docs/api.md (WebSocket): the server sends ``{"type": "error", "error": {"type",
    "message", "retry_after"?}}`` "for a bad client message or a refused start (`retry_after`:
    the seconds an HTTP answer's `Retry-After` would give, for `too_many_runs`,
    `store_unavailable` and the like)"; its Errors table: 429 ``too_many_runs`` "on a
    WebSocket, an error frame past 32 runs being started or forwarded".

    Wrong: the refusal past a socket's 32 runs (service/api/ws.py, ``receive_loop``: the
    ``_error("too_many_runs", ...)`` built by hand) has no ``retry_after``, though its type is
    ``too_many_runs`` (whose HTTP answer says ``Retry-After: 1``) and though the same socket's
    refusal for ``SERVICE_MAX_RUNS`` (``TooManyRuns.to_event()``) has one: a client written
    to the contract (retry after ``retry_after`` for these types) has nothing to wait on.

    Right: the error frame carries ``retry_after``, a positive number of seconds.
    """
    backend = ScriptedBackend(lambda req: Reply("a b c", hang_after=1))  # runs that go on
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, backend) as srv:
        conv = await _conversation(srv)
        ws = await RawWS.open(srv)
        try:
            for _ in range(ws_mod._RUNS_PER_SOCKET + 1):
                await ws.send({"type": "message", "conversation_id": conv, "content": "q"})
            reply = await _first_error(ws)
        finally:
            await ws.stream.aclose()
    error = reply["error"]
    assert error["type"] == "too_many_runs", reply
    # (The service's own limit says 1 s: TooManyRuns.retry_after.)
    retry_after = error.get("retry_after")
    assert isinstance(retry_after, int | float), (
        f"a refused start of type too_many_runs with no retry_after: {reply} (the same "
        f"type's HTTP answer and SERVICE_MAX_RUNS' error frame say {TooManyRuns.retry_after})")
    assert retry_after > 0, reply


# -- 2. an integer literal out of a double's range is not refused as malformed_json -------------

_HUGE = "1" + "0" * 400  # 1e400 written as an integer: JSON.parse reads it as Infinity


@pytest.mark.parametrize("raw", [
    '{"type": "cancel", "run_id": ' + _HUGE + "}",
    '{"type": "message", "conversation_id": "c", "content": "q", "timeout": ' + _HUGE + "}",
])
async def test_an_integer_out_of_a_doubles_range_is_refused_as_malformed_json(
    tmp_path: Path, raw: str,
) -> None:
    """docs/api.md (WebSocket): "NaN, Infinity and out-of-range numbers are refused as
    `malformed_json`"; its Errors table: 400 ``malformed_json`` "not JSON (NaN, Infinity and
    out-of-range numbers count, over HTTP and the WebSocket ...)"; ws.py's docstring: they
    are refused "as a browser's ``JSON.parse`` does". ``1e400`` is (tests/streaming/
    test_websocket_and_rejoin.py); the same number written as an integer is not.

    Wrong: ``strict_json_loads`` (service/api/models.py) checks only ``parse_float`` and
    ``parse_constant``: an integer literal of 401 digits (out of a double's range: a browser
    reads it as ``Infinity``) is taken as a Python int, and the message is answered
    ``invalid_request`` ("run_id: Input should be a valid string", "timeout: Input should be
    a valid number"), not ``malformed_json``.

    Right: ``malformed_json``, as for ``1e400``.
    """
    settings = load_settings(db=tmp_path / "s.db")
    async with running_server(settings, ScriptedBackend()) as srv:
        ws = await RawWS.open(srv)
        try:
            await ws.stream.send_all(ws.conn.send(TextMessage(raw)))
            reply = await _first_error(ws)
        finally:
            await ws.stream.aclose()
    assert reply["error"]["type"] == "malformed_json", reply


# -- 3. hypercorn's cap counts a text message's characters, not its bytes ------------------------


async def test_a_text_message_past_twice_the_byte_limit_is_closed_with_1009_whatever_its_script(
    tmp_path: Path,
) -> None:
    """docs/api.md (WebSocket): a message's size is ``SERVICE_MAX_BODY_BYTES``
    (``body_too_large``, the socket stays); "past twice that it is closed with 1009, whose
    reason names the cap" (the reason: "a message may be at most N bytes"); wsclose.py: "the
    server never holds more than one message's cap".

    Wrong: the cap is hypercorn's ``websocket_max_message_size`` (set to twice the setting by
    ``service.server.websocket_limits``), which hypercorn's ``WebsocketBuffer`` (used as it is
    by ``service.wsclose._handle_events``) counts in *characters* for a text message
    (``StringIO.write`` returns characters): a message of 3,000 emoji is 12,000 bytes on the
    wire, past twice a 4,096-byte limit, yet it is buffered whole and answered
    ``body_too_large`` with the socket kept. Non-ASCII text goes up to four times the
    documented cap (in memory too: an astral character takes 4 bytes in a ``str``).

    Right: bytes counted, as the setting and the close reason say: a 1009 close frame.
    """
    text = "\U0001F600" * 3000  # one emoji: 4 bytes of UTF-8
    assert len(text) < MAX_MESSAGE < len(text.encode())  # under the cap in characters only
    settings = load_settings(db=tmp_path / "s.db", max_body_bytes=MAX_BODY)
    async with running_server(settings, ScriptedBackend(),
                              websocket_max_message_size=MAX_MESSAGE) as srv:
        ws = await RawWS.open(srv)
        try:
            await ws.stream.send_all(ws.conn.send(TextMessage(text)))
            got = await _read_to_close(ws)
        finally:
            await ws.stream.aclose()
    assert isinstance(got, CloseConnection), (
        f"a text message of {len(text.encode()):,} bytes (the cap: {MAX_MESSAGE:,}, twice "
        f"SERVICE_MAX_BODY_BYTES={MAX_BODY:,}) got {got!r}, not a 1009 close")
    assert got.code == 1009, got
