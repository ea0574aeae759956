"""Review of the built-in tools, how agents call them, and the benchmark CLI (2026-12-06, g).

Each test fails on the code as reviewed, because of the defect its docstring names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from service.bench.procs import children
from service.settings import Settings
from service.sim import Reply
from service.tools import calculate

from .e2e import Event, e2e

REPO = Path(__file__).resolve().parents[1]


# ---- the calculator: a finite expression answered "inf" / "nan" --------------------------------

@pytest.mark.parametrize("expression", ["1e308 * 10", "1e400", "1e308 * 10 - 1e308 * 10"])
def test_calculator_does_not_answer_a_float_overflow_with_inf_or_nan(expression: str) -> None:
    """``calculate("1e308 * 10")`` returns ``inf``, ``calculate("1e400")`` too, and
    ``calculate("1e308*10 - 1e308*10")`` returns ``nan``: the model's observation is the text
    ``"inf"`` / ``"nan"`` (``strict_json`` turns the float into a string), and the user is told
    the answer is "infinity" or "not a number" for a finite expression. The same calculator
    refuses ``10.0 ** 400`` and ``exp(1000)`` with an error (OverflowError), so its answer to an
    overflow depends on which operator overflowed. Expected: a non-finite result is an error
    the model sees ("result too large for a float" / "not a number"), as for ``**``."""
    try:
        result = calculate(expression)
    except (ValueError, OverflowError, ArithmeticError):
        return
    pytest.fail(f"calculate({expression!r}) answered {result!r} instead of an error")


# ---- tools called from agents: NaN / Infinity in a model's arguments ----------------------------

async def _react_run(env: Any, call: dict[str, Any]) -> tuple[int, dict[str, Any], list[Event]]:
    env.sim.script(Reply(tool_calls=(call,)), Reply(text="Final Answer: done"))
    conv = await env.conversation()
    r = await env.client.post(f"/api/conversations/{conv}/messages",
                              json={"content": "convert it", "agent": "react"})
    body = r.json()
    run_id = (body.get("run") or {}).get("id") or body["error"]["run_id"]
    return r.status_code, body, await env.run_events(run_id)


async def test_unit_convert_overflow_is_a_tool_error_not_inf(settings: Settings) -> None:
    """A model calls ``unit_convert`` with ``{"value": 1e308, "from_unit": "km", "to_unit":
    "m"}`` (valid JSON, a finite number the schema accepts). The tool multiplies to ``inf``
    and the run's ``tool.result`` is ``{"output": "inf"}``: a success, whose text the model
    relays to the user as the converted value. Expected: an error observation (the result does
    not fit a float), as the calculator gives for ``10.0 ** 400``; a tool's output should
    never be a non-number dressed as a number."""
    async with e2e(settings, "llamacpp") as env:
        call = {"name": "unit_convert",
                "raw_arguments": '{"value": 1e308, "from_unit": "km", "to_unit": "m"}'}
        status, _, events = await _react_run(env, call)
    assert status == 200
    (result,) = [e.data for e in events if e.type == "tool.result"]
    assert "error" in result, f"unit_convert's overflow answered as a success: {result}"


async def test_unit_convert_refuses_a_nan_value(settings: Settings) -> None:
    """A model's native tool call ``unit_convert({"value": NaN, ...})`` (Python's json, which
    parses the arguments, accepts ``NaN`` and ``Infinity``; JSON Schema's ``"type":
    "number"`` accepts a float NaN) runs the tool, whose ``tool.result`` is ``{"output":
    "nan"}`` (and the ``tool.call`` event shows ``"value": "nan"``, a string). The model sees a
    "result" and the next request upstream carries ``'{"value": NaN, ...}'`` as the call's
    arguments, which strict JSON parsers (llama.cpp's) refuse. Expected: the call is refused
    as invalid arguments (a clear tool error: the value must be a finite number)."""
    async with e2e(settings, "llamacpp") as env:
        call = {"name": "unit_convert",
                "raw_arguments": '{"value": NaN, "from_unit": "km", "to_unit": "m"}'}
        status, _, events = await _react_run(env, call)
    assert status == 200
    (result,) = [e.data for e in events if e.type == "tool.result"]
    assert "error" in result, f"unit_convert ran on NaN and answered: {result}"


async def test_non_finite_tool_arguments_do_not_crash_an_ollama_run(settings: Settings) -> None:
    """An Ollama-protocol upstream (an Ollama-compatible server, a proxy, a fleet's member)
    streams a tool call whose arguments hold ``Infinity`` (what Python's json writes for a
    number past a float, e.g. a model's ``1e999``). The service parses it (its json accepts
    it), runs the tool, and then cannot build the next request: httpx encodes bodies with
    ``allow_nan=False`` and raises ``ValueError`` in ``OllamaBackend.stream``, which crashes
    the run: the client gets HTTP 500 ``internal_error`` "internal error (ValueError)" and the
    run ends ``failed``. Expected: the bad call is the model's problem, shown to it as a tool
    error (or its arguments passed on as text), and the run goes on to its answer."""
    async with e2e(settings, "ollama") as env:
        call = {"name": "unit_convert",
                "arguments": {"value": float("inf"), "from_unit": "km", "to_unit": "m"}}
        status, body, events = await _react_run(env, call)
    assert status == 200, body
    assert events[-1].data["status"] == "succeeded", events[-1].data


# ---- the benchmark CLI ----------------------------------------------------------------------

def _bench(*args: str, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.bench", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False,
                          **kwargs)


def test_bench_json_path_that_cannot_be_written_is_a_clear_error(tmp_path: Path) -> None:
    """``python -m service.bench --quick --only store --json results/out.json`` where
    ``results/`` does not exist runs the whole benchmark (minutes without ``--quick``),
    prints its table, and only then dies writing the file: a ``FileNotFoundError`` traceback,
    exit code 1, the results lost. Expected: the path is checked before anything runs, and a
    bad one is one line naming ``--json``, exit code 2 (argparse's usage error)."""
    out = tmp_path / "missing-dir" / "out.json"
    proc = _bench("--quick", "--only", "store", "--json", str(out))
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-1500:])
    assert "--json" in proc.stderr


def test_bench_only_naming_no_scenario_is_refused() -> None:
    """``python -m service.bench --only ,`` (or ``--only ""``, a script's empty variable) names
    no scenario: the benchmark runs nothing, prints an empty report and exits 0, which a CI
    job takes for a passed benchmark. Expected: exit code 2 with an error saying ``--only``
    names no scenario (as an unknown scenario name already is)."""
    proc = _bench("--only", ",")
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-500:])
    assert "--only" in proc.stderr


