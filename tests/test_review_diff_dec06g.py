"""A review of the diff 5e019ab..HEAD (re-join patience, a failed supervisor's shutdown, /v1).

Each test fails on the code as it is, because of a defect these commits introduced or left.
Real sockets: the real server on loopback, the real terminal client, a TCP proxy between them;
a real hypercorn process for the supervisor's failure.
"""

from __future__ import annotations

import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from service import chat
from service.settings import BackendKind, Settings, load_settings
from service.sim import Simulator
from service.sim.scenario import Reply as SimReply

from .clients.test_chat_page import CHROMIUM, WAIT_MS, _in_browser, _send
from .e2e import _serve_sim, e2e
from .fakes import Reply, ScriptedBackend
from .operations.test_supervisor_failure import _with_broken_upkeep
from .proxies import CuttableProxy, port_of, serving
from .run_ends import first_reply, run_over
from .servers import ROOT, running_server
from .test_review_diff_dec05c import _renderer, _turn

playwright = pytest.importorskip("playwright.sync_api")

GUARD = 90  # seconds any wait may take before the test fails
_TICKS = 200  # 10 s at 50 ms a token


async def _more_shown(out: Any, outcome: list[Any], words: int) -> None:
    """Until the terminal has shown ``words`` more words (or the turn ended)."""
    before = len(out.getvalue().split())
    while len(out.getvalue().split()) < before + words and not outcome:  # noqa: ASYNC110
        await trio.sleep(0.02)


async def _ended(outcome: list[Any]) -> None:
    while not outcome:  # noqa: ASYNC110
        await trio.sleep(0.05)


# -- 1. a Retry-After of 30 s or more: the terminal gives up without trying again -------------


class SaysRetryAfter(CuttableProxy):
    """A proxy (a load balancer in maintenance) that answers the next ``refusals`` connections
    itself: 503 with ``Retry-After: {seconds}``; the rest pass."""

    def __init__(self, port: int, seconds: int) -> None:
        super().__init__(port)
        self.seconds = seconds
        self.refusals = 0
        self.answered = 0

    async def _serve(self, client: trio.SocketStream) -> None:
        if self.refusals <= 0:
            await super()._serve(client)
            return
        self.refusals -= 1
        self.answered += 1
        head = b""
        async with client:
            while b"\r\n\r\n" not in head and (data := await client.receive_some(65536)):
                head += data
            body = b'{"error": {"type": "maintenance", "message": "back soon"}}'
            await client.send_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                + f"Retry-After: {self.seconds}\r\nContent-Length: {len(body)}\r\n".encode()
                + b"Connection: close\r\n\r\n" + body)


@pytest.mark.slow
async def test_terminal_waits_out_a_long_retry_after_instead_of_cancelling(
        settings: Settings) -> None:
    """A proxy restart cuts the terminal's stream mid-answer, and the proxy answers the first
    re-join 503 with ``Retry-After: 40`` (a load balancer in maintenance). The user sees the
    turn fail at once and its run cancelled: the terminal never tried again. It should wait
    the bounded Retry-After (``_RETRY_AFTER_MAX``, 30 s: "a longer Retry-After is waited this
    long", chat.py says) and re-join, showing the whole answer; the run would have succeeded.
    Before this diff it did wait. Now ``_stream`` counts the pause it was told against the
    30 s without an event and gives up before sleeping, so any Retry-After of about 30 s or
    more (or a shorter one late in an outage) cancels a run without one more try."""
    backend = ScriptedBackend([Reply("tick " * _TICKS, gap=0.05)])
    async with running_server(settings, backend) as srv, srv.client() as client, \
            serving(SaysRetryAfter(port_of(srv), 40)) as proxy, trio.open_nursery() as nursery:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        renderer, out = _renderer()
        opts = chat.Options(url=proxy.url, key=None, agent=None, model=None,
                            conversation=conv, message=None)
        outcome: list[Any] = []
        nursery.start_soon(_turn, opts, renderer, conv, "count the ticks", outcome)
        with trio.fail_after(GUARD):
            await _more_shown(out, outcome, 5)
            proxy.refusals = 1
            proxy.cut()
            await _ended(outcome)
        reply = await first_reply(client, conv)
        run = await run_over(client, reply["run_id"])
    assert proxy.answered == 1, "the re-join never reached the proxy"
    assert outcome == [None], outcome
    assert run["status"] == "succeeded", run


