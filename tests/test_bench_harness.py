"""``make test`` runs every benchmark scenario once at a tiny size so the harness cannot rot.

No timed assertions: only that each scenario ran, produced its table rows, and that
the counts in them are sane (integers, nothing negative, nothing more than was sent).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from bench.profile import PER_THREAD_PROFILES

ROOT = Path(__file__).parent.parent


def _rows(text: str, title: str) -> List[List[str]]:
    """The body rows of the table under the heading that starts with ``title``."""
    section = text.split(f"### {title}", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _count(cell: str) -> int:
    cell = cell.strip()
    assert re.fullmatch(r"\d[\d,]*", cell), f"not a count: {cell!r}"
    return int(cell.replace(",", ""))


@pytest.mark.timeout(600)
def test_bench_runs_tiny(isolated_env: str, tmp_path: Path) -> None:
    output = tmp_path / "results.md"
    out = subprocess.run([sys.executable, "-m", "bench.run", "--tiny", "--output", str(output)],
                         cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stdout + out.stderr
    text = output.read_text(encoding="utf-8")
    assert text.strip() in out.stdout
    assert "(tiny run)" in text

    targets = _rows(text, "Targets")
    assert [row[0] for row in targets] == ["Hot path", "Delivery", "Instrumented call",
                                           "Relay", "Memory"]
    assert all(row[3] in ("yes", "**no**") for row in targets)
    chart = output.with_name("results.png")
    assert "](results.png)" in text
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    hot = _rows(text, "Hot path")
    assert [row[0] for row in hot] == ["otel-zenml-analytics track()",
                                       "segment-analytics-python track()"]
    instrumented = _rows(text, "Instrumented call")
    assert [row[0] for row in instrumented] == [
        "bare call", "hand-written span + 1 event", "instrumented call (span + analytics event)"]

    delivery = _rows(text, "Delivery")
    assert [row[0] for row in delivery] == [
        "otel-zenml-analytics", "segment-analytics-python",
        "otel-zenml-analytics + OTEL_ZENML_ANALYTICS_SPOOL"]
    sent = _count(re.search(r"### Delivery: ([\d,]+) track", text).group(1))  # type: ignore[union-attr]
    for row in delivery:
        assert _count(row[1]) == 1  # runs
        assert float(row[2].replace(",", "")) > 0  # events/s: something arrived
        assert 0 <= _count(row[4]) <= _count(row[5]) <= sent  # lost: median ≤ max ≤ sent

    relay = _rows(text, "Relay")
    assert len(relay) == 1
    stored, expected = (_count(part) for part in relay[0][11].split("/"))
    assert 0 < stored <= expected
    assert _count(relay[0][10]) == 0  # no failed request
    assert float(relay[0][7]) <= float(relay[0][8])  # p50 ≤ p99
    assert relay[0][6].endswith("(1 run)")  # the spread over the runs
    assert relay[0][3].endswith("%") and relay[0][4].endswith("%")  # relay and sink busy
    assert _count(relay[0][5]) > 0  # the relay's CPU was measured

    memory = _rows(text, "Memory")
    assert [row[0] for row in memory] == ["otel-zenml-analytics", "segment-analytics-python"]
    for row in memory:
        assert float(row[1]) >= 0  # peak growth, MB
        _count(row[4])  # refused by track()
        _count(row[6])  # failed after retries


def _profile(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "bench.profile", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def _places(text: str) -> dict:  # type: ignore[type-arg]
    """``{place: µs per event}`` of a profile's summary."""
    summary = text.split("CPU per event by place", 1)[1].split("\n\n", 1)[0]
    found = re.findall(r"^\s+([\d.]+) µs\s+[\d.]+%\s+(.+)$", summary, re.MULTILINE)
    return {place: float(value) for value, place in found}


@pytest.mark.timeout(600)
def test_the_profiles_behind_the_readme_run_tiny(isolated_env: str) -> None:
    """``bench.profile``, the README's evidence for the missed targets, keeps working."""
    cpu = _profile("cpu", "50")
    assert re.search(r"ours: [\d.]+ µs", cpu) and re.search(r"peer: [\d.]+ µs", cpu), cpu
    signals = _profile("signals", "50")
    assert "Logger.emit of the analytics log record" in signals
    assert re.search(r"span \+ one \d+-attribute analytics event", signals), signals
    caller = _profile("caller", "50")
    assert re.search(r"[\d.]+x  the instrumented call", caller), caller
    posts = _profile("posts", "2")
    assert re.search(r"BatchConnection +[\d.]+ +[\d.]+ +[\d.]+\n", posts), posts
    assert re.search(r"requests +[\d.]+ +[\d.]+ +[\d.]+$", posts.strip()), posts
    if not PER_THREAD_PROFILES:  # Python 3.12+: the profiler modes say they cannot run
        return
    ours = _places(_profile("delivery", "100"))
    assert ours["OTel SDK"] > 0 and ours["otel-zenml-analytics"] > 0
    assert ours["total"] >= max(value for place, value in ours.items() if place != "total")
    peer = _places(_profile("peer", "100"))
    assert peer["segment-analytics-python"] > 0 and "OTel SDK" not in peer
    relay = _profile("relay", "512")
    assert "posted 512 events" in relay
    assert _places(relay)["protobuf"] > 0 and _places(relay)["otel-zenml-analytics"] > 0
