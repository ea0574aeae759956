"""``/v1`` driven with the official ``openai`` SDK (AsyncOpenAI on the real server on
127.0.0.1:0, the simulated llama.cpp/Ollama upstream behind it), the way users call it
(a review of 2026-12-05; each test failed before its fix)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import trio

from service.settings import Settings
from service.sim import Reply

from ..e2e import GUARD, e2e

MSG = [{"role": "user", "content": "weather in Oslo?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def _sdk(base: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key="k", **kwargs)


async def test_stream_none_is_a_non_streamed_completion(settings: Settings) -> None:
    """The SDK types ``stream`` as ``Optional[Literal[False]] | Literal[True]``
    (openai/resources/chat/completions/completions.py ``create``: ``stream:
    Optional[Literal[False]] | Omit``; types/chat/completion_create_params.py
    ``CompletionCreateParamsNonStreaming.stream: Optional[Literal[False]]``), so
    ``create(..., stream=None)`` is a valid non-streamed call, and wrappers that forward
    ``stream=kwargs.get("stream")`` send ``"stream": null``. The API reference documents
    ``stream`` as "boolean or null, defaults to false". The service answers 422 "stream: Input
    should be a valid boolean" (``stream: bool = False`` in a strict model,
    service/api/openai.py ``ChatCompletionRequest``). Right: null means the default, false."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="sunny"))
        c = _sdk(env.server.url, max_retries=0)
        with trio.fail_after(GUARD):
            r = await c.chat.completions.create(model="sim-model", messages=MSG,  # type: ignore[call-overload]
                                                stream=None)
        assert r.choices[0].message.content == "sunny"


@pytest.mark.parametrize("kind", ["llamacpp", "ollama"])
async def test_a_tool_call_cut_by_max_tokens_keeps_finish_reason_length(
    settings: Settings, kind: str,
) -> None:
    """The model hit ``max_tokens`` in the middle of a tool call: the upstream says
    ``finish_reason: "length"`` (llama.cpp/OpenAI) or ``done_reason: "length"`` (Ollama) and
    the arguments are cut (``{"city": "Os``). The service answers ``finish_reason:
    "tool_calls"`` (non-stream and stream), so a client (LangChain's agent loop, the SDK's
    ``chat.completions.parse``/``stream`` helpers, which raise ``LengthFinishReasonError`` only
    on "length": openai/lib/_parsing/_completions.py) takes the cut call for a whole one and
    runs the tool with broken arguments. Cause: service/agents/chat.py sets
    ``extra["finish_reason"] = "tool_calls"`` whenever there are tool calls, over the
    upstream's reason. Right: "tool_calls" only in place of "stop" (or none), as the Ollama
    adapter does; "length" (and "content_filter") pass through."""
    async with e2e(settings, kind) as env:
        c = _sdk(env.server.url, max_retries=0)
        cut = Reply(text="", tool_calls=({"name": "get_weather", "raw_arguments": '{"city": "Os'},),
                    finish_reason="length")
        env.sim.script(cut, cut)
        with trio.fail_after(GUARD):
            whole = await c.chat.completions.create(
                model="sim-model", messages=MSG, tools=[WEATHER], max_tokens=5)
            async with c.chat.completions.stream(
                model="sim-model", messages=MSG, tools=[WEATHER], max_tokens=5,
            ) as stream:
                async for _ in stream:
                    pass
                streamed = stream.current_completion_snapshot
        assert whole.choices[0].message.tool_calls[0].function.arguments == '{"city": "Os'
        assert whole.choices[0].message.content is None  # tool calls, no text: OpenAI's null
        assert whole.choices[0].finish_reason == "length"
        assert streamed.choices[0].finish_reason == "length"


async def test_an_upstream_400_for_a_passed_on_field_is_not_retried_three_times(
    settings: Settings,
) -> None:
    """``response_format``, ``tool_choice``, ``logit_bias``, ``stop``... are passed on to the
    model's server unchecked (docs/api.md). When that server refuses the request (llama.cpp:
    400 "JSON schema conversion failed"/"Unsupported param"; Ollama: 400 "invalid JSON schema
    in format"; vLLM: 400 for a ``tool_choice`` naming no tool), the service answers 502
    ``backend_response_error`` (service/backends/http.py ``error_from_status``: every status
    but 404/429/503/context becomes ``BackendResponseError``, status 502). The SDK retries
    every 5xx (openai/_base_client.py ``_should_retry``), so one bad request with the default
    ``max_retries=2`` runs three times: three upstream calls, three failed runs stored, ~1.5 s
    of back-off, and a ``InternalServerError`` for what is the caller's mistake. The service
    already fixed this for ``tools`` alone (the comment on
    ``ChatCompletionRequest._function_tools``). Right: an upstream 400/422 on a /v1 request
    is the request's fault: 400 (``invalid_request``/``BadRequestError``, not retried), or at
    least ``x-should-retry: false`` on it."""
    async with e2e(settings, "llamacpp") as env:
        refused = Reply(status=400, error="JSON schema conversion failed: unrecognized schema")
        env.sim.script(refused, refused, refused)
        c = _sdk(env.server.url)  # the SDK's default: max_retries=2
        with trio.fail_after(GUARD):
            with pytest.raises(openai.APIStatusError) as got:
                await c.chat.completions.create(
                    model="sim-model", messages=MSG,
                    response_format={"type": "json_schema", "json_schema": {
                        "name": "w", "schema": {"type": "nonsense"}}})
            runs = (await env.client.get("/api/conversations")).json()["data"]
        assert "JSON schema conversion failed" in got.value.message
        assert len(env.sim.streams) == 1, "the SDK sent the refused request again"
        assert len(runs) == 1
        assert got.value.status_code < 500, got.value.status_code


