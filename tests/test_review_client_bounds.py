"""Client-supplied input the service must bound and answer with a clear JSON 4xx: never a 500,
never a traceback in its log, never a crashed run stored (review of client bounds, each test
failing before its fix).

All three come from ``/v1/chat/completions`` parts that the strict body parse and the models
let through to a later step that fails on them: the history's tool-call ``arguments`` string
(parsed again with a plain ``json.loads``, service/api/openai.py ``_loads``) and the passed-on
JSON objects (``response_format``, ``tools``), encoded again for the model's server deeper in
the stack than the body was parsed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio

from service.settings import Settings

from .e2e import GUARD, e2e
from .fakes import Reply, ScriptedBackend
from .servers import running_server

JSON = {"content-type": "application/json"}
USER = {"role": "user", "content": "what is the weather?"}


def _with_tool_call(arguments: str, *, model: str = "m") -> bytes:
    """A /v1 body whose history holds an assistant tool call with ``arguments`` as its JSON
    string (the OpenAI shape), and the tool's result."""
    return json.dumps({
        "model": model,
        "messages": [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    }).encode()


def _crashes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that carry a traceback or say something crashed."""
    return [f"{r.name}: {r.getMessage()[:120]}" for r in caplog.records
            if r.exc_info or "crash" in r.getMessage() or "unhandled" in r.getMessage()]


def _is_client_error(status: int, body: Any) -> bool:
    return 400 <= status < 500 and isinstance(body, dict) and isinstance(
        body.get("error"), dict) and isinstance(body["error"].get("message"), str)


async def test_v1_tool_call_arguments_nested_too_deep_are_a_4xx_not_a_500(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A history tool call whose ``arguments`` string is JSON nested deeper than Python's
    parser goes ("[[[[...", 5 KB: far under the body limit) raised RecursionError out of
    openai.py ``_loads`` (which catches JSONDecodeError only): 500 ``internal_error`` and
    "unhandled error" with a traceback in the log. The body itself was valid JSON and passed
    every model check. Right: a 4xx naming the field (or the string taken as text, as a
    non-JSON one is), and nothing in the log."""
    caplog.set_level(logging.WARNING)
    backend = ScriptedBackend(lambda req: Reply("fine"))
    async with running_server(settings, backend) as srv, srv.client() as c:
        with trio.fail_after(GUARD):
            r = await c.post("/v1/chat/completions", content=_with_tool_call("[" * 5000),
                             headers=JSON)
            assert r.status_code != 500, r.text
            assert r.status_code < 500, r.text
            assert r.headers["content-type"].startswith("application/json"), r.text
            assert not _crashes(caplog), _crashes(caplog)
            assert (await c.get("/healthz")).status_code == 200


@pytest.mark.parametrize("arguments", ["NaN", '{"city": NaN}', '{"city": 1e999}', "Infinity"])
async def test_v1_tool_call_arguments_with_non_finite_numbers_do_not_crash_the_run(
    settings: Settings, caplog: pytest.LogCaptureFixture, arguments: str
) -> None:
    """The body is parsed strictly (NaN, Infinity and 1e999 are malformed JSON: 400), but a
    history tool call's ``arguments`` string is parsed again with plain ``json.loads``
    (openai.py ``_loads``), which reads them: ``{"city": nan}`` / ``{"input": inf}`` reached the
    Ollama adapter, whose upstream body httpx cannot encode (``allow_nan=False``): ValueError,
    "run crashed" with a traceback, a failed run stored, and 500 ``internal_error`` for what is
    the client's malformed input. Right: a 4xx (400 malformed / 422 naming
    ``messages.1.tool_calls.0.function.arguments``), or the string passed on as text; never a
    crashed run."""
    caplog.set_level(logging.WARNING)
    async with e2e(settings, "ollama") as env:
        with trio.fail_after(GUARD):
            r = await env.client.post(
                "/v1/chat/completions", content=_with_tool_call(arguments, model="sim-model"),
                headers=JSON)
            assert r.status_code != 500, r.text
            assert r.status_code == 200 or _is_client_error(r.status_code, r.json()), r.text
            assert not _crashes(caplog), _crashes(caplog)


async def _deepest_parsed(c: Any, field: str) -> int:
    """The deepest nesting of ``field`` the server's body parse accepts: a body that parses is
    a 422 (``messages`` is empty), one nested too deep a 400 ``malformed_json``."""
    low, high = 100, 3000  # low parses, high does not
    while high - low > 1:
        mid = (low + high) // 2
        nested = '{"a":' * mid + "1" + "}" * mid
        body = f'{{"model":"sim-model","messages":[],"{field}":{nested}}}'
        r = await c.post("/v1/chat/completions", content=body.encode(), headers=JSON)
        assert r.status_code in (400, 422), r.text
        low, high = (mid, high) if r.status_code == 422 else (low, mid)
    return low


async def test_a_deep_response_format_the_body_parse_accepted_does_not_crash_the_run(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Nesting is bounded only by the parser's recursion limit, which counts the stack the
    parse runs on. A passed-on object (``response_format``; ``tools``' parameters alike) as
    deep as the request's parse accepts (~980 levels, 6 KB) is encoded again for the model's
    server in the run's task, on a deeper stack: RecursionError in httpx's ``json_dumps``
    (service/backends/openai_compat.py ``stream``), "run crashed" with a traceback, a failed
    run stored, and 500 ``internal_error``. Right: the depth bounded where the body is read
    (a 400/422 naming the field), so that whatever is accepted can be passed on."""
    caplog.set_level(logging.WARNING)
    async with e2e(settings, "llamacpp") as env:
        with trio.fail_after(GUARD):
            depth = await _deepest_parsed(env.client, "response_format")
            caplog.clear()
            body = json.dumps({"model": "sim-model", "messages": [USER]})[:-1] + (
                ',"response_format":' + '{"a":' * depth + "1" + "}" * depth + "}")
            r = await env.client.post("/v1/chat/completions", content=body.encode(),
                                      headers=JSON)
            assert r.status_code != 500, (depth, r.text[:300])
            assert r.status_code == 200 or _is_client_error(r.status_code, r.json()), r.text
            assert not _crashes(caplog), _crashes(caplog)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/conversations"])
async def test_a_body_nested_past_the_bound_is_a_400_saying_so(
    settings: Settings, path: str
) -> None:
    """The bound itself (``MAX_JSON_DEPTH``, 128 levels): one level more is a 400
    ``malformed_json`` that says why; the bound is accepted (here a 422 for the rest)."""
    from service.api.models import MAX_JSON_DEPTH

    def body(depth: int) -> bytes:
        nested = "[" * (depth - 1) + "]" * (depth - 1)  # the body's object is one level
        return f'{{"messages":[],"x":{nested}}}'.encode()

    async with running_server(settings, ScriptedBackend()) as srv, srv.client() as c:
        over = await c.post(path, content=body(MAX_JSON_DEPTH + 1), headers=JSON)
        at = await c.post(path, content=body(MAX_JSON_DEPTH), headers=JSON)
    assert over.status_code == 400, over.text
    assert over.json()["error"]["type"] == "malformed_json", over.text
    assert f"more than {MAX_JSON_DEPTH} levels" in over.json()["error"]["message"], over.text
    assert at.status_code == 422, at.text  # parsed; refused for its fields, not its depth
