"""The request body of ``POST /v1/chat/completions``: OpenAI's fields, checked as OpenAI checks
them (a malformed one is a 422 naming it, not a 500 or a 502 that OpenAI SDKs retry), and
refused where the service cannot honour them rather than half done."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from .models import AgentName, JsonRequest

__all__ = ["ChatCompletionRequest", "ChatMessageIn"]

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name


class _Lenient(JsonRequest):
    # OpenAI clients send fields we do not use (n, user, seed, ...): accept and ignore them.
    # Those we use take their JSON types only, and Unicode text (JsonRequest).
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessageIn(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # (Before ``content``, whose check reads it.)
    tool_calls: list[ToolCallIn] | None = None
    content: str | list[dict[str, Any]] | None = Field(None, validate_default=True)
    name: str | None = None
    # (After ``role``, whose check reads it.)
    tool_call_id: str | None = Field(None, validate_default=True)

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not value and not info.data.get("name"):
            # A tool result names the call it answers: by its id (OpenAI's), or by the tool's
            # name (the shape Ollama's clients send; its API pairs results by name). With
            # neither, the model's server paired it with no call.
            raise ValueError("a tool message needs tool_call_id (the id of the call it "
                             "answers) or the tool's name")
        return value

    @field_validator("content")
    @classmethod
    def _text_parts(cls, value: str | list[dict[str, Any]] | None,
                    info: ValidationInfo) -> Any:
        if value is None and not (info.data.get("role") == "assistant"
                                  and info.data.get("tool_calls")):
            # As OpenAI: only an assistant's tool calls stand without text. A user message
            # with none was sent on as "", and the model's answer to nothing returned and
            # stored.
            raise ValueError("a message needs content (only an assistant message with "
                             "tool_calls may leave it out)")
        if isinstance(value, list):
            for part in value:
                if not isinstance(part, dict):
                    raise ValueError("each content part must be an object: {'type': 'text', "
                                     "'text': ...}")
                kind = part.get("type")
                if kind not in ("text", "refusal"):
                    # Dropping it would have the model answer about an image it never saw.
                    raise ValueError(f"only text content parts are supported, not "
                                     f"{str(kind)[:40]!r}")
                if not isinstance(part.get(kind), str):
                    # Dropped, the model was asked nothing (OpenAI refuses it too).
                    raise ValueError(f"a {kind} part's {kind!r} must be a string")
        return value


class StreamOptions(_Lenient):
    include_usage: bool | None = None  # null: absent, as the models' servers read it


class ChatCompletionRequest(_Lenient):
    model: str | None = Field(None, max_length=200)
    messages: list[ChatMessageIn] = Field(min_length=1)
    stream: bool | None = None  # null: not streamed (the SDK's type: Optional[Literal[False]])
    stream_options: StreamOptions | None = None
    # (Up to a 32-bit int, as the models' servers read it: 2**40 wrapped to 0 at llama.cpp's,
    # a one-token answer and a 200.)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    tools: list[dict[str, Any]] | None = None
    stop: str | list[str] | None = None
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's: a 64-bit integer
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logit_bias: dict[str, float] | None = None
    reasoning_effort: str | None = Field(None, max_length=40)
    # Output the service cannot give (audio, a web search): refused, not answered with text
    # alone and a 200.
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # Accepted only where honoured: one choice, no log probabilities (silently giving less than
    # was asked would break a client reading choices[1] or choice.logprobs).
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=0, description="not supported")
    agent: AgentName | None = Field(None, description="extension: run this agent")
    # The legacy function calling, superseded by ``tools``: refused, not dropped (the model
    # would answer without the function, and the client wait for a function_call).
    functions: list[Any] | None = Field(None, description="not supported: use tools")
    function_call: str | dict[str, Any] | None = Field(
        None, description="not supported: use tool_choice")

    @field_validator("tools")
    @classmethod
    def _function_tools(cls, value: list[dict[str, Any]] | None) -> Any:
        # Checked here, as OpenAI does: refused by the model's server instead, it came back a
        # 502 that the OpenAI SDKs retry (three stored runs for one bad request).
        for n, tool in enumerate(value or ()):
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict):
                raise ValueError(f"tools[{n}] must be {{'type': 'function', 'function': {{...}}}}")
            name = function.get("name")
            if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
                raise ValueError(f"tools[{n}].function.name must be 1-64 letters, digits, '_' "
                                 "or '-'")
            if not isinstance(function.get("parameters", {}), dict):
                raise ValueError(f"tools[{n}].function.parameters must be a JSON Schema object")
            if not isinstance(function.get("description", ""), str):
                raise ValueError(f"tools[{n}].function.description must be a string")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        # OpenAI's range: a bias past it is no bias at all but a ban or a forcing.
        if value is not None and any(not -100 <= bias <= 100 for bias in value.values()):
            raise ValueError("each bias must be from -100 to 100")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # OpenAI's shapes, checked here: passed on unchecked, a malformed one failed inside
        # the run (a 500 that OpenAI SDKs retry) or was refused by the model's server.
        if value is None:
            return value
        kind = value.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("type must be 'text', 'json_object' or 'json_schema'")
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict):
                raise ValueError("json_schema must be an object: {'name': ..., 'schema': {...}}")
            if not isinstance(spec.get("schema", {}), dict):
                raise ValueError("json_schema.schema must be a JSON Schema object")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _a_named_tool_is_offered(cls, value: str | dict[str, Any] | None,
                                 info: ValidationInfo) -> Any:
        # As OpenAI checks it: a call forced to a tool the model is not offered cannot be made
        # (on Ollama, where only the named tool is offered, the model got none).
        if isinstance(value, str):
            # A typo ("requried") was "auto" on Ollama, the client's forcing silently dropped,
            # and llama.cpp's server's 400 on llama.cpp.
            if value not in ("none", "auto", "required"):
                raise ValueError("must be 'none', 'auto', 'required' or "
                                 "{'type': 'function', 'function': {'name': ...}}")
            if value == "required" and not info.data.get("tools"):
                raise ValueError("'required' forces a call to one of tools, and none are given")
        if isinstance(value, dict) and (
                value.get("type") != "function" or not isinstance(value.get("function"), dict)
                or not isinstance(value["function"].get("name"), str)):
            raise ValueError("a forced tool is {'type': 'function', 'function': {'name': ...}}")
        if isinstance(value, dict) and "tools" in info.data:
            named = (value.get("function") or {}).get("name")
            offered = [(t.get("function") or {}).get("name") for t in info.data["tools"] or ()]
            if isinstance(named, str) and named not in offered:
                raise ValueError(f"names the function {named[:64]!r}, which is not in tools")
        return value

    @field_validator("agent")
    @classmethod
    def _tools_reach_the_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A client's tools are the model's to call and the client's to run: react and
        # plan_execute call the service's own tools, and dropped the client's silently (the
        # client waited for tool calls that never came).
        if value in ("react", "plan_execute") and info.data.get("tools"):
            raise ValueError(f"the {value} agent calls the service's own tools; a client's "
                             "tools are passed to the model by the chat agent (and by auto, "
                             "which then answers with chat)")
        return value

    @field_validator("functions", "function_call")
    @classmethod
    def _no_functions(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("the legacy function calling is not supported: use tools and "
                             "tool_choice")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(m != "text" for m in value):
            raise ValueError("only text output is supported")
        return value

    @field_validator("audio", "web_search_options")
    @classmethod
    def _not_supported(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("log probabilities are not supported")
        return value
