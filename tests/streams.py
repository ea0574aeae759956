"""Reading what the service streams (not a test module): SSE bodies, WebSocket messages, and
the conversations they are about."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection

from .servers import RunningServer


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Frames of an SSE body: ``{"id", "event", "data"}`` (comments dropped)."""
    frames = []
    for block in text.split("\n\n"):
        frame: dict[str, Any] = {}
        data = []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            if key == "data":
                data.append(value)
            else:
                frame[key] = value
        if data:
            raw = "\n".join(data)
            frame["data"] = raw if raw == "[DONE]" else json.loads(raw)
            frames.append(frame)
    return frames


async def read_sse(resp: httpx.Response, on_frame: Callable[[dict[str, Any]], bool]) -> bool:
    """Feed each frame of a streamed SSE body to ``on_frame`` as it comes (``parse_sse``'s
    frames); True once ``on_frame`` asks to stop, False at the body's end."""
    buf = ""
    async for chunk in resp.aiter_text():
        buf += chunk
        while "\n\n" in buf:
            block, buf = buf.split("\n\n", 1)
            for frame in parse_sse(block + "\n\n"):
                if on_frame(frame):
                    return True
    return False


def ws_url(srv: RunningServer) -> str:
    return srv.url.replace("http://", "ws://") + "/api/ws"


async def ws_reply(ws: WebSocketConnection) -> tuple[str, dict[str, Any]]:
    """The next message as its text and as parsed strictly, as a browser's JSON.parse does."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    with trio.fail_after(10):
        text = await ws.get_message()
    assert isinstance(text, str)
    return text, json.loads(text, parse_constant=refuse)


def ended(msg: dict[str, Any]) -> bool:
    """A run's last message on a WebSocket: its ``run.finished``, or an error reply."""
    return msg["type"] in ("run.finished", "error")


async def ws_send(ws: WebSocketConnection, **msg: Any) -> None:
    """A ``message`` (a run to start) on the socket."""
    await ws.send_message(json.dumps({"type": "message", **msg}))


async def ws_until(ws: WebSocketConnection, last: Callable[[dict[str, Any]], bool] = ended,
                   guard: float = 20.0) -> list[dict[str, Any]]:
    """Every message up to the first that is ``last`` (by default a run's end), included."""
    out: list[dict[str, Any]] = []
    with trio.fail_after(guard):
        while True:
            _, msg = await ws_reply(ws)
            out.append(msg)
            if last(msg):
                return out


async def new_conversation(client: httpx.AsyncClient) -> str:
    return str((await client.post("/api/conversations", json={})).json()["id"])


async def stored_messages(client: httpx.AsyncClient, conv: str) -> list[tuple[str, str]]:
    """A conversation's messages as the store has them: (role, content)."""
    r = await client.get(f"/api/conversations/{conv}")
    return [(m["role"], m["content"]) for m in r.json()["messages"]]
