"""Backend selection and fleets (a review of 2026-12-06): each test asserts the behaviour the docs
promise and failed on the code it was written against, because of the defect its docstring
names. Real simulated upstreams on 127.0.0.1 (``open_simulator``), the real adapters."""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from service.backends import build_backend, client_from_settings
from service.backends.base import ChatMessage, ChatRequest
from service.backends.http import Budgets, make_client
from service.backends.ollama import OllamaBackend
from service.backends.router import FleetBackend, Member
from service.errors import BackendError
from service.metrics import Metrics
from service.settings import load_settings
from service.sim import Reply, Simulator, open_simulator
from service.sim.scenario import Hang, SimResponse, Sleep, Step

from ..backend_helpers import FakeRecorder, req, serve_in, until_refused

GUARD = 20  # seconds any test here may take before it fails
BUDGETS = Budgets(connect=3.0, first_chunk=10.0, gap=5.0, call=100.0)


# -- 1. an Ollama whose /api/ps does not answer --------------------------------------------------


class _SlowLists(Simulator):
    """An Ollama that answers chats at once, and ``/api/tags`` / ``/api/ps`` after the given
    steps (``Hang()``: accepted, never answered: a scheduler busy loading a model, a proxy that
    does not pass that path on)."""

    def __init__(self, tags: list[Step], ps: list[Step]) -> None:
        super().__init__(default=Reply(text="from a"))
        self.delays = {"/api/tags": tags, "/api/ps": ps}

    def _get(self, path: str) -> SimResponse:
        response = super()._get(path)
        response.head = [*self.delays.get(path, []), *response.head]
        return response


@pytest.mark.parametrize(("tags", "ps", "inventory_timeout"), [
    # /api/tags at once, /api/ps never (the bound shortened only to keep the test short:
    # /api/ps's own deadline, health_timeout = 2 s, is past either bound).
    ([], [Hang()], 0.5),
    # Each within the health probe's 2 s, together past build_backend's bound of 2 s.
    ([Sleep(1.2)], [Sleep(1.2)], 2.0),
], ids=["ps-hangs", "each-within-the-probe-bound"])
async def test_an_ollama_whose_loaded_list_is_slow_is_not_marked_unreachable(
        tags: list[Step], ps: list[Step], inventory_timeout: float) -> None:
    """``OllamaBackend.inventory`` (service/backends/ollama.py:247-260) reads ``/api/tags`` and then
    ``/api/ps``; a failed ``/api/ps`` is tolerated there ("loaded" unknown: ``return models,
    None``). But ``/api/ps`` gets its own deadline of ``health_timeout`` (2 s) *after*
    ``/api/tags`` answered, while ``FleetBackend._refresh_one`` (service/backends/router.py:257)
    bounds the whole ``inventory()`` by ``inventory_timeout`` (``min(2.0, connect)`` in
    ``build_backend``): ``/api/ps`` is always cut by the outer scope first, the answered
    ``/api/tags`` is thrown away, and the server is marked ``reachable=False, ready=False`` ("no
    model list within ...") for ``health_ttl``, again at every refresh. Its own health probe
    says ready; it serves chats; yet calls never go to it while another server is up,
    ``/api/backends`` says unreachable and (alone in a fleet, the default ``auto``) ``/readyz``
    says down. The same happens when ``/api/tags`` and ``/api/ps`` each answer within the
    probe's bound but together take longer than it (1.2 s + 1.2 s).

    Expected (router.py's docstring: only a server "whose model list cannot be read (refused,
    TLS, timeout)" is marked not ready; architecture.md, "Backend fleets": "a server answering it
    in 1.4 s had been healthy by the probe and marked not ready by its model list at every
    refresh" was the bug the 2-s bound fixed): the model list was read, so the server keeps its
    models and stays among the servers a call may go to."""
    with trio.fail_after(GUARD):
        async with (open_simulator(_SlowLists(tags, ps)) as a,
                    open_simulator(Simulator(default=Reply(text="from b"))) as b,
                    make_client(BUDGETS) as client):
            fleet = FleetBackend(
                [OllamaBackend("ollama-a", a.url, client, BUDGETS),
                 OllamaBackend("ollama-b", b.url, client, BUDGETS)],
                [Member(kind="ollama"), Member(kind="ollama")],
                default_model="sim-model", inventory_timeout=inventory_timeout)
            own_probe = await fleet.backends[0].health()
            await fleet.refresh_if_stale()
            order = [m.name for m in fleet.route(req())]
            shown = (await fleet.health_all())[0]  # what /api/backends and /readyz show
    assert own_probe.ready, own_probe  # its own health probe: ready
    why = f"order {order}, shown {shown}, inventory {fleet.inventories[0]}"
    assert "ollama-a" in order, f"a server whose /api/tags answered was set aside: {why}"
    assert shown.reachable, why
    assert fleet.inventories[0].models == frozenset({"sim-model"}), fleet.inventories[0]


# -- 2. new conversations on an idle fleet of three servers --------------------------------------


