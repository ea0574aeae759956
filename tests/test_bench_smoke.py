"""``python -m service.bench --quick`` runs end to end and writes its JSON (no thresholds);
``--store both --workers 1,2`` compares the configurations side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.bench.crossclient import _SseReader
from service.bench.pg import find_pg_bin

REPO = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, *args: str) -> tuple[dict, str]:  # type: ignore[type-arg]
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "service.bench", "--quick", "--json", str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_bench_quick_writes_json(tmp_path: Path) -> None:
    data, stdout = _bench(tmp_path)
    for key in ("machine", "command", "idle_rss_mb", "idle_cpu_pct_per_worker", "relay",
                "throughput", "runs", "capacity", "cancel", "store", "floor", "cross", "bars"):
        assert key in data, key
    assert {t for row in data["relay"] for t in row["targets"]} == {"direct", "openai", "native"}
    # The stand-in relays answered every stream (their added latency is only reported).
    for row in data["floor"]:
        assert set(row["targets"]) == {"direct", "openai", "stack", "hyperc", "httpx", "trio"}
        for name, target in row["targets"].items():
            assert target["streams"] > 0, (name, target)
            assert target["errors"] == 0, (name, target)
            assert len(target["ttft_p50_rounds_ms"]) >= 1, (name, target)
    assert data["bars"]["added_ttft_p50_vs_stack"]["value"] is not None, data["bars"]
    assert data["cancel"]["measured"] > 0
    for name, target in data["runs"]["targets"].items():
        assert target["runs"] > 0, name
        assert target["errors"] == 0, (name, target["error_kinds"])
        assert target["service_cpu_ms_per_run"] > 0, name
    assert "## Relay overhead" in stdout
    assert "## The stack alone" in stdout
    assert "## Short runs" in stdout
    if find_pg_bin() is None:  # the cross scenario needs PostgreSQL: said, not failed
        assert data["cross"] == {"skipped": "PostgreSQL is not installed"}
        return
    follow, cancel = data["cross"]["follow"], data["cross"]["cancel"]
    assert follow["errors"] == 0, follow["error_samples"]
    assert follow["commit_to_b_subscriber"]["n"] > 0
    assert follow["commit_to_b_subscriber"]["p50_ms"] > 0  # the clocks line up
    assert follow["sim_to_commit"]["n"] > 0
    assert follow["missing_on_b"] == 0
    assert cancel["errors"] == 0, cancel["error_samples"]
    assert cancel["upstream_closed"]["n"] == cancel["runs"]
    assert cancel["never_closed"] == 0
    assert len(follow["cpu"]["client_cpu_pct"]) == 2  # two load client processes
    # The killed instance's runs were all closed by a survivor, every text shown stored.
    kill = data["cross"]["kill"]
    assert kill["runs"] == 3
    assert kill["closed_after_s"] is not None
    assert kill["runs_missing_shown_text"] == 0
    assert kill["tokens_shown"] > 0
    assert {"cross_event_p99_ms", "cross_cancel_p99_ms",
            "cross_killed_runs_closed_s"} <= set(data["bars"])
    assert "## Cross-instance" in stdout
    assert "kill: 3 runs" in stdout


@pytest.mark.slow
@pytest.mark.skipif(find_pg_bin() is None, reason="PostgreSQL is not installed")
def test_bench_stores_and_workers_side_by_side(tmp_path: Path) -> None:
    data, stdout = _bench(tmp_path, "--only", "runs", "--store", "both", "--workers", "1,2")
    configs = [(c["store"], c["workers"]) for c in data["configs"]]
    assert configs == [("sqlite", 1), ("postgres", 1), ("sqlite", 2), ("postgres", 2)]
    for cfg in data["configs"]:
        assert cfg["runs"]["all"]["runs"] > 0, cfg["store"]
        assert cfg["runs"]["all"]["errors"] == 0, cfg["runs"]["targets"]
        # PostgreSQL's own CPU is counted beside the service's.
        assert ("postgres_cpu_ms_per_run" in cfg["runs"]["all"]) == (cfg["store"] == "postgres")
        assert cfg["idle_cpu_pct_per_worker"] >= 0, cfg  # measured per configuration
        if cfg["workers"] == 2:  # both workers served runs
            for target in cfg["runs"]["targets"].values():
                assert len(target["service_process_cpu_pct"]) >= 2, target
    assert [r["workers"] for r in data["compare"]["postgres_vs_sqlite"]] == [1, 2]
    assert {r["store"] for r in data["compare"]["workers"]} == {"sqlite", "postgres"}
    assert "postgres_cpu_per_run_vs_sqlite" in data["bars"]
    assert "## Side by side" in stdout


def test_cross_client_reads_chunked_sse_split_anywhere() -> None:
    """The cross scenario's client: frames found whatever the receive and chunk boundaries."""
    frames = [b": keep-alive\n\n", b"id: 1\nevent: run.started\ndata: {\"run_id\": \"r1\"}\n\n",
              b"id: 2\nevent: token\ndata: {}\n\nid: 3\nevent: token\ndata: {}\n\n",
              b"id: 4\nevent: run.finished\ndata: {}\n\n"]
    wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    for f in frames:
        wire += b"%x\r\n" % len(f) + f + b"\r\n"
    wire += b"0\r\n\r\n"
    for step in (1, 3, 7, len(wire)):
        seen: list[tuple[int, bytes, bytes]] = []
        reader = _SseReader(lambda seq, event, data, now, seen=seen: seen.append(
            (seq, event, data)))
        for i in range(0, len(wire), step):
            reader.feed(wire[i:i + step], 0.0)
        assert reader.status == 200
        assert reader.done
        assert [s for s, _, _ in seen] == [1, 2, 3, 4]
        assert seen[0][1:] == (b"run.started", b'{"run_id": "r1"}')
