"""Review (dec06m) of the llama.cpp answer-room check (``git diff 5f84ec5..HEAD``:
``service/backends/room.py``, ``OpenAICompatBackend.stream``, ``AgentContext.call_llm``).

Each test fails on the reviewed code because of the defect its docstring names. The real
llama.cpp engine (the tiny model) on loopback, the service's own backend wiring
(``build_backend``); every wait bounded with ``trio.fail_after``; no sleeps, no timings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from service.agents.base import AgentContext
from service.backends import build_backend
from service.backends.base import ChatMessage, ChatRequest
from service.metrics import Metrics
from service.settings import load_settings
from service.tools import ToolRegistry

from .agents.test_answer_room import follow_up_to

pytestmark = [pytest.mark.embedded]

pytest.importorskip("xllamacpp", reason="needs the embedded extra: pip install -e '.[embedded]'")
pytest.importorskip("gguf", reason="needs the embedded extra: pip install -e '.[embedded]'")

GUARD = 120  # seconds: a generous bound on any one step (the engine runs on one CPU thread)
SLOT = 2048  # the embedded default's slot (4,096 split two ways)
CAP = 48  # the answers' cap (SERVICE_EMBEDDED_MAX_TOKENS, llama.cpp's n_predict)
ALIAS = "tiny"


class _Handle:
    """What ``AgentContext`` uses of a run's handle."""

    def __init__(self, run_id: str) -> None:
        self.id = run_id
        self.conversation_id = "conv_1"
        self.closed = False
        self.agent = "chat"
        self.model: str | None = None
        self.usage: dict[str, Any] = {}
        self.result_extra: dict[str, Any] = {}
        self.reasoning_parts: list[str] = []
        self.scope = trio.CancelScope()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.queued = trio.Event()

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        self.events.append((type_, data))
        if type_ == "queued":
            self.queued.set()


class _Recorder:
    def __init__(self) -> None:
        self.rows: list[Any] = []

    async def record_llm_call(self, rec: Any) -> None:
        self.rows.append(rec)


async def _prompt_tokens(c: httpx.AsyncClient, messages: list[ChatMessage]) -> int:
    """The prompt's tokens as llama.cpp counts them (its template, then its tokenizer)."""
    body = {"messages": [{"role": m.role, "content": m.content} for m in messages]}
    prompt = (await c.post("/apply-template", json=body)).json()["prompt"]
    r = await c.post("/tokenize", json={"content": prompt, "add_special": True,
                                        "parse_special": True})
    return len(r.json()["tokens"])


