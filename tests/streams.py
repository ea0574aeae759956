"""Reading what the service streams (not a test module): SSE bodies, WebSocket messages."""

from __future__ import annotations

import json
from typing import Any

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
