"""The relay over real HTTP and gRPC, without a Collector: real SDK signals encoded by
the OTLP exporters' own encoders, a real sink as the analytics server."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import pytest
import requests
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_zenml_analytics
from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics import signals
from otel_zenml_analytics.relay import Relay
from otel_zenml_analytics.settings import ConfigurationError, Settings
from otel_zenml_analytics.sink import SinkServer

from .conftest import CLI, InMemoryLogRecordExporter

PROTOBUF = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}
APP = os.path.join(os.path.dirname(__file__), "test_relay_app.py")


# -- real signals, encoded as the OTLP exporters encode them ------------------------------


class Recorded:
    """Analytics calls recorded by real SDK providers (plus one plain span and log record)."""

    def __init__(self, spans: Sequence[Any], logs: Sequence[Any]) -> None:
        self.spans = list(spans)
        self.logs = list(logs)

    def logs_request(self) -> ExportLogsServiceRequest:
        return encode_logs(self.logs)

    def traces_request(self) -> ExportTraceServiceRequest:
        return encode_spans(self.spans)


def record(count: int, event: str = "Pipeline run",
           extra: Optional[Dict[str, Any]] = None) -> Recorded:
    """``count`` tracks, each in its own span, through real SDK providers."""
    spans = InMemorySpanExporter()
    logs = InMemoryLogRecordExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    signals.use_providers(tracer_provider, logger_provider)
    tracer = tracer_provider.get_tracer("tests")
    try:
        for index in range(count):
            with tracer.start_as_current_span(f"work {index}"):
                assert otel_zenml_analytics.track(event, {"i": index, "tags": ["x"],
                                                          "nested": {"a": 1}, **(extra or {})})
        with tracer.start_as_current_span("no analytics here"):
            logger_provider.get_logger("app").emit(body="an ordinary log record")
    finally:
        signals.use_providers()
    return Recorded(spans.get_finished_spans(), logs.get_finished_logs())


def otlp_json(request: Any) -> Dict[str, Any]:
    """A request as OTLP/JSON: protobuf's JSON mapping, but ids in hex."""
    document = json_format.MessageToDict(request)

    def fix(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                fix(item)
        elif isinstance(node, dict):
            for name, value in node.items():
                if name in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                    node[name] = base64.b64decode(value).hex()
                else:
                    fix(value)

    fix(document)
    return document


def post(relay: Relay, path: str, body: bytes, headers: Dict[str, str]) -> requests.Response:
    return requests.post(relay.http_url + path, data=body, headers=headers, timeout=30)


def status_of(response: requests.Response) -> status_pb2.Status:
    """The ``google.rpc.Status`` of an OTLP/HTTP error answer (protobuf or JSON)."""
    if response.headers["Content-Type"] == "application/x-protobuf":
        return status_pb2.Status.FromString(response.content)
    document = response.json()
    return status_pb2.Status(code=document["code"], message=document["message"])


@contextlib.contextmanager
def cli_relay(args: Sequence[str], env: Dict[str, str], stderr: Any = subprocess.PIPE
              ) -> Iterator[Tuple[subprocess.Popen[str], str]]:
    """The CLI run with ``args`` (a relay command) and the first line it printed; killed
    on the way out unless it has ended."""
    process = subprocess.Popen([CLI, *args], env=env, stdout=subprocess.PIPE, stderr=stderr,
                               text=True)
    try:
        assert process.stdout is not None
        yield process, process.stdout.readline()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def http_url_of(banner: str) -> str:
    """The OTLP/HTTP URL the relay's first line announces."""
    return banner.split("OTLP/HTTP on ")[1].split()[0]


def answer_of(sock: socket.socket, done: bool = True) -> bytes:
    """Everything the relay says on a connection (once the sender has said all)."""
    if done:
        sock.shutdown(socket.SHUT_WR)
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def sink_messages(sink: SinkServer) -> List[Dict[str, Any]]:
    return [event["message"] for event in sink.store.query(limit=1000)]


@pytest.fixture
def relay(sink: SinkServer) -> Iterator[Relay]:
    with Relay(Settings.resolve(endpoint=sink.url), http_port=0, grpc_port=0) as server:
        yield server


# -- HTTP ---------------------------------------------------------------------------------


def test_http_protobuf_logs_then_traces_deliver_each_event_once(
    relay: Relay, sink: SinkServer
) -> None:
    recorded = record(3)
    answer = post(relay, "/v1/logs", recorded.logs_request().SerializeToString(), PROTOBUF)
    assert answer.status_code == 200, answer.content
    assert answer.headers["Content-Type"] == "application/x-protobuf"
    assert not ExportLogsServiceResponse.FromString(answer.content).HasField("partial_success")
    answer = post(relay, "/v1/traces", recorded.traces_request().SerializeToString(), PROTOBUF)
    assert answer.status_code == 200, answer.content
    assert not ExportTraceServiceResponse.FromString(answer.content).HasField("partial_success")

    assert sink.store.count() == 3
    assert sink.stats()["received_messages"] == 3
    stats = relay.stats()
    assert (stats["messages"], stats["delivered"], stats["duplicates"]) == (6, 3, 3)
    messages = sorted(sink_messages(sink), key=lambda m: m["properties"]["i"])
    spans = {span.name: span for span in recorded.spans}
    for index, message in enumerate(messages):
        span = spans[f"work {index}"]
        assert message["event"] == "Pipeline run"
        assert message["properties"]["i"] == index
        assert message["properties"]["tags"] == ["x"]
        assert message["properties"]["nested"] == {"a": 1}
        assert message["context"]["trace_id"] == format(span.context.trace_id, "032x")
        assert message["context"]["span_id"] == format(span.context.span_id, "016x")


def test_http_json_with_hex_ids(relay: Relay, sink: SinkServer) -> None:
    recorded = record(2)
    document = otlp_json(recorded.traces_request())
    answer = post(relay, "/v1/traces", json.dumps(document).encode(), JSON)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json() == {}
    trace_ids = {format(span.context.trace_id, "032x") for span in recorded.spans}
    assert {m["context"]["trace_id"] for m in sink_messages(sink)} <= trace_ids
    assert sink.store.count() == 2
    # the same events as JSON logs: already delivered
    answer = post(relay, "/v1/logs", json.dumps(otlp_json(recorded.logs_request())).encode(),
                  {"Content-Type": "application/json; charset=utf-8"})
    assert answer.status_code == 200, answer.text
    assert sink.stats()["received_messages"] == 2


def test_http_gzip(relay: Relay, sink: SinkServer) -> None:
    body = gzip.compress(record(4).logs_request().SerializeToString())
    answer = post(relay, "/v1/logs", body, {**PROTOBUF, "Content-Encoding": "gzip"})
    assert answer.status_code == 200, answer.content
    assert sink.store.count() == 4


def test_relay_redacts_before_delivering(sink: SinkServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_zenml_analytics.redaction import hash_value

    recorded = record(2)  # recorded without redaction, as an app that does not redact
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_REDACT", "tags,hash:i")
    with Relay(Settings.resolve(endpoint=sink.url), http_port=0, grpc_port=None) as relay:
        answer = post(relay, "/v1/logs", recorded.logs_request().SerializeToString(), PROTOBUF)
        assert answer.status_code == 200
    for message in sink_messages(sink):
        assert "tags" not in message["properties"]
        assert message["properties"]["i"] in (hash_value(0), hash_value(1))
        assert message["properties"]["nested"] == {"a": 1}


def test_an_oversized_message_is_truncated_marked_and_counted(relay: Relay, sink: SinkServer
                                                              ) -> None:
    from otel_zenml_analytics.delivery import live_deliveries

    body = record(1, extra={"blob": "é" * 40_000}).logs_request().SerializeToString()
    assert post(relay, "/v1/logs", body, PROTOBUF).status_code == 200
    [message] = sink_messages(sink)
    assert message["properties"]["blob"].endswith("…[truncated]")
    assert message["context"]["truncated"] == ["properties.blob"]
    assert message["properties"]["nested"] == {"a": 1}
    wire = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert len(wire) <= 32 * 1024
    [delivery] = [d for d in live_deliveries() if d.settings.endpoint == sink.url]
    assert delivery.stats()["truncated"] == 1


def test_zenml_wire_format(sink: SinkServer) -> None:
    settings = Settings.resolve(endpoint=sink.url, format="zenml")
    with Relay(settings, http_port=0, grpc_port=None) as relay:
        answer = post(relay, "/v1/logs", record(2).logs_request().SerializeToString(), PROTOBUF)
        assert answer.status_code == 200
    assert [e["format"] for e in sink.store.query()] == ["zenml", "zenml"]


def test_other_records_and_spans_are_accepted_and_ignored(relay: Relay, sink: SinkServer) -> None:
    recorded = record(0)
    assert recorded.spans and recorded.logs
    for path, request in (("/v1/logs", recorded.logs_request()),
                          ("/v1/traces", recorded.traces_request())):
        answer = post(relay, path, request.SerializeToString(), PROTOBUF)
        assert answer.status_code == 200
        assert answer.content == b""  # an empty response: full success
    assert sink.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [
        (b"\x0a\xff\xff\xff", PROTOBUF, 400, "not a valid protobuf ExportLogsServiceRequest"),
        (b"{not json", JSON, 400, "not valid JSON"),
        (b"[1, 2]", JSON, 400, "must be a JSON object"),
        (b'{"resourceLogs": 3}', JSON, 400, "resourceLogs"),
        (b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"traceId": "xyz"}]}]}]}', JSON,
         400, "$.resourceLogs[0].scopeLogs[0].logRecords[0].traceId is not a hex-encoded id"),
        (b"not gzip", {**PROTOBUF, "Content-Encoding": "gzip"}, 400, "not valid gzip"),
        (b"x", {"Content-Type": "text/plain"}, 415, "unsupported Content-Type 'text/plain'"),
        (b"x", {**PROTOBUF, "Content-Encoding": "br"}, 415, "unsupported Content-Encoding"),
    ],
)
def test_malformed_bodies_get_an_answer_naming_the_problem(
    relay: Relay, sink: SinkServer, body: bytes, headers: Dict[str, str], status: int,
    words: str
) -> None:
    answer = post(relay, "/v1/logs", body, headers)
    assert answer.status_code == status
    problem = status_of(answer)
    assert words in problem.message
    assert problem.code == 3  # INVALID_ARGUMENT
    assert relay.stats()["bad_requests"] == 1
    assert sink.stats()["requests"] == 0


