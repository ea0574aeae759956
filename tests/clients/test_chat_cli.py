"""``python -m service chat`` (issue 15, item 6) as a user runs it, against the real server on a
loopback port: one-shot in a subprocess, and the interactive chat through a pseudo-terminal,
where Ctrl-C is the terminal's (a ``\\x03`` typed into the pty) and cancels the run on the
server."""

from __future__ import annotations

import fcntl
import os
import re
import sys
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from service.backends.base import ChatRequest
from service.chat import SSEParser
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import ROOT, RunningServer, running_server

GUARD = 30  # seconds any one exchange with the client process may take
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")


def _answers(req: ChatRequest) -> Reply:
    q = req.messages[-1].content
    if q.startswith("slow"):
        return Reply("tick " * 400, gap=0.05)  # 20 s: long enough to be stopped
    if q.startswith("fail"):
        return Reply("", fail_after=0, error=RuntimeError("boom"))
    if q.startswith("think"):
        return Reply("the answer", thinking=["pondering deeply"])
    if q.startswith("history"):
        return Reply(f"I have seen {len(req.messages)} messages")
    return Reply(f"**echo**: {q}")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update(COLUMNS="100", LINES="40", TERM="xterm")
    return env


async def _chat(*args: str) -> trio.CompletedProcess[bytes]:
    with trio.fail_after(GUARD):
        return await trio.run_process(
            [sys.executable, "-m", "service", "chat", *args], cwd=ROOT, env=_env(),
            capture_stdout=True, capture_stderr=True, check=False)


@pytest.mark.slow
async def test_one_shot_streams_the_answer_to_stdout(settings: Settings) -> None:
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            srv.client() as client:
        out = await _chat("hello there", "--url", srv.url)
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode() == "**echo**: hello there\n"  # a pipe: the text, as is
        (conv,) = (await client.get("/api/conversations")).json()["data"]
        assert conv["title"] == "hello there"
        # --conversation goes on with it: the history is the conversation's.
        out = await _chat("history?", "--url", srv.url, "--conversation", conv["id"])
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode() == "I have seen 3 messages\n"
        assert len((await client.get("/api/conversations")).json()["data"]) == 1
        # The agent's steps: on stderr in a pipe (stdout is the answer alone).
        out = await _chat("think first", "--url", srv.url)
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode() == "the answer\n"
        assert "thinking: pondering deeply" in out.stderr.decode()


@pytest.mark.slow
async def test_one_shot_failures_exit_non_zero_with_the_error_on_stderr(
    settings: Settings,
) -> None:
    keyed = settings.model_copy(update={"api_keys": ("k1",)})
    async with running_server(keyed, ScriptedBackend(_answers)) as srv:
        out = await _chat("hi", "--url", srv.url)
        assert (out.returncode, out.stdout) == (1, b"")
        assert "401 unauthorized: missing or wrong API key" in out.stderr.decode()
        out = await _chat("fail now", "--url", srv.url, "--key", "k1")
        assert out.returncode == 1
        assert "failed" in out.stderr.decode()
        assert "internal error" in out.stderr.decode()
        out = await _chat("hi", "--url", srv.url, "--key", "k1", "--conversation", "conv_no")
        assert out.returncode == 1
        assert "404" in out.stderr.decode()
    out = await _chat("hi", "--url", srv.url)  # the server is gone
    assert out.returncode == 1
    assert "cannot reach the service" in out.stderr.decode()


class Terminal:
    """The client process on a pseudo-terminal that is its controlling terminal."""

    def __init__(self, process: trio.Process, master: trio.lowlevel.FdStream) -> None:
        self.process, self.master, self.screen = process, master, ""

    async def type(self, keys: str) -> None:
        await self.master.send_all(keys.encode())

    async def wait_for(self, pattern: str, *, after: int = 0) -> int:
        """Read until ``pattern`` shows (ANSI codes removed) past ``after``; its end."""
        with trio.move_on_after(GUARD):
            while (found := re.search(pattern, self.screen[after:])) is None:
                try:
                    chunk = await self.master.receive_some(65536)
                except trio.BrokenResourceError:  # EIO: the child closed its side
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"{pattern!r} never showed:\n{self.screen}")
                self.screen += _ANSI.sub("", chunk.decode(errors="replace"))
            return after + found.end()
        raise AssertionError(f"{pattern!r} did not show in {GUARD} s:\n{self.screen}")

    async def drain(self) -> None:
        with trio.move_on_after(GUARD):
            while True:
                try:
                    chunk = await self.master.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not chunk:
                    return
                self.screen += _ANSI.sub("", chunk.decode(errors="replace"))


