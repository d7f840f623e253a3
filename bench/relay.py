"""Scenario: OTLP/HTTP log batches into the relay, delivered to the sink.

Three processes: the sink (``otel-zenml-analytics sink``), the relay
(``otel-zenml-analytics relay --no-grpc``) pinned to core 0 with
``os.sched_setaffinity`` so its figure is "on one core", and this process posting
pre-built ``ExportLogsServiceRequest`` protobuf bodies (``opentelemetry-proto``
classes: one real ``track()`` recorded through the SDK and encoded as the OTLP exporter
encodes it, copied with a fresh message id per event) from ``connections`` threads,
pinned with the sink to the other core.

The relay acknowledges a request only after the sink answered every batch of it, and
the sink answers after its SQLite commit: so the acknowledgement latency measured
here *is* post → stored in the sink. At the end the sink's stored count is compared
with the events posted. There is no peer for this scenario.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, List, Tuple

from bench.procs import own_consent_dir, start_cli, stop_cli
from bench.sides import EVENT_NAME, PROPERTIES

RECORDS_PER_REQUEST = 512
"""The OTel SDK's ``BatchLogRecordProcessor`` default export batch size."""
WARMUP_REQUESTS = 2
PROTOBUF = {"Content-Type": "application/x-protobuf"}


@dataclass
class Result:
    """One run: ``connections`` posting concurrently."""

    name: str
    connections: int
    events: int
    requests: int
    failed_requests: int
    seconds: float
    latencies_ms: List[float]
    stored: int
    expected: int
    relay_cpus: str
    relay_cpu_seconds: float
    """CPU time (user + system) the relay process used while the events were posted."""
    sink_cpu_seconds: float
    """The same for the sink, which shares the other core with the poster."""
    spread: str = ""
    """Events per relay CPU-second over the runs of this connection count, min–max (set by
    :func:`median_runs`)."""
    lost_in_runs: int = 0
    """Events lost in the worst of the runs of this connection count (set by
    :func:`median_runs`)."""

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def lost(self) -> int:
        return self.expected - self.stored

    @property
    def events_per_cpu_second(self) -> float:
        """Events per second of the relay's own CPU: what one core busy only with the
        relay would carry, whatever the sink and the poster on the other core allow."""
        return self.events / self.relay_cpu_seconds if self.relay_cpu_seconds > 0 else 0.0

    @property
    def relay_busy(self) -> float:
        """The relay's CPU time over the wall time: 1.0 is one core fully used."""
        return self.relay_cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def sink_busy(self) -> float:
        """The sink's CPU time over the wall time (its core also runs the poster)."""
        return self.sink_cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    def latency(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


def recorded_request() -> Any:
    """One real ``track()`` through the SDK pipeline, as the OTLP exporter encodes it: an
    ``ExportLogsServiceRequest`` holding its one analytics log record.

    Recorded rather than written by hand, so the bodies carry exactly the attributes
    this version of the package emits.
    """
    own_consent_dir()
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

    try:
        from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
    except ImportError:  # SDKs before the 1.39 rename
        from opentelemetry.sdk._logs.export import (  # type: ignore[attr-defined,no-redef,unused-ignore]
            InMemoryLogExporter as InMemoryLogRecordExporter,
        )

    import otel_zenml_analytics as oza
    from otel_zenml_analytics import attributes as keys
    from otel_zenml_analytics.enums import AnalyticsEvent
    from otel_zenml_analytics.sdk import configure_sdk
    from otel_zenml_analytics.settings import Settings
    from otel_zenml_analytics.sink import SinkServer

    memory = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call,unused-ignore]
    with SinkServer(port=0) as sink:
        sdk = configure_sdk(Settings.resolve(endpoint=sink.url))
        sdk.logger_provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
        try:
            oza.track(AnalyticsEvent(EVENT_NAME), PROPERTIES)
            sdk.force_flush()
        finally:
            sdk.shutdown()
    records = [r for r in memory.get_finished_logs()
               if (getattr(r.log_record, "event_name", None) or "").startswith(
                   keys.EVENT_NAME_PREFIX)]
    if len(records) != 1:
        raise RuntimeError(f"expected one analytics log record, recorded {len(records)}")
    return encode_logs(records)


