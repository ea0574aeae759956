"""What the service tells whom: no upstream credentials anywhere, no internals to clients or to
anonymous probes, one log line per record (from a review; each test failed before its fix)."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.backends.common import split_credentials
from service.backends.http import Budgets, make_client
from service.backends.ollama import OllamaBackend
from service.logs import TextFormatter
from service.settings import Settings, load_settings

from ..backend_helpers import req
from ..fakes import Reply, ScriptedBackend
from ..servers import ROOT, running_server

SECRET = "s3cretPW"
DEAD_URL = f"http://user:{SECRET}@127.0.0.1:1"  # nothing listens on port 1


def test_url_credentials_become_an_authorization_header() -> None:
    url, auth = split_credentials("http://us%40er:p%3Ass@models.internal:8080/base")
    assert url == "http://models.internal:8080/base"
    assert auth == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert split_credentials("http://models.internal:8080") == ("http://models.internal:8080",
                                                                None)


def test_a_key_given_as_the_urls_user_name_is_never_shown() -> None:
    # (Suspected by the fleet review of 2026-12-06.) A gateway's key as the URL's user name,
    # with no password: "user:" and the Basic value were registered as secrets, the key
    # itself not, so an upstream's error echoing it was shown.
    from service.errors import scrub_upstream_secrets

    url, auth = split_credentials("http://sk-Gateway7Key@models.internal:8080")
    assert url == "http://models.internal:8080"
    assert auth == "Basic " + base64.b64encode(b"sk-Gateway7Key:").decode()
    assert "sk-Gateway7Key" not in scrub_upstream_secrets("401: unknown key sk-Gateway7Key")


async def test_an_upstream_with_credentials_in_its_url_gets_them_as_a_header() -> None:
    seen: list[httpx.Request] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b'{"model":"m","message":{"role":"assistant",'
                              b'"content":"hi"},"done":true,"done_reason":"stop"}\n')

    budgets = Budgets()
    backend = OllamaBackend("ollama", f"http://user:{SECRET}@models.internal:11434",
                            make_client(budgets, transport=httpx.MockTransport(handle)), budgets)
    assert SECRET not in backend.url
    assert SECRET not in repr(backend)
    async with backend.stream(req()) as chunks:
        assert [c.text async for c in chunks] == ["hi"]
    (sent,) = seen
    assert sent.headers["Authorization"] == "Basic " + base64.b64encode(
        f"user:{SECRET}".encode()).decode()
    assert SECRET not in str(sent.url)


async def test_no_endpoint_shows_a_backend_urls_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Found in review: /api/backends showed it, and a failed call's error (to the client, in
    # the run's events and in /api/llm-calls) carried the whole URL.
    settings = load_settings(db=tmp_path / "s.db", backend="ollama", default_model="m",
                             ollama_url=DEAD_URL)
    caplog.set_level(logging.DEBUG)
    async with running_server(settings, from_settings=True) as srv, srv.client() as client:
        seen = {
            "backends": (await client.get("/api/backends")).text,
            "v1": (await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}]})).text,
            "llm-calls": (await client.get("/api/llm-calls")).text,
            "readyz": (await client.get("/readyz")).text,
        }
    seen["log"] = caplog.text
    assert "127.0.0.1:1" in seen["backends"]  # the URL is shown, without its password
    assert {name: SECRET in text for name, text in seen.items()} == dict.fromkeys(seen, False)


def test_a_start_up_error_does_not_print_a_urls_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update(SERVICE_DB=str(tmp_path / "s.db"),
               SERVICE_OLLAMA_URL=f"http://user:{SECRET}@host:99999")
    out = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert "SERVICE_OLLAMA_URL" in out.stderr
    assert "//***@host" in out.stderr
    assert SECRET not in out.stderr


async def test_readyz_tells_why_only_to_a_key(tmp_path: Path) -> None:
    # Found in review: with keys set the probe is open (as it must be) and showed anyone the
    # backend's internal host and error text.
    settings = load_settings(db=tmp_path / "s.db", api_keys="k1", backend="ollama",
                             ollama_url="http://127.0.0.1:1")
    async with running_server(settings, from_settings=True) as srv, srv.client() as client:
        anonymous = await client.get("/readyz")
        keyed = await client.get("/readyz", headers={"Authorization": "Bearer k1"})
    assert anonymous.status_code == keyed.status_code == 503
    assert anonymous.json()["checks"]["backend"] == "down"
    assert anonymous.json()["down"] == ["backend"]
    assert "127.0.0.1:1" not in anonymous.text
    assert "127.0.0.1:1" in keyed.json()["checks"]["backend"]


async def test_a_crash_tells_the_client_its_kind_not_its_text(settings: Settings) -> None:
    # Found in review: "internal error: RuntimeError: db at /srv/internal/secret.db" went to
    # the client (response and events); the text and traceback belong in the log.
    backend = ScriptedBackend([Reply("a b", fail_after=0,
                                     error=RuntimeError("db at /srv/internal/secret.db"))])
    async with running_server(settings, backend) as srv, srv.client() as client:
        r = await client.post("/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500
    assert r.json()["error"]["message"] == (
        "internal error (RuntimeError); the details are in the service's log")
    assert "/srv/internal" not in r.text


def test_a_text_log_record_is_one_line() -> None:
    # Found in review: with SERVICE_LOG_FORMAT=text a request path with %0a forged a log line
    # (JSON, the default, escapes it already).
    record = logging.LogRecord("service.app", logging.INFO, __file__, 1, "%s %s %s",
                               ("GET", "/x\n2026-01-01 INFO service.app [req_1] FORGED", 404),
                               None)
    record.request_id = "req_2"
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert "FORGED" in line  # kept, escaped: the operator still sees what was sent


@pytest.mark.parametrize("keys", ["good,dé-jà", "tab\tkey"])
def test_a_key_no_header_could_carry_stops_the_start_without_being_echoed(keys: str) -> None:
    # Noticed in review: a key with non-ASCII or control characters could never match (the
    # header is read as latin-1), so its holder was locked out with no hint.
    from service.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_settings(db="/tmp/never-opened.db", api_keys=keys)
    assert "SERVICE_API_KEYS" in info.value.message
    assert keys.split(",")[-1] not in info.value.message


def test_a_key_with_a_space_inside_is_a_key() -> None:
    # "Bearer abc def" reaches the comparison as "abc def": such a key works (found in a
    # review of the check above, which refused it at first).
    assert load_settings(db="/tmp/never-opened.db", api_keys="abc def").api_keys == ("abc def",)


@pytest.mark.parametrize(("url", "secret"), [
    ("http://user:se/cret@host:99999", "cret"),  # a "/" in the password
    ("http://sk-secret-token@host:bad", "sk-secret-token"),  # a token alone before "@"
    ("http://user:it's@host:99999", "it's"),
])
def test_no_shape_of_url_credentials_is_echoed_at_start_up(url: str, secret: str) -> None:
    from service.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_settings(db="/tmp/never-opened.db", ollama_url=url)
    assert "SERVICE_OLLAMA_URL" in info.value.message
    assert secret not in info.value.message
