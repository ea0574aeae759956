"""Review (dec06h) of the agents and the run lifecycle on the REAL engine: the embedded llama.cpp
server (``SERVICE_BACKEND=embedded`` / ``python -m service --demo``) on the tiny random-weights
model, the app under hypercorn on 127.0.0.1:0. Each test fails on the reviewed code because of
the defect its docstring names. Kept cheap: small answers, a few runs at a time, every wait
bounded. (A fourth, a long demo conversation outgrowing the slot's 8,192 tokens before
SERVICE_HISTORY_CHARS trims it, is left for a history trimmed by tokens: see the note.)"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from service.settings import load_settings

from .servers import running_server

pytestmark = [pytest.mark.embedded]

pytest.importorskip("xllamacpp", reason="needs the embedded extra: pip install -e '.[embedded]'")
pytest.importorskip("gguf", reason="needs the embedded extra: pip install -e '.[embedded]'")

GUARD = 120  # seconds: a generous bound on any one step (the engine runs on one CPU thread)

# Plain English, as a user of the demo pastes it (~3 characters a token for the tiny model's
# tokenizer, as for many real ones on prose).
PROSE = ("Please tell me more about the weather in town this afternoon, and what the parents "
         "should pack for the park. ")
# With a few figures, as a message about a meeting or a report has them.
FIGURES = PROSE + ("The meeting moved to 14:30 on Friday, room 2B; bring the Q3 figures "
                   "(revenue 48,200, costs 31,750). ")


def _clean_env(monkeypatch: pytest.MonkeyPatch, model: Path) -> None:
    monkeypatch.setenv("SERVICE_GGUF", str(model))
    for var in ("SERVICE_DEFAULT_MODEL", "SERVICE_EMBEDDED_CTX", "SERVICE_EMBEDDED_MAX_TOKENS",
                "SERVICE_HISTORY_CHARS", "SERVICE_BACKEND_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)


async def test_a_huge_max_tokens_is_not_wrapped_into_a_one_token_answer(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``/v1`` client asks for ``max_tokens`` far above anything it means to bound (a large
    number as "no real limit": 2**40, or 2**31 which is one past a C ``int``).

    Wrong: the service checks only ``max_tokens >= 1`` and passes the number on; llama.cpp
    reads it as a 32-bit int. 2**40 wraps to 0, and the client gets a 200 with ONE token and
    ``finish_reason: "length"`` (a silently truncated answer, stored as complete); 2**31
    wraps to -2147483648 and the run fails 400 ``backend_rejected_request`` "Value must be
    between -1 <= value <= 2147483647, but got -2147483648", a number the client never sent.

    Right: the service bounds the field itself (a 422 naming ``max_tokens``, as it does for 0)
    or clamps it to what a backend takes, so that the answer runs to the model's own limit
    (here the server's cap of 16 tokens), never to a wrapped-around one."""
    _clean_env(monkeypatch, tiny_model)
    settings = load_settings(db=tmp_path / "s.db", backend="embedded", gguf=tiny_model,
                             default_model="tiny", embedded_ctx=4 * 1024, embedded_max_tokens=16)
    outcomes = {}
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(GUARD)
        with trio.fail_after(GUARD):
            for asked in (2**40, 2**31):
                r = await c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hello"}], "max_tokens": asked})
                if r.status_code == 200:
                    outcomes[asked] = (200, r.json()["usage"]["completion_tokens"])
                else:
                    outcomes[asked] = (r.status_code, r.json()["error"]["type"])
    for asked, outcome in outcomes.items():
        assert outcome in ((200, 16), (422, "invalid_request")), (asked, outcome)


async def _events_until(c: httpx.AsyncClient, conv: str, body: dict[str, object],
                        until: frozenset[str], seen: list[tuple[str, dict[str, object]]],
                        started: trio.Event | None = None) -> None:
    """A native streamed run's events into ``seen``, up to the first of type in ``until``."""
    kind = ""
    async with c.stream("POST", f"/api/conversations/{conv}/messages",
                        json={**body, "stream": True}) as s:
        async for line in s.aiter_lines():
            if line.startswith("event:"):
                kind = line[len("event:"):].strip()
            elif line.startswith("data:"):
                seen.append((kind, json.loads(line[len("data:"):])))
                if started is not None and kind == "token":
                    started.set()
                if kind in until:
                    return