async def test_new_conversations_spread_evenly_over_three_idle_servers(tmp_path: Path) -> None:
    """With the servers idle alike (same priority, free slots, the model loaded, nothing in
    flight), a new conversation goes where the tie-break sends it: ``route``
    (service/backends/router.py:165-166) ranks the servers by ``-zlib.crc32(name, salt)`` with
    ``salt = zlib.crc32(conversation)``. CRC-32 is affine in its starting value: for names of
    one length, ``crc32(name, salt) == crc32(name) ^ mask(salt)``, one mask for every server.
    The winner is then decided by the bits where the names' own CRCs differ, not by a fresh
    draw per server: with three servers one of them gets half of all new conversations and the
    other two a quarter each (``ollama-1`` 50 %, ``ollama-2`` / ``ollama-3`` 25 % each over
    20,000 random ids; five servers: 12.5/25/25/25/12.5 %). Each conversation then stays on
    its server (affinity), so that server carries twice the others' load.

    Expected (router.py's docstring, step 3e: "rendezvous hashing of the conversation id and
    the servers' names (... and conversations spread evenly)"; architecture.md, "Backend
    fleets": equal servers "share the load"; the fleet file's ``priority``: "equal priorities
    share the load"): about a third each. 300 conversations with fixed ids, one after another
    (so every call finds the fleet idle): each server gets at most 42 % (a fair hash gives
    100 +- 8 each; this one gave about half to one server)."""
    conversations = 300
    served: Counter[str] = Counter()
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            sims = [await stack.enter_async_context(open_simulator(
                Simulator(default=Reply(tokens=1)))) for _ in range(3)]
            conf = load_settings(db=tmp_path / "service.db", backend="ollama",
                                 ollama_url=",".join(sim.url for sim in sims))
            client = await stack.enter_async_context(client_from_settings(conf))
            fleet = build_backend(conf, client, recorder=FakeRecorder(), metrics=Metrics())
            assert isinstance(fleet, FleetBackend)
            stack.push_async_callback(fleet.aclose)
            for i in range(conversations):
                request = ChatRequest(messages=(ChatMessage("user", "hello"),),
                                      model="sim-model", conversation_id=f"conversation-{i}")
                served[(await fleet.chat(request)).backend] += 1
                assert all(fleet.in_flight(b) == 0 for b in fleet.backends)  # idle again
    assert set(served) <= {"ollama-1", "ollama-2", "ollama-3"}, served
    assert max(served.values()) <= 0.42 * conversations, (
        f"new conversations on three idle servers: {dict(served)}")


# -- 3. the model's only server down, a lower tier that does not have it ---------------------------







async def test_a_model_whose_server_is_down_is_503_not_model_not_found(tmp_path: Path) -> None:
    """``SERVICE_BACKEND=auto``: Ollama (priority 0) serves ``llama3:8b`` (known from its model
    list); the llama.cpp tier (priority 1) is an OpenAI-compatible server with another model,
    which answers an unknown name 404 (vLLM, LM Studio, llama-swap, or the embedded server's
    own refusal: architecture.md, "the embedded backend refuses other names itself, 404").
    Ollama goes down. Once the fleet knows it is down, ``route`` (service/backends/router.py:
    148-157) tries it and then the lower tier; Ollama is refused, the lower tier says 404, and
    ``_all_failed`` (service/backends/auto.py:363-370: "every backend that answered said the
    model is unknown ... the answer is ModelNotFound (404)") makes the call a 404
    ``model_not_found``, for every call as long as Ollama is down (only the very first call
    after it went down is a 503).

    Expected: 503 (architecture.md, "What an upstream failure becomes": "No backend reachable
    (refused, unreachable, 503, loading) is 503"; api.md's error table: 404
    ``model_not_found`` is "a model no backend has", and this model is Ollama's; router.py's
    own rule: "with its only server down, the call goes there (and fails 503, to be retried),
    not to servers without it (a 404 model_not_found a client takes for good)")."""
    ollama = Simulator(("llama3:8b",), default=Reply(tokens=2))
    other = Simulator(("tiny",), default=Reply(tokens=2))  # strict: another name is a 404
    kill = trio.CancelScope()
    outcomes: list[tuple[int, str]] = []
    request = ChatRequest(messages=(ChatMessage("user", "hello"),), model="llama3:8b")
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery, open_simulator(other) as llama:
            port = await nursery.start(serve_in, ollama, kill)
            conf = load_settings(db=tmp_path / "service.db", backend="auto",
                                 ollama_url=ollama.url, llamacpp_url=llama.url)
            async with client_from_settings(conf) as client:
                fleet = build_backend(conf, client, recorder=FakeRecorder(), metrics=Metrics())
                assert isinstance(fleet, FleetBackend)
                try:
                    assert (await fleet.chat(request)).backend == "ollama"  # while it is up
                    kill.cancel()
                    await until_refused(port)
                    for _ in range(3):
                        try:
                            result = await fleet.chat(request)
                        except BackendError as exc:
                            outcomes.append((exc.status, exc.type))
                        else:
                            outcomes.append((200, result.backend))
                finally:
                    await fleet.aclose()
            nursery.cancel_scope.cancel()
    assert all(status == 503 for status, _ in outcomes), (
        f"a model whose server is down was answered: {outcomes}")
