"""Analytics calls become a span event and a log record with the same message id."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any, Callable, Tuple

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry._logs import NoOpLoggerProvider
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_zenml_analytics as oza
from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics import consent, processor, signals
from otel_zenml_analytics.enums import AnalyticsEvent

from .conftest import InMemoryLogRecordExporter, Pipeline


def _analytics_events(pipeline: Pipeline) -> list:  # type: ignore[type-arg]
    return [
        (span, event)
        for span in pipeline.spans.get_finished_spans()
        for event in span.events
        if keys.is_analytics(event.attributes)
    ]


def test_track_inside_a_span_adds_an_event_and_a_log_record(
    make_pipeline: Callable[..., Pipeline], sink: Any
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    with pipeline.tracer.start_as_current_span("work") as span:
        assert oza.track(AnalyticsEvent.RUN_PIPELINE, {"n": 3, "ok": True, "x": 1.5,
                                                       "nested": {"a": [1, None]}, "none": None})
    pipeline.flush()
    [(owner, event)] = _analytics_events(pipeline)
    assert owner.context.span_id == span.get_span_context().span_id
    assert event.name == "Pipeline run"
    attrs = event.attributes
    assert attrs[keys.TYPE] == "track" and attrs[keys.EVENT] == "Pipeline run"
    assert attrs[keys.PROPERTIES_PREFIX + "n"] == 3
    assert attrs[keys.PROPERTIES_PREFIX + "ok"] is True
    assert attrs[keys.PROPERTIES_PREFIX + "x"] == 1.5
    assert json.loads(attrs[keys.PROPERTIES_PREFIX + "nested"]) == {"a": [1, None]}
    assert attrs[keys.PROPERTIES_PREFIX + "none"] == "null"
    [record] = [r for r in pipeline.logs.get_finished_logs() if r.log_record.event_name]
    log = record.log_record
    assert log.event_name == "zenml.analytics.track"
    assert log.attributes[keys.MESSAGE_ID] == attrs[keys.MESSAGE_ID]
    assert log.trace_id == span.get_span_context().trace_id
    assert log.span_id == span.get_span_context().span_id
    assert log.timestamp == event.timestamp


def test_without_a_recording_span_it_makes_a_short_span(
    make_pipeline: Callable[..., Pipeline], sink: Any
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    assert oza.identify({"plan": "free"})
    assert oza.group(uuid.uuid4(), {"name": "team"})
    assert oza.alias(uuid.uuid4(), uuid.uuid4())
    pipeline.flush()
    names = sorted(event.name for _, event in _analytics_events(pipeline))
    assert names == ["alias", "group", "identify"]
    spans = pipeline.spans.get_finished_spans()
    assert sorted(s.name for s in spans) == ["analytics alias", "analytics group",
                                              "analytics identify"]
    event_names = sorted(r.log_record.event_name for r in pipeline.logs.get_finished_logs())
    assert event_names == ["zenml.analytics.alias", "zenml.analytics.group",
                           "zenml.analytics.identify"]
    for record in pipeline.logs.get_finished_logs():
        assert record.log_record.trace_id in {s.context.trace_id for s in spans}


def test_without_an_sdk_calls_do_nothing() -> None:
    signals.use_providers(trace.NoOpTracerProvider(), NoOpLoggerProvider())
    assert oza.track(AnalyticsEvent.RUN_PIPELINE, {"a": 1}) is False
    assert oza.identify({"a": 1}) is False


def test_many_properties_survive_the_attribute_limit(
    make_pipeline: Callable[..., Pipeline], sink: Any
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    props = {f"k{i}": i for i in range(300)}
    assert oza.track("Wide event", props)
    pipeline.flush()
    [event] = sink.store.query(event="Wide event")
    for key, value in props.items():
        assert event["message"]["properties"][key] == value


class _Gate(SpanProcessor):
    """Holds the first span that starts until released: the signals thread stalls on it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(10)


