"""Analytics calls become a span event and a log record with the same message id."""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable

from opentelemetry import trace
from opentelemetry._logs import NoOpLoggerProvider

import otel_zenml_analytics as oza
from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics import signals
from otel_zenml_analytics.enums import AnalyticsEvent

from .conftest import Pipeline


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
