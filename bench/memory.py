"""Scenario: N ``track()`` calls with the destination unreachable; peak RSS growth.

Each side runs once in a process of its own (``bench.child memory``), both at the same
time (memory is not timed, and this halves the scenario's wall time), against a local
port that was free a moment ago and is closed now, so every connection is refused and
both clients retry, back off and drop. Growth is the peak RSS after the calls
(``VmHWM``) minus the RSS just before them, measured after the SDK or client was set
up. Dropped counts come from the clients themselves: ours from
``Delivery.stats()`` (via ``live_deliveries()``), counted per queued signal (each call
queues a span and a log record carrying one message id); the peer's from
``track()`` returning False (queue full) and ``on_error`` (retries exhausted).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Dict, List

from bench.procs import child_env, finish, read_json, start_python
from bench.sides import OURS, PEER

SIDES = [("otel-zenml-analytics", OURS), ("segment-analytics-python", PEER)]


@dataclass
class Result:
    """One side's run."""

    name: str
    calls: int
    refused: int
    rss_before_mib: float
    peak_growth_mib: float
    rss_after_mib: float
    counters: Dict[str, int]


def unreachable_url() -> str:
    """A loopback URL nobody listens on: a port bound and closed again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run(calls: int) -> List[Result]:
    """Both sides at once, each in its own process (memory is not timed, so they may
    share the machine)."""
    url = unreachable_url()
    procs = [(name, start_python(["-m", "bench.child", "memory", side, url, str(calls)],
                                 env=child_env())) for name, side in SIDES]
    outs = []
    try:
        for name, proc in procs:
            outs.append((name, read_json(proc)))
    finally:
        for _, proc in procs:
            finish(proc, timeout=10.0)
    results = []
    for name, out in outs:
        before = int(out["rss_before_kib"])
        results.append(Result(
            name=name, calls=calls, refused=int(out["refused"]),
            rss_before_mib=before / 1024,
            peak_growth_mib=max(0, int(out["hwm_after_kib"]) - before) / 1024,
            rss_after_mib=int(out["rss_after_kib"]) / 1024,
            counters={k: int(v) for k, v in out["counters"].items()}))
    return results
