"""``python -m bench.profile delivery|peer|relay|cpu|signals|caller|posts [N]``: where time goes.

For scenarios whose target is missed (issue 5 asks for the profile that shows where
the time goes). ``cProfile`` sees one thread only, so every thread started here is
profiled on its own (``threading.setprofile`` before anything starts) with the thread's
CPU clock as timer (so waiting for a lock or the GIL costs nothing), and the profiles
are merged; the table lists the functions by own CPU time over all threads. Calls
still in progress when the report is made (a daemon thread blocked in a wait) are left
out.

- ``delivery``: ours side of the delivery scenario in this process (full SDK pipeline,
  ``N`` track() calls as fast as possible, then a flush) against a sink in another
  process.
- ``peer``: the peer's side of the delivery scenario (``segment-analytics-python``), the
  same way, for comparison.
- ``relay``: the relay in this process (the in-process :class:`Relay`, with the CLI's
  settings), fed ``N`` events of OTLP/HTTP protobuf log batches by another process,
  delivering to a sink in a third.

- ``cpu``: no profiler: the process CPU time per event of each side of the delivery
  scenario (``N`` calls and a flush, each side in its own process), the figure the
  profiled shares are shares of.
- ``signals``: no profiler: what the OTel SDK alone charges for an analytics call's span
  event and log record, beside the instrumented-call scenario's yardstick.
- ``caller``: no profiler: the instrumented call built up step by step on the caller's
  thread, from the yardstick, with the scenario's pipeline.
- ``posts``: no profiler: how long a post of 600 messages to a sink in another process
  takes while three threads are busy in Python, through the delivery's
  ``BatchConnection`` and through ``requests`` (``destinations.post_encoded``), ``N``
  posts per round, three rounds alternating.

Before the function table comes the CPU per event by where the code lives (the OTel
SDK, this package, HTTP, JSON, protobuf, the peer, ...): a built-in function's time is
shared among its callers' places in proportion to what each caller spent in it.

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
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench.procs import child_env, finish, own_consent_dir, start_cli, start_python, stop_cli

_profiles: List[Tuple[str, cProfile.Profile]] = []
_lock = threading.Lock()


def _install() -> None:
    """Profile every thread the threading module starts from now on.

    ``threading.setprofile`` hands its function to each new thread before ``run()``
    (also a subclass's own ``run``, as in the peer's consumer); its first call there
    replaces itself with a cProfile profiler for that thread.
    """

    def start_profiling(frame: Any, event: str, arg: Any) -> None:
        profile = cProfile.Profile(time.thread_time)
        with _lock:
            _profiles.append((threading.current_thread().name, profile))
        profile.enable()

    threading.setprofile(start_profiling)


_HTTP = "HTTP (requests, urllib3, http.client, sockets)"
_THREADS = "threads, locks, queues"
_PLACES = (
    ("opentelemetry/sdk/", "OTel SDK"),
    ("opentelemetry/", "OTel API, proto, exporters"),
    ("otel_zenml_analytics/", "otel-zenml-analytics"),
    ("segment/analytics/", "segment-analytics-python"),
    ("google/protobuf/", "protobuf"),
    ("/requests/", _HTTP),
    ("/urllib3/", _HTTP),
    ("/http/", _HTTP),
    ("socket", _HTTP),
    ("/json/", "JSON (stdlib json)"),
    ("threading.py", _THREADS),
    ("queue.py", _THREADS),
)


_BUILT_IN_PLACES = {
    "google._upb._message.Message": "protobuf",
    "google._upb._message.RepeatedCompositeContainer": "protobuf",
    "_socket.socket": _HTTP,
    "_thread.lock": _THREADS,
    "_thread.RLock": _THREADS,
}
"""Built-in methods by the type they belong to (``{method 'X' of 'TYPE' objects}``)."""

_PROTOBUF_METHODS = ("FromString", "ParseFromString", "SerializeToString", "WhichOneof")


def _built_in_place(name: str) -> Optional[str]:
    """The place of a built-in by its type, or (protobuf's class methods) by its name."""
    if any(method in name for method in _PROTOBUF_METHODS):
        return "protobuf"
    return _BUILT_IN_PLACES.get(name.split(" of ")[-1].strip("'} ").split("'")[0])


def _place(function: Tuple[str, int, str]) -> str:
    filename = function[0].replace(os.sep, "/")
    for marker, place in _PLACES:
        if marker in filename:
            return place
    return "other Python code" if filename != "~" else "built-ins"


def _by_place(stats: pstats.Stats, events: int) -> str:
    """CPU per event by place; built-ins charged to their callers' places."""
    seconds: Dict[str, float] = {}
    table = stats.stats  # type: ignore[attr-defined]
    for function, (_, _, own, _, callers) in table.items():
        place = _built_in_place(function[2]) if function[0] == "~" else None
        if place is not None or function[0] != "~" or not callers:
            place = place or _place(function)
            seconds[place] = seconds.get(place, 0.0) + own
            continue
        spent = sum(caller_stats[2] for caller_stats in callers.values()) or 1.0
        for caller, caller_stats in callers.items():
            place = _place(caller)
            seconds[place] = seconds.get(place, 0.0) + own * caller_stats[2] / spent
    total = sum(seconds.values())
    lines = [f"CPU per event by place ({events} events; profiled, so several times the "
             "unprofiled cost: compare the shares and the sides, not the absolute times):"]
    for place, spent in sorted(seconds.items(), key=lambda item: -item[1]):
        lines.append(f"  {spent / events * 1e6:9.1f} µs  {100 * spent / total:5.1f}%  {place}")
    lines.append(f"  {total / events * 1e6:9.1f} µs  100.0%  total")
    return "\n".join(lines) + "\n\n"


class _Finished:
    """The finished calls of a thread's profile, for ``pstats.Stats``.

    A daemon thread may still be running, blocked in a call. ``pstats.Stats(profile)``
    would disable the profile from this thread, which closes that call with this
    thread's CPU clock against the other thread's: seconds of CPU that never were.
    The calls still in progress are left out instead.
    """

    def __init__(self, profile: cProfile.Profile) -> None:
        profile.snapshot_stats()
        self.stats = profile.stats  # type: ignore[attr-defined]

    def create_stats(self) -> None:
        """Already made in ``__init__`` (what ``pstats.Stats`` calls to load a profile)."""


def _report(main: cProfile.Profile, events: int, top: int = 30) -> str:
    stream = io.StringIO()
    stats = pstats.Stats(main, stream=stream)
    with _lock:
        profiles = list(_profiles)
    for _, profile in profiles:
        try:
            one = pstats.Stats(_Finished(profile))  # type: ignore[arg-type]
        except (TypeError, ValueError):  # nothing recorded
            continue
        stats.add(one)
    summary = _by_place(stats, events)
    stats.sort_stats(os.environ.get("BENCH_PROFILE_SORT", "tottime")).print_stats(top)
    return summary + stream.getvalue()


def _sink() -> Tuple[Any, str]:
    return start_cli(["sink", "--port", "0"], "listening on")


PER_THREAD_PROFILES = sys.version_info < (3, 12)
"""From Python 3.12, cProfile allows one profiler per process (``sys.monitoring``)."""


def _profiled(body: Callable[[], None], events: int) -> str:
    if not PER_THREAD_PROFILES:
        raise SystemExit("bench.profile delivery|peer|relay profiles every thread with a "
                         "cProfile of its own, which Python 3.12 and later do not allow: "
                         "run it with Python 3.11 (cpu and signals need no profiler)")
    _install()
    main = cProfile.Profile(time.thread_time)
    main.enable()
    body()
    main.disable()
    return _report(main, events)


def profile_delivery(calls: int, side_name: str = "ours") -> str:
    """One side of the delivery scenario (``ours`` or ``peer``), profiled."""
    own_consent_dir()
    sink, url = _sink()
    try:
        from bench.sides import open_side

        def body() -> None:
            side = open_side(side_name, url)
            for _ in range(calls):
                side.track()
            side.flush()
            print(f"delivery counters: {side.counters()}", file=sys.stderr)

        return _profiled(body, calls)
    finally:
        stop_cli(sink)


def profile_relay(events: int) -> str:
    """The relay, in this process, profiled while another process posts to it."""
    own_consent_dir()
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

        return _profiled(body, events)
    finally:
        stop_cli(sink)


def post(url: str, events: int) -> None:
    """The poster of :func:`profile_relay`: 4 connections, as in the relay scenario."""
    from bench.relay import build_bodies, post_all

    bodies = build_bodies(events)
    start = time.monotonic()
    timings, failed = post_all(url + "/v1/logs", bodies, 4)
    seconds = time.monotonic() - start
    print(f"posted {sum(n for _, _, n in timings)} events in {seconds:.1f} s "
          f"({failed} failed requests) under the profiler")


def cpu_per_event(calls: int, rounds: int = 3) -> str:
    """Unprofiled: the process CPU (all threads) per event of each side of the delivery
    scenario, ``calls`` track() calls and a flush, each side in a process of its own
    (alternating, ``rounds`` times); the median per side."""
    sink, url = _sink()
    figures: Dict[str, List[float]] = {}
    try:
        for _ in range(rounds):
            for side in ("ours", "peer"):
                child = start_python(["-m", "bench.profile", "cpu-side", side, url, str(calls)],
                                     env=child_env())
                assert child.stdout is not None
                figures.setdefault(side, []).append(float(child.stdout.read().strip()))
                finish(child, timeout=600)
    finally:
        stop_cli(sink)
    lines = [f"Process CPU per event, {calls} track() calls and a flush, median of {rounds}:"]
    for side, values in figures.items():
        values.sort()
        lines.append(f"  {side}: {values[len(values) // 2]:.1f} µs "
                     f"(runs: {', '.join(f'{v:.1f}' for v in values)})")
    return "\n".join(lines)


def signal_costs(calls: int, rounds: int = 8) -> str:
    """Unprofiled: what the OTel SDK charges the caller for an analytics call's signals,
    beside the instrumented-call scenario's yardstick (a span with one 2-attribute event).

    The SDK here has no processors of this package, so nothing is delivered: a span with
    one 2-attribute event, the same span with the 12 attributes of an analytics event
    instead, and ``Logger.emit`` of the analytics log record through a
    ``BatchLogRecordProcessor`` (to an exporter that drops it), variants interleaved.
    """
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.trace import TracerProvider

    from bench.harness import interleaved
    from bench.relay import recorded_request
    from otel_zenml_analytics import attributes as keys
    from otel_zenml_analytics import otlp

    record = recorded_request().resource_logs[0].scope_logs[0].log_records[0]
    analytics = otlp.attribute_dict(record.attributes)
    event = str(analytics[keys.EVENT])
    tracer = TracerProvider().get_tracer("bench")
    logs = LoggerProvider()
    logs.add_log_record_processor(BatchLogRecordProcessor(_Dropping()))
    logger = logs.get_logger("bench")

    def yardstick() -> None:
        with tracer.start_as_current_span("work") as span:
            span.add_event(event, {"zenml.analytics.event": event, "event_success": True})

    def rich_event() -> None:
        with tracer.start_as_current_span("work") as span:
            span.add_event(event, analytics)

    def log_record() -> None:
        logger.emit(body=event, attributes=analytics, event_name=record.event_name)

    results = interleaved([("span + one 2-attribute event (the yardstick)", yardstick),
                           (f"span + one {len(analytics)}-attribute analytics event",
                            rich_event),
                           ("Logger.emit of the analytics log record", log_record)],
                          calls, rounds)
    logs.shutdown()
    base, rich, emit = (r.median for r in results)
    lines = [f"Median µs per call, {rounds} interleaved rounds of {calls}:"]
    lines += [f"  {r.median:7.1f}  {r.name}" for r in results]
    lines.append(f"1.2x the yardstick leaves {0.2 * base:.1f} µs for everything an analytics "
                 f"call adds; the SDK alone charges {rich - base:.1f} µs for the richer event "
                 f"and {emit:.1f} µs for the log record.")
    return "\n".join(lines)


def caller_costs(calls: int, rounds: int = 10) -> str:
    """Unprofiled: the instrumented-call scenario's call built up step by step, as that
    scenario times it (the median of single calls on the caller's thread) and with its
    pipeline (``configure_sdk`` delivering to a local sink).

    From the yardstick to the instrumented call: the wrapper's span alone (started on
    the caller's thread, ended on the signals thread with ``signals.SpanEndingLater``),
    that span with a ``track()`` inside (the message, handed to the signals thread with
    the span's end), and the instrumented call (adding the wrapper's own work); then, for
    comparison, the span started and ended on the caller's thread holding the analytics
    event added as is (what the SDK charges the caller, with no message built, where the
    span ends as it did before ``SpanEndingLater``) and the instrumented call with
    ``span_end="caller"``. Variants interleaved.
    """
    own_consent_dir()
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import otel_zenml_analytics as oza
    from bench import workload
    from bench.harness import interleaved
    from bench.instrumented_call import instrumented
    from otel_zenml_analytics import signals
    from otel_zenml_analytics.instrumentation.wrapper import _Span
    from otel_zenml_analytics.sdk import configure_sdk
    from otel_zenml_analytics.settings import Settings
    from otel_zenml_analytics.sink import SinkServer

    name, event, bare = "bench.workload.work", "Work done", workload.work
    # The attributes of a real analytics event inside the span, recorded once beforehand.
    recorded = InMemorySpanExporter()
    probe = TracerProvider()
    probe.add_span_processor(SimpleSpanProcessor(recorded))
    signals.use_providers(probe)
    with probe.get_tracer("bench").start_as_current_span(name):
        oza.track(event, {"event_success": True})
    signals.flush()
    analytics = dict(recorded.get_finished_spans()[0].events[0].attributes or {})

    with SinkServer(port=0) as sink:
        sdk = configure_sdk(Settings.resolve(endpoint=sink.url))
        tracer = sdk.tracer_provider.get_tracer("bench")
        code = {"code.function.name": name}

        def yardstick() -> int:
            with tracer.start_as_current_span(name) as span:
                result = bare()
                span.add_event(event, {"zenml.analytics.event": event, "event_success": True})
                return result

        def span_alone(track: bool = False) -> int:
            with _Span(tracer, name, code):  # the wrapper's own
                result = bare()
                if track:
                    oza.track(event, {"event_success": True})
                return result

        def span_and_event_on_the_caller() -> int:
            with tracer.start_as_current_span(name, attributes=code) as span:
                result = bare()
                span.add_event(event, analytics)
                return result

        with instrumented(sdk, event):
            results = interleaved([
                ("span + one 2-attribute event (the yardstick)", yardstick),
                ("the wrapper's span, ended on the signals thread", span_alone),
                ("  + track() inside it", lambda: span_alone(track=True)),
                ("the instrumented call", workload.work),
                (f"a span ended on the caller's thread, with the {len(analytics)}-attribute "
                 "analytics event added as is", span_and_event_on_the_caller),
            ], calls, rounds, sdk.force_flush)
        sdk = configure_sdk(Settings.resolve(endpoint=sink.url))
        tracer = sdk.tracer_provider.get_tracer("bench")
        with instrumented(sdk, event, span_end="caller"):
            second = interleaved([("the yardstick, in this second pipeline", yardstick),
                                  ("the instrumented call, span_end=caller", workload.work)],
                                 calls, rounds, sdk.force_flush)
    lines = [f"Median µs per call on the caller's thread, {rounds} interleaved rounds of "
             f"{calls}:"]
    for batch in (results, second):
        base = batch[0].median
        lines += [f"  {r.median:7.1f}  {r.median / base:5.2f}x  {r.name}" for r in batch]
    base = results[0].median
    span_part, tracked, instrumented_call, on_caller = (r.median for r in results[1:5])
    lines.append(f"The span alone costs {span_part / base:.2f}x the yardstick; track() adds "
                 f"{tracked - span_part:.1f} µs, the wrapper {instrumented_call - tracked:.1f} "
                 f"µs. Ended on the caller's thread, the span and the analytics event alone, "
                 f"with no message built, cost {on_caller / base:.2f}x the yardstick.")
    return "\n".join(lines)


class _Dropping:
    """A log record exporter that drops what it is given."""

    def export(self, batch: Any) -> Any:
        from opentelemetry.sdk._logs.export import LogRecordExportResult

        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def post_costs(posts: int, rounds: int = 3, busy_threads: int = 3) -> str:
    """Median post time of each client, rounds alternating, while threads spin in Python
    (as the threads recording signals do in a burst, holding the GIL)."""
    import json
    import statistics

    from otel_zenml_analytics.connection import BatchConnection
    from otel_zenml_analytics.destinations import new_session, post_encoded
    from otel_zenml_analytics.settings import Settings

    sink, url = _sink()
    stop = threading.Event()

    def spin() -> None:
        count = 0
        while not stop.is_set():
            for step in range(100):
                count += step

    spinners = [threading.Thread(target=spin, daemon=True) for _ in range(busy_threads)]
    settings = Settings.resolve(endpoint=url)
    connection, session = BatchConnection(settings), new_session(settings)
    clients: Dict[str, Callable[[List[str]], object]] = {
        "BatchConnection": lambda chunk: connection.post(chunk, 15.0),
        "requests": lambda chunk: post_encoded(settings, chunk, session, 15.0),
    }
    medians: Dict[str, List[float]] = {name: [] for name in clients}
    serial = 0
    try:
        for thread in spinners:
            thread.start()
        for _ in range(rounds):
            for name, client in clients.items():
                took = []
                for _ in range(posts):
                    serial += 1
                    chunk = [json.dumps({"type": "track", "event": "Post timed", "userId": "u",
                                         "messageId": f"post-{serial}-{n}",
                                         "properties": {"padding": "x" * 600}})
                             for n in range(600)]
                    start = time.perf_counter()
                    client(chunk)
                    took.append(time.perf_counter() - start)
                medians[name].append(statistics.median(took) * 1000)
    finally:
        stop.set()
        connection.close()
        session.close()
        stop_cli(sink)
    lines = [f"Median ms per post of 600 messages, {busy_threads} threads busy in Python, "
             f"{rounds} rounds of {posts} posts, alternating:"]
    lines += [f"  {name:16} " + "  ".join(f"{m:6.1f}" for m in values)
              for name, values in medians.items()]
    return "\n".join(lines)


def cpu_side(side_name: str, url: str, calls: int) -> None:
    """The child of :func:`cpu_per_event`: prints its process CPU per event in µs."""
    own_consent_dir()
    from bench.sides import open_side

    side = open_side(side_name, url)
    side.track()
    side.flush()
    start = time.process_time()
    for _ in range(calls):
        side.track()
    side.flush()
    print(f"{(time.process_time() - start) / calls * 1e6:.1f}", flush=True)
    os._exit(0)  # the figure is out; skip the interpreter's teardown


def main(argv: List[str]) -> int:
    if argv[:1] == ["post"]:
        post(argv[1], int(argv[2]))
        return 0
    if argv[:1] == ["cpu-side"]:
        cpu_side(argv[1], argv[2], int(argv[3]))
        return 0
    what = argv[0] if argv else "delivery"
    size = int(argv[1]) if len(argv) > 1 else 20_000
    if what == "delivery":
        print(profile_delivery(size))
    elif what == "peer":
        print(profile_delivery(size, "peer"))
    elif what == "relay":
        print(profile_relay(size))
    elif what == "cpu":
        print(cpu_per_event(size))
    elif what == "signals":
        print(signal_costs(size))
    elif what == "caller":
        print(caller_costs(size))
    elif what == "posts":
        print(post_costs(int(argv[1]) if len(argv) > 1 else 100))
    else:
        raise SystemExit(
            "usage: python -m bench.profile delivery|peer|relay|cpu|signals|caller|posts [N]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
