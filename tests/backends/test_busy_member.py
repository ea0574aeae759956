"""A member whose slots stay taken by calls it is answering (``BackendBusy``: our own queue for
it, not its failure) is failed over for that call but not counted toward its cool-down
(2026-12-06; the test failed before: three busy waits put a healthy, busy server aside for 30 s).
Slots held by calls its server leaves unanswered do count: tests/test_review_diff_dec06.py."""

from __future__ import annotations

import trio
from trio.testing import MockClock

from service.backends.auto import AutoBackend
from service.backends.interceptor import Interceptor
from service.backends.ollama import OllamaBackend
from service.backends.openai_compat import OpenAICompatBackend
from service.metrics import METRICS
from service.sim import Reply, Simulator

from ..backend_helpers import BUDGETS, mock_client, req


async def _answer(auto: AutoBackend) -> str:
    text = ""
    async with auto.stream(req()) as chunks:
        async for chunk in chunks:
            text += chunk.text
    return text


async def test_a_busy_member_is_failed_over_but_not_cooled_down(
    autojump_clock: MockClock,
) -> None:
    a_sim = Simulator(default=Reply(text="from a", tokens=2))
    a_sim.script(Reply(tokens=200, interval=0.05))  # the holder's answer: 10 s of tokens
    b_sim = Simulator(default=Reply(text="from b"))
    a = Interceptor(OllamaBackend("a", "http://a", mock_client(a_sim), BUDGETS), None, METRICS,
                    concurrency=1, queue_timeout=1.0)
    b = Interceptor(OpenAICompatBackend("b", "http://b", mock_client(b_sim), BUDGETS), None,
                    METRICS, concurrency=4, queue_timeout=1.0)
    auto = AutoBackend([a, b], failure_threshold=3, cooldown=30.0)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:

            async def hold_a() -> None:  # a's one slot, answering all along
                async with auto.stream(req()) as chunks:
                    async for _ in chunks:
                        pass

            nursery.start_soon(hold_a)
            await trio.sleep(0.5)
            assert auto.in_flight(a) == 1
            for _ in range(5):  # each waits a's queue out (busy), then b answers
                assert "from b" in await _answer(auto)
            status = auto.member_status(a)
            assert status.failures == 0, status
            assert status.cooldown is None, status
        # a's slot is free again: a is first in line and answers at once (not set aside).
        assert "from a" in await _answer(auto)