def test_provider_flush_records_what_the_signals_thread_has_pending() -> None:
    gate, spans, logs = _Gate(), InMemorySpanExporter(), InMemoryLogRecordExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(gate)
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    signals.use_providers(tracer_provider, logger_provider)
    assert oza.track("First", {})
    assert gate.entered.wait(10)  # the signals thread is stuck on the first call's span
    for index in range(100):
        assert oza.track("Queued", {"i": index})
    assert signals.pending() == 100
    threading.Timer(0.5, gate.release.set).start()
    assert tracer_provider.force_flush()  # waits for the stuck call, records the rest
    assert signals.pending() == 0
    queued = [s for s in spans.get_finished_spans() if s.name == "analytics Queued"]
    assert sorted(s.events[0].attributes[keys.PROPERTIES_PREFIX + "i"] for s in queued) == \
        list(range(100))
    assert len([r for r in logs.get_finished_logs() if r.log_record.event_name]) == 101


def test_what_a_call_records_is_its_values_at_the_call(
    make_pipeline: Callable[..., Pipeline], sink: Any
) -> None:
    # With no span recording, the signals thread records the call later, and builds the
    # attributes of a message whose keys and values cannot change: a list the caller
    # changes after the call (held here until then), or a key it renames, is still
    # recorded as it was.
    pipeline = make_pipeline(endpoint=sink.url)
    gate = _SignalsThreadGate()
    pipeline.sdk.tracer_provider.add_span_processor(gate)
    assert oza.track("Stall", {})
    assert gate.entered.wait(10)
    steps, config = ["load"], {"epochs": 1}
    assert oza.track("Changed later", {"steps": steps, "config": config, "n": 1})
    assert oza.track("Plain", {"n": 2, "name": "training", "ratio": 0.5, "none": None})
    key = _Renamable("before")
    assert oza.track("Key renamed later", {key: 3})
    assert signals.pending() == 3
    steps.append("train")
    config["epochs"] = 2
    key.name = "after"
    gate.release.set()
    pipeline.flush()
    changed = sink.store.query(event="Changed later")[0]["message"]["properties"]
    assert (changed["steps"], changed["config"], changed["n"]) == (["load"], {"epochs": 1}, 1)
    plain = sink.store.query(event="Plain")[0]["message"]["properties"]
    assert (plain["n"], plain["name"], plain["ratio"], plain["none"]) == (2, "training", 0.5, None)
    assert plain["client_id"] == changed["client_id"]  # the facts, packed, on both
    assert sink.store.query(event="Key renamed later")[0]["message"]["properties"]["before"] == 3