def _retry_after_session(url: str, refuse_next: Any, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "how many ticks?")
    playwright.expect(answer).to_contain_text("tick tick tick")
    refuse_next()  # the stream drops; the re-join is answered 503, Retry-After: 40
    playwright.expect(page.get_by_test_id("send")).to_be_enabled(timeout=3 * WAIT_MS)
    return {"text": answer.locator(".answer").inner_text(),
            "notes": answer.locator(".note").all_inner_texts()}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_waits_out_a_long_retry_after_instead_of_giving_up(
        settings: Settings) -> None:
    """The chat page's stream is cut mid-run and the proxy answers the re-join 503 with
    ``Retry-After: 40``. The user sees "the stream ended before the run did (...); reload to
    re-join" at once, while the run goes on to its answer: the page never tried again. It
    should wait the Retry-After it bounds to 30 s (``wait``) and re-join, showing the whole
    answer, as it did before this diff. ``followEvents`` counts that pause against REJOIN_FOR
    (``Date.now() + pause - since > REJOIN_FOR``) and gives up before sleeping it."""
    async with e2e(settings, "llamacpp") as env, \
            serving(SaysRetryAfter(port_of(env.server), 40)) as proxy:
        env.sim.script(SimReply(text="tick " * _TICKS, interval=0.05))

        def refuse_next() -> None:
            def now() -> None:
                proxy.refusals = 1
                proxy.cut()
            trio.from_thread.run_sync(now)

        seen = await _in_browser(partial(_retry_after_session, proxy.url, refuse_next))
        stored = await env.the_reply()
        answered = proxy.answered
    assert answered == 1, "the re-join never reached the proxy"
    assert seen["notes"] == [], seen
    assert seen["text"].split() == stored["content"].split() == ["tick"] * _TICKS


# -- 2. a quiet run whose re-joins all succeed is given up after 30 s -------------------------


@pytest.mark.slow
async def test_terminal_keeps_following_a_quiet_run_whose_rejoins_succeed(
        tmp_path: Path) -> None:
    """A run is quiet for 40 s (a model loading: only keep-alives), and a proxy cuts the
    terminal's stream every 3 s. Every re-join is answered 200 by a live service, keep-alives
    flow, and yet after 30 s the user sees the turn fail and its run is cancelled: a run that
    would have answered. It should go on following (a re-join answered with a stream is the
    service there, not an outage) and show the answer. ``_stream`` starts its count again only
    when ``turn.last_id`` moved, so a stream that only brings keep-alives counts as a failed
    try: the "any number of cuts" the diff promises holds only for runs that emit events."""
    settings = load_settings(db=tmp_path / "s.db", sse_keepalive=0.5)
    backend = ScriptedBackend([Reply("the answer at last", first_delay=40)])
    async with running_server(settings, backend) as srv, srv.client() as client, \
            serving(CuttableProxy(port_of(srv))) as proxy, trio.open_nursery() as nursery:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        renderer, out = _renderer()
        opts = chat.Options(url=proxy.url, key=None, agent=None, model=None,
                            conversation=conv, message=None)
        outcome: list[Any] = []
        nursery.start_soon(_turn, opts, renderer, conv, "think long", outcome)
        with trio.fail_after(GUARD):
            while (await first_reply(client, conv))["run_id"] is None:  # noqa: ASYNC110
                await trio.sleep(0.05)
            while not outcome:
                await trio.sleep(3)
                proxy.cut()
        reply = await first_reply(client, conv)
        run = await run_over(client, reply["run_id"])
    assert outcome == [None], outcome
    assert run["status"] == "succeeded", run
    assert "the answer at last" in out.getvalue()


