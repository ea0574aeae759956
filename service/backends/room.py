"""Room for the answer in a llama.cpp server's context.

llama.cpp's server refuses a prompt longer than its slot's context, but accepts one that fills
it, and then stops the answer where the slot ends: a follow-up after a long paste, its history
just under the demo's 8,192 tokens, got a one-token answer (``finish_reason: "length"``). A
stored conversation's history can be shortened (``AgentContext.call_llm`` leaves its oldest
turns out when a call is refused); for that, a call whose prompt leaves the answer no room is
refused here, before it is sent, as the server refuses one that does not fit at all.

The answer's room is the request's ``max_tokens`` or the server's own cap (``--n-predict``:
the embedded server's SERVICE_EMBEDDED_MAX_TOKENS, as configured, since ``/props`` does not
tell it), the smaller of the two, and at most a quarter of the slot (a quarter with neither).
The slot's context comes from ``GET /props`` (read again every ``PROPS_TTL``), the prompt's
tokens from the server: ``POST /apply-template`` (the request's messages and tools as its chat
template writes them) then ``POST /tokenize``. All three are answered by the server's HTTP
threads, not its slots (3-6 ms with every slot busy generating), and are asked before the call
waits for a slot of its own (``Interceptor.stream``): a call refused here and shortened keeps
its place in the queue. They are asked only when a cheap bound says the prompt might not
leave the room: a token is at least one byte of text, so the request's messages and tools as
JSON, plus ``TEMPLATE_SLACK`` for what a template adds, bound the prompt's tokens.

A server that has none of these endpoints (another OpenAI-compatible server), or that does not
answer them in time, is not checked: the call goes as it is, and its answer may be cut where
the context ends (vLLM and OpenAI refuse only a prompt over the context: a stored
conversation's calls send no ``max_tokens``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import trio

from ..errors import BackendError, ContextLengthExceeded
from .http import request_json

__all__ = ["ContextRoom", "reserve", "slot_context"]

log = logging.getLogger(__name__)

# Tokens a chat template may add over the messages' JSON (a date line, a tools preamble).
TEMPLATE_SLACK = 256
PROPS_TTL = 300.0  # seconds: a restarted server may have another context
RETRY_AFTER = 60.0  # seconds before a server without /props (or that failed it) is asked again
TIMEOUT = 2.0  # seconds for each of the small requests


def reserve(n_ctx: int, *caps: int | None) -> int:
    """The room an answer gets in a slot of ``n_ctx`` tokens: the smallest of its caps (the
    request's ``max_tokens``, the server's), at most a quarter of the slot (a cap of the whole
    slot, "no cap" in effect, turned the check off), a quarter with none."""
    return min([c for c in caps if c is not None and c > 0] + [n_ctx // 4])


def slot_context(body: Any) -> int | None:
    """A llama.cpp ``/props`` body's slot context (``default_generation_settings.n_ctx``, in
    tokens), else None. (Its ``params.n_predict`` is not the server's ``--n-predict``: -1 on a
    server started with 48.)"""
    settings = body.get("default_generation_settings") if isinstance(body, dict) else None
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 4:
        return None
    return n_ctx


class ContextRoom:
    """One OpenAI-compatible server's check (see the module's docstring)."""

    def __init__(self, backend: str, url: str, client: httpx.AsyncClient,
                 headers: dict[str, str], *, cap: int | None = None) -> None:
        self.backend = backend
        self.cap = cap  # the server's cap on an answer, as configured (None: not known)
        self.url = url
        self.client = client
        self.headers = headers  # the adapter's own (its Authorization, changed with it)
        self._n_ctx: int | None = None  # a slot's context, as /props said it
        self._until = -float("inf")  # trio time when /props is read again
        self._reading = trio.Lock()  # one read of /props at a time (a burst of runs at start)

    async def refuse_without_room(self, body: dict[str, Any], max_tokens: int | None) -> None:
        """Raise ContextLengthExceeded when ``body`` (a chat request's) leaves its answer no
        room in the server's slot; return when it does, or when that cannot be told."""
        n_ctx = await self._slot()
        if n_ctx is None:
            return
        answer = reserve(n_ctx, max_tokens, self.cap)
        room = n_ctx - answer
        asked = {"messages": body.get("messages", []), "tools": body.get("tools", [])}
        if len(json.dumps(asked).encode()) + TEMPLATE_SLACK <= room:
            return
        tokens = await self._count(body)
        if tokens is None or tokens <= room:
            return
        too_long = ContextLengthExceeded(
            f"the prompt ({tokens} tokens) leaves its answer {max(n_ctx - tokens, 0)} of the "
            f"{answer} tokens it is given in the model's context ({n_ctx} tokens a slot)",
            backend=self.backend, param="messages")
        too_long.tokens, too_long.unsent = (tokens, room), True
        raise too_long

    async def _slot(self) -> int | None:
        if trio.current_time() < self._until:
            return self._n_ctx
        async with self._reading:
            if trio.current_time() < self._until:
                return self._n_ctx  # read meanwhile
            try:
                n_ctx = slot_context(await self._json("GET", "/props"))
            except BackendError as exc:
                log.debug("%s: no /props (%s): answers are not given room", self.backend, exc)
                n_ctx = None
            self._checked_for(PROPS_TTL if n_ctx is not None else RETRY_AFTER, n_ctx)
            return n_ctx

    def _checked_for(self, seconds: float, n_ctx: int | None) -> None:
        self._n_ctx, self._until = n_ctx, trio.current_time() + seconds

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
