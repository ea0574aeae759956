"""Room for the answer in a llama.cpp server's context.

llama.cpp's server refuses a prompt longer than its slot's context, but accepts one that fills
it, and then stops the answer where the slot ends: a follow-up after a long paste, its history
just under the demo's 8,192 tokens, got a one-token answer (``finish_reason: "length"``). A
stored conversation's history can be shortened (``AgentContext.call_llm`` leaves its oldest
turns out when a call is refused); for that, a call whose prompt leaves the answer no room is
refused here, before it is sent, as the server refuses one that does not fit at all.

The answer's room is the request's ``max_tokens`` or the server's own cap (``--n-predict``:
the embedded server's SERVICE_EMBEDDED_MAX_TOKENS, as configured, since ``/props`` does not
tell it), the smaller of the two; with neither, a quarter of the slot. The slot's context
comes from ``GET /props`` (read again every ``PROPS_TTL``), the prompt's tokens from the server:
``POST /apply-template`` (the request's messages and tools as its chat template writes them)
then ``POST /tokenize``. Both are answered by the server's HTTP threads, not its slots. They are
asked only when a cheap bound says the prompt might not leave the room: a token is at least one
byte of text, so the request's messages and tools as JSON, plus ``TEMPLATE_SLACK`` for what a
template adds, bound the prompt's tokens.

A server that has none of these endpoints (another OpenAI-compatible server: vLLM and OpenAI
refuse ``max_tokens`` past the context themselves), or that does not answer them in time, is not
checked: the call goes as it is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from ..errors import BackendError, ContextLengthExceeded
from .http import request_json

__all__ = ["ContextRoom", "SlotProps"]

log = logging.getLogger(__name__)

# Tokens a chat template may add over the messages' JSON (a date line, a tools preamble).
TEMPLATE_SLACK = 256
PROPS_TTL = 300.0  # seconds: a restarted server may have another context
RETRY_AFTER = 60.0  # seconds before a server without /props (or that failed it) is asked again
TIMEOUT = 2.0  # seconds for each of the small requests


@dataclass(frozen=True, slots=True)
class SlotProps:
    n_ctx: int  # one slot's context, in tokens
    n_predict: int | None  # the server's cap on an answer, when /props tells it (None: none)

    def reserve(self, *caps: int | None) -> int:
        """The room an answer takes: the smallest of its caps (the request's, the server's);
        with none, a quarter of the slot."""
        caps = (*caps, self.n_predict)
        known = [c for c in caps if c is not None and c > 0]
        return min(known) if known else self.n_ctx // 4


def slot_props(body: Any) -> SlotProps | None:
    """A llama.cpp ``/props`` body's slot context and answer cap, else None."""
    settings = body.get("default_generation_settings") if isinstance(body, dict) else None
    if not isinstance(settings, dict):
        return None
    n_ctx = settings.get("n_ctx")
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx <= 0:
        return None
    params = settings.get("params")
    n_predict = params.get("n_predict") if isinstance(params, dict) else None
    if not isinstance(n_predict, int) or isinstance(n_predict, bool) or n_predict <= 0:
        n_predict = None
    return SlotProps(n_ctx, n_predict)


class ContextRoom:
    """One OpenAI-compatible server's check (see the module's docstring)."""

    def __init__(self, backend: str, url: str, client: httpx.AsyncClient,
                 headers: dict[str, str], *, cap: int | None = None) -> None:
        self.backend = backend
        self.cap = cap  # the server's cap on an answer, as configured (None: not known)
        self.url = url
        self.client = client
        self.headers = headers  # the adapter's own (its Authorization, changed with it)
        self._props: SlotProps | None = None
        self._until = -float("inf")  # trio time when /props is read again
        self._reading = trio.Lock()  # one read of /props at a time (a burst of runs at start)

    async def refuse_without_room(self, body: dict[str, Any], max_tokens: int | None) -> None:
        """Raise ContextLengthExceeded when ``body`` (a chat request's) leaves its answer no
        room in the server's slot; return when it does, or when that cannot be told."""
        props = await self._slot()
        if props is None:
            return
        reserve = props.reserve(max_tokens, self.cap)
        room = props.n_ctx - reserve
        if room <= 0:
            return  # no prompt could leave it: the server says what it says
        asked = {"messages": body.get("messages", []), "tools": body.get("tools", [])}
        if len(json.dumps(asked).encode()) + TEMPLATE_SLACK <= room:
            return
        tokens = await self._count(body)
        if tokens is None or tokens <= room:
            return
        raise ContextLengthExceeded(
            f"the prompt ({tokens} tokens) leaves its answer {max(props.n_ctx - tokens, 0)} of "
            f"the {reserve} tokens it may take in the model's context ({props.n_ctx} tokens "
            "a slot)", backend=self.backend, param="messages")

    async def _slot(self) -> SlotProps | None:
        if trio.current_time() < self._until:
            return self._props
        async with self._reading:
            if trio.current_time() < self._until:
                return self._props  # read meanwhile
            try:
                props = slot_props(await self._json("GET", "/props"))
            except BackendError as exc:
                log.debug("%s: no /props (%s): answers are not given room", self.backend, exc)
                props = None
            self._checked_for(PROPS_TTL if props is not None else RETRY_AFTER, props)
            return props

    def _checked_for(self, seconds: float, props: SlotProps | None) -> None:
        self._props, self._until = props, trio.current_time() + seconds

    async def _count(self, body: dict[str, Any]) -> int | None:
        """The prompt's tokens as the server counts them, else None."""
        asked = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        try:
            prompt = (await self._json("POST", "/apply-template", asked)).get("prompt")
            if not isinstance(prompt, str):
                return None
            tokens = (await self._json("POST", "/tokenize", {
                "content": prompt, "add_special": True, "parse_special": True})).get("tokens")
        except (BackendError, AttributeError) as exc:
            # Not asked again for a while: a server whose /tokenize hangs would cost every
            # call TIMEOUT more.
            log.info("%s: a prompt's tokens could not be counted (%s); answers are not given "
                     "room for %.0f s", self.backend, exc, RETRY_AFTER)
            self._checked_for(RETRY_AFTER, None)
            return None
        return len(tokens) if isinstance(tokens, list) else None

    async def _json(self, method: str, path: str, body: Any = None) -> Any:
        return await request_json(
            self.client, method, f"{self.url}{path}", backend=self.backend,
            deadline=trio.current_time() + TIMEOUT, json_body=body, headers=self.headers)
