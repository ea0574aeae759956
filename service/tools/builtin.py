"""Built-in tools: useful and safe (no eval, no file system, no network)."""

from __future__ import annotations

import ast
import math
import operator
import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .base import Tool, tool

__all__ = ["BUILTIN_TOOLS", "calculate"]

_BINOPS: dict[type[ast.operator], Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Any] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_NDIGITS = 400  # round(x, n): |n| past this is refused (see _round)


def _round(number: Any, ndigits: Any = None) -> Any:
    """``round``, with its digits bounded: ``round(1, -10**9)`` has CPython compute
    ``10**1000000000`` holding the GIL (for hours; no timeout can stop it)."""
    if ndigits is None:
        return round(number)
    if not isinstance(ndigits, int) or abs(ndigits) > _MAX_NDIGITS:
        raise ValueError(f"round's digits must be a whole number within +-{_MAX_NDIGITS}")
    return round(number, ndigits)


_FUNCS: dict[str, Any] = {
    "sqrt": math.sqrt, "abs": abs, "round": _round, "min": min, "max": max,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log, "exp": math.exp,
    "floor": math.floor, "ceil": math.ceil,
}
_NAMES = {"pi": math.pi, "e": math.e}
_MAX_LEN = 500
# Integers stay under this many bits (~1,233 digits): big-integer arithmetic holds the GIL, so an
# expression like ((9**999)**999)**999 (20 characters) would freeze every task of the process
# for hours, and no timeout can stop it. The bound is checked before each operation.
_MAX_BITS = 4096


def _check_size(op: ast.operator, left: Any, right: Any) -> None:
    """Refuse an operation whose integer result would pass ``_MAX_BITS`` (before computing it)."""
    if isinstance(op, ast.Pow):
        # Only an integer power grows with its exponent: a float one costs the same whatever
        # it is (past a float's range, an OverflowError: an error the model sees), so
        # (1 + 0.05/365) ** (365*30), compound interest, is answered (a bound on every
        # exponent refused it).
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 and (
            right * math.log2(abs(left)) > _MAX_BITS
        ):
            raise ValueError("result too large")
    elif isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int) and (
        left.bit_length() + right.bit_length() > _MAX_BITS
    ):
        raise ValueError("result too large")


def _finite(value: Any) -> Any:
    """``value``, unless it is a float past a float's range or not a number: "inf" or "nan"
    is no answer to an arithmetic question (``1e308 * 10``), and ``10.0 ** 400`` is refused
    the same way (OverflowError)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a number" if math.isnan(value) else "result too large for a float")
    return value


def calculate(expression: str) -> float | int:
    """Evaluate arithmetic by walking its AST: numbers, + - * / // % **, a few math functions."""
    if len(expression) > _MAX_LEN:
        raise ValueError(f"expression longer than {_MAX_LEN} characters")
    tree = ast.parse(expression.replace("^", "**"), mode="eval")

    def ev(node: ast.AST) -> Any:
        return _finite(each(node))

    def each(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            _check_size(node.op, left, right)
            value = _BINOPS[type(node.op)](left, right)
            if isinstance(value, complex):
                # (-8) ** (1/3): Python's answer is complex; this is a real calculator, as
                # sqrt(-1) says (an error the model sees, not a wrong number).
                raise ValueError(f"{ast.unparse(node)} is not a real number")
            return value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Name) and node.id in _NAMES:
            return _NAMES[node.id]
        if (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS and not node.keywords
        ):
            return _FUNCS[node.func.id](*(ev(a) for a in node.args))
        raise ValueError(f"unsupported expression: {ast.unparse(node)!r}")

    result = ev(tree)
    if isinstance(result, float) and result.is_integer() and abs(result) < 2**53:
        return int(result)
    return result  # type: ignore[no-any-return]


@tool(
    "calculator",
    "Evaluate an arithmetic expression, e.g. '2 * (3 + 4) ** 2' or 'sqrt(2)'.",
    {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "the expression"}},
        "required": ["expression"],
        "additionalProperties": False,
    },
    timeout=5,
)
def calculator(expression: str) -> Any:
    return calculate(expression)


@tool(
    "current_time",
    "The current date and time, in ISO 8601, in a given IANA time zone (default UTC).",
    {
        "type": "object",
        "properties": {"timezone": {"type": "string", "description": "e.g. Europe/Paris"}},
        "additionalProperties": False,
    },
    timeout=5,
)
async def current_time(timezone: str = "UTC") -> dict[str, str]:
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {timezone!r}") from exc
    now = datetime.now(tz)
    return {"iso": now.isoformat(timespec="seconds"), "weekday": now.strftime("%A"),
            "timezone": timezone}


@tool(
    "text_stats",
    "Count the characters, words, lines and sentences of a text.",
    {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
        "additionalProperties": False,
    },
    timeout=5,
)
def text_stats(text: str) -> dict[str, int]:
    return {
        "characters": len(text),
        "words": len(text.split()),
        # Line ends only (\n, \r\n, \r; not a page break's form feed, as splitlines has
        # it); a last one ends a line, as editors count.
        "lines": len(re.findall(r"\r\n|\r|\n", text)) + (
            0 if not text or text.endswith(("\n", "\r")) else 1),
        # A "." between two digits (3.14) ends no sentence.
        "sentences": len([s for s in re.split(r"(?<!\d)[.!?]+|[.!?]+(?!\d)", text)
                          if s.strip()]),
    }


@tool(
    "unit_convert",
    "Convert a value between units of length, mass or temperature (m, km, mi, ft, in, cm, kg, "
    "g, lb, oz, C, F, K).",
    {
        "type": "object",
        "properties": {
            "value": {"type": "number"},
            "from_unit": {"type": "string"},
            "to_unit": {"type": "string"},
        },
        "required": ["value", "from_unit", "to_unit"],
        "additionalProperties": False,
    },
    timeout=5,
)
def unit_convert(value: float, from_unit: str, to_unit: str) -> float:
    length = {"m": 1.0, "km": 1000.0, "cm": 0.01, "mi": 1609.344, "ft": 0.3048, "in": 0.0254}
    mass = {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "oz": 0.028349523125}
    _finite(float(value))
    for table in (length, mass):
        if from_unit in table and to_unit in table:
            return _finite(value * table[from_unit] / table[to_unit])  # type: ignore[no-any-return]
    temps = {"C", "F", "K"}
    if from_unit in temps and to_unit in temps:
        c = {"C": value, "F": (value - 32) * 5 / 9, "K": value - 273.15}[from_unit]
        if c < -273.15 - 1e-9:  # none is (-500 C was answered as -226.85 K)
            raise ValueError(f"{value} {from_unit} is below absolute zero")
        return _finite({"C": c, "F": c * 9 / 5 + 32, "K": c + 273.15}[to_unit])  # type: ignore[no-any-return]
    raise ValueError(f"cannot convert {from_unit} to {to_unit}")


BUILTIN_TOOLS: tuple[Tool, ...] = (calculator, current_time, text_stats, unit_convert)