async def test_a_call_refused_for_room_goes_back_to_the_end_of_the_queue(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Was: a stored conversation's turn whose history leaves the answer no room waits in the
    backend's queue for a slot, gets it, is refused by the room check (which needs no slot:
    ``/props``, ``/apply-template`` and ``/tokenize`` are answered by llama.cpp's HTTP
    threads), gives the slot to the next call in the queue, and its shortened retry queues
    again at the END of the queue (the run's clients are told ``queued`` a second time).
    Under load every turn of a long conversation (the fit is rediscovered per run) waits
    for the queue twice, once more per shortening level, and each wait can end in
    ``backend_busy`` on its own; a call that came later is answered first.

    Right: the call first in line is answered first; its check does not cost it its place
    (the check made before a slot is taken, or the slot kept for the retry).

    Shown: one slot (SERVICE_BACKEND_CONCURRENCY=1, as ``build_backend`` wires the embedded
    server), held by a call; the long turn C queues, then a short call D; the slot is freed.
    D is answered before C.

    Root cause: ``OpenAICompatBackend.stream`` runs ``ContextRoom.refuse_without_room``
    inside ``Interceptor.stream`` (service/backends/interceptor.py), after ``_acquire`` took
    the limiter's slot; the refusal releases it and ``AgentContext.call_llm`` retries from
    scratch (service/agents/base.py), back through ``Interceptor._acquire``."""
    from service.backends.embedded import embedded_llama_server

    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS",
                "SERVICE_HISTORY_CHARS", "SERVICE_BACKEND_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings(db=tmp_path / "s.db", backend="embedded", gguf=tiny_model,
                             default_model=ALIAS, embedded_max_tokens=CAP,
                             backend_concurrency=1)
    recorder = _Recorder()
    with trio.fail_after(GUARD):
        async with (embedded_llama_server(tiny_model, n_predict=CAP, alias=ALIAS) as llama,
                    httpx.AsyncClient(base_url=llama.base_url, timeout=GUARD,
                                      trust_env=False) as probe,
                    httpx.AsyncClient(timeout=GUARD, trust_env=False) as client):
            backend = build_backend(settings, client, recorder=recorder, metrics=Metrics(),
                                    embedded_url=llama.base_url)
            # A stored conversation: a pasted table, its answer, a follow-up bringing the
            # prompt to 8 tokens under the slot's end (room for 8 of the answer's 48).
            older = [ChatMessage("user", "12.5, 33.1, 47.0, 58.9\n" * 40),
                     ChatMessage("assistant", "The table lists four columns. " * 6)]
            filler = 0
            for _ in range(6):  # "ab " is one token
                follow_up = ChatMessage("user", "and then? " + "ab " * filler)
                have = await _prompt_tokens(probe, [*older, follow_up])
                if have == SLOT - 8:
                    break
                filler += SLOT - 8 - have
            assert have == SLOT - 8, have
            handle = _Handle("run_c")
            async with trio.open_nursery() as nursery:
                ctx = AgentContext(handle=handle, backend=backend,  # type: ignore[arg-type]
                                   tools=ToolRegistry([]), history=[*older, follow_up],
                                   nursery=nursery, metrics=Metrics(),
                                   history_trimmable=True)
                held, release, d_queued = trio.Event(), trio.Event(), trio.Event()
                answered: list[str] = []

                async def hold() -> None:
                    request = ChatRequest((ChatMessage("user", "hi"),), run_id="hold")
                    async with backend.stream(request):
                        held.set()
                        await release.wait()

                async def turn_c() -> None:
                    await ctx.call_llm(ctx.history)
                    answered.append("C")

                async def call_d() -> None:
                    request = ChatRequest((ChatMessage("user", "hello"),), run_id="other",
                                          on_queued=lambda _place: d_queued.set())
                    async with backend.stream(request) as chunks:
                        async for _ in chunks:
                            pass
                    answered.append("D")

                nursery.start_soon(hold)
                await held.wait()
                nursery.start_soon(turn_c)
                await handle.queued.wait()  # C waits for the slot, first in line
                nursery.start_soon(call_d)
                await d_queued.wait()  # D waits behind it
                release.set()
    rows = [(r.run_id, r.outcome.value) for r in recorder.rows]
    # C's long history was refused once by the check, before it was sent: no LLM call, no row
    # (since; it was an error row).
    assert ("run_c", "error") not in rows, rows
    assert ("run_c", "ok") in rows, rows
    assert len(ctx.history) == 1  # the older turns left out
    assert ctx.usage.get("completion_tokens") == CAP, ctx.usage  # and answered whole after
    # C came first: answered first, and told its place once.
    assert answered == ["C", "D"], (answered, rows)
    assert [e for e in handle.events if e[0] == "queued"] == [("queued", {"position": 1})]


async def test_a_cap_at_the_slots_size_turns_the_check_off(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Was: with SERVICE_EMBEDDED_MAX_TOKENS at (or past) a slot's size (2,048 here: "no
    practical cap"), a stored conversation's follow-up that brings its history to 8 tokens
    under the slot's end gets an answer of 8 tokens, stored ``complete``: exactly the cut
    answer the change is meant to prevent, although the older turns could be left out.

    Right: a cap the slot cannot hold is no cap: the answer is given the room it gets without
    one (a quarter of the slot, docs/api.md), and the history is shortened for it.

    Shown: a conversation answered under a cap of 48 (a pasted table and its 48 tokens);
    the service restarted with the cap at 2,048 on the same database; the follow-up.

    Root cause: ``ContextRoom.refuse_without_room`` (service/backends/room.py) returns at
    once when ``room = n_ctx - reserve <= 0`` ("no prompt could leave it"), and
    ``SlotProps.reserve`` takes the configured cap as it is, never bounded by the slot."""
    from .servers import running_server

    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS",
                "SERVICE_HISTORY_CHARS", "SERVICE_BACKEND_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)
    db = tmp_path / "s.db"

    def settings(cap: int) -> Any:
        return load_settings(db=db, backend="embedded", gguf=tiny_model, default_model=ALIAS,
                             embedded_max_tokens=cap)

    async with running_server(settings(CAP), from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(GUARD)
        with trio.fail_after(GUARD):
            conv = (await c.post("/api/conversations", json={"agent": "chat"})).json()["id"]
            r = await c.post(f"/api/conversations/{conv}/messages",
                             json={"content": "12.5, 33.1, 47.0, 58.9\n" * 70})
            assert r.json()["run"]["usage"]["completion_tokens"] == CAP, r.text[:300]
            follow_up = await follow_up_to(c, conv, SLOT - 8)
    async with running_server(settings(SLOT), from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(GUARD)
        with trio.fail_after(GUARD):
            r = await c.post(f"/api/conversations/{conv}/messages", json={"content": follow_up})
            assert r.status_code == 200, r.text[:300]
            run = r.json()["run"]
    assert run["status"] == "succeeded", run
    # Not the slot's last 8 tokens: the room an answer is given without a cap.
    assert run["usage"]["completion_tokens"] >= SLOT // 4, run["usage"]
