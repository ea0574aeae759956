"""Review: secrets and observability under faults (each test failed on the tree it was
written against)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from service.errors import ConfigError
from service.settings import load_settings
from service.sim import Reply, Simulator
from service.sim.server import open_simulator

from .servers import running_server

SECRET = "S3cretPW77"


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:]+)(\{[^}]*\})? (\S+)", line)
        if not m or m[1] != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m[2] or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m[3])
    return total


def _json_log(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as the service writes it (JSON, with its extra fields)."""
    from service.logs import JsonFormatter

    fmt = JsonFormatter()
    return "\n".join(fmt.format(r) for r in caplog.records)


async def test_tls_verification_off_warning_does_not_log_url_credentials(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A fleet server behind a credentialed URL with `tls = { verify = false }`: the start-up
    # warning printed its whole URL, user:password included.
    caplog.set_level(logging.INFO)
    async with open_simulator(Simulator(("sim-model",))) as sim:
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(f'[[server]]\nname = "lab"\nkind = "llamacpp"\n'
                         f'url = "https://user:{SECRET}@127.0.0.1:{sim.port}"\n'
                         f'tls = {{ verify = false }}\n')
        settings = load_settings(db=tmp_path / "s.db", backends_file=fleet,
                                 default_model="sim-model")
        async with running_server(settings, from_settings=True) as srv, srv.client() as c:
            assert (await c.get("/healthz")).status_code == 200
    text = _json_log(caplog)
    assert "TLS verification is OFF" in text
    assert SECRET not in text, [line for line in text.splitlines() if SECRET in line]


def test_libpq_keyword_string_in_service_db_is_refused_without_its_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SERVICE_DB="host=... password=..." (libpq's keyword/value form, what many PostgreSQL
    # deployments hand out) was taken for a SQLite path: a file was created whose name held
    # the password, and the "store open" record logged it in full. It is refused (API.md:
    # "anything else stops the start with one line"), and the line does not echo it.
    monkeypatch.chdir(tmp_path)
    db = f"host=127.0.0.1 port=1 user=svc password={SECRET} dbname=svc"
    with pytest.raises(ConfigError) as caught:
        load_settings(db=db)
    assert "SERVICE_DB" in caught.value.message
    assert SECRET not in caught.value.message
    assert not list(tmp_path.iterdir())


def test_an_in_memory_sqlite_store_is_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SERVICE_DB=:memory: (SQLite's name for a database in memory) failed the start with
    # "store read failed: no such table: runs": each of the store's connections opened a
    # database of its own. Refused, saying why.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_settings(db=":memory:")
    assert "SERVICE_DB" in caught.value.message
    assert ":memory: is not supported" in caught.value.message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("url", [
    "http://user:se/cret@host:99999",  # a "/" in the password
    "http://user:se cret@host:99999",  # a space in it
])
def test_fleet_file_url_credentials_never_echoed_at_start_up(tmp_path: Path, url: str) -> None:
    # settings._redact was fixed for a "/" in the password; the fleet file's own _redact
    # (service/backends/fleet.py) stops at "/" and at whitespace, so the error echoed it.
    from service.errors import ConfigError

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[[server]]\nname = "a"\nkind = "llamacpp"\nurl = "{url}"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(db=tmp_path / "s.db", backends_file=fleet)
    assert "SERVICE_BACKENDS_FILE" in info.value.message
    assert "cret" not in info.value.message, info.value.message


def test_service_url_with_a_space_in_the_password_is_not_echoed() -> None:
    from service.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_settings(db="/tmp/never-opened.db", ollama_url="http://user:se cret@host:99999")
    assert "SERVICE_OLLAMA_URL" in info.value.message
    assert "cret" not in info.value.message, info.value.message


async def test_upstream_error_echoing_a_fleet_header_value_is_not_shown(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A gateway answering 401 "invalid api key: Bearer sk-..." (many do echo the credential):
    # the service knows the header value is a secret, yet passes the upstream's text through
    # to the client's error, the stored run, /api/llm-calls and /api/backends.
    caplog.set_level(logging.INFO)
    async with open_simulator(Simulator(("sim-model",))) as sim:
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(f'[[server]]\nname = "gw"\nkind = "llamacpp"\nurl = "{sim.url}"\n'
                         f'headers = {{ Authorization = "Bearer {SECRET}" }}\n')
        settings = load_settings(db=tmp_path / "s.db", backends_file=fleet,
                                 default_model="sim-model")
        sim.default = Reply(status=401, error=f"invalid api key: Bearer {SECRET}")
        async with running_server(settings, from_settings=True) as srv, srv.client() as c:
            conv = (await c.post("/api/conversations", json={})).json()["id"]
            r = await c.post(f"/api/conversations/{conv}/messages", json={"content": "hi"})
            run_id = r.json()["error"]["run_id"]
            seen = {
                "error body": r.text,
                "run": (await c.get(f"/api/runs/{run_id}")).text,
                "llm-calls": (await c.get("/api/llm-calls")).text,
                "backends": (await c.get("/api/backends")).text,
            }
    assert sim.streams
    assert sim.streams[-1].headers["authorization"] == f"Bearer {SECRET}"
    seen["log"] = _json_log(caplog)
    assert {k: SECRET in v for k, v in seen.items()} == dict.fromkeys(seen, False)