@pytest.mark.parametrize("option", [("--cross-runs", "0"), ("--cross-runs", "-5"),
                                    ("--cross-clients", "0"), ("--rounds", "0")])
def test_bench_counts_below_one_are_refused(option: tuple[str, str]) -> None:
    """``--cross-runs 0`` is taken for "not given" (``if args.cross_runs``) and runs the
    default 100 live runs; ``--cross-runs -5`` and ``--cross-clients 0`` are accepted as
    they are (a level of -5 runs), ``--rounds 0`` silently becomes 1. Expected: a count
    below 1 is a usage error naming the option, exit code 2, as ``--workers 0`` is.
    (``--only ,`` keeps the invocation from running any scenario on the current code.)"""
    proc = _bench("--only", ",", *option)
    assert proc.returncode == 2, (option, proc.returncode, proc.stderr[-500:])
    assert option[0] in proc.stderr, proc.stderr[-500:]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]


async def test_bench_sigint_while_the_simulator_starts_leaves_no_simulator(tmp_path: Path) -> None:
    """``kill -INT`` (or ``timeout -s INT``, a CI runner's cancel) reaching ``python -m
    service.bench`` while its simulator is still starting (``start_simulator`` waits up to
    20 s for ``/health``) leaves the simulator running, orphaned, holding its port, after the
    benchmark has exited: ``start_simulator`` starts the process and then waits with no
    ``try`` around the wait, and the caller's ``try: ... finally: sim.stop()`` begins only once
    it returned. The same happens when the simulator does not answer within 20 s
    (``TooSlowError``), and in ``floor``'s ``_start``. Here the simulator is held stopped
    (SIGSTOP: a slow start on a loaded machine) so the interrupt lands in that wait.
    Expected: the benchmark stops what it started, whenever it is interrupted."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    bench = subprocess.Popen(  # noqa: ASYNC220 (killed below whatever happens)
        [sys.executable, "-m", "service.bench", "--quick", "--only", "relay"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    sim: int | None = None
    try:
        with trio.move_on_after(60):
            while sim is None and bench.poll() is None:
                for child in children(bench.pid):
                    if b"service.bench.simproc" in _cmdline(child):
                        sim = child
                        os.kill(sim, signal.SIGSTOP)  # still starting: it cannot answer /health
                        break
                else:
                    await trio.sleep(0.001)
        assert sim is not None, "the benchmark never started its simulator"
        await trio.sleep(0.2)  # the benchmark is waiting for the simulator's /health
        bench.send_signal(signal.SIGINT)
        with trio.fail_after(60):
            while bench.poll() is None:  # noqa: ASYNC110 (another process)
                await trio.sleep(0.05)
        assert not _alive(sim), (
            f"the simulator (pid {sim}) outlived the interrupted benchmark "
            f"(exit {bench.returncode})")
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)  # (killed: at once)
        if bench.stderr is not None:
            bench.stderr.close()
        if sim is not None and _alive(sim):
            os.kill(sim, signal.SIGKILL)
