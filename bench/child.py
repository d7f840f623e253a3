"""``python -m bench.child MODE SIDE ENDPOINT CALLS``: one side of a scenario, alone.

Each side runs in its own process so that one client's threads do not slow the
other's. The child talks JSON lines on stdout; the parent (``bench.delivery``,
``bench.memory``) reads them.

- ``delivery``: ``CALLS`` track() calls as fast as possible; prints the monotonic
  clock around them (comparable across processes on Linux), flushes the client
  (so the parent knows when nothing more is coming), then waits for a line on stdin
  and prints the client's counters.
- ``memory``: ``CALLS`` track() calls to an unreachable destination; prints RSS
  before and after (``VmHWM`` is the peak) and the client's counters.

Either way it leaves with ``os._exit`` so that no exit hook of either client spends
time flushing or retrying what the scenario has already counted.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List

from bench.sides import open_side, rss_kib


def _say(document: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def _calls(track: Any, calls: int) -> int:
    """Make the calls; returns how many the client refused at once."""
    refused = 0
    for _ in range(calls):
        if not track():
            refused += 1
    return refused


def main(argv: List[str]) -> None:
    mode, side_name, endpoint, calls = argv[0], argv[1], argv[2], int(argv[3])
    side = open_side(side_name, endpoint)
    if mode == "delivery":
        start = time.monotonic()
        refused = _calls(side.track, calls)
        end = time.monotonic()
        _say({"start": start, "end": end, "refused": refused})
        side.flush()
        _say({"flushed": time.monotonic()})
        sys.stdin.readline()
        _say({"counters": side.counters()})
    elif mode == "memory":
        before = rss_kib()
        start = time.monotonic()
        refused = _calls(side.track, calls)
        end = time.monotonic()
        after = rss_kib()
        _say({"start": start, "end": end, "refused": refused, "rss_before_kib": before["VmRSS"],
              "hwm_before_kib": before["VmHWM"], "rss_after_kib": after["VmRSS"],
              "hwm_after_kib": after["VmHWM"], "counters": side.counters()})
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
