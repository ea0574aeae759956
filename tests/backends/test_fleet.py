"""Backend fleets (issue 16): several servers per kind, routing, affinity, TLS, headers.

Real simulated upstreams on 127.0.0.1 (each in its own cancel scope, so a test can kill one),
the adapters built by ``build_backend`` from the settings, as the app builds them.
"""

from __future__ import annotations

import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from service.backends import FleetBackend, build_backend, client_from_settings
from service.backends.base import Backend, ChatMessage, ChatRequest
from service.backends.http import BackendTLSError
from service.backends.router import Inventory, Member
from service.errors import AllBackendsFailed, BackendAuthFailed, ConfigError
from service.metrics import Metrics
from service.settings import Settings, load_settings
from service.sim import Reply, Simulator

from ..backend_helpers import FakeRecorder, serve_in

GUARD = 10  # seconds any wait may take before the test fails


def ask(conversation: str | None = None, model: str | None = "sim-model",
        text: str = "hello") -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("user", text),), model=model,
                       conversation_id=conversation)


async def answer(backend: Backend, request: ChatRequest) -> tuple[str, str]:
    """(the text, the server that answered)."""
    with trio.fail_after(GUARD):
        result = await backend.chat(request)
    return result.message.content, result.backend


# Only ever started with nursery.start (flake8's startable list is project config).



