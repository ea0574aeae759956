"""The printed table, the machine description and the bars (pure formatting over result dicts)."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Callable
from typing import Any

__all__ = ["bars", "compare", "machine", "render", "summaries"]


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


def _label(cfg: dict[str, Any]) -> str:
    n = cfg["workers"]
    return f"{cfg['store']}, {n} worker{'s' if n > 1 else ''}"


QUIET_PCT = 10.0  # a round counts if other processes took at most this much of one core


def _foreign(cfg: dict[str, Any]) -> float:
    """CPU other processes took while this configuration ran (its short runs, else its flood)."""
    part = (cfg.get("runs") or {}).get("all") or (cfg.get("throughput") or {}).get("openai") or {}
    return float(part.get("foreign_cpu_pct") or 0.0)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summaries(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (store, workers): with ``--rounds N``, the median of its rounds in which
    other processes (another user's work on the host) took at most ``QUIET_PCT`` % of a core
    (of all its rounds if none was that quiet)."""
    out = []
    for store, workers in dict.fromkeys((c["store"], c["workers"]) for c in configs):
        mine = [c for c in configs if c["store"] == store and c["workers"] == workers]
        quiet = [c for c in mine if _foreign(c) <= QUIET_PCT] or mine
        row: dict[str, Any] = {"store": store, "workers": workers, "rounds": len(mine),
                               "quiet_rounds": [c.get("round", 0) for c in quiet]}
        runs = [c["runs"] for c in quiet if c.get("runs")]
        if runs:
            every = [r["all"] for r in runs]
            for key in ("runs_per_s", "service_cpu_ms_per_run", "postgres_cpu_ms_per_run",
                        "simulator_cpu_ms_per_run", "client_cpu_ms_per_run", "service_cpu_pct",
                        "foreign_cpu_pct"):
                row[key] = _median([a[key] for a in every if a.get(key) is not None])
            for target in runs[0]["targets"]:
                row[f"{target}_service_cpu_ms_per_run"] = _median(
                    [r["targets"][target]["service_cpu_ms_per_run"] for r in runs
                     if r["targets"][target]["service_cpu_ms_per_run"] is not None])
        flood = [c["throughput"]["openai"] for c in quiet if c.get("throughput")]
        if flood:
            row["chunks_per_service_cpu_s"] = _median(
                [f["chunks_per_service_cpu_s"] for f in flood if f.get("chunks_per_service_cpu_s")])
            row["flood_chunks_per_s"] = _median([f["chunks_per_s"] for f in flood])
        out.append(row)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def compare(res: dict[str, Any]) -> dict[str, Any]:
    """The configurations against each other (their :func:`summaries`): PostgreSQL's service
    CPU per short run against SQLite's at each worker count; each worker count's short-run
    throughput against the fewest's."""
    rows = summaries(res.get("configs") or [])
    out: dict[str, Any] = {"summaries": rows} if rows else {}

    def find(store: str, workers: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["store"] == store and r["workers"] == workers
                     and r.get("runs_per_s") is not None), None)

    counts = sorted({r["workers"] for r in rows})
    for n in counts:
        lite, pg = find("sqlite", n), find("postgres", n)
        if lite and pg:
            row: dict[str, Any] = {
                "workers": n,
                "sqlite_service_cpu_ms_per_run": lite["service_cpu_ms_per_run"],
                "postgres_service_cpu_ms_per_run": pg["service_cpu_ms_per_run"],
                "postgres_server_cpu_ms_per_run": pg.get("postgres_cpu_ms_per_run"),
                "ratio": _ratio(pg["service_cpu_ms_per_run"], lite["service_cpu_ms_per_run"])}
            for key in lite:
                if key.endswith("_service_cpu_ms_per_run") and key in pg and key != (
                        "service_cpu_ms_per_run"):
                    row[f"ratio_{key.split('_')[0]}"] = _ratio(pg[key], lite[key])
            # Counting the database server's CPU too (SQLite's is in the service's process).
            row["ratio_with_server"] = _ratio(
                (pg["service_cpu_ms_per_run"] or 0) + (pg.get("postgres_cpu_ms_per_run") or 0),
                lite["service_cpu_ms_per_run"])
            out.setdefault("postgres_vs_sqlite", []).append(row)
    for store in dict.fromkeys(r["store"] for r in rows):
        base = find(store, counts[0]) if counts else None
        for n in counts[1:]:
            more = find(store, n)
            if base and more:
                out.setdefault("workers", []).append({
                    "store": store, "workers": n, "against": counts[0],
                    "runs_per_s": more["runs_per_s"], "base_runs_per_s": base["runs_per_s"],
                    "ratio": _ratio(more["runs_per_s"], base["runs_per_s"])})
    return out