def test_unknown_path_and_health(relay: Relay) -> None:
    answer = post(relay, "/v1/metrics", b"", PROTOBUF)
    assert answer.status_code == 404
    assert "/v1/logs" in status_of(answer).message
    health = requests.get(relay.http_url + "/health", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"


def _log_request(*records: LogRecord) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    request.resource_logs.add().scope_logs.add().log_records.extend(records)
    return request


def _attrs(values: Dict[str, Any]) -> List[KeyValue]:
    out = []
    for key, value in values.items():
        any_value = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(
            string_value=value)
        out.append(KeyValue(key=key, value=any_value))
    return out


def _analytics_log_record() -> LogRecord:
    """The log record of one real track() call."""
    return next(log for scope in record(1).logs_request().resource_logs[0].scope_logs
                for log in scope.log_records if log.event_name.startswith(keys.EVENT_NAME_PREFIX))


def _record_without_ids() -> LogRecord:
    """An analytics log record the mapping refuses: no type and no message id."""
    return LogRecord(event_name="zenml.analytics.track",
                     attributes=_attrs({keys.EVENT: "Pipeline run"}))


def test_unmappable_records_are_reported_through_partial_success(
    relay: Relay, sink: SinkServer
) -> None:
    good = _analytics_log_record()
    no_ids = _record_without_ids()
    bad_type = LogRecord(event_name="zenml.analytics.track", attributes=_attrs(
        {keys.TYPE: "page", keys.MESSAGE_ID: "m-1", keys.USER_ID: "u"}))
    short_trace = LogRecord(event_name="zenml.analytics.track", trace_id=b"\x01\x02",
                            attributes=_attrs({keys.TYPE: "track", keys.MESSAGE_ID: "m-2",
                                               keys.USER_ID: "u", keys.EVENT: "E"}))
    request = _log_request(good, no_ids, bad_type, short_trace)
    for content_type in ("protobuf", "json"):
        if content_type == "protobuf":
            answer = post(relay, "/v1/logs", request.SerializeToString(), PROTOBUF)
            response = ExportLogsServiceResponse.FromString(answer.content)
        else:
            answer = post(relay, "/v1/logs", json.dumps(otlp_json(request)).encode(), JSON)
            response = json_format.ParseDict(answer.json(), ExportLogsServiceResponse())
        assert answer.status_code == 200
        partial = response.partial_success
        assert partial.rejected_log_records == 3
        assert "logRecords[1]" in partial.error_message
        assert "no zenml.analytics.type and zenml.analytics.message_id" in partial.error_message
        assert "'page' is not one of track" in partial.error_message
        assert "traceId has 2 bytes, expected 16" in partial.error_message
    assert sink.store.count() == 1


def test_many_unmappable_records_are_counted_and_the_first_reasons_told(relay: Relay) -> None:
    no_ids = _record_without_ids()
    answer = post(relay, "/v1/logs", _log_request(*[no_ids] * 1000).SerializeToString(),
                  PROTOBUF)
    partial = ExportLogsServiceResponse.FromString(answer.content).partial_success
    assert partial.rejected_log_records == 1000
    assert partial.error_message.count("no zenml.analytics.type") == 3
    assert "logRecords[2] " in partial.error_message and "logRecords[3] " not in \
        partial.error_message
    assert partial.error_message.endswith("; and 997 more")


def test_ids_of_the_wrong_type_are_refused_not_sent_as_python_reprs(
    relay: Relay, sink: SinkServer
) -> None:
    base = _attrs({keys.TYPE: "track", keys.MESSAGE_ID: "m-1", keys.EVENT: "E"})
    listed = KeyValue(key=keys.USER_ID, value=AnyValue(array_value=ArrayValue(
        values=[AnyValue(string_value="x"), AnyValue(string_value="y")])))
    flagged = KeyValue(key=keys.USER_ID, value=AnyValue(bool_value=True))
    numbered = KeyValue(key=keys.USER_ID, value=AnyValue(int_value=42))
    request = _log_request(
        LogRecord(event_name="zenml.analytics.track", attributes=[*base, listed]),
        LogRecord(event_name="zenml.analytics.track", attributes=[*base, flagged]),
        LogRecord(event_name="zenml.analytics.track", attributes=[*base, numbered]))
    answer = post(relay, "/v1/logs", request.SerializeToString(), PROTOBUF)
    partial = ExportLogsServiceResponse.FromString(answer.content).partial_success
    assert partial.rejected_log_records == 2
    assert "zenml.analytics.user_id must be a string, not an array" in partial.error_message
    assert "zenml.analytics.user_id must be a string, not a boolean" in partial.error_message
    assert [m["userId"] for m in sink_messages(sink)] == ["42"]


def test_unmappable_span_events_are_reported_per_span(relay: Relay, sink: SinkServer) -> None:
    request = record(2).traces_request()
    spans = request.resource_spans[0].scope_spans[0].spans
    broken = next(span for span in spans if span.events)
    for attribute in broken.events[0].attributes:
        if attribute.key == keys.USER_ID:
            attribute.key = "zenml.analytics.other"
        if attribute.key == keys.ANONYMOUS_ID:
            attribute.key = "zenml.analytics.another"
    answer = post(relay, "/v1/traces", request.SerializeToString(), PROTOBUF)
    assert answer.status_code == 200
    partial = ExportTraceServiceResponse.FromString(answer.content).partial_success
    assert partial.rejected_spans == 1
    assert "events[0] (Pipeline run): needs zenml.analytics.user_id" in partial.error_message
    assert sink.store.count() == 1


def test_a_span_with_an_unmappable_event_and_a_refused_one_counts_once(
    relay: Relay, sink: SinkServer
) -> None:
    request = record(1).traces_request()
    span = next(s for s in request.resource_spans[0].scope_spans[0].spans if s.events)
    span.events.add().CopyFrom(span.events[0])  # a good copy after the one broken here
    for attribute in span.events[0].attributes:
        if attribute.key in (keys.USER_ID, keys.ANONYMOUS_ID):
            attribute.key = "zenml.analytics.other"
    sink.set_faults(1, status=400)  # and the server refuses the good one
    answer = post(relay, "/v1/traces", request.SerializeToString(), PROTOBUF)
    partial = ExportTraceServiceResponse.FromString(answer.content).partial_success
    assert partial.rejected_spans == 1
    assert "needs zenml.analytics.user_id" in partial.error_message
    assert "the analytics server refused 1 of 1 messages" in partial.error_message


def test_destination_failing_answers_503_with_retry_after_then_delivers(
    relay: Relay, sink: SinkServer
) -> None:
    body = record(2).logs_request().SerializeToString()
    sink.set_faults(1, status=503, retry_after=3)
    answer = post(relay, "/v1/logs", body, PROTOBUF)
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "3"
    assert "503" in status_of(answer).message
    assert sink.store.count() == 0
    sink.set_faults(1, status=500)
    answer = post(relay, "/v1/logs", body, PROTOBUF)
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "2"  # the relay's default
    # the sender's retry is not taken for a duplicate
    answer = post(relay, "/v1/logs", body, PROTOBUF)
    assert answer.status_code == 200
    assert sink.store.count() == 2
    assert relay.stats()["unavailable"] == 2


def test_with_a_spool_written_is_acknowledged_and_delivered_later(
    sink: SinkServer, tmp_path: Any
) -> None:
    settings = Settings.resolve(endpoint=sink.url, spool=str(tmp_path / "spool.db"),
                                max_retries=0)
    sink.set_faults(3, status=503)  # the analytics server fails for a while
    recorded = record(3)
    with Relay(settings, http_port=0, grpc_port=None) as relay:
        answer = post(relay, "/v1/logs", recorded.logs_request().SerializeToString(), PROTOBUF)
        assert answer.status_code == 200  # durably accepted, not yet delivered
        assert relay.stats()["spooled"] == 3
        deadline = time.monotonic() + 60
        while sink.store.count() < 3:
            assert time.monotonic() < deadline, "the spool was not drained"
            time.sleep(0.1)
    assert sink.stats()["faulted_requests"] == 3
    assert {m["properties"]["i"] for m in sink_messages(sink)} == {0, 1, 2}


def test_with_a_spool_a_copy_of_messages_still_being_written_is_not_acknowledged(
    sink: SinkServer, tmp_path: Any
) -> None:
    """Request B repeats a message of request A, whose spool write waits on a lock held by
    another SQLite connection: B must be told to retry, not acknowledged with its new
    message unwritten."""
    spool = tmp_path / "spool.db"
    settings = Settings.resolve(endpoint=sink.url, spool=str(spool), timeout=0.5)
    logs = sorted((log for log in record(3).logs if keys.is_analytics(log.log_record.attributes)),
                  key=lambda log: log.log_record.attributes[keys.PROPERTIES_PREFIX + "i"])
    first, second = encode_logs(logs[:2]), encode_logs([logs[0], logs[2]])
    with Relay(settings, http_port=0, grpc_port=None) as relay:
        other = sqlite3.connect(spool, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # holds the spool's write lock
        answers: Dict[str, requests.Response] = {}
        writer = threading.Thread(target=lambda: answers.setdefault("first", post(
            relay, "/v1/logs", first.SerializeToString(), PROTOBUF)))
        writer.start()
        deadline = time.monotonic() + 30
        while relay.stats()["messages"] < 2:  # the first request is mapped, now writing
            assert time.monotonic() < deadline, "the first request never arrived"
            time.sleep(0.01)
        copy = post(relay, "/v1/logs", second.SerializeToString(), PROTOBUF)
        other.execute("ROLLBACK")
        other.close()
        writer.join(60)
        assert copy.status_code == 503 and "Retry-After" in copy.headers, copy.status_code
        assert answers["first"].status_code == 200
        assert post(relay, "/v1/logs", second.SerializeToString(), PROTOBUF).status_code == 200
        deadline = time.monotonic() + 60
        while sink.store.count() < 3:
            assert time.monotonic() < deadline, "the spool was not drained"
            time.sleep(0.1)
    assert sorted(m["properties"]["i"] for m in sink_messages(sink)) == [0, 1, 2]


def test_destination_refusing_for_good_is_a_partial_success(
    relay: Relay, sink: SinkServer
) -> None:
    sink.set_faults(1, status=400)
    answer = post(relay, "/v1/traces", record(2).traces_request().SerializeToString(), PROTOBUF)
    assert answer.status_code == 200
    partial = ExportTraceServiceResponse.FromString(answer.content).partial_success
    assert partial.rejected_spans == 2
    assert "refused" in partial.error_message and "400" in partial.error_message


def test_the_servers_refusal_is_told_first_among_many_reasons(
    relay: Relay, sink: SinkServer
) -> None:
    good = _analytics_log_record()
    no_ids = _record_without_ids()
    sink.set_faults(1, status=400)
    answer = post(relay, "/v1/logs", _log_request(good, *[no_ids] * 4).SerializeToString(),
                  PROTOBUF)
    partial = ExportLogsServiceResponse.FromString(answer.content).partial_success
    assert partial.rejected_log_records == 5
    assert partial.error_message.startswith("the analytics server refused 1 of 1 messages: ")
    assert partial.error_message.count("no zenml.analytics.type") == 2
    assert partial.error_message.endswith("; and 2 more")


def test_a_batch_refused_for_good_does_not_take_the_others_with_it(sink: SinkServer) -> None:
    """A request of three messages goes out as three batches; the server refuses the first
    for good: the other two are still posted, and only the record it refused is reported."""
    sink.set_faults(1, status=400)
    with Relay(Settings.resolve(endpoint=sink.url, batch_size=1), http_port=0,
               grpc_port=None) as relay:
        answer = post(relay, "/v1/logs", record(3).logs_request().SerializeToString(),
                      PROTOBUF)
        stats = relay.stats()
    assert answer.status_code == 200
    partial = ExportLogsServiceResponse.FromString(answer.content).partial_success
    assert partial.rejected_log_records == 1
    assert "refused 1 of 3 messages" in partial.error_message, partial.error_message
    assert sink.stats()["requests"] == 3 and sink.store.count() == 2
    assert stats["delivered"] == 2 and stats["rejected_records"] == 1


def test_bearer_token(sink: SinkServer) -> None:
    body = record(1).logs_request().SerializeToString()
    with Relay(Settings.resolve(endpoint=sink.url), http_port=0, grpc_port=0,
               token="s3cret") as relay:
        for header in (None, "Bearer wrong", "Basic s3cret", "Bearer s3cret-and-more"):
            headers = dict(PROTOBUF, **({"Authorization": header} if header else {}))
            answer = post(relay, "/v1/logs", body, headers)
            assert answer.status_code == 401
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
            assert "bearer token" in status_of(answer).message
        assert requests.get(relay.http_url + "/health", timeout=10).status_code == 200
        assert sink.store.count() == 0
        answer = post(relay, "/v1/logs", body, {**PROTOBUF, "Authorization": "bearer s3cret"})
        assert answer.status_code == 200
        assert sink.store.count() == 1

        channel = grpc.insecure_channel(relay.grpc_endpoint)
        export = channel.unary_unary("/opentelemetry.proto.collector.logs.v1.LogsService/Export")
        with pytest.raises(grpc.RpcError) as refused:
            export(body, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert export(body, timeout=10, metadata=(("authorization", "Bearer s3cret"),)) == b""
        channel.close()


def test_a_refused_sender_still_writing_reads_the_answer(sink: SinkServer) -> None:
    """Refused before its body is read (here: no token), a sender that writes all of a
    16 MiB body first, as Go's HTTP client does, reads the 401: the relay reads and
    drops the body instead of closing with it unread, which would reset the connection.
    With Expect: 100-continue, it is refused before it uploads."""
    size = 16 * 1024 * 1024 - 1
    head = (f"POST /v1/logs HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n"
            f"Content-Length: {size}\r\n").encode()
    with Relay(Settings.resolve(endpoint=sink.url), http_port=0, grpc_port=None,
               token="s3cret") as relay:
        host, port = relay.http_url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=60) as sender:
            sender.sendall(head + b"\r\n" + bytes(size))
            answer = sender.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        with socket.create_connection((host, int(port)), timeout=60) as sender:
            sender.sendall(head + b"Expect: 100-continue\r\n\r\n")
            answer = sender.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


def test_what_a_request_was_admitted_as_does_not_outlive_it(sink: SinkServer) -> None:
    """A GET with Expect: 100-continue is not admitted as an export, and the POST after it
    on the same connection is checked for its own token and length; GET /health asked to
    expect is answered."""
    with Relay(Settings.resolve(endpoint=sink.url), http_port=0, grpc_port=None,
               token="s3cret") as relay:
        host, port = relay.http_url.removeprefix("http://").rsplit(":", 1)
        def statuses(*requests: bytes) -> List[bytes]:
            """The statuses answered to ``requests`` sent on one connection."""
            with socket.create_connection((host, int(port)), timeout=60) as sender:
                sender.sendall(b"".join(requests))
                return re.findall(rb"HTTP/1\.1 (\d{3}) ", answer_of(sender))

        tokenless_post = (b"POST /v1/logs HTTP/1.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 9\r\n\r\n{\"a\": []}")
        get = (b"GET /v1/logs HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n"
               b"Content-Type: application/json\r\nContent-Length: 0\r\n"
               b"Expect: 100-continue\r\n\r\n")
        assert statuses(get, tokenless_post) == [b"100", b"404", b"401"]
        # a GET's body is not read: the connection ends with its answer
        assert statuses(get.replace(b"Length: 0", b"Length: 2") + b"{}", tokenless_post) == \
            [b"100", b"404"]
        with socket.create_connection((host, int(port)), timeout=60) as sender:
            sender.sendall(b"GET /health HTTP/1.1\r\nContent-Length: 0\r\n"
                           b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
            answer = answer_of(sender, done=False)
        assert b"HTTP/1.1 200 " in answer, answer


def test_a_gzip_body_of_many_members_is_refused(relay: Relay, sink: SinkServer) -> None:
    """Each member costs a copy of the rest of the body: a million tiny ones, minutes."""
    body = record(1).logs_request().SerializeToString()
    members = gzip.compress(body) + gzip.compress(b"") * 64
    answer = post(relay, "/v1/logs", members, {**PROTOBUF, "Content-Encoding": "gzip"})
    assert answer.status_code == 400
    assert status_of(answer).message == "gzip body of more than 64 members"
    answer = post(relay, "/v1/logs", gzip.compress(body[:10]) + gzip.compress(body[10:]),
                  {**PROTOBUF, "Content-Encoding": "gzip"})
    assert answer.status_code == 200 and sink.store.count() == 1


def test_request_size_limit(sink: SinkServer) -> None:
    body = record(20).logs_request().SerializeToString()
    limit = len(body) - 1
    with Relay(Settings.resolve(endpoint=sink.url), http_port=0, grpc_port=0,
               max_request_bytes=limit) as relay:
        answer = post(relay, "/v1/logs", body, PROTOBUF)
        assert answer.status_code == 413
        assert f"limit of {limit} bytes" in status_of(answer).message
        # small on the wire, too big once inflated
        packed = gzip.compress(body)
        assert len(packed) < limit
        answer = post(relay, "/v1/logs", packed, {**PROTOBUF, "Content-Encoding": "gzip"})
        assert answer.status_code == 413
        assert "inflates past" in status_of(answer).message

        channel = grpc.insecure_channel(relay.grpc_endpoint)
        export = channel.unary_unary("/opentelemetry.proto.collector.logs.v1.LogsService/Export")
        with pytest.raises(grpc.RpcError) as refused:
            export(body, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        channel.close()
    assert sink.stats()["requests"] == 0


def test_an_sdk_batch_of_512_is_one_request_to_the_server_unless_configured(
        sink: SinkServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch default (512, the SDK's export batch) and the variable that overrides
    it; either way every message arrives once."""
    body = record(512).logs_request().SerializeToString()
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_ENDPOINT", sink.url)
    for batch_size, expected_requests in ((None, 1), ("100", 6)):
        if batch_size is not None:
            monkeypatch.setenv("OTEL_ZENML_ANALYTICS_BATCH_SIZE", batch_size)
        before = sink.stats()
        with Relay(http_port=0, grpc_port=None) as relay:  # a new relay: sends them again
            assert post(relay, "/v1/logs", body, PROTOBUF).status_code == 200
        after = sink.stats()
        assert after["requests"] - before["requests"] == expected_requests
        assert after["received_messages"] - before["received_messages"] == 512
    assert sink.store.count() == 512


def test_relay_needs_a_destination() -> None:
    with pytest.raises(ConfigurationError, match="OTEL_ZENML_ANALYTICS_ENDPOINT"):
        Relay(Settings.resolve(), http_port=0, grpc_port=0)


# -- gRPC ---------------------------------------------------------------------------------


def test_grpc_exporters_deliver_each_event_once(relay: Relay, sink: SinkServer) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.exporter import Compression

    recorded = record(3)
    endpoint = "http://" + relay.grpc_endpoint
    log_exporter = OTLPLogExporter(endpoint=endpoint, insecure=True,
                                   compression=Compression.Gzip)
    span_exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    try:
        # LogExportResult was renamed LogRecordExportResult in newer SDKs
        assert log_exporter.export(recorded.logs).name == "SUCCESS"
        assert span_exporter.export(recorded.spans) == SpanExportResult.SUCCESS
    finally:
        log_exporter.shutdown()
        span_exporter.shutdown()
    assert sink.store.count() == 3
    assert sink.stats()["received_messages"] == 3
    assert relay.stats()["duplicates"] == 3


def _grpc_call(relay: Relay, service: str, body: bytes) -> Tuple[Any, Optional[str]]:
    channel = grpc.insecure_channel(relay.grpc_endpoint)
    try:
        export = channel.unary_unary(f"/{service}/Export")
        try:
            return export(body, timeout=10), None
        except grpc.RpcError as exc:
            return exc, exc.details()
    finally:
        channel.close()


def test_grpc_malformed_body_is_invalid_argument(relay: Relay) -> None:
    error, details = _grpc_call(relay, "opentelemetry.proto.collector.trace.v1.TraceService",
                                b"\x0a\xff\xff\xff")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details is not None
    assert "not a valid protobuf ExportTraceServiceRequest" in details


def test_grpc_destination_failing_is_unavailable_with_retry_info(
    relay: Relay, sink: SinkServer
) -> None:
    body = record(1).traces_request().SerializeToString()
    sink.set_faults(1, status=429, retry_after=4)
    error, details = _grpc_call(relay, "opentelemetry.proto.collector.trace.v1.TraceService",
                                body)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert details is not None and "429" in details
    trailers = dict(error.trailing_metadata())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert retry.retry_delay.seconds == 4
    answer, _ = _grpc_call(relay, "opentelemetry.proto.collector.trace.v1.TraceService", body)
    assert answer == b""
    assert sink.store.count() == 1


# -- an application exporting both signals, and the command line -------------------------


def run_app(mode: str, count: int, run: str, env: Dict[str, str],
            timeout: float = 120) -> Dict[str, Any]:
    """Run the OTLP-only test application; its JSON summary."""
    out = subprocess.run([sys.executable, APP, mode, str(count), run], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    summary: Dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["tracked"] == count
    return summary


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_app_exporting_logs_and_traces_to_the_relay_gets_each_event_once(
    relay: Relay, sink: SinkServer, protocol: str
) -> None:
    endpoint = relay.http_url if protocol == "http" else "http://" + relay.grpc_endpoint
    env = {**os.environ, "APP_OTLP_PROTOCOL": protocol, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    summary = run_app("otlp", 6, protocol, env)
    assert sink.store.count() == 6
    assert sink.stats()["received_messages"] == 6
    assert relay.stats()["duplicates"] == 6
    assert {m["context"]["trace_id"] for m in sink_messages(sink)} == set(summary["trace_ids"])


def test_cli_relay(sink: SinkServer) -> None:
    env = {**os.environ, "OTEL_ZENML_ANALYTICS_ENDPOINT": sink.url,
           "OTEL_ZENML_ANALYTICS_RELAY_TOKEN": "t0ken"}
    with cli_relay(["relay", "--http-port", "0", "--grpc-port", "0"], env) as (process, banner):
        assert "bearer token required" in banner and sink.url in banner, banner
        url = http_url_of(banner)
        body = record(2).logs_request().SerializeToString()
        answer = requests.post(url + "/v1/logs", data=body, timeout=30,
                               headers={**PROTOBUF, "Authorization": "Bearer t0ken"})
        assert answer.status_code == 200
        answer = requests.post(url + "/v1/logs", data=b"\x0a\xff", timeout=30,
                               headers={**PROTOBUF, "Authorization": "Bearer t0ken"})
        assert answer.status_code == 400
        assert "not a valid protobuf" in status_of(answer).message
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "2 messages delivered" in out
    assert sink.store.count() == 2


def test_cli_relay_without_destination_fails_clearly() -> None:
    out = subprocess.run([CLI, "relay", "--http-port", "0", "--grpc-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "OTEL_ZENML_ANALYTICS_ENDPOINT" in out.stderr


@pytest.mark.parametrize("option", ["--grpc-port", "--http-port"])
def test_cli_relay_refuses_a_port_out_of_range(option: str) -> None:
    out = subprocess.run([CLI, "relay", option, "70000", "--endpoint", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2  # it used to listen on 70000 mod 65536, or fail with a traceback
    assert f"argument {option}: 70000 is not a port number (0-65535)" in out.stderr
    assert "Traceback" not in out.stderr


def test_stop_ends_kept_alive_connections(sink: SinkServer) -> None:
    settings = Settings.resolve(endpoint=sink.url)
    body = record(1).logs_request().SerializeToString()
    with requests.Session() as session:
        relay = Relay(settings, http_port=0, grpc_port=None).start()
        port = relay.http_port
        assert session.post(relay.http_url + "/v1/logs", data=body, headers=PROTOBUF,
                            timeout=10).status_code == 200
        relay.stop()
        with pytest.raises(requests.ConnectionError):
            session.post(f"http://127.0.0.1:{port}/v1/logs", data=body, headers=PROTOBUF,
                         timeout=10)
