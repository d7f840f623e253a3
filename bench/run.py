"""``python -m bench.run``: run the benchmarks, write ``bench/results.md`` and its chart.

``--tiny`` runs every scenario once at a tiny size (what ``make test`` does, so the
harness cannot rot); its figures mean nothing, and it writes the page and chart only
where ``--output`` says (a temporary folder otherwise), never over ``bench/results.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from bench import chart, delivery, hot_path, instrumented_call, memory, readme, relay, report

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does."""

    calls: int
    rounds: int
    delivery_calls: int
    delivery_repeats: int
    relay_events: int
    relay_connections: List[int]
    relay_repeats: int
    memory_calls: int


FULL = Sizes(calls=2000, rounds=12, delivery_calls=100_000, delivery_repeats=3,
             relay_events=50_176, relay_connections=[1, 4], relay_repeats=3,
             memory_calls=1_000_000)
TINY = Sizes(calls=20, rounds=1, delivery_calls=200, delivery_repeats=1,
             relay_events=1024, relay_connections=[2], relay_repeats=1, memory_calls=2000)


def _step(name: str) -> float:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    return time.monotonic()


def _done(started: float) -> None:
    print(f"[bench]   {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="one tiny run of each scenario")
    parser.add_argument("--spool", action="store_true",
                        help="add the delivery row with OTEL_ZENML_ANALYTICS_SPOOL (one more "
                             "run of 100,000 calls, about a minute; a tiny run always has it)")
    parser.add_argument("--output", default=None,
                        help="results page (default: bench/results.md; the chart goes next "
                             "to it as results.png)")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    output = Path(args.output) if args.output else (
        Path(tempfile.mkdtemp(prefix="oza-bench-")) / "results.md" if args.tiny
        else HERE / "results.md")
    began = time.monotonic()

    started = _step("hot path")
    hot = hot_path.run(sizes.calls, sizes.rounds)
    _done(started)
    started = _step("instrumented call")
    instrumented = instrumented_call.run(sizes.calls, sizes.rounds)
    _done(started)
    started = _step(f"delivery ({sizes.delivery_calls:,} calls × {sizes.delivery_repeats})")
    delivered = delivery.run(sizes.delivery_calls, sizes.delivery_repeats,
                             with_spool=args.spool or args.tiny)
    _done(started)
    started = _step(f"relay ({sizes.relay_events:,} events × {sizes.relay_repeats})")
    relayed = relay.median_runs(relay.run(sizes.relay_events, sizes.relay_connections,
                                          sizes.relay_repeats))
    _done(started)
    started = _step(f"memory ({sizes.memory_calls:,} calls)")
    mem = memory.run(sizes.memory_calls)
    _done(started)

    figures = report.Figures(hot, instrumented, delivered, relayed, mem, sizes.delivery_calls,
                             sizes.relay_events, sizes.memory_calls)
    today = dt.date.today().isoformat()
    header = [
        "# Benchmark results", "",
        f"Command: `make bench{' BENCH_ARGS=--spool' if args.spool and not args.tiny else ''}`"
        f" ({'tiny' if args.tiny else 'full'} run), {today}, "
        f"Python {platform.python_version()}, {os.cpu_count()} cores (shared, noisy: the "
        f"ratios in one run are the claim). The whole run took "
        f"{time.monotonic() - began:.0f} s. Hot path and instrumented call: each round "
        f"times {sizes.calls} single calls per variant, variants alternate round by round "
        f"({sizes.rounds} rounds). Delivery: "
        + ("one run per side, each" if sizes.delivery_repeats == 1 else
           f"{sizes.delivery_repeats} runs per side, sides alternating, each")
        + " in its own process. Relay: "
        + ("one run per connection count" if sizes.relay_repeats == 1 else
           f"{sizes.relay_repeats} runs per connection count, alternating; the run with the "
           "median events per relay CPU-second is shown")
        + ". Memory: one run.",
    ]
    text = "\n".join(report.markdown(figures, header)) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    if output == HERE / "results.md":
        readme.splice("bench", text)
    chart.render(report.panels(figures), output.with_name("results.png"),
                 f"otel-zenml-analytics vs segment-analytics-python — {today}"
                 + (" (tiny run: figures mean nothing)" if args.tiny else ""))
    print(text)
    print(f"[bench] wrote {output} and {output.with_name('results.png')} in "
          f"{time.monotonic() - began:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