def _quiet_run_session(url: str, page: Any) -> dict[str, Any]:
    page.goto(url + "/")
    answer = _send(page, "think long")
    playwright.expect(page.get_by_test_id("send")).to_be_enabled(timeout=4 * WAIT_MS)
    return {"text": answer.locator(".answer").inner_text(),
            "notes": answer.locator(".note").all_inner_texts()}


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_page_keeps_following_a_quiet_run_whose_rejoins_succeed(
        settings: Settings) -> None:
    """The chat page follows a run that is quiet for 40 s (the model loading: only
    keep-alives), behind a proxy that cuts its stream every 3 s. Every re-join is answered 200
    by the live service, and yet after 30 s the user sees "the stream ended before the run
    did; reload to re-join", while the run goes on to its answer. The page should keep
    following (a re-join answered with a stream is no outage) and show the answer.
    ``followEvents`` starts its count again only when ``live.last_id`` moved, so a stream that
    brings only keep-alives counts as a failed try."""
    async with e2e(settings, "llamacpp", sse_keepalive=0.5) as env, \
            serving(CuttableProxy(port_of(env.server))) as proxy, \
            trio.open_nursery() as nursery:
        env.sim.script(SimReply(text="the answer at last", first_delay=40))

        async def cut_often() -> None:
            while True:
                await trio.sleep(3)
                proxy.cut()

        nursery.start_soon(cut_often)
        seen = await _in_browser(partial(_quiet_run_session, proxy.url))
        nursery.cancel_scope.cancel()
    assert seen["notes"] == [], seen
    assert "the answer at last" in seen["text"], seen


# -- 3. hypercorn's own entry point: a failed supervisor leaves the process up ----------------


@pytest.mark.slow
async def test_hypercorn_cli_process_whose_supervisor_failed_exits(tmp_path: Path) -> None:
    """Served the other supported way, ``hypercorn --config hypercorn.toml service.app:app``
    (API.md: it must work too), a process whose run supervisor fails (a real bug in one of its
    loops) stays up: its port answers, ``/healthz`` is 503 and every run is refused, forever;
    nothing restarts it. Under ``python -m service`` it now shuts down, exit 1
    (docs/deploy.md), so systemd or an orchestrator starts another. It should do the same
    here. ``Services.broken`` is only waited on by ``server.stop_if_broken``, which only
    ``server.run_server`` starts; ``drainfirst._serve`` (hypercorn's entry points) never
    watches it."""
    log = tmp_path / "hypercorn.log"
    with log.open("wb") as sink:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
             "--bind", "127.0.0.1:0", "service.app:app"],
            cwd=ROOT, env=_with_broken_upkeep(tmp_path), stdout=sink, stderr=sink)
    try:
        with trio.fail_after(GUARD):
            while (m := re.search(rb"Running on (http://127\.0\.0\.1:\d+)",
                                  log.read_bytes())) is None:
                if proc.returncode is not None:  # (up, failed and gone between two looks)
                    break
                await trio.sleep(0.05)
        health = None
        with trio.move_on_after(20):
            await proc.wait()
        if proc.returncode is None and m is not None:
            async with httpx.AsyncClient(base_url=m.group(1).decode()) as client:
                health = (await client.get("/healthz")).status_code
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(GUARD):
                await proc.wait()
    text = log.read_text()
    assert "injected: a bug in an upkeep loop" in text, text
    assert health is None, f"still up 20 s after its supervisor failed: /healthz {health}"
    assert proc.returncode is not None, text
    # The worker exits 1 with its one line; hypercorn's parent (0.18, one worker) then stops
    # too but reports 0: its ``run`` joins the exited worker, then returns the join of the
    # (no longer any) others. (The same for a bad setting; outside this service's reach.)
    assert "service: the run supervisor stopped: RuntimeError: injected" in text, text


# -- 4. /v1: a tool_choice whose "function" is not an object is a 500 ------------------------

_WEATHER: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("function", ["get_weather", ["get_weather"]])
async def test_v1_tool_choice_with_a_function_not_an_object_is_a_422(
        settings: Settings, function: Any) -> None:
    """A client sends ``tool_choice: {"type": "function", "function": "get_weather"}`` (the
    name where the object belongs). It gets a 500 ``internal_error``, which the OpenAI SDKs
    retry twice (three requests, the same each time). It should be a 422 naming
    ``tool_choice``, as every other malformed field is (docs/api.md: "Refused with 422 naming
    the field"). The new ``_a_named_tool_is_offered`` validator calls ``.get`` on
    ``value["function"]`` without checking it is an object: the AttributeError is no
    ValueError, so pydantic does not turn it into a validation error."""
    async with e2e(settings, "llamacpp") as env:
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "messages": [{"role": "user", "content": "weather?"}],
                "tools": [_WEATHER],
                "tool_choice": {"type": "function", "function": function}})
    assert r.status_code in (400, 422), (r.status_code, r.text[:300])
    assert "tool_choice" in r.text, r.text[:300]


