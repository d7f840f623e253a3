"""``python -m bench.run``: run the benchmarks and write ``bench/results.md``.

``--tiny`` runs every scenario once at a tiny size (what ``make test`` does, so the
harness cannot rot); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from pathlib import Path
from typing import List

from bench import hot_path, instrumented_call
from bench.harness import Result

HERE = Path(__file__).parent


def _table(title: str, results: List[Result], baseline: str) -> List[str]:
    base = next(r for r in results if r.name == baseline).median
    lines = [f"### {title}", "",
             "| variant | median µs/call | p99 µs/call | median spread over rounds | vs "
             f"{baseline} |", "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.median:.2f} | {r.p99:.2f} | {r.spread} | "
                     f"{r.median / base:.2f}× |")
    return lines + [""]


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="one tiny run of each scenario")
    parser.add_argument("--output", default=str(HERE / "results.md"))
    args = parser.parse_args(argv)
    calls, rounds = (20, 1) if args.tiny else (2000, 15)
    hot = hot_path.run(calls, rounds)
    results = instrumented_call.run(calls, rounds)
    instrumented = results[2].median
    lines = [
        "# Benchmark results", "",
        f"Command: `make bench` ({'tiny' if args.tiny else 'full'} run), "
        f"{dt.date.today().isoformat()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores. Each round times {calls} single calls per variant; "
        f"variants alternate round by round ({rounds} rounds).", "",
    ]
    lines += _table("Hot path: track() with delivery to the local sink", hot,
                    "segment-analytics-python track()")
    lines += _table("Instrumented call", results, "hand-written span + 1 event")
    lines.append(f"Instrumented call overhead over the bare call: "
                 f"{instrumented - results[0].median:.2f} µs.")
    text = "\n".join(lines) + "\n"
    if not args.tiny:
        Path(args.output).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