def bars(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    configs = res.get("configs") or []
    first = configs[0] if configs else {"store": "sqlite", "workers": 1}
    # The service's own bars are the first configuration's (alone: the default, sqlite, 1).
    tail = "" if (len(configs) <= 1 and first["store"] == "sqlite"
                  and first["workers"] == 1) else f"; {_label(first)}"
    _service_bars(res, out)
    cmp = res.get("compare") or {}
    mine = next((r for r in cmp.get("summaries") or [] if r["store"] == first["store"]
                 and r["workers"] == first["workers"] and r.get("chunks_per_service_cpu_s")),
                None)
    if mine and mine["rounds"] > 1 and "chunks_per_service_cpu_s" in out:
        out["chunks_per_service_cpu_s"] = _bar(
            mine["chunks_per_service_cpu_s"], 10_000, ">=",
            f"flood, median of rounds {mine['quiet_rounds']}")
    for b in out.values():
        b["where"] += tail
    if cmp.get("postgres_vs_sqlite"):
        row = cmp["postgres_vs_sqlite"][0]
        out["postgres_cpu_per_run_vs_sqlite"] = _bar(
            row["ratio"], 1.3, "<=", f"short runs, {row['workers']} worker(s): "
            f"{row['postgres_service_cpu_ms_per_run']} vs {row['sqlite_service_cpu_ms_per_run']}"
            f" ms service CPU a run; with the server's {row['ratio_with_server']}")
    pg = next((r for r in cmp.get("summaries") or []
               if r["store"] == "postgres" and r.get("chunks_per_service_cpu_s")), None)
    if pg:
        lite = next((r for r in cmp.get("summaries") or [] if r["store"] == "sqlite"
                     and r["workers"] == pg["workers"] and r.get("chunks_per_service_cpu_s")),
                    None)
        beside = f"; SQLite {lite['chunks_per_service_cpu_s']:.0f}" if lite else ""
        out["postgres_chunks_per_service_cpu_s"] = _bar(
            pg["chunks_per_service_cpu_s"], 8_000, ">=", f"flood; {_label(pg)}{beside}")
    for row in cmp.get("workers") or []:
        out[f"runs_per_s_{row['workers']}_vs_{row['against']}_workers_{row['store']}"] = _bar(
            row["ratio"], 1.3, ">=", f"short runs, {row['store']}: {row['runs_per_s']} vs "
            f"{row['base_runs_per_s']} runs/s")
    cross = res.get("cross")
    if cross and not cross.get("skipped"):
        f, c = cross["follow"], cross["cancel"]
        out["cross_event_p99_ms"] = _bar(
            f["commit_to_b_subscriber"]["p99_ms"], 50, "<=",
            f"committed on A -> B's subscriber, {f['runs']} runs"
            f" (peak live {f['peak_live_runs']})")
        out["cross_cancel_p99_ms"] = _bar(
            c["upstream_closed"]["p99_ms"], 100, "<=",
            f"cancel on B -> A's upstream closed, {c['runs']} runs")
        k = cross.get("kill")
        if k:
            where = ("its own PID namespace: judged by its lease" if k["own_pid_namespace"]
                     else "the same PID namespace: its death seen from its PID")
            out["cross_killed_runs_closed_s"] = _bar(
                k["closed_after_s"], k["bound_s"], "<=",
                f"{k['runs']} runs of an instance killed (SIGKILL) in {where}, closed by a"
                f" survivor; lease {k['lease_s']:g} s + 5")
            out["cross_killed_runs_missing_shown_text"] = _bar(
                k["runs_missing_shown_text"], 0, "<=",
                f"runs whose stored reply lacks text a client was shown"
                f" ({k['tokens_shown']} characters shown)")
    return out


def _ttft_vs_stack_bar(row: dict[str, Any], out: dict[str, Any]) -> None:
    """Issue 14's bar: ``/v1``'s added TTFT p50 <= 2 x the ``stack`` relay's (hypercorn + httpx
    alone), same run; with each round's ratio beside it."""
    t = row["targets"]
    if "openai" not in t or "stack" not in t:
        return
    mine, floor = t["openai"].get("added_ttft_p50_ms"), t["stack"].get("added_ttft_p50_ms")
    ratio = round(mine / floor, 2) if mine is not None and floor and floor > 0 else None
    rounds = [round(a / b, 2) if a is not None and b else None for a, b in zip(
        t["openai"].get("added_ttft_p50_rounds_ms", []),
        t["stack"].get("added_ttft_p50_rounds_ms", []), strict=False)]
    out["added_ttft_p50_vs_stack"] = _bar(
        ratio, 2.0, "<=", f"{row['streams']} streams: /v1 +{mine} vs stack +{floor} ms p50;"
        f" per round {', '.join('-' if r is None else f'{r:g}' for r in rounds)}")


def _service_bars(res: dict[str, Any], out: dict[str, Any]) -> None:
    relay = res.get("relay")
    if relay:
        row = min(relay, key=lambda r: abs(r["streams"] - 100))
        where = f"{row['streams']} streams"
        for q, limit in (("p50", 1.0), ("p99", 5.0)):
            worst = [row["targets"][n][f"added_ttft_{q}_ms"] for n in ("openai", "native")]
            value = None if None in worst else max(worst)
            out[f"added_ttft_{q}_ms"] = _bar(value, limit, "<=", where + ", worst of openai/native")
    floor = res.get("floor")
    if floor:
        _ttft_vs_stack_bar(min(floor, key=lambda r: abs(r["streams"] - 100)), out)
    if res.get("throughput"):
        out["chunks_per_service_cpu_s"] = _bar(
            res["throughput"]["openai"].get("chunks_per_service_cpu_s"), 10_000, ">=", "flood")
    if res.get("idle_rss_mb") is not None:
        out["idle_rss_mb"] = _bar(res["idle_rss_mb"], 80, "<=", "after start-up and a warm-up")
    if res.get("idle_cpu_pct_per_worker") is not None:
        out["idle_cpu_pct_per_worker"] = _bar(res["idle_cpu_pct_per_worker"], 2.0, "<=",
                                              "% of a core, idle after a warm-up")
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


def _pct_list(values: list[float] | None) -> str:
    return "+".join(f"{v:g}" for v in values) if values else "-"


def _runs_table(runs: dict[str, Any], add: Callable[[str], None]) -> None:
    add(f"## Short runs (closed loop: {runs['concurrency']} clients, {runs['tokens']} unpaced"
        f" tokens a run, {runs['seconds']:g} s per target)")
    add("target    runs  errs    runs/s  svc_ms/run  pg_ms/run  sim_ms/run  cli_ms/run"
        "   svc%    pg%   sim%   cli% other%  svc% per process")
    rows = [*runs["targets"].items(), ("all", runs["all"])]
    for name, t in rows:
        add(f"{name:<7}{t['runs']:>7}{t['errors']:>6}{_f(t['runs_per_s'], 10, 1)}"
            f"{_f(t['service_cpu_ms_per_run'], 12, 3)}{_f(t.get('postgres_cpu_ms_per_run'), 11, 3)}"
            f"{_f(t['simulator_cpu_ms_per_run'], 12, 3)}{_f(t['client_cpu_ms_per_run'], 12, 3)}"
            f"{_f(t['service_cpu_pct'], 7, 1)}{_f(t.get('postgres_cpu_pct'), 7, 1)}"
            f"{_f(t['simulator_cpu_pct'], 7, 1)}{_f(t['client_cpu_pct'], 7, 1)}"
            f"{_f(t.get('foreign_cpu_pct'), 7, 1)}  {_pct_list(t.get('service_process_cpu_pct'))}")
    for name, t in runs["targets"].items():
        if t.get("error_kinds"):
            add(f"errors, {name}: {t['error_kinds']}")


def _side_by_side(res: dict[str, Any], add: Callable[[str], None]) -> None:
    configs = res["configs"]
    rounds = max(c.get("round", 0) for c in configs) + 1
    add("## Side by side (short runs, all targets; flood: /v1 through the service)")
    add("store     workers   runs/s  svc_ms/run  pg_ms/run  sim_ms/run  cli_ms/run   svc%"
        "    pg%   sim%   cli% other%  flood_chunks/s  chunks/svc-CPU-s  svc% per process (runs)")
    for cfg in configs:
        r = (cfg.get("runs") or {}).get("all") or {}
        tp = (cfg.get("throughput") or {}).get("openai") or {}
        add(f"{cfg['store']:<10}{cfg['workers']:>7}{_f(r.get('runs_per_s'), 9, 1)}"
            f"{_f(r.get('service_cpu_ms_per_run'), 12, 3)}"
            f"{_f(r.get('postgres_cpu_ms_per_run'), 11, 3)}"
            f"{_f(r.get('simulator_cpu_ms_per_run'), 12, 3)}"
            f"{_f(r.get('client_cpu_ms_per_run'), 12, 3)}{_f(r.get('service_cpu_pct'), 7, 1)}"
            f"{_f(r.get('postgres_cpu_pct'), 7, 1)}{_f(r.get('simulator_cpu_pct'), 7, 1)}"
            f"{_f(r.get('client_cpu_pct'), 7, 1)}{_f(r.get('foreign_cpu_pct'), 7, 1)}"
            f"{_f(tp.get('chunks_per_s'), 16, 0)}"
            f"{_f(tp.get('chunks_per_service_cpu_s'), 18, 0)}  "
            + " / ".join(_pct_list(t.get("service_process_cpu_pct"))
                         for t in (cfg.get("runs") or {}).get("targets", {}).values()))
    cmp = res.get("compare") or {}
    if rounds > 1:
        add(f"medians of the rounds with other% <= {QUIET_PCT:g}:")
        for r in cmp.get("summaries") or []:
            add(f"{r['store']:<10}{r['workers']:>7}{_f(r.get('runs_per_s'), 9, 1)}"
                f"{_f(r.get('service_cpu_ms_per_run'), 12, 3)}"
                f"{_f(r.get('postgres_cpu_ms_per_run'), 11, 3)}"
                f"{_f(r.get('simulator_cpu_ms_per_run'), 12, 3)}"
                f"{_f(r.get('client_cpu_ms_per_run'), 12, 3)}{_f(r.get('service_cpu_pct'), 7, 1)}"
                f"{'':21}{_f(r.get('foreign_cpu_pct'), 7, 1)}"
                f"{_f(r.get('flood_chunks_per_s'), 16, 0)}"
                f"{_f(r.get('chunks_per_service_cpu_s'), 18, 0)}  rounds {r['quiet_rounds']}"
                f" of {r['rounds']}")
    for row in cmp.get("postgres_vs_sqlite") or []:
        per = ", ".join(f"{k[6:]} {v}" for k, v in row.items()
                        if k.startswith("ratio_") and k != "ratio_with_server")
        add(f"PostgreSQL / SQLite service CPU per short run, {row['workers']} worker(s): "
            f"{row['ratio']} ({per}); counting the PostgreSQL server's too:"
            f" {row['ratio_with_server']}")
    for row in cmp.get("workers") or []:
        add(f"{row['store']}: {row['workers']} workers / {row['against']}: short runs per second"
            f" x{row['ratio']} ({row['runs_per_s']} vs {row['base_runs_per_s']})")
    add("(ms/run: each process's CPU over the windows / runs finished; pg = the PostgreSQL"
        " server, postmaster and backends; other%: processes not the benchmark's (another"
        " user's work on the host), of 100 per core; svc% per process: with --workers, the"
        " busiest first, per target)")



def _cross(cross: dict[str, Any], add: Callable[[str], None]) -> None:
    if cross.get("skipped"):
        add(f"## Cross-instance: skipped ({cross['skipped']})")
        return
    lvl = cross["level"]
    f, c = cross["follow"], cross["cancel"]
    add(f"## Cross-instance: instances A and B on one {cross['store']} (fsync"
        f" {'on' if cross['fsync'] else 'off'}); load from {lvl['clients']} client processes")

    def cpus(w: dict[str, Any]) -> str:
        return (f"cpu%: A {w['a_cpu_pct']}  B {w['b_cpu_pct']}  postgres {w['postgres_cpu_pct']}"
                f"  sim {w['simulator_cpu_pct']}  clients {_pct_list(w['client_cpu_pct'])}"
                f"  bench {w['bench_cpu_pct']}  total {w['total_cpu_pct']}; other processes"
                f" {w['foreign_cpu_pct']} (of {100 * (os.cpu_count() or 1)}; {w['wall_s']} s)")

    def dist(name: str, d: dict[str, Any]) -> str:
        return f"{name} p50 {d['p50_ms']} / p99 {d['p99_ms']} ms"

    e = f["commit_to_b_subscriber"]
    add(f"follow: {f['runs']} runs on A at 20 tokens/s (peak live {f['peak_live_runs']}),"
        f" a subscriber on B each: committed on A -> B's subscriber n={e['n']}"
        f"  p50 {e['p50_ms']} ms  p99 {e['p99_ms']} ms  max {e['max_ms']} ms"
        f"  missing on B {f['missing_on_b']}  errors {f['errors']}")
    add("  " + "; ".join((dist("committed -> A's client", f["commit_to_a_client"]),
                          dist("simulator's send -> committed", f["sim_to_commit"]),
                          dist("B's subscriber - A's client", f["b_minus_a_client"]))))
    add("  " + cpus(f["cpu"]))
    u, s = c["upstream_closed"], c["end_seen_on_a"]
    add(f"cancel: {c['cancelled']} runs on A cancelled through B (live at the first cancel"
        f" {c['live_at_first_cancel']}): -> A's upstream closed n={u['n']}  p50 {u['p50_ms']} ms"
        f"  p99 {u['p99_ms']} ms  max {u['max_ms']} ms  never closed {c['never_closed']};"
        f" -> A's client has the end p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms"
        f"  errors {c['errors'] + c['cancel_errors']}")
    add("  " + cpus(c["cpu"]))
    k = cross.get("kill")
    if k:
        ns = ("in its own PID namespace (to the others, another host: its lease decides)"
              if k["own_pid_namespace"] else "in the same PID namespace (not root: its PID"
              " tells its death at once; the lease is not what was measured)")
        closed = "never" if k["closed_after_s"] is None else f"{k['closed_after_s']} s"
        add(f"kill: {k['runs']} runs on an instance C {ns}, C killed (SIGKILL): all closed by a"
            f" survivor after {closed} (lease {k['lease_s']:g} s; bar {k['bound_s']:g} s);"
            f" runs whose stored reply lacks text its client was shown:"
            f" {k['runs_missing_shown_text']} ({k['tokens_shown']} characters shown)")
    for part in (f, c):
        for sample in part.get("error_samples") or []:
            add(f"  error: {sample}")


def render(res: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    configs = res.get("configs") or []
    if len(configs) > 1:
        if all(c.get("round", 0) == 0 for c in configs):  # with --rounds N: the table only
            for cfg in configs:
                add(f"# {_label(cfg)} ({cfg['store_detail']})")
                _sections(cfg, add)
                add("")
        _side_by_side(res, add)
    else:
        if configs and (configs[0]["store"] != "sqlite" or configs[0]["workers"] != 1):
            add(f"# {_label(configs[0])} ({configs[0]['store_detail']})")
        _sections(res, add)
    if res.get("cross"):
        if lines:
            add("")
        _cross(res["cross"], add)
    _store_and_bars(res, add)
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


def _sections(res: dict[str, Any], add: Callable[[str], None]) -> None:
    if res.get("relay"):
        add("## Relay overhead (ms; added = through the service minus direct, same run)")
        _relay_table(res["relay"], add)
    if res.get("floor"):
        add("")
        add("## The stack alone (ms; stand-in relays, same run: stack = hypercorn + httpx,"
            " hyperc = hypercorn + sockets, httpx = sockets + httpx, trio = sockets both ways)")
        _relay_table(res["floor"], add)
    tp = res.get("throughput")
    if tp:
        add("")
        add(f"## Throughput, flood upstream ({tp['streams']} streams x {tp['tokens_per_stream']}"
            " tokens, no pacing)")
        pg = "postgres_cpu_pct" in tp["openai"]
        add("target   chunks/s  chunks/svc-CPU-s  chunks/client-CPU-s  svc%   sim%   cli%  errs"
            + ("    pg%" if pg else "") + " other%")
        for name in ("direct", "openai"):
            t = tp[name]
            add(f"{name:<7}{_f(t['chunks_per_s'], 10)}{_f(t.get('chunks_per_service_cpu_s'), 18)}"
                f"{_f(t['chunks_per_client_cpu_s'], 21)}{_f(t['service_cpu_pct'], 7, 1)}"
                f"{_f(t['simulator_cpu_pct'], 7)}{_f(t['client_cpu_pct'], 7)}{_f(t['errors'], 6)}"
                + (_f(t.get("postgres_cpu_pct"), 7, 1) if pg else "")
                + _f(t.get("foreign_cpu_pct"), 7, 1))
    if res.get("runs"):
        add("")
        _runs_table(res["runs"], add)
    cap = res.get("capacity")
    if cap:
        add("")
        add(f"## Capacity: live streams at 1 token/s (idle RSS {res.get('idle_rss_mb')} MB,"
            f" idle CPU {res.get('idle_cpu_pct_per_worker')} % of a core)")
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


def _store_and_bars(res: dict[str, Any], add: Callable[[str], None]) -> None:
    stores = res.get("stores") or ({"": res["store"]} if res.get("store") else {})
    for store in stores.values():
        add("")
        kind = ("PostgreSQL" if store["store"] == "postgresql"
                else f"SQLite WAL, synchronous={store['synchronous']}")
        add(f"## Store appends ({kind}, {store['tasks']} tasks per process)")
        add("processes  appends/s   p50_ms   p99_ms")
        for key, label in (("one_process", "1"), ("many_processes", str(store.get("procs")))):
            s = store[key]
            add(f"{label:>9}{_f(s['appends_per_s'], 11)}{_f(s['p50_ms'], 9)}{_f(s['p99_ms'], 9)}")
    if res.get("bars"):
        add("")
        add("## Bars")
        for name, b in res["bars"].items():
            verdict = {True: "met", False: "MISSED", None: "n/a"}[b["met"]]
            add(f"{name:<34}{_f(b['value'], 10)}  {b['limit']:<10} {verdict:<7} ({b['where']})")
