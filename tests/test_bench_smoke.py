"""``python -m service.bench --quick`` runs end to end and writes its JSON (no thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "service.bench", "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    for key in ("machine", "command", "idle_rss_mb", "relay", "throughput", "capacity", "cancel",
                "store", "floor", "bars"):
        assert key in data, key
    assert {t for row in data["relay"] for t in row["targets"]} == {"direct", "openai", "native"}
    # The stand-in relays answered every stream (their added latency is only reported).
    for row in data["floor"]:
        assert set(row["targets"]) == {"direct", "openai", "stack", "hyperc", "httpx", "trio"}
        for name, target in row["targets"].items():
            assert target["streams"] > 0, (name, target)
            assert target["errors"] == 0, (name, target)
    assert data["cancel"]["measured"] > 0
    assert "## Relay overhead" in proc.stdout
    assert "## The stack alone" in proc.stdout