def _controlling_tty() -> None:  # in the child, after setsid (start_new_session)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@asynccontextmanager
async def _terminal(srv: RunningServer) -> AsyncIterator[Terminal]:
    master, slave = os.openpty()
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "service", "chat", "--url", srv.url], cwd=ROOT, env=_env(),
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=_controlling_tty)
    finally:
        os.close(slave)
    stream = trio.lowlevel.FdStream(master)
    try:
        yield Terminal(process, stream)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):  # reap it even if the test was cancelled
            await process.wait()
            await stream.aclose()


async def _run_of(client: httpx.AsyncClient, index: int) -> dict[str, Any]:
    (conv,) = (await client.get("/api/conversations")).json()["data"]
    messages = (await client.get(f"/api/conversations/{conv['id']}")).json()["messages"]
    run_id = [m["run_id"] for m in messages if m["role"] == "assistant"][index]
    return (await client.get(f"/api/runs/{run_id}")).json()  # type: ignore[no-any-return]


@pytest.mark.slow
async def test_interactive_chat_and_ctrl_c_cancels_the_run_on_the_server(
    settings: Settings,
) -> None:
    backend = ScriptedBackend(_answers)
    async with running_server(settings, backend) as srv, srv.client() as client, \
            _terminal(srv) as term:
        at = await term.wait_for(r"you> ")
        await term.type("hello\r")
        at = await term.wait_for(r"echo: hello", after=at)  # Markdown: no "**" on a terminal
        assert "**echo**" not in term.screen
        at = await term.wait_for(r"you> ", after=at)
        await term.type("history?\r")
        at = await term.wait_for(r"I have seen 3 messages", after=at)  # one conversation
        at = await term.wait_for(r"you> ", after=at)
        await term.type("think\r")
        at = await term.wait_for(r"thinking: pondering deeply", after=at)  # dimmed, first
        at = await term.wait_for(r"the answer", after=at)
        at = await term.wait_for(r"you> ", after=at)
        await term.type("slow please\r")
        at = await term.wait_for(r"tick tick", after=at)
        await term.type("\x03")  # the terminal turns it into SIGINT for the client
        at = await term.wait_for(r"run cancelled", after=at)
        run = await _run_of(client, 3)
        assert run["status"] == "cancelled"  # on the server, not just in the client
        assert (await backend.wait_stream(3)).cancelled
        # The chat goes on; Ctrl-D at the prompt leaves it.
        at = await term.wait_for(r"you> ", after=at)
        await term.type("\x04")
        with trio.fail_after(GUARD):
            assert await term.process.wait() == 0


@pytest.mark.slow
async def test_a_second_ctrl_c_exits(settings: Settings) -> None:
    async with running_server(settings, ScriptedBackend(_answers)) as srv, \
            srv.client() as client, _terminal(srv) as term:
        at = await term.wait_for(r"you> ")
        await term.type("slow again\r")
        at = await term.wait_for(r"tick tick", after=at)
        await term.type("\x03")
        at = await term.wait_for(r"Ctrl-C again to quit", after=at)
        await term.type("\x03")
        with trio.fail_after(GUARD):
            assert await term.process.wait() == 130
        await term.drain()
        assert "interrupted" in term.screen
        run = await _run_of(client, 0)
        with trio.fail_after(GUARD):  # its events to the end: it has ended
            await client.get(f"/api/runs/{run['id']}/events")
        assert (await _run_of(client, 0))["status"] == "cancelled"


@given(st.lists(st.tuples(st.sampled_from(["token", "run.finished"]),
                          st.dictionaries(st.text(max_size=5), st.text(max_size=20),
                                          max_size=3)), max_size=5))
