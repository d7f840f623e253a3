"""``make test`` runs every benchmark scenario once at a tiny size so the harness cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_runs_tiny(isolated_env: str) -> None:
    out = subprocess.run([sys.executable, "-m", "bench.run", "--tiny"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| instrumented call (span + analytics event) |" in out.stdout
    assert "| hand-written span + 1 event |" in out.stdout
    assert "| segment-analytics-python track() |" in out.stdout