@asynccontextmanager
async def upstreams(
    count: int, *, models: Sequence[tuple[str, ...]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[list[tuple[Simulator, trio.CancelScope]]]:
    """``count`` simulators on loopback; cancel a one's scope to kill it (its port closes)."""
    async with trio.open_nursery() as nursery:
        out = []
        for i in range(count):
            sim = Simulator(models[i] if models else ("sim-model",), default=Reply(tokens=3))
            scope = trio.CancelScope()
            await nursery.start(serve_in, sim, scope, ssl_context)
            out.append((sim, scope))
        yield out
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def fleet(settings: Settings, **update: object) -> AsyncIterator[FleetBackend]:
    conf = load_settings(**{**settings.model_dump(), **update})
    async with client_from_settings(conf) as client:
        backend = build_backend(conf, client, recorder=FakeRecorder(), metrics=Metrics())
        assert isinstance(backend, FleetBackend)
        try:
            yield backend
        finally:
            await backend.aclose()


# -- 1. several servers per kind; the fleet file ------------------------------------------------


async def test_url_lists_make_one_server_each(settings: Settings) -> None:
    async with fleet(settings, backend="auto",
                     ollama_url="http://127.0.0.1:1, http://127.0.0.1:2/",
                     llamacpp_url="http://127.0.0.1:3/v1,http://127.0.0.1:4") as auto:
        assert [(b.name, b.url) for b in auto.backends] == [
            ("ollama-1", "http://127.0.0.1:1"), ("ollama-2", "http://127.0.0.1:2"),
            ("llamacpp-1", "http://127.0.0.1:3"), ("llamacpp-2", "http://127.0.0.1:4")]
        # Ollama's before llama.cpp's, as the single servers always were.
        assert [m.priority for m in auto.members] == [0, 0, 1, 1]


def test_a_bad_url_in_a_list_stops_the_start() -> None:
    with pytest.raises(ConfigError, match=r"SERVICE_LLAMACPP_URL.*127\.0\.0\.1:abc"):
        load_settings(llamacpp_url="http://127.0.0.1:8080,http://127.0.0.1:abc")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


FULL = """
[[server]]
name = "gpu-a"
kind = "llamacpp"
url = "http://127.0.0.1:8081/v1"
weight = 2
max_concurrency = 3
models = ["qwen"]
headers = { Authorization = "Bearer s3cret-token" }
timeouts = { connect = 2, idle = 30, call = 90 }
n_predict = 256

[[server]]
name = "box-b"
kind = "ollama"
url = "http://127.0.0.1:11434"
num_ctx = 8192
"""


async def test_a_fleet_file_describes_every_server(settings: Settings, tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    async with fleet(settings, backends_file=path) as auto:
        a, b = auto.backends
        assert (a.name, a.url, b.name) == ("gpu-a", "http://127.0.0.1:8081", "box-b")
        assert auto.members[0].weight == 2
        assert a.limiter.total_tokens == 3  # type: ignore[attr-defined]
        assert a.budgets.call == 90  # type: ignore[attr-defined]
        assert a.room.cap == 256  # type: ignore[attr-defined]
        assert b.num_ctx == 8192  # type: ignore[attr-defined]
        assert auto.inventories[0].models == frozenset({"qwen"})
        assert "s3cret-token" not in repr(auto) + repr(a) + repr(load_settings(
            db=settings.db, backends_file=path))


async def test_ollamas_context_window_is_asked_by_every_request_and_the_preload(
        settings: Settings) -> None:
    # Unasked, Ollama uses its own default window (2,048-4,096 tokens by version) and drops the
    # start of a longer prompt (the system prompt, the tools) without a word. The preload asks
    # the same window, or the first request would load the model a second time.
    async with upstreams(2) as ((sim, _), (other, _)):
        async with fleet(settings, backend="ollama", ollama_url=f"{sim.url},{other.url}",
                         ollama_num_ctx=8192) as auto:
            for backend in auto.backends:
                assert (await answer(backend, ask()))[1] == backend.name
                await backend.preload("sim-model")
        for s in (sim, other):
            assert [r.body["options"]["num_ctx"] for r in s.streams] == [8192, 8192]
            assert s.preloads == ["sim-model"]
        async with fleet(settings, backend="ollama",
                         ollama_url=f"{sim.url},{other.url}") as auto:
            await answer(auto.backends[0], ask())
        assert "num_ctx" not in sim.streams[-1].body.get("options", {})  # unset: Ollama's own
    with pytest.raises(ConfigError, match="SERVICE_OLLAMA_NUM_CTX"):
        load_settings(ollama_num_ctx=100)


@pytest.mark.parametrize(("text", "message"), [
    ('[[server]]\nname = "a"\nkind = "llamacpp"\n', r"server 1 \('a'\): url: Field required"),
    ('[[server]]\nname = "a"\nkind = "vllm"\nurl = "http://x"\n', r"server 1 \('a'\): kind"),
    ('[[server]]\nname = "a"\nkind = "ollama"\nurl = "ftp://x"\n', r"url: .*not an http"),
    ('[[server]]\nname = "a"\nkind = "ollama"\nurl = "http://x"\nwieght = 2\n',
     r"server 1 \('a'\): wieght: Extra inputs"),
    ('[[server]]\nname = "a"\nkind = "ollama"\nurl = "http://x"\n'
     '[[server]]\nname = "a"\nkind = "ollama"\nurl = "http://y"\n', r"name 'a' is used twice"),
    ('[[server]]\nname = "a"\nkind = "ollama"\nurl = "http://x"\n'
     'tls = { ca_bundle = "missing.pem" }\n', r"tls.ca_bundle: no such file .*missing.pem"),
    ('[[server]]\nname = "a"\nkind = "ollama"\nurl = "http://x"\n'
     'headers = { "X-Key" = "sécret" }\n', r"headers: .*'X-Key' must be printable ASCII"),
    ('[[server]]\nname = "a"\nkind = "llamacpp"\nurl = "http://x"\nn_predict = 0\n',
     r"server 1 \('a'\): n_predict: Input should be greater than or equal to 1"),
    ('[[server]]\nname = "a"\nkind = "ollama"\nurl = "http://x"\nn_predict = 64\n',
     r"server 1 \('a'\): n_predict: for a llama.cpp server only"),
    ('[[server]]\nname = "a"\nkind = "llamacpp"\nurl = "http://x"\nnum_ctx = 8192\n',
     r"server 1 \('a'\): num_ctx: for an Ollama server only"),
    ('[[server]]\nname = "a"\nkind = "ollama"\nurl = "http://x"\nnum_ctx = 100\n',
     r"server 1 \('a'\): num_ctx: Input should be greater than or equal to 256"),
    ("server = 3", r"the file: server: Input should be a valid list"),
    ("[[server", r"not TOML"),
])
def test_a_bad_fleet_file_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(backends_file=path)
    assert caught.value.message.startswith(f"SERVICE_BACKENDS_FILE: {path}: ")
    assert "\n" not in caught.value.message
    assert "sécret" not in caught.value.message


def test_a_bad_fleet_file_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from service.server import main

    monkeypatch.setenv("SERVICE_BACKENDS_FILE", str(write(tmp_path, "[[server]]\nname='x'\n")))
    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("service: SERVICE_BACKENDS_FILE: ")


def test_a_ca_bundle_that_does_not_load_stops_the_start(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"SERVICE_OLLAMA_CA_BUNDLE: tls\.ca_bundle: .*PEM"):
        load_settings(ollama_ca_bundle=bad)


# -- 2. routing ---------------------------------------------------------------------------------


async def test_short_runs_spread_over_two_servers(settings: Settings) -> None:
    async with upstreams(2) as ups, fleet(
            settings, backend="llamacpp",
            llamacpp_url=",".join(s.url for s, _ in ups)) as auto:
        served = Counter([(await answer(auto, ask(f"c{i}")))[1] for i in range(40)])
        assert set(served) == {"llamacpp-1", "llamacpp-2"}
        assert min(served.values()) >= 10, served  # each >= 25 %

        # At once: fewest in flight first.
        for sim, _ in ups:
            sim.default = Reply(tokens=3, first_delay=0.2)
        together: Counter[str] = Counter()

        async def one(i: int) -> None:
            together[(await answer(auto, ask(f"d{i}")))[1]] += 1

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        assert min(together.values()) >= 5, together


async def test_a_conversation_stays_on_its_server(settings: Settings) -> None:
    async with upstreams(2) as ups, fleet(
            settings, backend="llamacpp",
            llamacpp_url=",".join(s.url for s, _ in ups)) as auto:
        for conversation in ("c1", "c2", "c3", "c4"):
            servers = {(await answer(auto, ask(conversation)))[1] for _ in range(6)}
            assert len(servers) == 1, (conversation, servers)
            assert auto.server_of(conversation) is not None
        # Different conversations still use both servers.
        assert {auto.server_of(c).name for c in ("c1", "c2", "c3", "c4")} == {  # type: ignore[union-attr]
            "llamacpp-1", "llamacpp-2"}


async def test_two_processes_send_a_new_conversation_to_the_same_server(
        autojump_clock: trio.testing.MockClock) -> None:
    # Each --workers process has its own router; idle, they break ties alike.
    sims = [Simulator(default=Reply(tokens=2)) for _ in range(3)]
    one = memory_fleet(sims, [Member(), Member(), Member()])
    other = memory_fleet(sims, [Member(), Member(), Member()])
    chosen: Counter[str] = Counter()
    for i in range(60):
        a = (await one.chat(ask(f"conversation-{i}"))).backend
        b = (await other.chat(ask(f"conversation-{i}"))).backend
        assert a == b
        chosen[a] += 1
    assert min(chosen.values()) >= 10, chosen  # and they spread


async def test_one_server_killed_every_later_run_succeeds(settings: Settings) -> None:
    async with upstreams(2) as ups, fleet(
            settings, backend="ollama", ollama_url=",".join(s.url for s, _ in ups)) as auto:
        for i in range(6):
            await answer(auto, ask(f"c{i}"))
        victim = auto.server_of("c0")
        assert victim is not None
        dead = auto.backends.index(victim)
        ups[dead][1].cancel()  # its listener and its connections close
        await trio.testing.wait_all_tasks_blocked()  # its tasks have ended
        for i in range(30):
            text, server = await answer(auto, ask(f"c{i % 8}"))
            assert text
            assert server != victim.name
        assert auto.server_of("c0") is not victim  # the conversation moved, and stays there


async def test_only_servers_that_have_the_model(settings: Settings) -> None:
    async with upstreams(2, models=[("small",), ("small", "big")]) as ups, fleet(
            settings, backend="ollama", ollama_url=",".join(s.url for s, _ in ups)) as auto:
        served = {(await answer(auto, ask(f"c{i}", model="big")))[1] for i in range(8)}
        assert served == {"ollama-2"}
        assert not ups[0][0].streams  # never asked for a model it does not have


async def test_a_server_with_the_model_loaded_is_preferred(settings: Settings) -> None:
    async with upstreams(2, models=[("m",), ("m",)]) as ups:
        ups[0][0].loaded = []
        ups[1][0].loaded = ["m"]
        async with fleet(settings, backend="ollama",
                         ollama_url=",".join(s.url for s, _ in ups)) as auto:
            served = {(await answer(auto, ask(f"c{i}", model="m")))[1] for i in range(8)}
            assert served == {"ollama-2"}


# -- 3. TLS -------------------------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def test_a_private_ca_server_works_with_its_bundle(
        settings: Settings, ca: trustme.CA, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    async with upstreams(1, ssl_context=server_context(ca)) as ups:
        url = ups[0][0].url
        assert url.startswith("https://")
        async with fleet(settings, backend="llamacpp", llamacpp_url=f"{url},{url}",
                         llamacpp_ca_bundle=bundle) as auto:
            text, _ = await answer(auto, ask("c"))
            assert text == "tok0 tok1 tok2 "


async def test_without_its_bundle_it_fails_fast_naming_tls(
        settings: Settings, ca: trustme.CA) -> None:
    async with upstreams(1, ssl_context=server_context(ca)) as ups:
        url = ups[0][0].url
        conf = load_settings(**{**settings.model_dump(), "backend": "llamacpp",
                                "llamacpp_url": url})
        async with client_from_settings(conf) as client:
            single = build_backend(conf, client)
            started = time.monotonic()
            with pytest.raises(BackendTLSError) as caught:
                await answer(single, ask())
            assert time.monotonic() - started < 2
            assert caught.value.status == 502
            assert caught.value.type == "backend_tls_error"
            assert "TLS handshake failed" in caught.value.message
            assert "certificate verify failed" in caught.value.message
            health = await single.health()
            assert not health.ready
            assert health.error is not None
            assert "TLS" in health.error
        async with fleet(settings, backend="llamacpp", llamacpp_url=f"{url},{url}") as auto:
            with pytest.raises(AllBackendsFailed, match="TLS handshake failed"):
                await answer(auto, ask())


async def test_mutual_tls_from_the_fleet_file(
        settings: Settings, ca: trustme.CA, tmp_path: Path) -> None:
    client_ca = trustme.CA()
    cert = client_ca.issue_cert("service@example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with upstreams(1, ssl_context=server_context(ca, client_ca=client_ca)) as ups:
        url = ups[0][0].url
        path = write(tmp_path, f"""
[[server]]
name = "with-cert"
kind = "llamacpp"
url = "{url}"
tls = {{ ca_bundle = "ca.pem", client_cert = "client.pem" }}

[[server]]
name = "without-cert"
kind = "llamacpp"
url = "{url}"
priority = 1
tls = {{ ca_bundle = "ca.pem" }}
""")
        async with fleet(settings, backends_file=path) as auto:
            text, server = await answer(auto, ask("c"))
            assert (text, server) == ("tok0 tok1 tok2 ", "with-cert")
            without = auto.backends[1]
            with pytest.raises(BackendTLSError, match="TLS"):
                await answer(without, ask())


async def test_verification_off_only_when_said_and_warned(
        settings: Settings, ca: trustme.CA, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    async with upstreams(1, ssl_context=server_context(ca)) as ups:
        url = ups[0][0].url
        path = write(tmp_path, f'[[server]]\nname = "lab"\nkind = "ollama"\nurl = "{url}"\n'
                               f'tls = {{ verify = false }}\n')
        async with fleet(settings, backends_file=path) as auto:
            assert "TLS verification is OFF for backend lab" in caplog.text
            assert (await answer(auto, ask()))[0] == "tok0 tok1 tok2 "


# -- 4. headers ---------------------------------------------------------------------------------


async def test_per_server_headers_are_sent_and_never_shown(
        settings: Settings, tmp_path: Path) -> None:
    async with upstreams(1) as ups:
        sim = ups[0][0]
        path = write(tmp_path, f"""
[[server]]
name = "gw"
kind = "llamacpp"
url = "{sim.url}"
headers = {{ Authorization = "Bearer s3cret-token" }}
""")
        async with fleet(settings, backends_file=path) as auto:
            await answer(auto, ask())
            assert sim.streams[-1].headers["authorization"] == "Bearer s3cret-token"
            sim.default = Reply(status=401, error="bad token")
            # (Every server refusing the key: said as that, not retried.)
            with pytest.raises(BackendAuthFailed) as caught:
                await answer(auto, ask())
            assert "s3cret" not in str(caught.value.to_dict()) + repr(auto)


# -- 5. through the app: conversations, /api/backends, /metrics --------------------------------


async def test_the_app_keeps_conversations_and_shows_every_server(
        settings: Settings, tmp_path: Path) -> None:
    from ..servers import running_server

    async with upstreams(2) as ups:
        path = write(tmp_path, "".join(f"""
[[server]]
name = "gpu-{i}"
kind = "llamacpp"
url = "{sim.url}"
weight = {i + 1}
headers = {{ Authorization = "Bearer s3cret-token" }}
""" for i, (sim, _) in enumerate(ups)))
        conf = settings.model_copy(update={"backends_file": path, "default_model": "sim-model"})
        async with running_server(conf, from_settings=True) as server, server.client() as c:
            conversations = []
            for _ in range(2):
                r = await c.post("/api/conversations", json={})
                assert r.status_code == 201, r.text
                conversations.append(r.json()["id"])
            for turn in range(3):
                for n, conv in enumerate(conversations):
                    with trio.fail_after(GUARD):
                        r = await c.post(f"/api/conversations/{conv}/messages", json={
                            "content": f"conv{n} turn{turn}", "stream": True})
                    assert r.status_code == 200, r.text
                    assert "run.finished" in r.text
                    assert '"succeeded"' in r.text

            def conversations_on(sim: Simulator) -> set[str]:
                return {m["content"][:5] for s in sim.streams for m in s.body["messages"]
                        if m["role"] == "user" and m["content"].startswith("conv")}

            on = [conversations_on(sim) for sim, _ in ups]
            # Each conversation's turns on one server (which one: its id's hash).
            assert not on[0] & on[1], on
            assert on[0] | on[1] == {"conv0", "conv1"}

            r = await c.get("/api/backends")
            assert r.status_code == 200
            assert "s3cret" not in r.text
            data = {b["name"]: b for b in r.json()["data"]}
            assert set(data) == {"gpu-0", "gpu-1"}
            for b in data.values():
                assert b["ready"] is True
                assert b["models"] == ["sim-model"]
                assert b["loaded"] == ["sim-model"]
                assert b["in_flight"] == 0
                assert b["cooldown"] is None
                assert b["failures"] == 0
            assert data["gpu-1"]["weight"] == 2

            metrics = (await c.get("/metrics")).text
            assert 'service_backend_in_flight{backend="gpu-0"} 0.0' in metrics
            assert 'service_backend_up{backend="gpu-1"} 1.0' in metrics
            assert 'service_backend_cooldown_seconds{backend="gpu-0"} 0.0' in metrics
            assert 'service_backend_model{backend="gpu-0",model="sim-model"} 2.0' in metrics
            assert "s3cret" not in metrics

            # conv0's server killed: every later run succeeds, /api/backends says it is down.
            dead = 0 if "conv0" in on[0] else 1
            ups[dead][1].cancel()
            await trio.testing.wait_all_tasks_blocked()
            for turn in range(3, 6):
                for conv in conversations:
                    with trio.fail_after(GUARD):
                        r = await c.post(f"/api/conversations/{conv}/messages", json={
                            "content": f"again {turn}", "stream": True})
                    assert '"succeeded"' in r.text, r.text
            data = {b["name"]: b for b in (await c.get("/api/backends")).json()["data"]}
            assert data[f"gpu-{dead}"]["ready"] is False
            assert data[f"gpu-{1 - dead}"]["ready"] is True
            metrics = (await c.get("/metrics")).text
            assert f'service_backend_up{{backend="gpu-{dead}"}} 0.0' in metrics


async def test_a_server_that_never_completes_the_handshake_is_bounded(
        settings: Settings, tmp_path: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def accept_and_say_nothing() -> None:
        while True:
            accepted.append(await listeners[0].accept())  # holds it open, silent

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_and_say_nothing)
        path = write(tmp_path, f'[[server]]\nname = "mute"\nkind = "llamacpp"\n'
                               f'url = "https://127.0.0.1:{port}"\n'
                               f'timeouts = {{ connect = 0.5 }}\n')
        async with fleet(settings, backends_file=path) as auto:
            with trio.fail_after(5), pytest.raises(AllBackendsFailed) as caught:
                await auto.chat(ask())
            assert "connect or TLS handshake timed out" in caught.value.message
        nursery.cancel_scope.cancel()
    for stream in accepted:
        await stream.aclose()
    await listeners[0].aclose()


# -- routing rules, in memory and virtual time ---------------------------------------------------


def memory_fleet(sims: list[Simulator], members: list[Member]) -> FleetBackend:
    from service.backends.openai_compat import OpenAICompatBackend

    from ..backend_helpers import mock_client

    return FleetBackend([OpenAICompatBackend(f"s{i}", f"http://s{i}", mock_client(sim))
                         for i, sim in enumerate(sims)], members, default_model="sim-model")


async def test_weights_share_concurrent_calls(autojump_clock: trio.testing.MockClock) -> None:
    sims = [Simulator(default=Reply(tokens=2, first_delay=1.0)) for _ in range(2)]
    auto = memory_fleet(sims, [Member(weight=1), Member(weight=2)])
    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(auto.chat, ask(f"c{i}"))
    assert (len(sims[0].streams), len(sims[1].streams)) == (10, 20)


async def test_loaded_is_preferred_only_while_it_has_a_free_slot(
        autojump_clock: trio.testing.MockClock) -> None:
    sims = [Simulator(default=Reply(tokens=2, first_delay=1.0)) for _ in range(2)]
    auto = memory_fleet(sims, [Member(capacity=4), Member(capacity=4)])
    # Ollama's /api/ps is what tells "loaded"; these speak OpenAI: say it as the inventory would.
    await auto.refresh_if_stale()
    auto.inventories[0] = Inventory(frozenset({"sim-model"}), frozenset({"sim-model"}),
                                    trio.current_time())
    auto.inventories[1] = Inventory(frozenset({"sim-model"}), frozenset(), trio.current_time())
    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(auto.chat, ask(f"c{i}"))
        await trio.testing.wait_all_tasks_blocked()
        assert (len(sims[0].streams), len(sims[1].streams)) == (4, 0)  # the loaded one
        for i in range(4, 10):
            nursery.start_soon(auto.chat, ask(f"c{i}"))
    # Its slots full: fewest in flight (the other catches up, then they alternate).
    assert (len(sims[0].streams), len(sims[1].streams)) == (5, 5)


async def test_the_conversation_leaves_a_cooling_server_and_stays_on_the_new_one(
        autojump_clock: trio.testing.MockClock) -> None:
    sims = [Simulator(default=Reply(tokens=2)) for _ in range(2)]
    auto = memory_fleet(sims, [Member(), Member()])
    await auto.chat(ask("conv"))
    first = auto.server_of("conv")
    assert first is not None
    i = auto.backends.index(first)
    sims[i].default = Reply(status=503, error="overloaded")
    for _ in range(5):
        result = await auto.chat(ask("conv"))
        assert result.backend != first.name
    assert auto.server_of("conv") is auto.backends[1 - i]


async def test_keep_fresh_refreshes_so_calls_do_not(
        autojump_clock: trio.testing.MockClock) -> None:
    sims = [Simulator(("a",), default=Reply(tokens=2)), Simulator(("a",), default=Reply(tokens=2))]
    auto = memory_fleet(sims, [Member(), Member()])
    async with trio.open_nursery() as nursery:
        await nursery.start(auto.keep_fresh)
        listed = sum(r == ("GET", "/v1/models") for sim in sims for r in sim.requests)
        assert listed == 2  # once each, before it reported started
        sims[1].models.append("b")
        await trio.sleep(auto.inventory_ttl + 0.5)
        assert auto.inventories[1].models == frozenset({"a", "b"})
        before = sum(len(sim.requests) for sim in sims)
        await auto.chat(ask("c", model="b"))
        # The call asked nothing but its answer (no model list on its way).
        assert sum(len(sim.requests) for sim in sims) == before + 1
        assert len(sims[1].streams) == 1
        nursery.cancel_scope.cancel()


async def test_the_lifespans_shutdown_stops_the_fleets_refresh(settings: Settings) -> None:
    """The fleet's model lists are refreshed in the background (``_keep_fleet_fresh`` in
    service/lifespan.py, a task of the app's nursery). The lifespan's shutdown closed the HTTP
    client and left that task running: the lifespan did not end until its next refresh (5 s
    later, under quart's test app) ran on the closed client and logged "keeping the fleet's
    model lists fresh stopped" with a RuntimeError's traceback (hypercorn cancels the
    lifespan after the shutdown, which hid it but for a refresh due in the shutdown itself).
    The shutdown now stops every task it started, the refresh before the client closes."""
    from service.factory import create_app

    conf = load_settings(**{**settings.model_dump(), "backend": "llamacpp",
                            "llamacpp_url": "http://127.0.0.1:9,http://127.0.0.1:10"})
    app = create_app(conf)
    with trio.fail_after(GUARD):
        async with app.test_app() as running:
            assert isinstance(app.extensions["service"].backend, FleetBackend)
            assert (await running.test_client().get("/healthz")).status_code == 200
            await running.shutdown()  # as a server asks it
            await trio.testing.wait_all_tasks_blocked()
            assert [t.name for t in app.nursery.child_tasks] == []
