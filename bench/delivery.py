"""Scenario: N ``track()`` calls as fast as possible, then until the sink stored them all.

The sink (:class:`otel_zenml_analytics.sink.SinkServer`, a fresh SQLite file per run)
runs in this process; each side runs in a process of its own (``bench.child``), one
after the other, variants alternating run by run. The clock starts just before the
first call (the monotonic clock is shared by all processes) and stops when the sink's
stored-message count reaches N. After its last call the child flushes its client and
says so: from then on nothing more is coming, so the missing messages (and those still
missing at the deadline) count as lost, and the time is that of the last one stored.
Both sides run with default settings: their queues are bounded, so a side whose
caller outruns its sender drops events, and this scenario says how many.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from bench.procs import child_env, finish, read_json, start_python
from bench.sides import OURS, PEER

DEADLINE_SECONDS = 120.0
"""At most this long after the last call."""
FLUSH_GRACE_SECONDS = 5.0
"""How long a client that is still flushing at the deadline may take to answer."""
POLL_SECONDS = 0.01

OURS_LABEL = "otel-zenml-analytics"
SPOOL_LABEL = "otel-zenml-analytics + OTEL_ZENML_ANALYTICS_SPOOL"
PEER_LABEL = "segment-analytics-python"

VARIANTS: List[Tuple[str, str, bool, bool]] = [
    (OURS_LABEL, OURS, False, True),
    (PEER_LABEL, PEER, False, True),
    (SPOOL_LABEL, OURS, True, False),
]
"""(label, side, with a spool, in every repeat): the spool row runs once, and only when
asked for (``python -m bench.run --spool``), to keep ``make bench`` within its time budget
on a slow day."""


@dataclass
class Run:
    """One run of one variant."""

    sent: int
    stored: int
    seconds: float
    """First call → last message stored."""
    call_seconds: float
    """First call → last call returned (the caller's side)."""
    refused: int
    """Calls the client refused at once (the peer's queue full; ours returns False only
    when no SDK recorded the signal)."""
    counters: Dict[str, int]

    @property
    def lost(self) -> int:
        return self.sent - self.stored

    @property
    def events_per_second(self) -> float:
        return self.stored / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Result:
    """All runs of one variant."""

    name: str
    runs: List[Run] = field(default_factory=list)

    @property
    def events_per_second(self) -> float:
        return statistics.median(r.events_per_second for r in self.runs)

    @property
    def spread(self) -> str:
        rates = [r.events_per_second for r in self.runs]
        return f"{min(rates):,.0f}–{max(rates):,.0f}"

    @property
    def lost(self) -> int:
        """The median of the lost counts (an integer: the lower median)."""
        return int(statistics.median_low(r.lost for r in self.runs))

    @property
    def lost_max(self) -> int:
        return max(r.lost for r in self.runs)

    @property
    def call_us(self) -> float:
        """Median caller time per call, µs."""
        return statistics.median(r.call_seconds / r.sent * 1e6 for r in self.runs)


def run_once(side: str, calls: int, spool: bool) -> Run:
    """One side, one run, against a fresh sink."""
    from otel_zenml_analytics.sink import SinkServer

    spool_dir: Optional[str] = tempfile.mkdtemp(prefix="oza-bench-spool-") if spool else None
    extra = {"OTEL_ZENML_ANALYTICS_SPOOL": str(Path(spool_dir) / "spool.db")} if spool_dir else {}
    try:
        with SinkServer(port=0) as sink:
            proc = start_python(["-m", "bench.child", "delivery", side, sink.url, str(calls)],
                                env=child_env(extra), stdin=True)
            counters: Dict[str, Any] = {}
            try:
                timing = read_json(proc)
                start, end = float(timing["start"]), float(timing["end"])
                flushed = threading.Event()

                def wait_for_flush() -> None:
                    read_json(proc)
                    flushed.set()

                threading.Thread(target=wait_for_flush, daemon=True).start()
                stored, last = _wait_for(sink, calls, end, flushed)
                if flushed.wait(FLUSH_GRACE_SECONDS):
                    assert proc.stdin is not None
                    proc.stdin.write("done\n")
                    proc.stdin.flush()
                    counters = read_json(proc)["counters"]
            finally:
                finish(proc, timeout=10.0)
            return Run(sent=calls, stored=stored, seconds=max(last, end) - start,
                       call_seconds=end - start, refused=int(timing["refused"]),
                       counters={k: int(v) for k, v in counters.items()})
    finally:
        if spool_dir:
            shutil.rmtree(spool_dir, ignore_errors=True)


def _wait_for(sink: Any, calls: int, end: float, flushed: threading.Event) -> Tuple[int, float]:
    """Poll the sink until it stored ``calls`` messages, the client has flushed (nothing
    more is coming), or the deadline passes; returns the count and the monotonic time
    of its last increase."""
    stored = int(sink.stats()["stored_messages"])
    last = time.monotonic()
    deadline = end + DEADLINE_SECONDS
    while stored < calls:
        done = flushed.is_set()  # read before the count: a flush ends with its last answer
        time.sleep(POLL_SECONDS)
        count = int(sink.stats()["stored_messages"])
        if count != stored:
            stored, last = count, time.monotonic()
        if done or time.monotonic() > deadline:
            break
    return stored, last


def run(calls: int, repeats: int, with_spool: bool) -> List[Result]:
    """Every variant ``repeats`` times (the spool row once, ``with_spool`` only),
    alternating run by run."""
    variants = [v for v in VARIANTS if with_spool or not v[2]]
    results = {label: Result(label) for label, _, _, _ in variants}
    for repeat in range(repeats):
        for label, side, spool, every in variants:
            if every or repeat == 0:
                results[label].runs.append(run_once(side, calls, spool))
    return [results[label] for label, _, _, _ in variants]