# -- 5. a fleet whose servers all refuse the service's key: retried, three runs ---------------


async def test_fleet_whose_servers_all_refuse_the_key_is_not_retried(settings: Settings) -> None:
    """Two llama.cpp servers behind one ``SERVICE_LLAMACPP_URL`` (a fleet) share one API key,
    which expired: both answer 401. An OpenAI SDK client gets a 503 ``all_backends_failed``
    with no ``x-should-retry: false``, so it tries twice more: three runs stored and six calls
    refused for one request, the client waiting out the back-off, the same answer each time.
    It should be what a single server's 401 now is (``backend_auth_failed``, 502,
    ``x-should-retry: false``: one run). The diff fixed it only for one server: under a fleet
    or ``auto`` (the default backend), ``auto._all_failed`` turns every member's
    ``BackendAuthFailed`` into ``AllBackendsFailed``, which is worth a retry."""
    sims = [Simulator(("sim-model",)), Simulator(("sim-model",))]
    async with trio.open_nursery() as nursery:
        scopes = [await nursery.start(_serve_sim, sim, trio.Event()) for sim in sims]
        for sim in sims:
            sim.script(*[SimReply(status=401, error="invalid api key")] * 6)
        conf = settings.model_copy(update={
            "backend": BackendKind.llamacpp,
            "llamacpp_url": ",".join(sim.url for sim in sims)})
        try:
            async with running_server(conf, from_settings=True) as srv:
                sdk = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=2)
                with trio.fail_after(GUARD), pytest.raises(openai.APIStatusError) as got:
                    await sdk.chat.completions.create(
                        model="sim-model", messages=[{"role": "user", "content": "hi"}])
                tries = sum(len(sim.streams) for sim in sims)
        finally:
            for scope in scopes:
                scope.cancel()
    assert got.value.response.headers.get("x-should-retry") == "false", (
        got.value.status_code, got.value.body, f"{tries} calls refused")
    assert tries == 2, f"the SDK asked {tries // 2} times ({tries} calls refused)"


# -- 6. /v1/models/{id} while the backend refuses the service's key: 503, retried ------------


async def _refuse_every_request(stream: trio.SocketStream) -> None:
    """A model server whose API key the service has is wrong: 401 to everything."""
    head = b""
    async with stream:
        while b"\r\n\r\n" not in head and (data := await stream.receive_some(65536)):
            head += data
        body = b'{"error": {"message": "invalid api key", "type": "authentication_error"}}'
        await stream.send_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n".encode()
            + b"Connection: close\r\n\r\n" + body)


async def test_v1_models_retrieve_while_the_backend_refuses_the_key_is_not_retried(
        settings: Settings) -> None:
    """The llama.cpp server refuses the service's API key (401). ``client.models.retrieve``
    gets a 503 ``backend_unavailable`` "no backend answered: the model's server cannot be asked
    now", which the OpenAI SDK retries twice (three requests, each refused, the same each
    time). The server did answer: the answer should be what a chat completion now gets for
    the same cause (``backend_auth_failed``, ``x-should-retry: false``), so the operator is
    told the key is wrong and the client does not retry. ``retrieve_model`` (the 503 added in
    this diff) takes every ``list_models`` failure, ``BackendAuthFailed`` too, as "no backend
    answered" (``_models`` swallows the error and records only success)."""
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(
            trio.serve_tcp, _refuse_every_request, 0, host="127.0.0.1"))
        url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
        conf = settings.model_copy(update={"backend": BackendKind.llamacpp, "llamacpp_url": url})
        async with running_server(conf, from_settings=True) as srv:
            sdk = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=2)
            with trio.fail_after(GUARD), pytest.raises(openai.APIStatusError) as got:
                await sdk.models.retrieve("sim-model")
        nursery.cancel_scope.cancel()
    headers = got.value.response.headers
    assert (got.value.status_code, headers.get("x-should-retry")) == (502, "false"), (
        got.value.status_code, got.value.body)
    assert (got.value.body or {}).get("type") == "backend_auth_failed", got.value.body
