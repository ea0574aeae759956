"""A fleet whose servers have different contexts: a prompt one refuses as over its context is
offered to the others, but not to one whose own refusal said it takes fewer tokens than the
prompt has (an identical fleet would be asked N times for every long prompt). Simulators on
loopback, llama.cpp's protocol (its refusal says ``n_prompt_tokens`` and ``n_ctx``)."""

from __future__ import annotations

from pathlib import Path

import trio

from service.settings import Settings
from service.sim import Reply, Simulator, serve

from ..e2e import GUARD, e2e

V1 = "/v1/chat/completions"
LONG = " ".join(["word"] * 80)  # 81 of the simulator's tokens


async def _fleet(tmp_path: Path, *sims: Simulator) -> Path:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("".join(
        f'[[server]]\nname = "s{i}"\nkind = "llamacpp"\nurl = "{sim.url}"\npriority = {i}\n'
        for i, sim in enumerate(sims)))
    return fleet


async def test_a_prompt_over_one_members_context_is_answered_by_a_roomier_one(
    settings: Settings, tmp_path: Path,
) -> None:
    small, big = Simulator(("sim-model",)), Simulator(("sim-model",))
    small.default, big.default = Reply(text="small", context=40), Reply(text="big")
    async with trio.open_nursery() as nursery:
        with trio.fail_after(GUARD):
            await nursery.start(serve, small)
            await nursery.start(serve, big)
        async with e2e(settings, "llamacpp",
                       backends_file=await _fleet(tmp_path, small, big)) as env:
            with trio.fail_after(GUARD):
                r = await env.client.post(V1, json={
                    "messages": [{"role": "user", "content": LONG}]})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "big"
            backends = (await env.client.get("/api/backends")).json()["data"]
            # The refusal is the request's fault: not held against the small server.
            assert all(not b["failures"] and b["cooldown"] is None for b in backends)
        nursery.cancel_scope.cancel()
    assert [s.status for s in small.streams] == [400]


async def test_a_member_that_said_it_takes_fewer_tokens_is_not_asked_again(
    settings: Settings, tmp_path: Path,
) -> None:
    """Two servers of one context: the first long prompt is offered to both, and refused
    (the refusal that allowed the most is the client's 400); the next long prompt only to
    the first, the second having said it takes fewer tokens."""
    a, b = Simulator(("sim-model",)), Simulator(("sim-model",))
    a.default = b.default = Reply(text="ok", context=40)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(GUARD):
            await nursery.start(serve, a)
            await nursery.start(serve, b)
        async with e2e(settings, "llamacpp", backends_file=await _fleet(tmp_path, a, b)) as env:
            for _ in range(2):
                with trio.fail_after(GUARD):
                    r = await env.client.post(V1, json={
                        "messages": [{"role": "user", "content": LONG}]})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["type"] == "context_length_exceeded"
            with trio.fail_after(GUARD):
                r = await env.client.post(V1, json={
                    "messages": [{"role": "user", "content": "short"}]})
            assert r.status_code == 200, r.text
        nursery.cancel_scope.cancel()
    assert [s.status for s in a.streams] == [400, 400, 200]
    assert [s.status for s in b.streams] == [400]