def test_a_request_every_answering_backend_refused_is_a_400_not_all_backends_failed() -> None:
    """With a fleet, each server's 400 for the same passed-on field made the call
    ``all_backends_failed`` (503), which SDKs retry. When every server that answered refused
    the request itself (the others down), the answer is that refusal: 400."""
    from service.backends.auto import _all_failed
    from service.errors import BackendRejectedRequest, BackendUnavailable

    causes = [
        BackendRejectedRequest("unsupported param", backend="a", upstream_status=400),
        BackendUnavailable("connection refused", backend="b"),
        BackendRejectedRequest("unsupported param", backend="c", upstream_status=422),
    ]
    error = _all_failed(causes)
    assert isinstance(error, BackendRejectedRequest), error
    assert (error.status, error.type) == (400, "backend_rejected_request")
    assert len(error.details["causes"]) == 3


async def test_a_completion_past_the_run_deadline_is_not_run_again_by_the_sdk(
    settings: Settings,
) -> None:
    """A non-streamed completion whose run passes its deadline (SERVICE_RUN_TIMEOUT) is a 504
    ``run_timeout``, which the SDK retried twice: the whole completion run three times over,
    each to the same deadline, and three runs stored. Now it carries
    ``x-should-retry: false``, as a cancel's 409 does: one run."""
    async with e2e(settings, "llamacpp", run_timeout=0.5) as env:
        slow = Reply(tokens=100, interval=0.05)  # 5 s: far past the deadline
        env.sim.script(slow, slow, slow)
        c = _sdk(env.server.url)  # the SDK's default: max_retries=2
        with trio.fail_after(GUARD):
            with pytest.raises(openai.APIStatusError) as got:
                await c.chat.completions.create(model="sim-model", messages=MSG)
            runs = (await env.client.get("/api/conversations")).json()["data"]
        assert got.value.status_code == 504, got.value
        assert len(env.sim.streams) == 1, "the SDK ran the completion again"
        assert len(runs) == 1


def test_a_request_refused_by_one_server_and_unknown_to_the_other_is_not_a_503() -> None:
    """``_all_failed`` (service/backends/auto.py) answers the refusal itself only when every
    server that answered gave the *same* kind of refusal: all ModelNotFound (404) or all
    BackendRejectedRequest (400). A fleet whose server with the model refused a passed-on
    field (400) while another server does not have the model (404) falls through to
    ``AllBackendsFailed``: 503 ``all_backends_failed``, which OpenAI SDKs retry (three runs for
    one bad request, the thing the 400 was introduced to stop), although no server was down
    and both answers were about the request. Right: when every answering server refused the
    request (unknown model or invalid request), the answer is a refusal, not 503; the server
    that has the model said why (400 ``backend_rejected_request``)."""
    from service.backends.auto import _all_failed
    from service.errors import BackendRejectedRequest, ModelNotFound

    causes = [
        BackendRejectedRequest("response_format: unsupported", backend="gpu-a",
                               upstream_status=400),
        ModelNotFound("model 'm' not found", backend="gpu-b", upstream_status=404, model="m"),
    ]
    error = _all_failed(causes)
    assert error.status < 500, (error.status, error.type)
    assert isinstance(error, BackendRejectedRequest), error


def test_a_model_whose_server_is_down_counts_only_the_answers_of_servers_that_have_it() -> None:
    """(Suspected by the second diff review of 2026-12-06.) The model's only server is down;
    a lower tier without the model answered, with a 404 or with a 400 about a field it does
    not take: neither says anything of the model, whose server is away (503, retried). A 400
    of another server that has the model is still the answer."""
    from service.backends.auto import _all_failed
    from service.errors import AllBackendsFailed, BackendRejectedRequest, BackendUnavailable

    down = BackendUnavailable("connection refused", backend="ollama-a")
    lower = BackendRejectedRequest("tools: unsupported", backend="llamacpp", upstream_status=400)
    assert isinstance(_all_failed([down, lower], serving={"ollama-a"}), AllBackendsFailed)
    other = BackendRejectedRequest("tools: unsupported", backend="ollama-b", upstream_status=400)
    error = _all_failed([down, other, lower], serving={"ollama-a", "ollama-b"})
    assert isinstance(error, BackendRejectedRequest), error
    assert error.backend == "ollama-b"


async def test_a_model_named_without_its_tag_is_retrieved_as_ollama_reads_it(
    settings: Settings,
) -> None:
    """Ollama lists ``llama3.2:latest`` and runs ``llama3.2`` as it (a name without a tag is
    its ``:latest``). Chat with ``model="llama3.2"`` worked, but ``models.retrieve("llama3.2")``
    was a 404 (``NotFoundError``): a client that checks its model before using it gave up on
    a model it could use. Right: found, under the name asked for; an unknown name is still a
    404, and a tag is not guessed the other way."""
    async with e2e(settings, "ollama") as env:
        env.sim.models[:] = ["llama3.2:latest"]
        env.sim.script(Reply(text="sunny"))
        c = _sdk(env.server.url, max_retries=0)
        with trio.fail_after(GUARD):
            model = await c.models.retrieve("llama3.2")
            assert (model.id, model.owned_by) == ("llama3.2", "ollama")
            assert (await c.models.retrieve("llama3.2:latest")).id == "llama3.2:latest"
            r = await c.chat.completions.create(model="llama3.2", messages=MSG)
            assert r.choices[0].message.content == "sunny"
            with pytest.raises(openai.NotFoundError):
                await c.models.retrieve("llama3")
            with pytest.raises(openai.NotFoundError):
                await c.models.retrieve("llama3.2:1b")