def test_the_sse_parser_reads_back_what_the_service_writes(
    frames: list[tuple[str, dict[str, str]]],
) -> None:

    from service.api.sse import KEEPALIVE, sse_event

    wire = b"".join(KEEPALIVE + sse_event(n + 1, kind, data)
                    for n, (kind, data) in enumerate(frames)).decode()
    parser, got = SSEParser(), []
    for line in wire.split("\n"):
        if (frame := parser.feed(line)) is not None:
            got.append(frame)
    assert got == [{"id": str(n + 1), "event": kind, "data": data}
                   for n, (kind, data) in enumerate(frames)]



def test_a_plan_steps_work_is_shown_with_its_step() -> None:
    """A wave's steps run at once: a tool call of step 2 is shown as step 2's, and the plan's
    own events as they were."""
    from service.chat_render import _describe

    call = {"name": "calculator", "arguments": {"expression": "1+1"}, "call_id": "c1"}
    assert _describe("tool.call", {**call, "step": 2}) == (
        '· [step 2] tool calculator({"expression": "1+1"})')
    assert _describe("tool.result", {"call_id": "c1", "output": "2", "step": 2}) == (
        "· [step 2] tool result: 2")
    assert _describe("tool.call", call) == '· tool calculator({"expression": "1+1"})'
    assert _describe("step.started", {"id": 2, "task": "add"}) == "· step 2: add"


@pytest.mark.parametrize("tty", [False, True], ids=["pipe", "terminal"])
def test_a_reasoning_thought_between_answer_tokens_leaves_the_answer_whole(tty: bool) -> None:
    """A reasoning model's thinking may come between answer tokens; it is not a step. In a
    pipe the answer was cut at it and then written again whole ("The answer \\nis 42.\\nThe
    answer is 42."); on a terminal the answer so far was dimmed as if a step's text."""
    import io

    from rich.console import Console

    from service.chat import Renderer

    out, err = io.StringIO(), io.StringIO()
    renderer = Renderer(
        Console(file=out, force_terminal=tty, width=60, height=20,
                color_system="standard" if tty else None),
        Console(file=err, force_terminal=False, width=60))
    renderer.started("chat")
    renderer.token("The answer ")
    renderer.step("thought", {"text": "hmm, check", "reasoning": True})
    renderer.token("is 42.")
    renderer.message("The answer is 42.")
    renderer.finished("succeeded", None)
    if not tty:
        assert out.getvalue() == "The answer is 42.\n"
        assert err.getvalue() == "· thinking: hmm, check\n"
    else:
        shown = out.getvalue()
        assert "\x1b[2mThe answer" not in shown  # never dimmed
        assert "\x1b[2m· thinking: hmm, check\x1b[0m" in shown
        assert shown.rstrip("\n\x1b[?25h").rstrip().endswith("The answer is 42.")


def test_a_reasoning_thought_inside_a_tall_answer_on_a_terminal_leaves_the_answer_whole() -> None:
    """An answer taller than the screen is written as it comes on a terminal. A reasoning
    thought between two of its tokens ended the answer's line and was printed inside it:
    "wor", "· thinking: hmm", "ld.". Now the thinking is held until the answer is written,
    and shown after it."""
    import io

    from rich.console import Console

    from service.chat import Renderer

    out, err = io.StringIO(), io.StringIO()
    renderer = Renderer(
        Console(file=out, force_terminal=True, width=40, height=5, color_system=None),
        Console(file=err, force_terminal=False, width=60))
    renderer.started("chat")
    tokens = [f"line{i}\n\n" for i in range(8)] + ["wor", "ld."]  # taller than 5 rows
    for i, t in enumerate(tokens):
        if i == len(tokens) - 1:
            renderer.step("thought", {"text": "hmm", "reasoning": True})
        renderer.token(t)
    renderer.message("".join(tokens))
    renderer.finished("succeeded", None)
    assert out.getvalue().endswith("line7\n\nworld.\n· thinking: hmm\n"), out.getvalue()[-60:]
