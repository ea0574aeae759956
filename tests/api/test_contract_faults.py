"""Where the service does not do what API.md (and docs/api.md, which extends it) says: found in
a contract-conformance review, 2026-12-04. Each test fails on the code it was written against."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import ROOT, RunningServer, running_server

HI = [{"role": "user", "content": "hi"}]


async def test_llm_calls_ignores_unknown_query_parameters(server: RunningServer) -> None:
    # API.md: "unknown query parameters are ignored". /api/llm-calls answered 422
    # "_: Extra inputs are not permitted" to a cache-buster, where every other list ignores it.
    async with server.client() as client:
        r = await client.get("/api/llm-calls", params={"_": "123", "limit": "5"})
    assert r.status_code == 200, r.text
    assert r.json() == {"data": []}


@pytest.mark.parametrize("path", ["/api//conversations", "/v1//models", "/api//tools"])
async def test_a_doubled_slash_is_answered_in_json_not_an_html_redirect_page(
    server: RunningServer, path: str,
) -> None:
    # API.md: "All bodies are JSON". Werkzeug's merge_slashes answered 308 with an HTML
    # "Redirecting..." page (routing redirects bypass the app's error handlers). The slashes
    # are merged before routing now: the path is served as the one with a single slash.
    async with server.client() as client:
        r = await client.get(path)
        single = await client.get(path.replace("//", "/"))
    assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text)
    assert (r.status_code, r.json()) == (single.status_code, single.json()) == (200, r.json())


async def test_an_empty_run_id_is_a_404_not_a_redirect_to_another_run(
    server: RunningServer,
) -> None:
    # API.md: "404 unknown id". "/api/runs//events" (a client that interpolated an empty id)
    # was redirected (308, HTML) to "/api/runs/events": the run whose id is "events".
    async with server.client() as client:
        r = await client.get("/api/runs//events")
        assert r.status_code == 404, (r.status_code, r.headers.get("location"))
        assert r.json()["error"]["type"] == "not_found"


@pytest.mark.parametrize(("path", "body"), [
    # Python's json reads these; no JSON parser elsewhere does (a browser's JSON.parse,
    # llama.cpp's nlohmann::json, Go's encoding/json).
    ("/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}],'
     b' "response_format": {"type": "json_schema", "json_schema": {"name": "x",'
     b' "schema": {"type": "number", "maximum": Infinity}}}}'),
    ("/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}],'
     b' "tools": [{"type": "function", "function": {"name": "f",'
     b' "parameters": {"type": "object", "x": NaN}}}]}'),
    ("/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("/api/conversations/{conv}/messages", b'{"content": "hi", "timeout": NaN}'),
    ("/api/conversations/{conv}/messages", b'{"content": "hi", "timeout": 1e400}'),
], ids=["v1-infinity-in-response_format", "v1-nan-in-a-tool-schema", "v1-nan-temperature",
        "native-nan-timeout", "native-1e400-timeout"])
async def test_nan_infinity_and_out_of_range_numbers_are_malformed_json(
    settings: Settings, path: str, body: bytes,
) -> None:
    # API.md: "400 malformed JSON"; docs/api.md: "400 malformed_json: not JSON (NaN, Infinity
    # and out-of-range numbers count)". Over HTTP (the WebSocket refuses them) they were a 422
    # "temperature: Input should be less than or equal to 2" for NaN, or a 200 that passed
    # NaN/Infinity on inside response_format or a tool's schema to the model's server.
    backend = ScriptedBackend(lambda req: Reply("ok"))
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        r = await client.post(path.format(conv=conv), content=body,
                              headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["type"]) == (400, "malformed_json"), r.text
    assert backend.streams == []


@pytest.mark.parametrize(("extra", "field"), [
    # The client asked for audio output and gets text only, with a 200 and no message.audio.
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
     ("modalities", "audio")),
    # Sampling the client asked for (llama.cpp's server honours it), silently dropped.
    ({"logit_bias": {"1234": -100}}, ("logit_bias",)),
], ids=["modalities-audio", "logit_bias"])
async def test_v1_fields_it_does_not_honour_are_refused_or_passed_on(
    settings: Settings, extra: dict[str, Any], field: tuple[str, ...],
) -> None:
    # API.md (December): "422 for /v1 fields it would not honour ... is part of the contract".
    # These were accepted (extra="allow") and dropped: neither refused nor given to the model.
    backend = ScriptedBackend(lambda req: Reply("ok"))
    body = {"model": "m", "messages": HI, **extra}
    async with running_server(settings, backend) as srv, srv.client() as client:
        r = await client.post("/v1/chat/completions", json=body)
    if r.status_code == 422:
        assert r.json()["error"]["param"] in field
        assert backend.streams == []
    else:
        assert r.status_code == 200, r.text
        passed = dict(backend.streams[0].request.options)
        assert all(f in passed for f in field if f in extra), passed


@pytest.mark.slow
async def test_hypercorn_cli_start_up_failure_is_one_line_not_a_traceback(
    tmp_path: Path,
) -> None:
    # API.md: "`hypercorn --config hypercorn.toml service.app:app` must work too", and a bad
    # setting stops the start with one line (as `python -m service` does). Under hypercorn's
    # own CLI a setting only checked at start-up (here a model file that does not exist)
    # printed ~100 lines of ExceptionGroup traceback, after announcing "Running on ...".
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_BACKEND": "embedded",
                "SERVICE_GGUF": str(tmp_path / "missing.gguf")})
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
             "--bind", "127.0.0.1:0", "service.app:app"],
            cwd=tmp_path, env=env, capture_stdout=True, capture_stderr=True, check=False,
        )
    out = (proc.stdout + proc.stderr).decode()
    assert "SERVICE_GGUF" in out
    assert "Traceback" not in out, out[-3000:]
    assert "Running on" not in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["--bind", "127.0.0.1:99999"],  # OverflowError: port must be 0-65535
    ["--bind", "unix:{tmp}/no-such-dir/service.sock"],  # FileNotFoundError
    ["--config", "{tmp}/bad.toml"],  # tomllib.TOMLDecodeError
], ids=["port-out-of-range", "unix-socket-in-a-missing-dir", "config-that-does-not-parse"])
async def test_a_bad_bind_or_config_stops_the_start_with_one_line(
    tmp_path: Path, args: list[str],
) -> None:
    # API.md: "`python -m service --bind 127.0.0.1:9000` overrides the bind", and a bad
    # setting stops the start with one line. Only a taken port (EADDRINUSE/EACCES/
    # EADDRNOTAVAIL, service/server.py:_bind_error) was one line; a port out of range, a unix
    # socket in a missing directory or a hypercorn.toml that does not parse was a traceback.
    (tmp_path / "bad.toml").write_text("bind = [\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), "SERVICE_BACKEND": "llamacpp",
                "SERVICE_LLAMACPP_URL": "http://127.0.0.1:9"})
    argv = [a.format(tmp=tmp_path) for a in args]
    with trio.fail_after(60):
        proc = await trio.run_process(
            [sys.executable, "-m", "service", *argv], cwd=tmp_path, env=env,
            capture_stdout=True, capture_stderr=True, check=False,
        )
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("service: "), err[-3000:]