class _Renamable:
    """A property key (hashable by identity) whose text the caller can change."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return self.name

    __hash__ = object.__hash__


class _SignalsThreadGate(_Gate):
    """Holds the first span started on the signals thread (a call's own short span)."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if threading.current_thread().name == "otel-zenml-analytics-signals":
            super().on_start(span, parent_context)


def _end_a_span_behind_a_stalled_signals_thread(
    make_pipeline: Callable[..., Pipeline], sink: Any
) -> Tuple[Pipeline, _Gate]:
    """A pipeline whose signals thread is held (until the gate is released, 10 s at most)
    by a first call's short span, and a span the caller ended with a track() ("Inside")."""
    pipeline = make_pipeline(endpoint=sink.url)
    gate = _SignalsThreadGate()
    pipeline.sdk.tracer_provider.add_span_processor(gate)
    assert oza.track("Stall", {})
    assert gate.entered.wait(10)
    with pipeline.tracer.start_as_current_span("work"):
        assert oza.track("Inside", {"n": 1})
    return pipeline, gate


def test_a_span_ended_by_the_caller_reaches_the_delivery_through_the_signals_thread(
    make_pipeline: Callable[..., Pipeline], sink: Any
) -> None:
    pipeline, gate = _end_a_span_behind_a_stalled_signals_thread(make_pipeline, sink)
    # Pending: the call's log record, and the span the caller ended (its events are
    # claimed and copied for the delivery on the signals thread, not the caller's).
    assert signals.pending() == 2
    threading.Timer(0.5, gate.release.set).start()
    # The processor's own flush (not only the provider's) runs what is pending first.
    assert pipeline.sdk.span_processor.force_flush(10_000)
    assert sink.store.query(event="Inside")[0]["message"]["properties"]["n"] == 1


@pytest.mark.parametrize("flushed", ["processor", "provider"])
def test_a_flush_keeps_to_its_timeout_while_the_signals_thread_is_busy(
    make_pipeline: Callable[..., Pipeline], sink: Any, flushed: str
) -> None:
    pipeline, gate = _end_a_span_behind_a_stalled_signals_thread(make_pipeline, sink)
    flush = (pipeline.sdk.span_processor if flushed == "processor"
             else pipeline.sdk.tracer_provider).force_flush
    # The signals thread is held: a 200 ms flush gives up, and says so.
    assert flush(200) is False
    assert signals.pending() == 2  # it did not wait for the thread: all still pending
    gate.release.set()
    assert flush(10_000) is True
    assert sink.store.query(event="Inside")[0]["message"]["properties"]["n"] == 1


def test_a_span_handed_over_after_the_delivery_shut_down_is_counted_as_dropped(
    make_pipeline: Callable[..., Pipeline], sink: Any, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    pipeline, gate = _end_a_span_behind_a_stalled_signals_thread(make_pipeline, sink)
    # Both components shut down while the signals thread is held: the processor's wait
    # for it gives up (after 0.2 s here), and the delivery closes with the span pending.
    monkeypatch.setattr(processor, "SHUTDOWN_SECONDS", 0.2)
    delivery = pipeline.sdk.span_processor.delivery
    pipeline.sdk.span_processor.shutdown()
    pipeline.sdk.log_exporter.shutdown()
    assert signals.pending() == 2
    gate.release.set()
    assert signals.flush(10)
    assert delivery.stats()["dropped_after_shutdown"] == 1
    assert "arrived after the delivery to" in caplog.text
    assert not sink.store.query(event="Inside")


def _track_in(ending: signals.SpanEndingLater, name: str) -> None:
    token = otel_context.attach(ending.make_context())
    try:
        assert oza.track(name, {"n": 1})
    finally:
        otel_context.detach(token)


def test_an_event_for_a_span_that_ends_later_goes_on_it_or_on_its_own_if_it_ended_first(
    make_pipeline: Callable[..., Pipeline], sink: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A span made current with SpanEndingLater gets its event on the signals thread, and
    # its end after it, even when the thread is behind (here: at once, PENDING_LIMIT 1).
    # If its owner ended it otherwise first, the event goes on a short span of its own,
    # as for a span at its event limit: never lost.
    pipeline, gate = _end_a_span_behind_a_stalled_signals_thread(make_pipeline, sink)
    ends_later = signals.SpanEndingLater(pipeline.tracer.start_span("ends later"))
    ended_first = signals.SpanEndingLater(pipeline.tracer.start_span("ended first"))
    _track_in(ends_later, "Ends later")
    _track_in(ended_first, "Ended first")
    monkeypatch.setattr(signals, "PENDING_LIMIT", 1)
    ends_later.end()
    ended_first.span.end()
    assert ended_first.span.events == ()  # its event was not added yet
    gate.release.set()
    pipeline.flush()
    finished = {s.name: s for s in pipeline.spans.get_finished_spans()}
    assert [e.name for e in finished["ends later"].events] == ["Ends later"]
    assert [e.name for e in finished["ended first"].events] == []
    own = finished["analytics Ended first"]
    assert own.parent is not None and own.parent.span_id == ended_first.span.context.span_id
    assert [e.name for e in own.events] == ["Ended first"]
    assert "analytics Ends later" not in finished
    for name in ("Ends later", "Ended first"):
        assert [e["message"]["properties"]["n"] for e in sink.store.query(event=name)] == [1]


def test_a_span_ending_later_on_the_signals_thread_holds_its_event(
    make_pipeline: Callable[..., Pipeline], sink: Any
) -> None:
    # There the end runs at once (hand_off), so the event is added at once too.
    pipeline = make_pipeline(endpoint=sink.url)

    def tracked_call(_: object) -> None:
        ending = signals.SpanEndingLater(pipeline.tracer.start_span("on the thread"))
        _track_in(ending, "On the thread")
        ending.end()

    signals.hand_off(tracked_call, None)
    pipeline.flush()
    finished = {s.name: s for s in pipeline.spans.get_finished_spans()}
    assert [e.name for e in finished["on the thread"].events] == ["On the thread"]
    assert "analytics On the thread" not in finished


def test_a_caller_records_its_own_signals_when_the_thread_is_behind(
    make_pipeline: Callable[..., Pipeline], sink: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    monkeypatch.setattr(signals, "PENDING_LIMIT", 0)
    before = signals._emitter.recorded_by_callers
    assert oza.track("Overloaded", {"n": 1})
    # Recorded before track() returned: no flush needed to see the span.
    [span] = [s for s in pipeline.spans.get_finished_spans() if s.name == "analytics Overloaded"]
    # Two jobs, both on the caller's thread: the call's signals, then the hand-off of
    # its short span (ended there) to the delivery.
    assert signals._emitter.recorded_by_callers == before + 2
    pipeline.flush()
    assert sink.store.query(event="Overloaded")[0]["message"]["properties"]["n"] == 1


def _all_attribute_values(pipeline: Pipeline) -> str:
    values = [v for s in pipeline.spans.get_finished_spans() for e in s.events
              for v in (e.attributes or {}).values()]
    values += [v for r in pipeline.logs.get_finished_logs()
               for v in (r.log_record.attributes or {}).values()]
    return json.dumps(values, default=str)


def test_the_opted_in_email_reaches_the_server_but_no_signal(
    make_pipeline: Callable[..., Pipeline], sink: Any
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    assert oza.track("Before opt-in", {})
    consent.update(email="ada@example.com", email_opt_in=True)
    assert oza.track("Opted in", {})
    pipeline.flush()
    consent.update(email_opt_in=False)
    assert oza.track("Opted out again", {})
    pipeline.flush()
    assert "ada@example.com" not in _all_attribute_values(pipeline)
    emails = {e["event"]: e["message"]["properties"].get("email") for e in sink.store.query()}
    assert emails == {"Before opt-in": None, "Opted in": "ada@example.com",
                      "Opted out again": None}


def test_system_facts_travel_packed_and_come_back_as_properties(
    make_pipeline: Callable[..., Pipeline], sink: Any
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    assert oza.track("Packed", {"n": 1})
    assert oza.track("Overridden", {"os": "Plan 9", "in_server": 0})
    pipeline.flush()
    attrs = {s.name: s.events[0].attributes for s in pipeline.spans.get_finished_spans()}
    packed, flat = attrs["analytics Packed"], attrs["analytics Overridden"]
    assert keys.FACTS in packed and keys.PROPERTIES_PREFIX + "os" not in packed
    assert keys.FACTS not in flat and flat[keys.PROPERTIES_PREFIX + "os"] == "Plan 9"
    stored = {e["event"]: e["message"]["properties"] for e in sink.store.query()}
    assert stored["Packed"]["n"] == 1 and stored["Packed"]["in_server"] is False
    assert set(signals_facts := stored["Packed"]) >= {"os", "os_version", "python_version",
                                                      "version", "client_id", "user_id"}
    assert signals_facts["client_id"] == stored["Overridden"]["client_id"]
    assert stored["Overridden"]["os"] == "Plan 9" and stored["Overridden"]["in_server"] == 0


def test_events_a_full_span_cannot_hold_go_on_short_spans_of_their_own(
    make_pipeline: Callable[..., Pipeline], sink: Any
) -> None:
    # The SDK keeps 128 events per span and drops the rest: the rest must still be
    # span events (visible in Jaeger), each on an "analytics <event>" child of the job.
    pipeline = make_pipeline(endpoint=sink.url)
    with pipeline.tracer.start_as_current_span("long job") as job:
        for i in range(200):
            oza.track("Many", {"i": i})
    pipeline.flush()
    found = _analytics_events(pipeline)
    assert len(found) == 200
    assert len({event.attributes[keys.MESSAGE_ID] for _, event in found}) == 200
    extra = [owner for owner, _ in found if owner.context.span_id != job.get_span_context().span_id]
    assert len(extra) == 200 - 128
    assert all(owner.name == "analytics Many" for owner in extra)
    assert all(owner.parent.span_id == job.get_span_context().span_id for owner in extra)
