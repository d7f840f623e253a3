"""Delivery to the real sink over HTTP: both wire formats, dedup, retries, limits."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider

import otel_zenml_analytics as oza
from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics import request, signals
from otel_zenml_analytics.delivery import Delivery
from otel_zenml_analytics.enums import AnalyticsEvent, LegacyAnalyticsEvent
from otel_zenml_analytics.exporter import SegmentLogExporter
from otel_zenml_analytics.processor import SegmentSpanProcessor
from otel_zenml_analytics.settings import Settings
from otel_zenml_analytics.sink import SinkServer
from otel_zenml_analytics.utils import AnalyticsAPIError

from .conftest import Pipeline, wait_until

FOUR_CALLS = 4


def _four_calls(pipeline: Pipeline) -> str:
    with pipeline.tracer.start_as_current_span("work") as span:
        assert oza.track(AnalyticsEvent.RUN_PIPELINE, {"steps": 2})
        assert oza.identify({"role": "dev"})
        assert oza.group(uuid.UUID(int=7), {"name": "team"})
        assert oza.alias(uuid.UUID(int=8), uuid.UUID(int=9))
    return format(span.get_span_context().trace_id, "032x")


@pytest.mark.parametrize("wire_format", ["segment", "zenml"])
def test_every_message_arrives_once_with_its_fields(
    make_pipeline: Callable[..., Pipeline], sink: SinkServer, wire_format: str
) -> None:
    pipeline = make_pipeline(endpoint=sink.url, format=wire_format)
    trace_id = _four_calls(pipeline)
    pipeline.flush()
    events = {e["type"]: e for e in sink.store.query()}
    assert set(events) == {"track", "identify", "group", "alias"}
    stats = sink.stats()
    assert stats["received_messages"] == FOUR_CALLS and stats["duplicate_messages"] == 0
    track = events["track"]
    assert track["format"] == wire_format
    message = track["message"]
    assert message["event"] == "Pipeline run"
    assert message["properties"]["steps"] == 2
    assert message["properties"]["event_success"] is True
    assert message["properties"]["os"] and message["properties"]["version"]
    assert message["userId"] and message["anonymousId"]
    assert message["context"]["library"]["name"] == "otel-zenml-analytics"
    assert message["context"]["os"]["name"]
    assert message["context"]["trace_id"] == trace_id
    assert len(message["context"]["span_id"]) == 16
    assert message["timestamp"].endswith("Z")
    assert events["group"]["message"]["groupId"] == str(uuid.UUID(int=7))
    assert events["group"]["message"]["traits"]["group_id"] == str(uuid.UUID(int=7))
    assert events["alias"]["message"]["previousId"] == str(uuid.UUID(int=9))
    assert events["identify"]["message"]["traits"] == {"role": "dev"}
    if wire_format == "zenml":
        assert message["debug"] is False


def _providers_with(*, span: bool, log: bool, endpoint: str) -> tuple:  # type: ignore[type-arg]
    tp, lp = TracerProvider(), LoggerProvider()
    if span:
        tp.add_span_processor(SegmentSpanProcessor(endpoint=endpoint))
    if log:
        lp.add_log_record_processor(BatchLogRecordProcessor(SegmentLogExporter(endpoint=endpoint)))
    signals.use_providers(tp, lp)
    return tp, lp


@pytest.mark.parametrize(("span", "log"), [(True, False), (False, True), (True, True)])
def test_each_component_alone_and_both_deliver_once(
    sink: SinkServer, span: bool, log: bool
) -> None:
    tp, lp = _providers_with(span=span, log=log, endpoint=sink.url)
    for i in range(25):
        assert oza.track(LegacyAnalyticsEvent.RUN_EXAMPLE, {"i": i})
    tp.shutdown()
    lp.shutdown()
    stats = sink.stats()
    assert stats["stored_messages"] == 25
    assert stats["received_messages"] == 25, "a message went over the wire twice"


def test_gzip_and_write_key(tmp_path: Any, make_pipeline: Callable[..., Pipeline]) -> None:
    with SinkServer(port=0, db_path=str(tmp_path / "k.db"), write_key="s3cret-key") as server:
        pipeline = make_pipeline(endpoint=server.url, write_key="s3cret-key", gzip=True)
        oza.track("Gzipped", {"x": "y" * 1000})
        pipeline.flush()
        assert [e["event"] for e in server.store.query()] == ["Gzipped"]


def test_wrong_write_key_is_not_retried_and_never_logged(
    tmp_path: Any, make_pipeline: Callable[..., Pipeline], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with SinkServer(port=0, db_path=str(tmp_path / "k.db"), write_key="right") as server:
        pipeline = make_pipeline(endpoint=server.url, write_key="wrong-key-123")
        oza.track("Denied")
        pipeline.flush()
        assert server.stats()["requests"] == 1
        assert pipeline.stats["rejected"] == 1
    assert "401" in caplog.text
    assert "wrong-key-123" not in caplog.text
    assert "wrong-key-123" not in repr(pipeline.sdk.span_processor)


def test_retries_after_5xx_and_429_then_delivers(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    sink.set_faults(2, status=503)
    pipeline = make_pipeline(endpoint=sink.url)
    oza.track("Retried", {"n": 1})
    pipeline.flush()
    sink.set_faults(1, status=429, retry_after=0.2)
    oza.track("Rate limited", {"n": 2})
    pipeline.flush()
    assert sorted(e["event"] for e in sink.store.query()) == ["Rate limited", "Retried"]
    assert pipeline.stats["retries"] == 3
    assert sink.stats()["requests"] == 5


def test_a_400_is_reported_with_the_servers_answer_and_not_retried(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline], caplog: pytest.LogCaptureFixture
) -> None:
    sink.set_faults(1, status=400)
    pipeline = make_pipeline(endpoint=sink.url)
    oza.track("Rejected")
    pipeline.flush()
    assert pipeline.stats["rejected"] == 1 and pipeline.stats["retries"] == 0
    assert sink.stats()["requests"] == 1
    assert "rejected 1 messages" in caplog.text and "400" in caplog.text


def test_unreachable_destination_gives_up_without_raising(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    pipeline = make_pipeline(endpoint="http://127.0.0.1:9", max_retries=2, timeout=1)
    assert oza.track("Nowhere")
    pipeline.flush()
    assert pipeline.stats["failed"] == 1 and pipeline.stats["retries"] == 2


def test_oversized_message_is_truncated_and_marked(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    oza.track("Huge", {"blob": "x" * 100_000, "small": "kept", "list": list(range(5000))})
    pipeline.flush()
    [event] = sink.store.query(event="Huge")
    message = event["message"]
    assert message["properties"]["small"] == "kept"
    assert message["properties"]["blob"].endswith("…[truncated]")
    assert "properties.blob" in message["context"]["truncated"]
    wire = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert len(wire) <= 32 * 1024
    assert pipeline.stats["truncated"] == 1


def test_unserialisable_properties_are_encoded(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    import datetime

    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    pipeline = make_pipeline(endpoint=sink.url)
    oza.track("Odd values", {"id": uuid.UUID(int=3), "when": datetime.date(2026, 1, 2),
                             "raw": b"abc", "tags": {"b"}, "nan": float("nan"),
                             "obj": Opaque(), "event": AnalyticsEvent.RUN_PIPELINE})
    pipeline.flush()
    props = sink.store.query(event="Odd values")[0]["message"]["properties"]
    assert props["id"] == str(uuid.UUID(int=3))
    assert props["when"] == "2026-01-02" and props["raw"] == "abc" and props["tags"] == ["b"]
    assert props["nan"] == "NaN" and props["obj"] == "<opaque>"
    assert props["event"] == "Pipeline run"


def test_text_that_utf8_cannot_hold_neither_breaks_otlp_export_nor_loses_the_event(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    """A file name decoded with ``surrogateescape`` holds lone surrogates: the host's OTLP
    exporter would drop such an attribute (logging a traceback), and the JSON encoding
    would fail the message."""
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    pipeline = make_pipeline(endpoint=sink.url)
    path = b"/data/caf\xe9.csv".decode("utf-8", "surrogateescape")
    with pipeline.tracer.start_as_current_span("load"):
        oza.track("Odd text", {"path": path, "emoji": "\ud83d\ude00",
                               f"key {path}": 1, "nested": {"path": path}})
    pipeline.flush()
    props = sink.store.query(event="Odd text")[0]["message"]["properties"]
    assert props["path"] == "/data/caf\ufffd.csv" and props["emoji"] == "\U0001f600"
    assert props["key /data/caf\ufffd.csv"] == 1
    assert props["nested"] == {"path": "/data/caf\ufffd.csv"}
    exported = [encode_spans(pipeline.spans.get_finished_spans()).resource_spans[0]
                .scope_spans[0].spans[0].events[0].attributes,
                encode_logs(pipeline.logs.get_finished_logs()).resource_logs[0]
                .scope_logs[0].log_records[0].attributes]
    for attributes in exported:
        values = {item.key: item.value.string_value for item in attributes}
        assert values["zenml.analytics.properties.path"] == "/data/caf\ufffd.csv"
        assert "zenml.analytics.properties.key /data/caf\ufffd.csv" in values


def test_full_queue_drops_and_counts(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline], caplog: pytest.LogCaptureFixture
) -> None:
    sink.set_faults(1000, status=503, retry_after=0.5)
    pipeline = make_pipeline(endpoint=sink.url, max_queue_size=5, batch_size=1, max_retries=1)
    for i in range(40):
        oza.track("Flood", {"i": i})
    pipeline.sdk.tracer_provider.force_flush()
    deadline = time.monotonic() + 5
    while pipeline.stats["dropped_queue_full"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pipeline.stats["dropped_queue_full"] > 0
    assert "Analytics queue is full (5)" in caplog.text


def test_full_queue_counts_a_copy_of_a_queued_message_as_a_duplicate(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    """With the queue full, a signal is refused at the door without claiming its id:
    the second signal of a queued message is a duplicate (delivered once, with the
    first), a message not seen before is dropped and counted."""
    pipeline = make_pipeline()  # no endpoint: the signals are only recorded, for the test
    for name in ("A", "B", "C"):
        with pipeline.tracer.start_as_current_span("work"):
            oza.track(name)
    pipeline.flush()
    spans = {s.events[0].attributes[keys.EVENT]: s for s in pipeline.spans.get_finished_spans()
             if s.events}
    logs = {r.log_record.attributes[keys.EVENT]: r for r in pipeline.logs.get_finished_logs()}
    ids = {name: spans[name].events[0].attributes[keys.MESSAGE_ID] for name in "ABC"}

    sink.set_faults(1, mode="slow", delay=2.0)
    delivery = Delivery(Settings.resolve(endpoint=sink.url, max_queue_size=1, batch_size=1,
                                         timeout=5))
    try:
        assert delivery.submit(("span", spans["A"]))
        # A is being posted: the queue is empty
        wait_until(lambda: len(sink.store.query()) == 1, "A to be stored")
        assert delivery.submit(("span", spans["B"]))  # B waits in the queue: now full
        assert delivery.submit(("log", logs["B"])) is True  # a copy of B: nothing lost
        assert delivery.submit(("log", logs["C"])) is False  # C: dropped
        assert delivery.force_flush(10.0)
    finally:
        delivery.shutdown()
    stats = delivery.stats()
    assert stats["duplicates"] == 1 and stats["dropped_queue_full"] == 1
    assert sorted(e["message"]["messageId"] for e in sink.store.query()) == sorted(
        [ids["A"], ids["B"]])


def test_a_long_queue_is_encoded_by_the_thread_that_submits(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    """From a tenth of the queue's size on, the thread that submits a signal maps and
    encodes it, and the worker only batches it: the messages arrive each once, as the
    worker would have sent them (the last one truncated to Segment's 32 KB), and are
    counted when the worker takes them."""
    pipeline = make_pipeline()  # no endpoint: the signals are only recorded, for the test
    for i in range(8):
        with pipeline.tracer.start_as_current_span("work"):
            oza.track(f"E{i}", {"i": i, "nested": {"a": [1, None]}, "text": "caf\u00e9",
                                "blob": "x" * (40_000 if i == 7 else 10)})
    pipeline.flush()
    spans = sorted((s for s in pipeline.spans.get_finished_spans() if s.events),
                   key=lambda s: s.events[0].attributes[keys.EVENT])

    def stored(server: SinkServer) -> dict[str, Any]:
        return {e["message"]["messageId"]: {k: v for k, v in e["message"].items()
                                             if k != "sentAt"}
                for e in server.store.query()}

    with SinkServer(port=0) as plain_sink:  # the worker encodes every one
        plain = Delivery(Settings.resolve(endpoint=plain_sink.url, timeout=5))
        try:
            for span in spans:
                assert plain.submit(("span", span))
            assert plain.force_flush(10.0)
        finally:
            plain.shutdown()
        assert plain.stats()["encoded_on_submit"] == 0 and plain.stats()["truncated"] == 1
        expected = stored(plain_sink)
    assert len(expected) == 8

    sink.set_faults(1, mode="slow", delay=2.0)
    delivery = Delivery(Settings.resolve(endpoint=sink.url, max_queue_size=10, batch_size=1,
                                         timeout=5))
    try:
        assert delivery.submit(("span", spans[0]))  # posted, answered 2 s later
        wait_until(lambda: len(sink.store.query()) == 1, "the first to be stored")
        for span in spans[1:]:  # one waits for the sender, one with the worker, the rest
            assert delivery.submit(("span", span))  # queue (from the first one waiting)
        assert delivery.force_flush(10.0)
    finally:
        delivery.shutdown()
    stats = delivery.stats()
    assert stats["encoded_on_submit"] >= 3, stats
    assert stats["accepted"] == stats["delivered"] == 8 and stats["dropped_queue_full"] == 0
    assert stats["truncated"] == 1
    assert stored(sink) == expected


def test_no_endpoint_warns_once_and_sends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    processor = SegmentSpanProcessor()
    exporter = SegmentLogExporter()
    assert caplog.text.count("No analytics endpoint is configured") == 1
    assert processor.delivery.submit(("message", {"messageId": "x"})) is False
    processor.shutdown()
    exporter.shutdown()


def test_request_post_and_api_error(sink: SinkServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_ENDPOINT", sink.url)
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_FORMAT", "zenml")
    message = {"type": "track", "user_id": str(uuid.uuid4()), "event": "Direct",
               "properties": {}, "message_id": str(uuid.uuid4())}
    assert request.post([message]).status_code == 200
    assert sink.store.query()[0]["event"] == "Direct"
    with pytest.raises(AnalyticsAPIError) as info:
        request.post([{"type": "track"}])
    assert info.value.status == 400 and str(info.value).startswith("[ZenML Analytics] 400: ")


def test_request_post_sends_what_it_is_given(sink: SinkServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # ZenML's request.post never rewrites a batch: no truncation here, even over 32 KB,
    # and a hand-made message without a type or with an odd context does not crash it.
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_ENDPOINT", sink.url)
    big = {"type": "track", "userId": "u", "event": "Big", "messageId": str(uuid.uuid4()),
           "properties": {"blob": "x" * 40_000}, "context": None}
    assert request.post([big]).status_code == 200
    [stored] = sink.store.query(event="Big")
    assert stored["message"]["properties"]["blob"] == "x" * 40_000
    with pytest.raises(AnalyticsAPIError):
        request.post([{"userId": "u", "messageId": "m", "properties": {"blob": "x" * 40_000}}])


def test_host_seeding_random_neither_repeats_ids_nor_is_disturbed(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    import random

    from otel_zenml_analytics.client import new_message_id
    from otel_zenml_analytics.delivery import backoff_delay

    pipeline = make_pipeline(endpoint=sink.url)
    with pipeline.tracer.start_as_current_span("training"):
        for i in range(3):
            random.seed(42)  # an ML script seeding before each step
            oza.track("Seeded", {"i": i})
    pipeline.flush()
    assert sink.store.count() == 3
    # Our ids and jitter do not draw from the host's generator. (The OTel SDK's own
    # span ids do: that is the SDK's RandomIdGenerator, not this package.)
    random.seed(1)
    expected = random.random()
    random.seed(1)
    new_message_id()
    backoff_delay(2)
    assert random.random() == expected


def test_more_events_than_a_span_can_hold_are_all_delivered(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    with pipeline.tracer.start_as_current_span("long job"):
        for i in range(200):
            oza.track("Many", {"i": i})
    pipeline.flush()
    assert sink.store.count() == 200


def test_worker_survives_a_bad_item(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    assert pipeline.sdk.span_processor.delivery.submit(("message", {"type": "track"}))
    oza.track("After a bad item")
    pipeline.flush()
    assert [e["event"] for e in sink.store.query()] == ["After a bad item"]
    assert pipeline.stats["dropped_unmappable"] == 1


class _ExitOnRejection(logging.Handler):
    """A host's log handler that raises ``SystemExit`` (a ``BaseException``, which no
    ``except Exception`` catches) when the delivery reports a rejected batch, once
    ``ready()`` holds."""

    def __init__(self, ready: Callable[[], bool] = lambda: True) -> None:
        super().__init__()
        self.ready = ready
        self.raised_on = ""

    def emit(self, record: logging.LogRecord) -> None:
        if not self.raised_on and "rejected" in record.getMessage():
            wait_until(self.ready, "the moment to raise", timeout=10.0)
            self.raised_on = threading.current_thread().name
            raise SystemExit(1)


@contextlib.contextmanager
def _delivery_log_handler(handler: logging.Handler) -> Iterator[None]:
    delivery_logger = logging.getLogger("otel_zenml_analytics.delivery")
    delivery_logger.addHandler(handler)
    try:
        yield
    finally:
        delivery_logger.removeHandler(handler)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_sender_ended_by_a_base_exception_is_replaced(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline], caplog: pytest.LogCaptureFixture
) -> None:
    handler = _ExitOnRejection()
    with _delivery_log_handler(handler):
        sink.set_faults(1, status=400)
        pipeline = make_pipeline(endpoint=sink.url)
        oza.track("Rejected")
        pipeline.flush()  # waits behind the rejected batch, on the sender that ends there
        assert handler.raised_on == "otel-zenml-analytics-sender"
        oza.track("After the sender ended")
        pipeline.flush()
    assert [e["event"] for e in sink.store.query()] == ["After the sender ended"]
    assert "sender thread ended unexpectedly" in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_batch_left_in_the_outbox_by_an_ended_sender_is_sent_without_a_flush(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    pipeline = make_pipeline(endpoint=sink.url, batch_size=1)

    def second_batch_handed_over() -> bool:
        # Counted as the worker encodes it; the hand-over to the idle outbox follows.
        if pipeline.stats["accepted"] < 2:
            return False
        time.sleep(0.2)
        return True

    handler = _ExitOnRejection(ready=second_batch_handed_over)
    with _delivery_log_handler(handler):
        sink.set_faults(1, status=400)
        oza.track("Rejected")
        oza.track("Waiting in the outbox")
        wait_until(lambda: sink.store.count(), "the waiting batch stored, with no flush",
                   timeout=15.0)
    assert handler.raised_on == "otel-zenml-analytics-sender"
    assert [e["event"] for e in sink.store.query()] == ["Waiting in the outbox"]


class _RaiseOnce(logging.Handler):
    """A host's log handler that raises ``exception`` the first time a delivery message
    contains ``text``."""

    def __init__(self, text: str, exception: BaseException) -> None:
        super().__init__()
        self.text, self.exception, self.raised = text, exception, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.raised and self.text in record.getMessage():
            self.raised = True
            raise self.exception


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_flush_that_meets_a_failure_of_the_worker_does_not_report_success(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline], caplog: pytest.LogCaptureFixture
) -> None:
    # The sender ends on the rejection; the worker, finding it ended during the flush,
    # fails in turn (its warning raises), with the flush in hand.
    with _delivery_log_handler(_ExitOnRejection()), _delivery_log_handler(
            _RaiseOnce("ended unexpectedly", RuntimeError("a host's handler failed"))):
        sink.set_faults(1, status=400)
        pipeline = make_pipeline(endpoint=sink.url)
        oza.track("Rejected")
        assert pipeline.sdk.force_flush(10_000) is False
        assert "Analytics delivery failed unexpectedly" in caplog.text
        oza.track("After the failed flush")
        pipeline.flush()
    assert [e["event"] for e in sink.store.query()] == ["After the failed flush"]


def test_track_with_metadata_that_is_not_a_dict_is_tracked_without_it(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline], caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    for bad in ("abc", 5, [("a", 1, 2)]):
        assert oza.track("Odd metadata", bad) is True  # type: ignore[arg-type]
    pipeline.flush()
    messages = [e["message"] for e in sink.store.query()]
    assert [m["properties"]["event_success"] for m in messages] == [True, True, True]
    assert "track('Odd metadata'): metadata must be a dict, not str" in caplog.text


def test_retry_after_is_honoured(sink: SinkServer, make_pipeline: Callable[..., Pipeline]) -> None:
    # The first backoff would be at most 0.25 s: waiting 1.5 s shows Retry-After was read.
    pipeline = make_pipeline(endpoint=sink.url)
    sink.set_faults(1, status=429, retry_after=1.5)
    started = time.monotonic()
    oza.track("Rate limited")
    pipeline.flush()
    assert sink.store.count() == 1
    assert time.monotonic() - started >= 1.5


def test_a_proxy_from_the_environment_is_used(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sink understands the absolute URL a client sends to a forward proxy, so it can
    # stand in for one: the destination's host does not resolve, only the proxy is reached.
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", sink.url)
    pipeline = make_pipeline(endpoint="http://analytics.invalid", max_retries=0, timeout=5)
    oza.track("Through the proxy")
    pipeline.flush()
    assert pipeline.stats["delivered"] == 1
    stored = sink.store.query(event="Through the proxy")
    assert [e["event"] for e in stored] == ["Through the proxy"]


def test_the_deliverys_own_requests_stay_out_of_the_hosts_traces(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    # A host that instruments requests (as opentelemetry-instrument does when the
    # instrumentation is installed) traces its own calls; the delivery's posts, made on
    # its own threads, are not traced, or analytics traffic would feed telemetry back.
    import requests
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    pipeline = make_pipeline(endpoint=sink.url)
    instrumentor = RequestsInstrumentor()
    instrumentor.instrument(tracer_provider=pipeline.sdk.tracer_provider)
    try:
        assert requests.get(f"{sink.url}/health", timeout=10).ok  # the host's own call
        assert oza.track("Posted untraced", {})
        pipeline.flush()
    finally:
        instrumentor.uninstrument()
    assert len(sink.store.query(event="Posted untraced")) == 1
    methods = [span.attributes.get("http.request.method", span.attributes.get("http.method"))
               for span in pipeline.spans.get_finished_spans()
               if span.kind.name == "CLIENT"]
    assert methods == ["GET"]


@pytest.mark.parametrize("kind", ["_RecentIds", "_LockedRecentIds"])
def test_ids_claimed_by_racing_threads_are_each_claimed_once(kind: str) -> None:
    # The span processor's and the log exporter's threads claim the same ids at once
    # (with no lock where the GIL makes each step atomic, the class used on this build):
    # every id must be new to exactly one of them, and the memory of ids must hold
    # exactly its bound once threads have trimmed it together. A smoke test: on 3.11
    # threads switch only at calls and loops, so it catches a claim that calls out
    # between its look and its write (a sleep(0) there claimed 537 and 49 ids twice in
    # two runs), not one that merely looks, then writes.
    import threading

    from otel_zenml_analytics import delivery

    recent_ids = getattr(delivery, kind)
    seen, ids = recent_ids(100_000), [f"id-{i}" for i in range(20_000)]
    bounded = recent_ids(1_000)
    claimed: list = []
    start = threading.Barrier(4)

    def claim(offset: int) -> None:
        start.wait(10)
        claimed.append(sum(seen.add(message_id) for message_id in ids))
        for number in range(5_000):
            bounded.add(f"{offset}-{number}")

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(claimed) == len(ids)
    assert len(bounded._ids) == 1_000
    small = recent_ids(3)
    assert [small.add(i) for i in "abcda"] == [True, True, True, True, True]  # "a" evicted
