"""``SegmentLogExporter``: analytics log records, delivered to Segment.

Usage::

    from opentelemetry._logs import set_logger_provider
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from otel_zenml_analytics.exporter import SegmentLogExporter

    provider = LoggerProvider()
    provider.add_log_record_processor(
        BatchLogRecordProcessor(SegmentLogExporter(endpoint="http://127.0.0.1:8800"))
    )
    set_logger_provider(provider)

Records whose ``event_name`` is ``zenml.analytics.<type>`` are delivered; all other
records are ignored, so the exporter can sit beside an OTLP exporter on one
provider. With ``OTEL_LOGS_EXPORTER=zenml_analytics`` the SDK's auto-configuration
builds it from the environment.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from opentelemetry.sdk._logs import ReadableLogRecord

try:
    from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
except ImportError:  # SDKs before the 1.39 rename
    from opentelemetry.sdk._logs.export import (  # type: ignore[attr-defined,no-redef]
        LogExporter as LogRecordExporter,
    )
    from opentelemetry.sdk._logs.export import (  # type: ignore[attr-defined,no-redef,assignment]
        LogExportResult as LogRecordExportResult,
    )

from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics._component import DeliveringComponent

_logger = logging.getLogger(__name__)


class SegmentLogExporter(DeliveringComponent, LogRecordExporter):
    """A ``LogRecordExporter`` that turns analytics log records into Segment messages."""

    _warned_after_shutdown = False

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        """Queue the analytics records of ``batch``; never raises."""
        if self._shut_down:
            if not self._warned_after_shutdown:
                self._warned_after_shutdown = True
                _logger.warning("SegmentLogExporter.export called after shutdown; ignored.")
            return LogRecordExportResult.FAILURE
        for record in batch:
            name = getattr(record.log_record, "event_name", None)
            if name and name.startswith(keys.EVENT_NAME_PREFIX):
                self._delivery.submit(("log", record))
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        """Deliver what is queued and release the delivery. Idempotent."""
        self._shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Deliver everything queued so far within ``timeout_millis``."""
        return self._flush(timeout_millis)
