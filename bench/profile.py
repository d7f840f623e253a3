"""``python -m bench.profile delivery|relay [N]``: where the time of a scenario goes.

For scenarios whose target is missed (issue 5 asks for the profile that shows where
the time goes). ``cProfile`` sees one thread only, so every thread started here is
profiled on its own (``threading.Thread.run`` is wrapped before anything starts) with
the thread's CPU clock as timer (so waiting for a lock or the GIL costs nothing), and
the profiles are merged; the table lists the functions by own CPU time over all
threads.

- ``delivery``: ours side of the delivery scenario in this process (full SDK pipeline,
  ``N`` track() calls as fast as possible, then a flush) against a sink in another
  process.
- ``relay``: the relay in this process (the in-process :class:`Relay`), fed ``N``
  events of OTLP/HTTP protobuf log batches by another process, delivering to a sink
  in a third.

A diagnostic, not a benchmark: profiling slows everything down several times.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import threading
import time
from typing import Any, Callable, List, Tuple

from bench.procs import child_env, finish, own_consent_dir, start_python

_profiles: List[Tuple[str, cProfile.Profile]] = []
_lock = threading.Lock()


def _install() -> None:
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time)
        with _lock:
            _profiles.append((self.name, profile))
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    threading.Thread.run = run  # type: ignore[method-assign]


def _report(main: cProfile.Profile, top: int = 30) -> str:
    stream = io.StringIO()
    stats = pstats.Stats(main, stream=stream)
    with _lock:
        profiles = list(_profiles)
    for _, profile in profiles:
        profile.disable()  # a daemon thread still running: take what it has so far
        try:
            one = pstats.Stats(profile)
        except (TypeError, ValueError):  # nothing recorded
            continue
        stats.add(one)
    stats.sort_stats(os.environ.get("BENCH_PROFILE_SORT", "tottime")).print_stats(top)
    return stream.getvalue()


def _sink() -> Tuple[Any, str]:
    from bench.relay import _cli

    return _cli(["sink", "--port", "0"], "listening on", None)


def _profiled(body: Callable[[], None]) -> str:
    _install()
    main = cProfile.Profile(time.thread_time)
    main.enable()
    body()
    main.disable()
    return _report(main)


def profile_delivery(calls: int) -> str:
    """Ours side of the delivery scenario, profiled."""
    own_consent_dir()
    sink, url = _sink()
    try:
        from bench.sides import OURS, open_side

        def body() -> None:
            side = open_side(OURS, url)
            for _ in range(calls):
                side.track()
            side.flush()
            print(f"delivery counters: {side.counters()}", file=sys.stderr)

        return _profiled(body)
    finally:
        from bench.relay import _stop

        _stop(sink)


def profile_relay(events: int) -> str:
    """The relay, in this process, profiled while another process posts to it."""
    own_consent_dir()
    from bench.relay import _stop

    sink, url = _sink()
    try:
        def body() -> None:
            from otel_zenml_analytics.relay import Relay
            from otel_zenml_analytics.settings import Settings

            with Relay(Settings.resolve(endpoint=url), http_port=0, grpc_port=None) as relay:
                poster = start_python(["-m", "bench.profile", "post", relay.http_url,
                                       str(events)], env=child_env())
                assert poster.stdout is not None
                print(poster.stdout.read().strip(), file=sys.stderr)
                finish(poster, timeout=600)

        return _profiled(body)
    finally:
        _stop(sink)


def post(url: str, events: int) -> None:
    """The poster of :func:`profile_relay`: 4 connections, as in the relay scenario."""
    from bench.relay import _post_all, build_bodies

    bodies = build_bodies(events)
    start = time.monotonic()
    timings, failed = _post_all(url + "/v1/logs", bodies, 4)
    seconds = time.monotonic() - start
    print(f"posted {sum(n for _, _, n in timings)} events in {seconds:.1f} s "
          f"({failed} failed requests) under the profiler")


def main(argv: List[str]) -> int:
    if argv[:1] == ["post"]:
        post(argv[1], int(argv[2]))
        return 0
    what = argv[0] if argv else "delivery"
    size = int(argv[1]) if len(argv) > 1 else 20_000
    if what == "delivery":
        print(profile_delivery(size))
    elif what == "relay":
        print(profile_relay(size))
    else:
        raise SystemExit("usage: python -m bench.profile delivery|relay [N]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
