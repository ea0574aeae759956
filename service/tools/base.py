"""Tools the agents can call: a name, a description, JSON-schema parameters and a timeout.

A tool function takes its arguments as keywords and returns anything JSON-serialisable. It may be
``async`` (runs in the run's task tree, cancelled with it) or plain (runs in a worker thread via
``trio.to_thread.run_sync``; a cancelled sync tool is abandoned, so sync tools must be free of
side effects that matter if cut short, or be written async).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator

from ..errors import ConfigError, ToolArgumentsError

__all__ = ["Tool", "ToolRegistry", "load_tool_modules", "tool"]

ToolFn = Callable[..., Any] | Callable[..., Awaitable[Any]]
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    fn: ToolFn
    timeout: float | None = None  # None: SERVICE_TOOL_TIMEOUT (which also caps it)
    _validator: Draft202012Validator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            # OpenAI's rule for a function's name, which strict servers enforce: a tool named
            # otherwise made them refuse every call of react and plan_execute.
            raise ConfigError(f"tool {self.name!r}: a name is 1-64 letters, digits, '_' or '-'")
        if self.timeout is not None and not (isinstance(self.timeout, int | float)
                                             and 0 < self.timeout < math.inf):
            # Found here, at start, naming the tool: not by the model, at every call.
            raise ConfigError(f"tool {self.name!r}: timeout must be a number of seconds "
                              f"above 0, not {self.timeout!r}")
        Draft202012Validator.check_schema(self.parameters)
        object.__setattr__(self, "_validator", Draft202012Validator(self.parameters))

    @property
    def is_async(self) -> bool:
        # Through functools.wraps decorators (a deployer's logging or timing wrapper).
        return inspect.iscoroutinefunction(inspect.unwrap(self.fn))

    def validate(self, arguments: object) -> dict[str, Any]:
        """Return the arguments if they match the schema, else raise ToolArgumentsError."""
        if not isinstance(arguments, dict):
            raise ToolArgumentsError(
                f"arguments of {self.name} must be a JSON object", tool=self.name
            )
        errors = sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.path))
        if errors:
            first = errors[0]
            where = ".".join(str(p) for p in first.path) or "arguments"
            raise ToolArgumentsError(
                f"invalid arguments for {self.name}: {where}: {first.message}", tool=self.name
            )
        return arguments

    def timeout_under(self, limit: float) -> float:
        """Seconds a call may take: its own timeout, never more than SERVICE_TOOL_TIMEOUT."""
        return limit if self.timeout is None else min(self.timeout, limit)

    def spec(self, default_timeout: float) -> dict[str, Any]:
        """The ``/api/tools`` shape."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "timeout": self.timeout_under(default_timeout),
        }

    def openai(self) -> dict[str, Any]:
        """The OpenAI / Ollama ``tools`` entry."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


def tool(
    name: str, description: str, parameters: dict[str, Any], *, timeout: float | None = None
) -> Callable[[ToolFn], Tool]:
    """Decorator: ``@tool("name", "what it does", {json schema})`` turns a function into a Tool."""

    def wrap(fn: ToolFn) -> Tool:
        return Tool(name, description, parameters, fn, timeout)

    return wrap


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, t: Tool) -> None:
        if t.name in self._tools:
            raise ConfigError(f"two tools are named {t.name!r}")
        self._tools[t.name] = t

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __repr__(self) -> str:
        return f"<ToolRegistry [{', '.join(self._tools)}]>"


def load_tool_modules(modules: Iterable[str]) -> list[Tool]:
    """Import each module and collect its tools: a ``TOOLS`` list, or module-level Tool objects."""
    found: list[Tool] = []
    where: dict[str, str] = {}  # a tool's name -> the module it was found in first
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # ImportError, and whatever its code raises (SyntaxError too)
            raise ConfigError(f"SERVICE_TOOLS: cannot import tool module {name!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
        tools = getattr(module, "TOOLS", None)
        if tools is None:
            tools = [v for v in vars(module).values() if isinstance(v, Tool)]
        if not isinstance(tools, list | tuple):
            raise ConfigError(
                f"SERVICE_TOOLS: {name}.TOOLS is a {type(tools).__name__}, not a list")
        for t in tools:
            if not isinstance(t, Tool):
                raise ConfigError(f"{name}.TOOLS holds {t!r}, not a service.tools.Tool")
            if any(t is f for f in found):
                continue  # the same tool, imported by another module (to reuse it)
            if t.name in where:
                raise ConfigError(f"SERVICE_TOOLS: two tools are named {t.name!r} (in "
                                  f"{where[t.name]} and {name})")
            where[t.name] = name
            found.append(t)
    return found
