"""ZenML-style product analytics as first-class OpenTelemetry signals.

The API of ``zenml.analytics``: every call becomes a span event and a log record
(one message id), which ``SegmentSpanProcessor`` and ``SegmentLogExporter``
deliver as Segment-style batches.

Track an event
--------------

.. code-block:: python

    from otel_zenml_analytics import track
    from otel_zenml_analytics.enums import AnalyticsEvent

    track(AnalyticsEvent.RUN_PIPELINE, {"pipeline": "training", "steps": 3})

Deliver the events
------------------

.. code-block:: python

    from otel_zenml_analytics.exporter import SegmentLogExporter
    from otel_zenml_analytics.processor import SegmentSpanProcessor

    tracer_provider.add_span_processor(SegmentSpanProcessor())
    logger_provider.add_log_record_processor(BatchLogRecordProcessor(SegmentLogExporter()))

Both read ``OTEL_ZENML_ANALYTICS_ENDPOINT`` (and the other settings) from the
environment when not given as arguments; together they deliver each event once.

Opt out
-------

``otel-zenml-analytics analytics opt-out`` (per machine), ``ZENML_ANALYTICS_OPT_IN=false``
(per process) or ``with analytics_disabler():`` (per block).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional
from uuid import UUID

from otel_zenml_analytics.context import AnalyticsContext
from otel_zenml_analytics.version import __version__

_logger = logging.getLogger(__name__)

__all__ = ["__version__", "alias", "group", "identify", "track"]


def identify(metadata: Optional[Dict[str, Any]] = None) -> bool:
    """Attach metadata to user directly.

    Args:
        metadata: Dict of metadata to attach to the user.

    Returns:
        True if event is sent successfully, False is not.
    """
    with AnalyticsContext() as analytics:
        return analytics.identify(traits=metadata)
    return False  # reached only when the context swallowed an error


def alias(user_id: UUID, previous_id: UUID) -> bool:
    """Alias user IDs.

    Args:
        user_id: The user ID.
        previous_id: Previous ID for the alias.

    Returns:
        True if event is sent successfully, False is not.
    """
    with AnalyticsContext() as analytics:
        return analytics.alias(user_id=user_id, previous_id=previous_id)
    return False  # reached only when the context swallowed an error


def group(group_id: UUID, group_metadata: Optional[Dict[str, Any]] = None) -> bool:
    """Attach metadata to a segment group.

    Args:
        group_id: ID of the group.
        group_metadata: Metadata to attach to the group.

    Returns:
        True if event is sent successfully, False if not.
    """
    with AnalyticsContext() as analytics:
        return analytics.group(group_id=group_id, traits=group_metadata)
    return False  # reached only when the context swallowed an error


def track(event: Any, metadata: Optional[Dict[str, Any]] = None) -> bool:
    """Track segment event if user opted-in.

    Args:
        event: Name of event to track in segment (``AnalyticsEvent``,
            ``LegacyAnalyticsEvent`` or, unless strict, any non-empty string).
        metadata: Dict of metadata to track; ``event_success`` defaults to True.

    Returns:
        True if event is sent successfully, False if not.
    """
    return _track_properties(event, _properties(event, metadata))


def _track_properties(event: Any, properties: Dict[str, Any]) -> bool:
    """:func:`track` without its copy of ``properties``: a dict nobody else holds that
    already has ``event_success`` (``track_handler``'s); the context reads the consent
    for this call alone, so the client need not read it again."""
    with AnalyticsContext() as analytics:
        return analytics._track(event, properties, consent_just_read=True)
    return False  # reached only when the context swallowed an error


def _properties(event: Any, metadata: Any) -> Dict[str, Any]:
    """A copy of ``metadata`` with ``event_success`` defaulting to True; metadata that is
    not a dict is left out, with a warning (the event is still tracked)."""
    if metadata is not None and type(metadata) is not dict and not isinstance(metadata, Mapping):
        _logger.warning("track(%r): metadata must be a dict, not %s; tracked without it",
                        getattr(event, "value", event), type(metadata).__name__)
        metadata = None
    properties = dict(metadata or {})
    properties.setdefault("event_success", True)
    return properties
