"""Reading a run's events: store then live, keep-alives when idle, resume after a gap."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from service.api.sse import sse_event
from service.api.streams import EventReader, Keepalive
from service.runs import RunSpec

from .fakes import Reply, ScriptedBackend, supervisor_env


async def test_keepalive_when_idle_then_events(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("late answer", first_delay=12.0)])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        reader = EventReader(handle.id, after=0, store=env.store, supervisor=env.supervisor,
                             keepalive=5.0)
        got: list[tuple[float, str]] = []
        start = trio.current_time()
        async for item in reader:
            kind = "keepalive" if isinstance(item, Keepalive) else item.type
            got.append((trio.current_time() - start, kind))
        assert got[:3] == [(0.0, "run.started"), (5.0, "keepalive"), (10.0, "keepalive")]
        assert [k for _, k in got[3:]] == ["token", "token", "message", "run.finished"]


async def test_rejoin_after_the_run_reads_the_store(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend([Reply("a b c d")])
    async with supervisor_env(tmp_path, backend) as env:
        conv = await env.conversation()
        handle = await env.supervisor.start(RunSpec(conv, "x"))
        await handle.finished.wait()
        assert env.supervisor.get(handle.id) is None
        reader = EventReader(handle.id, after=3, store=env.store, supervisor=env.supervisor,
                             keepalive=5.0)
        seqs = [e.seq async for e in reader if not isinstance(e, Keepalive)]
        assert seqs == list(range(4, handle.emitted_seq + 1))


def test_sse_frames_split_multiline_data() -> None:
    assert sse_event(3, "token", {"text": "a"}) == b'id: 3\nevent: token\ndata: {"text":"a"}\n\n'
    assert sse_event(None, None, "x\ny") == b"data: x\ndata: y\n\n"


def test_openai_token_fast_path_is_byte_identical() -> None:
    from service.api.openai import _chunk, _frame, _token_prefix
    from service.api.sse import sse_data
    from service.runs import RunEvent

    for text in ["plain", 'quote " and \\ back', "new\nline", "ünïcødé ✓", ""]:
        event = RunEvent.make("run_x", 2, "token", {"text": text}, 0.0)
        fast = _frame(event, "chatcmpl-x", 7, "m", _token_prefix("chatcmpl-x", 7, "m"))
        assert fast == sse_data(_chunk("chatcmpl-x", 7, "m", {"content": text}))
