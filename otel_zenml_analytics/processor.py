"""``SegmentSpanProcessor``: analytics span events of ended spans, delivered to Segment.

Usage::

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from otel_zenml_analytics.processor import SegmentSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SegmentSpanProcessor(endpoint="http://127.0.0.1:8800"))
    trace.set_tracer_provider(provider)

Only span events that carry ``zenml.analytics.*`` attributes are delivered; every
other span and event is ignored. ``on_end`` runs on the thread that ends the span,
so it only checks for analytics events and hands the span to the background thread
of :mod:`otel_zenml_analytics.signals`, which claims and copies its events for the
delivery (on the ending thread only when that thread is behind); the mapping and
the HTTP work happen on the delivery thread. ``force_flush`` and ``shutdown`` run
what was handed over first.
"""

from __future__ import annotations

import time
from typing import Optional

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics import signals
from otel_zenml_analytics._component import DeliveringComponent
from otel_zenml_analytics.delivery import SHUTDOWN_SECONDS


class SegmentSpanProcessor(DeliveringComponent, SpanProcessor):
    """A ``SpanProcessor`` that turns analytics span events into Segment messages."""

    def on_start(self, span: Span, parent_context: Optional[Context] = None) -> None:
        """Nothing to do when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Hand the span over for delivery if one of its events is an analytics event."""
        if self._shut_down or self._delivery.settings.endpoint is None:
            return
        for event in span.events:
            if keys.is_analytics(event.attributes):
                # The span ends on the caller's thread: its events are claimed and
                # copied for the delivery on the background thread.
                signals.hand_off(self._delivery.submit, ("span", span))
                return

    def shutdown(self) -> None:
        """Deliver what is queued and release the delivery. Idempotent."""
        if not self._shut_down:
            signals.flush(SHUTDOWN_SECONDS)
        self._shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Deliver everything queued so far within ``timeout_millis``."""
        deadline = time.monotonic() + timeout_millis / 1000.0
        handed_over = signals.flush(timeout_millis / 1000.0)
        flushed = self._flush(max(0.0, deadline - time.monotonic()) * 1000.0)
        return handed_over and flushed