def build_bodies(events: int, per_request: int = RECORDS_PER_REQUEST
                 ) -> List[Tuple[bytes, int]]:
    """``events`` copies of a recorded analytics log record, ``per_request`` per serialized
    request; each body with its record count. Each copy has its own message id and its
    own value of one property (``steps``), as events of real traffic differ in more
    than their ids: two of the twelve attributes are new in every record."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    from otel_zenml_analytics import attributes as keys

    template = recorded_request()
    template_logs = template.resource_logs[0]
    template_record = template_logs.scope_logs[0].log_records[0]
    id_index = next(i for i, kv in enumerate(template_record.attributes)
                    if kv.key == keys.MESSAGE_ID)
    varying_index = next(i for i, kv in enumerate(template_record.attributes)
                         if kv.key == keys.PROPERTIES_PREFIX + "steps")
    bodies = []
    for first in range(0, events, per_request):
        request = ExportLogsServiceRequest()
        resource_logs = request.resource_logs.add()
        resource_logs.resource.CopyFrom(template_logs.resource)
        scope = resource_logs.scope_logs.add()
        scope.scope.CopyFrom(template_logs.scope_logs[0].scope)
        count = min(per_request, events - first)
        for number in range(first, first + count):
            record = scope.log_records.add()
            record.CopyFrom(template_record)
            record.attributes[id_index].value.string_value = str(uuid.uuid4())
            record.attributes[varying_index].value.int_value = number
        bodies.append((request.SerializeToString(), count))
    return bodies


def post_all(url: str, bodies: List[Tuple[bytes, int]], connections: int
              ) -> Tuple[List[Tuple[float, float, int]], int]:
    """Post every body, ``connections`` at a time; ``(start, end, records)`` of each 200
    answer, and the count of other answers."""
    import requests

    lock = threading.Lock()
    pending: Iterator[Tuple[bytes, int]] = iter(bodies)
    timings: List[Tuple[float, float, int]] = []
    failed = [0]

    def worker() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    item = next(pending, None)
                if item is None:
                    return
                body, records = item
                start = time.monotonic()
                status = session.post(url, data=body, headers=PROTOBUF, timeout=60).status_code
                end = time.monotonic()
                with lock:
                    if status == 200:
                        timings.append((start, end, records))
                    else:
                        failed[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return timings, failed[0]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sink_stored(sink_url: str) -> int:
    import requests

    return int(requests.get(sink_url + "/v1/stats", timeout=30).json()["stored_messages"])


def run(events: int, connections: List[int], repeats: int = 1) -> List[Result]:
    """``repeats`` runs per entry of ``connections`` (alternating), each with its own sink
    and relay."""
    cpus = sorted(os.sched_getaffinity(0))
    relay_cpus = {cpus[0]} if len(cpus) >= 2 else None
    rest = set(cpus[1:]) if relay_cpus else None
    warmup = WARMUP_REQUESTS * RECORDS_PER_REQUEST
    results = []
    # Every run has a sink and a relay of its own, so the runs can post the same bodies.
    began = time.monotonic()
    bodies = build_bodies(events + warmup)
    _say(f"bodies built in {time.monotonic() - began:.1f} s")
    mine = os.sched_getaffinity(0)
    counts = [count for _ in range(repeats) for count in connections]
    for number, count in enumerate(counts, 1):
        sink, relay = None, None
        began = time.monotonic()
        try:
            if rest:
                os.sched_setaffinity(0, rest)
            sink, sink_url = start_cli(["sink", "--port", "0"], "listening on", rest)
            relay, relay_url = start_cli(["relay", "--http-port", "0", "--no-grpc",
                                          "--endpoint", sink_url], "OTLP/HTTP on", relay_cpus)
            logs_url = relay_url + "/v1/logs"
            _, warm_failed = post_all(logs_url, bodies[:WARMUP_REQUESTS], 1)
            cpu_before, sink_cpu_before = _cpu_seconds(relay.pid), _cpu_seconds(sink.pid)
            start = time.monotonic()
            timings, failed = post_all(logs_url, bodies[WARMUP_REQUESTS:], count)
            seconds = max((end for _, end, _ in timings), default=start) - start
            cpu_seconds = _cpu_seconds(relay.pid) - cpu_before
            sink_cpu_seconds = _cpu_seconds(sink.pid) - sink_cpu_before
            stored = _sink_stored(sink_url)
        finally:
            if relay is not None:
                stop_cli(relay)
            if sink is not None:
                stop_cli(sink)
            os.sched_setaffinity(0, mine)
        _say(f"run {number}/{len(counts)}, {count} connection(s): {seconds:.1f} s posting, "
             f"{time.monotonic() - began:.1f} s with the warm-up, start and stop")
        results.append(Result(
            name=f"{count} connection{'s' if count > 1 else ''}", connections=count,
            events=sum(records for _, _, records in timings), requests=len(timings) + failed,
            failed_requests=failed + warm_failed, seconds=seconds,
            latencies_ms=[(end - begin) * 1000 for begin, end, _ in timings], stored=stored,
            expected=events + warmup,
            relay_cpus=",".join(map(str, sorted(relay_cpus))) if relay_cpus else "not pinned",
            relay_cpu_seconds=cpu_seconds, sink_cpu_seconds=sink_cpu_seconds))
    return results


def _say(line: str) -> None:
    """Progress on stderr, where ``bench.run`` reports each scenario's time."""
    print(f"[bench]     relay: {line}", file=sys.stderr, flush=True)


def median_runs(results: List[Result]) -> List[Result]:
    """Per connection count, the run with the median events per relay CPU-second, with
    its ``spread`` and the worst loss over all the runs of that count."""
    out = []
    for count in sorted({r.connections for r in results}):
        runs = sorted((r for r in results if r.connections == count),
                      key=lambda r: r.events_per_cpu_second)
        middle = runs[len(runs) // 2]
        middle.spread = (f"{runs[0].events_per_cpu_second:,.0f}–"
                         f"{runs[-1].events_per_cpu_second:,.0f} ({len(runs)} "
                         f"run{'s' if len(runs) > 1 else ''})")
        middle.lost_in_runs = max(r.lost for r in runs)
        out.append(middle)
    return out
