"""The printed table, the machine description and the bars (pure formatting over result dicts)."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Callable
from typing import Any

__all__ = ["bars", "machine", "render"]


def machine() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _bar(value: Any, limit: float, op: str, where: str) -> dict[str, Any]:
    met = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return {"value": value, "limit": f"{op} {limit:g}", "met": met, "where": where}


def bars(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    relay = res.get("relay")
    if relay:
        row = min(relay, key=lambda r: abs(r["streams"] - 100))
        where = f"{row['streams']} streams"
        for q, limit in (("p50", 1.0), ("p99", 5.0)):
            worst = [row["targets"][n][f"added_ttft_{q}_ms"] for n in ("openai", "native")]
            value = None if None in worst else max(worst)
            out[f"added_ttft_{q}_ms"] = _bar(value, limit, "<=", where + ", worst of openai/native")
    if res.get("throughput"):
        out["chunks_per_service_cpu_s"] = _bar(
            res["throughput"]["openai"].get("chunks_per_service_cpu_s"), 10_000, ">=", "flood")
    if res.get("idle_rss_mb") is not None:
        out["idle_rss_mb"] = _bar(res["idle_rss_mb"], 80, "<=", "after start-up and a warm-up")
    cap = res.get("capacity")
    if cap:
        out["live_streams"] = _bar(cap["reached"], 2000, ">=", "added p99 gap <= 50 ms, no errors")
        out["rss_per_stream_kb"] = _bar(cap["rss_per_stream_kb"], 100, "<=",
                                        f"at {cap['reached']} streams")
    cancel = res.get("cancel")
    if cancel:
        where = f"{cancel['streams']} streams"
        out["cancel_p99_ms"] = _bar(cancel["p99_ms"], 20, "<=", where)
        out["cancel_never_closed"] = _bar(cancel["never_closed"], 0, "<=", where)
    return out


def _f(v: Any, width: int = 8, digits: int = 2) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return f"{v:{width}.{digits}f}" if abs(v) < 1e5 else f"{v:{width}.0f}"
    return str(v).rjust(width)


def _relay_table(rows: list[dict[str, Any]], add: Callable[[str], None]) -> None:
    add("streams target  n_str  errs  ttft50  ttft99 +ttft50 +ttft99 to_up50 up_cli50"
        "   gap50   gap99  +gap50  +gap99   chunk/s  svc%  sim%  cli%")
    for row in rows:
        for name, t in row["targets"].items():
            c = t["cpu"]
            add(f"{row['streams']:>7} {name:<7}{t['streams']:>6}{t['errors']:>6}"
                f"{_f(t['ttft_p50_ms'])}{_f(t['ttft_p99_ms'])}"
                f"{_f(t.get('added_ttft_p50_ms'))}{_f(t.get('added_ttft_p99_ms'))}"
                f"{_f(t['to_upstream_p50_ms'])}{_f(t['first_chunk_to_client_p50_ms'], 9)}"
                f"{_f(t['gap_p50_ms'])}{_f(t['gap_p99_ms'])}"
                f"{_f(t.get('added_gap_p50_ms'))}{_f(t.get('added_gap_p99_ms'))}"
                f"{_f(t['chunks_per_s'], 10)}{_f(c.get('service_cpu_pct'), 6, 1)}"
                f"{_f(c.get('simulator_cpu_pct'), 6, 1)}{_f(c.get('client_cpu_pct'), 6, 1)}")
    add("(to_up50: request sent -> simulator got the upstream request; up_cli50: simulator's"
        " first chunk -> client's first token; svc%: the process serving that target)")
    for row in rows:
        for name, t in row["targets"].items():
            if t.get("error_kinds"):
                add(f"errors at {row['streams']} streams, {name}: {t['error_kinds']}")


def render(res: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    if res.get("relay"):
        add("## Relay overhead (ms; added = through the service minus direct, same run)")
        _relay_table(res["relay"], add)
    if res.get("floor"):
        if lines:
            add("")
        add("## The stack alone (ms; stand-in relays, same run: stack = hypercorn + httpx,"
            " hyperc = hypercorn + sockets, httpx = sockets + httpx, trio = sockets both ways)")
        _relay_table(res["floor"], add)
    tp = res.get("throughput")
    if tp:
        add("")
        add(f"## Throughput, flood upstream ({tp['streams']} streams x {tp['tokens_per_stream']}"
            " tokens, no pacing)")
        add("target   chunks/s  chunks/svc-CPU-s  chunks/client-CPU-s  svc%   sim%   cli%  errs")
        for name in ("direct", "openai"):
            t = tp[name]
            add(f"{name:<7}{_f(t['chunks_per_s'], 10)}{_f(t.get('chunks_per_service_cpu_s'), 18)}"
                f"{_f(t['chunks_per_client_cpu_s'], 21)}{_f(t['service_cpu_pct'], 7, 1)}"
                f"{_f(t['simulator_cpu_pct'], 7)}{_f(t['client_cpu_pct'], 7)}{_f(t['errors'], 6)}")
    cap = res.get("capacity")
    if cap:
        add("")
        add(f"## Capacity: live streams at 1 token/s (idle RSS {res.get('idle_rss_mb')} MB)")
        add(" streams errs    gap50    gap99  +gap50  +gap99  ramp_s  rss_MB  KB/stream"
            "  svc%  sim%  cli%")
        for r in cap["steps"]:
            add(f"{r['streams']:>8}{r['errors']:>5}{_f(r['gap_p50_ms'], 9)}"
                f"{_f(r['gap_p99_ms'], 9)}{_f(r['added_gap_p50_ms'])}"
                f"{_f(r['added_gap_p99_ms'])}{_f(r['ramp_s'])}{_f(r['service_rss_mb'])}"
                f"{_f(r['rss_per_stream_kb'], 11)}{_f(r['service_cpu_pct'], 6, 1)}"
                f"{_f(r['simulator_cpu_pct'], 6, 1)}{_f(r['client_cpu_pct'], 6, 1)}")
        add("(+gap: a token's arrival gap minus its send gap at the simulator)")
        for r in cap["steps"]:
            if not r.get("all_set_up", True):
                add(f"(at {r['streams']}: not every stream had its first token within 30 s)")
        add(f"reached: {cap['reached']} streams, {cap['rss_per_stream_kb']} KB RSS each")
    cancel = res.get("cancel")
    if cancel:
        add("")
        add(f"## Cancellation: client disconnect -> upstream closed ({cancel['streams']} streams,"
            f" {cancel['interval_ms']:g} ms/token)")
        add(f"measured {cancel['measured']}  p50 {cancel['p50_ms']} ms  p99 {cancel['p99_ms']} ms"
            f"  max {cancel['max_ms']} ms  never closed {cancel['never_closed']}"
            f"  errors {cancel['errors']}  (svc {cancel['service_cpu_pct']}%,"
            f" client {cancel['client_cpu_pct']}%)")
        for name, p in cancel["by_protocol"].items():
            add(f"  {name:<7} n={p['n']}  p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms"
                f"  max {p['max_ms']} ms")
    store = res.get("store")
    if store:
        add("")
        add(f"## Store appends (SQLite WAL, synchronous={store['synchronous']},"
            f" {store['tasks']} tasks per process)")
        add("processes  appends/s   p50_ms   p99_ms")
        for key, label in (("one_process", "1"), ("many_processes", str(store.get("procs")))):
            s = store[key]
            add(f"{label:>9}{_f(s['appends_per_s'], 11)}{_f(s['p50_ms'], 9)}{_f(s['p99_ms'], 9)}")
    if res.get("bars"):
        add("")
        add("## Bars")
        for name, b in res["bars"].items():
            verdict = {True: "met", False: "MISSED", None: "n/a"}[b["met"]]
            add(f"{name:<26}{_f(b['value'], 10)}  {b['limit']:<10} {verdict:<7} ({b['where']})")
    return "\n".join(lines)
