"""Tools: the registry, argument validation, the built-ins, and a deployer's own module."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import ConfigError, ToolArgumentsError
from service.tools import BUILTIN_TOOLS, ToolRegistry, calculate, load_tool_modules


@pytest.mark.parametrize(
    ("expr", "value"),
    [("2 * (3 + 4) ** 2", 98), ("10 / 4", 2.5), ("-3 + 5", 2), ("2^8", 256), ("sqrt(16)", 4),
     ("max(1, 7, 3)", 7), ("pi", math.pi), ("7 // 2", 3), ("7 % 4", 3)],
)
def test_calculator(expr: str, value: float) -> None:
    assert calculate(expr) == pytest.approx(value)


@pytest.mark.parametrize(
    "expr",
    ["__import__('os').system('true')", "open('/etc/passwd')", "x", "(1).__class__",
     "2 ** 100000", "[1, 2]", "lambda: 1", "'a' * 3"],
)
def test_calculator_refuses_anything_but_arithmetic(expr: str) -> None:
    with pytest.raises((ValueError, SyntaxError)):
        calculate(expr)


@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6))
def test_calculator_agrees_with_python(a: int, b: int) -> None:
    assert calculate(f"{a} + {b} * 3") == a + b * 3


def test_registry_validates_arguments() -> None:
    reg = ToolRegistry(BUILTIN_TOOLS)
    calc = reg.get("calculator")
    assert calc is not None
    assert calc.validate({"expression": "1"}) == {"expression": "1"}
    with pytest.raises(ToolArgumentsError, match="expression"):
        calc.validate({})
    with pytest.raises(ToolArgumentsError):
        calc.validate({"expression": 5})
    with pytest.raises(ToolArgumentsError, match="JSON object"):
        calc.validate("1+1")
    with pytest.raises(ConfigError):
        reg.add(calc)
    assert calc.spec(30)["timeout"] == 5
    assert calc.openai()["function"]["name"] == "calculator"


async def test_builtins_work() -> None:
    reg = ToolRegistry(BUILTIN_TOOLS)
    now = await reg.get("current_time").fn(timezone="Europe/Paris")  # type: ignore[union-attr]
    assert now["timezone"] == "Europe/Paris"
    assert "T" in now["iso"]
    assert reg.get("text_stats").fn(text="One two. Three!") == {  # type: ignore[union-attr]
        "characters": 15, "words": 3, "lines": 1, "sentences": 2}
    assert reg.get("unit_convert").fn(value=100, from_unit="C", to_unit="F") == 212  # type: ignore[union-attr]
    km = reg.get("unit_convert").fn(value=1, from_unit="mi", to_unit="km")  # type: ignore[union-attr]
    assert km == pytest.approx(1.609344)


def test_a_deployer_module_adds_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_tools.py").write_text(
        "from service.tools import tool\n"
        "@tool('shout', 'Upper-case a text.', {'type': 'object', 'properties': "
        "{'text': {'type': 'string'}}, 'required': ['text']})\n"
        "def shout(text):\n    return text.upper()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tools = load_tool_modules(["my_tools"])
    assert [t.name for t in tools] == ["shout"]
    assert tools[0].fn(text="hi") == "HI"
    with pytest.raises(ConfigError, match="cannot import"):
        load_tool_modules(["no_such_module_here"])
    sys.modules.pop("my_tools", None)


@pytest.mark.parametrize(("source", "error"), [
    ("x = (\n", "SyntaxError"),
    ("raise RuntimeError('no API key')\n", "RuntimeError: no API key"),
    ("TOOLS = 3\n", "TOOLS is a int, not a list"),
])
def test_a_tool_module_that_cannot_load_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, error: str
) -> None:
    # Found in review: only ImportError became the one-line start-up error naming
    # SERVICE_TOOLS; a module with a syntax error or failing code gave a traceback.
    (tmp_path / "broken_tools.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="SERVICE_TOOLS") as info:
            load_tool_modules(["broken_tools"])
        assert error in info.value.message
    finally:
        sys.modules.pop("broken_tools", None)