async def test_service_backend_concurrency_bounds_the_embedded_servers_calls(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``SERVICE_BACKEND=embedded`` with ``SERVICE_BACKEND_CONCURRENCY=1`` (docs/operations.md:
    "LLM calls in flight per backend (more wait in a queue, recorded)"): an operator on a small
    machine wants one generation at a time.

    Wrong: the setting is ignored for the embedded backend: ``build_backend`` wraps it with
    ``concurrency=EMBEDDED_SLOTS`` (4), which takes precedence over the setting
    (``concurrency or settings.backend_concurrency``). A second run starts generating at once
    next to the first, never ``queued``: four generations share the CPU, each slower, where
    the operator asked for one.

    Right: the embedded server's calls are bounded by the smaller of its slots and
    ``SERVICE_BACKEND_CONCURRENCY``: the second run waits in the service's queue, told its
    place (a ``queued`` event, position 1) until the first ends."""
    _clean_env(monkeypatch, tiny_model)
    settings = load_settings(db=tmp_path / "s.db", backend="embedded", gguf=tiny_model,
                             default_model="tiny", embedded_ctx=4 * 2048,
                             embedded_max_tokens=0, backend_concurrency=1)
    first: list[tuple[str, dict[str, object]]] = []
    second: list[tuple[str, dict[str, object]]] = []
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(GUARD)
        convs = [(await c.post("/api/conversations", json={})).json()["id"] for _ in range(2)]
        with trio.fail_after(GUARD):
            async with trio.open_nursery() as nursery:
                generating = trio.Event()
                # The first: a long answer (the model writes until its slot's 2,048 are full).
                nursery.start_soon(_events_until, c, convs[0], {"content": "hi"},
                                   frozenset({"run.finished"}), first, generating)
                await generating.wait()
                await _events_until(c, convs[1], {"content": "hi"},
                                    frozenset({"token", "queued", "run.finished"}), second)
                first_was_going = not any(kind == "run.finished" for kind, _ in first)
                nursery.cancel_scope.cancel()  # (the runs end cancelled: client disconnected)
    assert first_was_going, "(the first answer ended before the second began: no contention)"
    assert second[-1][0] == "queued", [kind for kind, _ in second]


async def test_a_question_too_long_for_the_model_does_not_fail_every_later_message(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``python -m service --demo``: a user pastes a table of numbers (10,500 characters,
    ~10,500 tokens) into a conversation; the run fails 400 ``context_length_exceeded``, as it
    should (the slot holds 8,192). The user then writes a short message, "hi".

    Wrong: "hi" fails too, with the same 400, and so does every later message on that
    conversation: ``build_history`` leaves out the failed run's (empty) reply but keeps its
    question, and the trimming keeps the newest earlier turns that fit 24,000 characters, so
    the pasted table is sent again with every new message. The conversation is dead for good
    (the page, the terminal client and every native client keep sending into it).

    Right: a later message gets an answer: the question whose run failed because it was too
    long is not sent again (or the history is trimmed to what the model takes)."""
    from service.demo import demo_overrides

    _clean_env(monkeypatch, tiny_model)
    settings = load_settings(db=tmp_path / "demo.db", **demo_overrides())
    async with running_server(settings, from_settings=True) as srv, srv.client() as c:
        c.timeout = httpx.Timeout(GUARD)
        conv = (await c.post("/api/conversations", json={"title": "table"})).json()["id"]
        with trio.fail_after(GUARD):
            r = await c.post(f"/api/conversations/{conv}/messages",
                             json={"content": "12, 34, 56, 78\n" * 700, "agent": "chat"})
            assert r.status_code == 400, r.text[:300]  # (as it should: the prompt is too long)
            assert r.json()["error"]["type"] == "context_length_exceeded"
            r = await c.post(f"/api/conversations/{conv}/messages",
                             json={"content": "hi", "agent": "chat"})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["run"]["status"] == "succeeded"
