"""One call to wire both components into fresh SDK providers.

For scripts, the CLI and the demo. Applications that already own a
``TracerProvider``/``LoggerProvider`` add the two components to them instead
(see the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from opentelemetry import _logs, trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from otel_zenml_analytics import signals
from otel_zenml_analytics.exporter import SegmentLogExporter
from otel_zenml_analytics.processor import SegmentSpanProcessor
from otel_zenml_analytics.settings import Settings


@dataclass
class AnalyticsSDK:
    """Providers with both components attached."""

    tracer_provider: TracerProvider
    logger_provider: LoggerProvider
    span_processor: SegmentSpanProcessor
    log_exporter: SegmentLogExporter

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Flush spans, then log records, then the shared delivery."""
        spans = self.tracer_provider.force_flush(timeout_millis)
        logs = self.logger_provider.force_flush(timeout_millis)
        delivered = self.span_processor.force_flush(timeout_millis)
        return bool(spans and logs and delivered)

    def shutdown(self) -> None:
        """Flush and stop both providers."""
        self.tracer_provider.shutdown()
        self.logger_provider.shutdown()


def configure_sdk(
    settings: Optional[Settings] = None,
    service_name: str = "otel-zenml-analytics",
    set_global: bool = False,
) -> AnalyticsSDK:
    """Build a TracerProvider and a LoggerProvider that deliver analytics events.

    With ``set_global`` they become the global providers; otherwise only the
    analytics calls of this process use them.
    """
    settings = settings or Settings.resolve()
    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    processor = SegmentSpanProcessor(settings=settings)
    tracer_provider.add_span_processor(processor)
    logger_provider = LoggerProvider(resource=resource)
    exporter = SegmentLogExporter(settings=settings)
    logger_provider.add_log_record_processor(
        BatchLogRecordProcessor(exporter, schedule_delay_millis=200)
    )
    if set_global:
        trace.set_tracer_provider(tracer_provider)
        _logs.set_logger_provider(logger_provider)
        signals.use_providers()
    else:
        signals.use_providers(tracer_provider, logger_provider)
    return AnalyticsSDK(tracer_provider, logger_provider, processor, exporter)
