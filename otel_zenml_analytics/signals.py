"""Analytics calls become OTel signals: a span event and a log record, one message id.

:func:`emit` is the only place that touches the OTel API on the caller's thread.
It adds a span event to the current recording span (or to a short span of its
own when none is recording) and emits a log record whose ``event_name`` is
``zenml.analytics.<type>``, both carrying the same attributes. When no SDK is
configured neither signal would be recorded, so it returns before building
anything.
"""

from __future__ import annotations

import platform
import threading
import time
from typing import Any, Callable, Dict, Optional

from opentelemetry import _logs, trace
from opentelemetry._logs import SeverityNumber

from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics.version import __version__

LIBRARY_NAME = "otel-zenml-analytics"
INSTRUMENTATION_NAME = "otel_zenml_analytics"

STATIC_ATTRIBUTES: Dict[str, Any] = {
    keys.LIBRARY_NAME: LIBRARY_NAME,
    keys.LIBRARY_VERSION: __version__,
    keys.OS_NAME: platform.system(),
    keys.OS_VERSION: platform.release(),
}
"""Facts about this process that every message carries (``context.library``/``os``)."""

Message = Dict[str, Any]

_EVENT_NAMES = {t: keys.EVENT_NAME_PREFIX + t for t in keys.MESSAGE_TYPES}


class _Providers:
    """The tracer and logger analytics calls use: the global ones unless overridden."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tracer: trace.Tracer = trace.get_tracer(INSTRUMENTATION_NAME, __version__)
        self.logger: _logs.Logger = _logs.get_logger(INSTRUMENTATION_NAME, __version__)
        self.log_enabled = _enabled_check(self.logger)

    def use(
        self,
        tracer_provider: Optional[trace.TracerProvider] = None,
        logger_provider: Optional[_logs.LoggerProvider] = None,
    ) -> None:
        with self._lock:
            self.tracer = trace.get_tracer(
                INSTRUMENTATION_NAME, __version__, tracer_provider=tracer_provider
            )
            self.logger = _logs.get_logger(
                INSTRUMENTATION_NAME, __version__, logger_provider=logger_provider
            )
            self.log_enabled = _enabled_check(self.logger)


def _enabled_check(logger: _logs.Logger) -> Callable[[str], bool]:
    """``Logger.enabled`` where the API has it (1.37+); older APIs: not a no-op logger."""
    enabled = getattr(logger, "enabled", None)
    if enabled is not None:
        return lambda name: bool(enabled(event_name=name))
    return lambda name: not isinstance(getattr(logger, "_logger", logger), _logs.NoOpLogger)


_providers = _Providers()


def use_providers(
    tracer_provider: Optional[trace.TracerProvider] = None,
    logger_provider: Optional[_logs.LoggerProvider] = None,
) -> None:
    """Send analytics signals through these providers instead of the global ones.

    ``None`` for either means the global provider. Instrumentors and tests use this.
    """
    _providers.use(tracer_provider, logger_provider)


def event_name(message: Message) -> str:
    """The span event name: the event for track ("Pipeline run"), else the type."""
    if message["type"] == "track":
        return str(message["event"])
    return str(message["type"])


def to_attributes(message: Message) -> Dict[str, Any]:
    """The ``zenml.analytics.*`` attributes of a message built by the client."""
    message_type = message["type"]
    attrs: Dict[str, Any] = dict(STATIC_ATTRIBUTES)
    attrs[keys.TYPE] = message_type
    attrs[keys.MESSAGE_ID] = message["messageId"]
    for field, key in _ID_FIELDS:
        value = message.get(field)
        if value is not None:
            attrs[key] = value
    if message.get("debug"):
        attrs[keys.DEBUG] = True
    if message_type == "track":
        keys.encode_payload(keys.PROPERTIES_PREFIX, message.get("properties"), attrs)
    else:
        keys.encode_payload(keys.TRAITS_PREFIX, message.get("traits"), attrs)
    return attrs


_ID_FIELDS = (
    ("userId", keys.USER_ID),
    ("anonymousId", keys.ANONYMOUS_ID),
    ("event", keys.EVENT),
    ("groupId", keys.GROUP_ID),
    ("previousId", keys.PREVIOUS_ID),
)


def emit(message: Message) -> bool:
    """Record ``message`` as a span event and a log record.

    Returns True when at least one of the two signals was recorded by an SDK.
    The client calls it inside its guard, so an SDK failure never reaches the caller.
    """
    providers = _providers
    tracer, logger = providers.tracer, providers.logger
    name = event_name(message)
    log_event_name = _EVENT_NAMES[message["type"]]
    span = trace.get_current_span()
    own_span = None
    if not span.is_recording():
        candidate = tracer.start_span(f"analytics {name}")
        if candidate.is_recording():
            own_span = span = candidate
    span_on = span.is_recording()
    log_on = providers.log_enabled(log_event_name)
    if not span_on and not log_on:
        return False
    attrs = to_attributes(message)
    now = time.time_ns()
    if span_on:
        dropped = getattr(span, "dropped_events", 0)
        span.add_event(name, attrs, timestamp=now)
        if getattr(span, "dropped_events", 0) > dropped:
            # The span is at its event limit (128 by default): the SDK dropped ours, so it
            # goes on a short span of its own instead of being lost.
            extra = tracer.start_span(f"analytics {name}")
            extra.add_event(name, attrs, timestamp=now)
            extra.end(end_time=now)
    if log_on:
        context = trace.set_span_in_context(own_span) if own_span is not None else None
        logger.emit(
            timestamp=now,
            context=context,
            severity_number=SeverityNumber.INFO,
            body=name,
            attributes=attrs,
            event_name=log_event_name,
        )
    if own_span is not None:
        own_span.end(end_time=now)
    return True
