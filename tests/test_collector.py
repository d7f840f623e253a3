"""The real binaries: an application with standard OTLP exporters only, the project's
OpenTelemetry Collector (collector-config/otelcol-*.yaml, built by scripts/build-collector),
Jaeger v2 (collector-config/jaeger-dev.yaml, built by scripts/build-jaeger), the relay's
command line and the sink. Every address is a free port handed over through the
environment variables the config files read.

Without the binaries these tests skip and name the build command; with ``CI=true`` they
fail instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import requests

from otel_zenml_analytics.sink import SinkServer

from .conftest import BIN, CLI, clean_env, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "collector-config"
APP = Path(__file__).resolve().parent / "test_relay_app.py"
APPS = Path(__file__).resolve().parent / "apps"
SERVICE = "zenml-relay-test-app"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

pytestmark = pytest.mark.timeout(300)


# -- binaries and processes ---------------------------------------------------------------


def _binary(script: str, make_target: str) -> str:
    """The path of a built binary; skip (fail under CI) when it is not built."""
    out = subprocess.run([str(ROOT / "scripts" / script), "--check"], capture_output=True,
                         text=True, timeout=60)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip().splitlines()[-1]
    reason = f"{make_target} is not built: run `make {make_target}` (scripts/{script})"
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)  # only outside CI: with CI=true the line above failed the test


@pytest.fixture(scope="session")
def otelcol() -> str:
    return _binary("build-collector", "collector")


@pytest.fixture(scope="session")
def jaeger() -> str:
    return _binary("build-jaeger", "jaeger")


class Process:
    """A child process whose output goes to a log file, stopped with SIGTERM."""

    def __init__(self, name: str, argv: List[str], env: Dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, env=env, stdout=self._log_file,
                                      stderr=subprocess.STDOUT, cwd=str(ROOT))

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {self.name} ({self.log}):\n" + "\n".join(text)

    def wait_ready(self, url: str, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.popen.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.popen.returncode}\n{self.tail()}")
            return requests.get(url, timeout=2).status_code == 200

        wait_until(ready, f"{self.name} at {url}", timeout, self.tail)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log_file.close()


class Stack:
    """Starts processes on free ports and stops them all at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.config_dir = workdir / "config"
        self.processes: List[Process] = []

    def start(self, name: str, argv: List[str], ready_url: str, **env: str) -> Process:
        process = Process(name, argv, clean_env(self.config_dir, **env),
                          self.workdir / f"{name}-{len(self.processes)}.log")
        self.processes.append(process)
        process.wait_ready(ready_url)
        return process

    def start_on_free_ports(self, start: Callable[[], Any], attempts: int = 3) -> Any:
        """Run ``start``, which picks free ports; again if another process took one of
        them between the pick and the bind (the machine runs other work too)."""
        for attempt in range(attempts):
            try:
                return start()
            except pytest.fail.Exception as exc:
                if "address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
                self.processes.pop().stop()
        raise AssertionError("unreachable")

    def relay(self, sink: SinkServer, http_port: int) -> Process:
        return self.start("relay", [CLI, "relay", "--http-port", str(http_port), "--no-grpc",
                                    "--endpoint", sink.url],
                          f"http://127.0.0.1:{http_port}/health")

    def jaeger(self, binary: str) -> Tuple[str, str]:
        """Start Jaeger; its OTLP/gRPC endpoint and its query URL."""
        def start() -> Tuple[str, str]:
            otlp, query = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            self.start("jaeger", [binary, "--config", str(CONFIGS / "jaeger-dev.yaml")],
                       f"http://{query}/api/services",
                       JAEGER_OTLP_GRPC_ENDPOINT=otlp,
                       JAEGER_OTLP_HTTP_ENDPOINT=f"127.0.0.1:{free_port()}",
                       JAEGER_QUERY_HTTP_ENDPOINT=query,
                       JAEGER_QUERY_GRPC_ENDPOINT=f"127.0.0.1:{free_port()}",
                       JAEGER_HEALTH_ENDPOINT=f"127.0.0.1:{free_port()}",
                       JAEGER_METRICS_PORT=str(free_port()))
            return otlp, f"http://{query}"
        return self.start_on_free_ports(start)

    def collector(self, binary: str, config: str, relay_port: int,
                  jaeger_otlp: Optional[str] = None, **env: str) -> Dict[str, str]:
        """Start the Collector with one of the project's configs; its addresses."""
        def start() -> Dict[str, str]:
            addresses = {
                "OTELCOL_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{free_port()}",
                "OTELCOL_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{free_port()}",
                "OTELCOL_HEALTH_ENDPOINT": f"127.0.0.1:{free_port()}",
                "OTELCOL_METRICS_PORT": str(free_port()),
                # nothing listens there unless a Jaeger was started
                "JAEGER_OTLP_ENDPOINT": jaeger_otlp or f"127.0.0.1:{free_port()}",
                "TRACES_OTLP_ENDPOINT": jaeger_otlp or f"127.0.0.1:{free_port()}",
                "RELAY_ENDPOINT": f"http://127.0.0.1:{relay_port}",
                **env,
            }
            self.start("otelcol", [binary, "--config", str(CONFIGS / config)],
                       f"http://{addresses['OTELCOL_HEALTH_ENDPOINT']}/", **addresses)
            return addresses
        return self.start_on_free_ports(start)

    def app(self, collector: Dict[str, str], count: int, run: str, protocol: str = "http",
            mode: str = "otlp", wait: bool = True, **env: str) -> subprocess.Popen[str]:
        """Run the OTLP-only application against a Collector (or in-process)."""
        endpoint = ("http://" + collector["OTELCOL_OTLP_HTTP_ENDPOINT"] if protocol == "http"
                    else "http://" + collector["OTELCOL_OTLP_GRPC_ENDPOINT"])
        child_env = clean_env(self.config_dir, APP_OTLP_PROTOCOL=protocol,
                              OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
                              OTEL_SERVICE_NAME=SERVICE, **env)
        process = subprocess.Popen([sys.executable, str(APP), mode, str(count), run],
                                   env=child_env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        if wait:
            finish(process, count)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def finish(process: subprocess.Popen[str], count: int) -> Dict[str, Any]:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, out + err
    summary: Dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert summary["tracked"] == count
    return summary


def relay_stats(port: int) -> Dict[str, int]:
    stats: Dict[str, int] = requests.get(f"http://127.0.0.1:{port}/health",
                                         timeout=5).json()["stats"]
    return stats


def by_run_and_index(sink: SinkServer) -> Dict[Tuple[str, int], Dict[str, Any]]:
    """The stored messages by (run, i), failing on any (run, i) stored twice."""
    out: Dict[Tuple[str, int], Dict[str, Any]] = {}
    for event in sink.store.query(limit=10_000):
        message = event["message"]
        key = (message["properties"]["run"], message["properties"]["i"])
        assert key not in out, f"{key} stored twice"
        out[key] = message
    return out


# -- app -> Collector (otelcol-dev.yaml) -> relay -> sink, and -> Jaeger --------------------

COUNT = 8


class DevStack:
    """One run of the development stack, shared by the tests that read its results."""

    def __init__(self, sink: SinkServer, reference: SinkServer, jaeger_url: str,
                 relay_port: int, trace_ids: List[str], jaeger_otlp: str) -> None:
        self.sink = sink
        self.reference = reference
        self.jaeger_url = jaeger_url
        self.jaeger_otlp = jaeger_otlp
        self.relay_port = relay_port
        self.trace_ids = trace_ids


@pytest.fixture(scope="module")
def dev_stack(otelcol: str, jaeger: str, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[DevStack]:
    workdir = tmp_path_factory.mktemp("dev-stack")
    stack = Stack(workdir)
    sink = SinkServer(port=0, db_path=str(workdir / "sink.db")).start()
    reference = SinkServer(port=0, db_path=str(workdir / "reference.db")).start()
    try:
        relay_port = free_port()
        stack.relay(sink, relay_port)
        jaeger_otlp, jaeger_url = stack.jaeger(jaeger)
        collector = stack.collector(otelcol, "otelcol-dev.yaml", relay_port, jaeger_otlp)
        trace_ids = []
        for protocol in ("http", "grpc"):
            app = stack.app(collector, COUNT, protocol, protocol, wait=False)
            trace_ids += finish(app, COUNT)["trace_ids"]
        # the same calls through the in-process components, for comparison
        stack.app(collector, COUNT, "http", mode="inprocess",
                  OTEL_ZENML_ANALYTICS_ENDPOINT=reference.url)
        # every event reaches the relay twice: as a log record and as a span event
        wait_until(lambda: relay_stats(relay_port)["messages"] >= 4 * COUNT,
                   "the Collector to forward logs and traces to the relay",
                   diagnose=lambda: "\n".join(p.tail() for p in stack.processes))
        yield DevStack(sink, reference, jaeger_url, relay_port, trace_ids, jaeger_otlp)
    finally:
        stack.stop()
        sink.stop()
        reference.stop()


def test_every_event_arrives_exactly_once_through_the_collector(dev_stack: DevStack) -> None:
    stored = by_run_and_index(dev_stack.sink)
    expected = {(run, i) for run in ("http", "grpc") for i in range(COUNT)}
    assert set(stored) == expected
    stats = dev_stack.sink.stats()
    assert stats["received_messages"] == 2 * COUNT  # not one copy more on the wire
    assert stats["stored_messages"] == 2 * COUNT
    relay = relay_stats(dev_stack.relay_port)
    assert relay["messages"] == 4 * COUNT
    assert (relay["delivered"], relay["duplicates"]) == (2 * COUNT, 2 * COUNT)
    assert relay["unavailable"] == relay["bad_requests"] == relay["rejected_records"] == 0
    assert {m["context"]["trace_id"] for m in stored.values()} == set(dev_stack.trace_ids)


def test_messages_match_the_in_process_path(dev_stack: DevStack) -> None:
    through_collector = by_run_and_index(dev_stack.sink)
    in_process = by_run_and_index(dev_stack.reference)
    assert len(in_process) == COUNT
    volatile = ("messageId", "timestamp")
    for (run, index), expected in in_process.items():
        actual = through_collector[(run, index)]
        assert {k: v for k, v in actual.items() if k not in volatile and k != "context"} == {
            k: v for k, v in expected.items() if k not in volatile and k != "context"}
        for key in ("library", "os"):
            assert actual["context"][key] == expected["context"][key]
        assert set(actual["context"]) == set(expected["context"]) == {
            "library", "os", "trace_id", "span_id"}
    sample = through_collector[("http", 3)]
    assert sample["properties"]["nested"] == {"k": 3, "v": [1, 2]}
    assert sample["properties"]["tags"] == ["a", "b"]
    assert sample["properties"]["missing"] is None
    assert sample["properties"]["ratio"] == 0.75
    assert sample["properties"]["event_success"] is True


def test_jaeger_shows_the_span_with_its_analytics_event(dev_stack: DevStack) -> None:
    wanted = set(dev_stack.trace_ids)

    def traces() -> Optional[Dict[str, Any]]:
        answer = requests.get(f"{dev_stack.jaeger_url}/api/traces",
                              params={"service": SERVICE, "limit": 100}, timeout=10)
        found = {t["traceID"]: t for t in answer.json().get("data") or []}
        return found if wanted <= set(found) else None

    found = wait_until(traces, f"Jaeger to return the {len(wanted)} traces of {SERVICE}")
    messages = {m["context"]["trace_id"]: m for m in dev_stack.sink.store.query(limit=100)
                for m in [m["message"]]}
    for trace_id in wanted:
        (span,) = found[trace_id]["spans"]
        message = messages[trace_id]
        assert span["operationName"] == f"step {message['properties']['i']}"
        assert span["spanID"] == message["context"]["span_id"]
        (log,) = span["logs"]
        fields = {field["key"]: field["value"] for field in log["fields"]}
        assert fields["event"] == "Pipeline run"  # the span event's name
        assert fields["zenml.analytics.type"] == "track"
        assert fields["zenml.analytics.event"] == "Pipeline run"
        assert fields["zenml.analytics.message_id"] == message["messageId"]
        assert fields["zenml.analytics.user_id"] == message["userId"]
        assert fields["zenml.analytics.properties.i"] == message["properties"]["i"]
        assert fields["zenml.analytics.properties.run"] == message["properties"]["run"]
        assert json.loads(fields["zenml.analytics.properties.nested"]) == \
            message["properties"]["nested"]


def test_jaeger_shows_tracked_calls_whose_spans_ended_on_the_signals_thread(
    dev_stack: DevStack, tmp_path: Path
) -> None:
    # The real opentelemetry-instrument runs the sample shop, its traces straight to
    # Jaeger: each tracked call's span is ended (and its analytics event added) by the
    # signals thread, and the exit records what is pending before the SDK's exporter
    # shuts down.
    service = "sample-shop-in-jaeger"
    env = clean_env(tmp_path / "config", PYTHONPATH=str(APPS), OTEL_SERVICE_NAME=service,
                    OTEL_ZENML_ANALYTICS_TRACKED="sample_app.shop:place_order=Order placed;"
                                                 "sample_app.shop:fail_checkout=Checkout",
                    OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc",
                    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"http://{dev_stack.jaeger_otlp}",
                    OTEL_LOGS_EXPORTER="none", OTEL_METRICS_EXPORTER="none")
    out = subprocess.run([os.path.join(BIN, "opentelemetry-instrument"), sys.executable,
                          str(APPS / "run_shop.py")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "caught ValueError card declined" in out.stdout

    def spans() -> Optional[Dict[str, Any]]:
        answer = requests.get(f"{dev_stack.jaeger_url}/api/traces",
                              params={"service": service, "limit": 100}, timeout=10)
        found = {s["operationName"]: s for t in answer.json().get("data") or []
                 for s in t["spans"]}
        names = {"sample_app.shop.place_order", "sample_app.shop.fail_checkout"}
        return found if names <= set(found) else None

    found = wait_until(spans, f"Jaeger to show the tracked calls of {service}")
    for name, event, failed in (("place_order", "Order placed", False),
                                ("fail_checkout", "Checkout", True)):
        span = found[f"sample_app.shop.{name}"]
        tags = {tag["key"]: tag["value"] for tag in span["tags"]}
        assert tags["code.function.name"] == f"sample_app.shop.{name}"
        logs = [{f["key"]: f["value"] for f in log["fields"]} for log in span["logs"]]
        assert [log["event"] for log in logs] == (["exception", event] if failed else [event])
        assert logs[-1]["zenml.analytics.properties.event_success"] is not failed
        assert tags.get("error", False) is failed
    assert "ValueError" in {f["value"] for log in found["sample_app.shop.fail_checkout"]["logs"]
                            for f in log["fields"] if f["key"] == "exception.type"}


# -- the relay stopped and started again ------------------------------------------------


def test_relay_restart_loses_nothing_and_doubles_nothing(
    otelcol: str, tmp_path: Path, sink: SinkServer
) -> None:
    stack = Stack(tmp_path)
    try:
        relay_port = free_port()
        relay = stack.relay(sink, relay_port)
        collector = stack.collector(otelcol, "otelcol-dev.yaml", relay_port)
        go_on = tmp_path / "go-on"
        first, total = 5, 15
        app = stack.app(collector, total, "restart", wait=False, APP_WAIT_AFTER=str(first),
                        APP_WAIT_FILE=str(go_on))
        assert app.stdout is not None
        assert app.stdout.readline().strip() == "waiting"
        wait_until(lambda: sink.store.count() == first, "the first events to be delivered")
        relay.stop()
        go_on.touch()  # the app sends the rest while the relay is down
        finish(app, total)
        assert sink.store.count() == first
        stack.relay(sink, relay_port)  # the same port: the Collector's retry finds it
        wait_until(lambda: sink.store.count() == total, "the Collector to retry into the "
                   "restarted relay", diagnose=lambda: stack.processes[1].tail())
        stored = by_run_and_index(sink)
        assert set(stored) == {("restart", i) for i in range(total)}
        # Each event travels as a log record and as a span event. The first relay
        # delivered one copy and skipped the other; after the restart a copy that the
        # Collector still held may reach the sink once more, and the sink's message-id
        # de-duplication (Segment's too) keeps one.
        assert len({m["messageId"] for m in stored.values()}) == total
    finally:
        stack.stop()


# -- the gateway: redaction and a persistent queue that survives a restart ----------------


def test_gateway_redacts_and_keeps_its_queue_across_a_restart(
    otelcol: str, tmp_path: Path, sink: SinkServer
) -> None:
    stack = Stack(tmp_path)
    relay_port = free_port()
    storage = tmp_path / "queue"
    gateway_env = {"OTELCOL_STORAGE_DIR": str(storage),
                   "REDACTED_PROPERTIES": "email|api_key"}
    try:
        collector = stack.collector(otelcol, "otelcol-gateway.yaml", relay_port, **gateway_env)
        stack.app(collector, 4, "gateway", APP_EXTRA_PROPERTIES=json.dumps(
            {"email": "someone@example.com", "api_key": "k-123", "plan": "pro"}))
        metrics_url = f"http://127.0.0.1:{collector['OTELCOL_METRICS_PORT']}/metrics"
        wait_until(lambda: _queued(metrics_url) >= 2,
                   "the gateway to hold logs and traces in its queue for the relay",
                   diagnose=lambda: stack.processes[0].tail())
        stack.processes[0].stop()  # the Collector goes down with data queued
        assert sink.store.count() == 0
        stack.relay(sink, relay_port)
        stack.collector(otelcol, "otelcol-gateway.yaml", relay_port, **gateway_env)
        wait_until(lambda: sink.store.count() == 4,
                   "the restarted gateway to deliver its persisted queue",
                   diagnose=lambda: stack.processes[-1].tail())
    finally:
        stack.stop()
    stored = by_run_and_index(sink)
    assert set(stored) == {("gateway", i) for i in range(4)}
    for message in stored.values():
        assert "email" not in message["properties"]
        assert "api_key" not in message["properties"]
        assert message["properties"]["plan"] == "pro"
        assert message["properties"]["tags"] == ["a", "b"]


def _queued(metrics_url: str) -> int:
    """Requests waiting in the relay exporter's queue, per the Collector's own metrics."""
    total = 0
    for line in requests.get(metrics_url, timeout=5).text.splitlines():
        if line.startswith("otelcol_exporter_queue_size") and "otlp_http/relay" in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total
