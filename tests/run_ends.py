"""What a test reads once a run is over, through the public API as a client would: the run's
stored record, and the conversation's replies. ``client`` is an httpx client with the service's
base URL (``Env.client``, ``RunningServer.client()``)."""

from __future__ import annotations

from typing import Any

import httpx
import trio

__all__ = ["GUARD", "first_reply", "only_reply", "replies", "run_over"]

GUARD = 60  # seconds a wait may take before the test fails (a process start included)


async def run_over(client: httpx.AsyncClient, run_id: str, *, guard: float = GUARD,
                   every: float = 0.05) -> dict[str, Any]:
    """The run's record once it is stored as over (neither ``queued`` nor ``running``)."""
    with trio.fail_after(guard):
        while True:
            run: dict[str, Any] = (await client.get(f"/api/runs/{run_id}")).json()
            if run["status"] not in ("queued", "running"):
                return run
            await trio.sleep(every)


async def replies(client: httpx.AsyncClient, conv: str) -> list[dict[str, Any]]:
    """The conversation's assistant messages, oldest first."""
    messages = (await client.get(f"/api/conversations/{conv}")).json()["messages"]
    return [m for m in messages if m["role"] == "assistant"]


async def only_reply(client: httpx.AsyncClient) -> dict[str, Any]:
    """The one reply of the one conversation there is (fails if there are more of either)."""
    (conv,) = (await client.get("/api/conversations")).json()["data"]
    (reply,) = await replies(client, conv["id"])
    return reply


async def first_reply(client: httpx.AsyncClient, conv: str) -> dict[str, Any]:
    """The conversation's first reply, or ``{"run_id": None}`` while there is none stored."""
    found = await replies(client, conv)
    return found[0] if found else {"run_id": None}
