"""The one mapping from OTel signals to Segment messages.

A span event, an SDK log record and (in the relay) an OTLP log record or span
event all end up in :func:`message_from_attributes`: the ``zenml.analytics.*``
attributes plus the signal's time and trace context give one Segment message
in canonical (camelCase) form. The destinations turn that into a wire format.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from opentelemetry.sdk.trace import ReadableSpan

from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics.encoding import dumps

_logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 32 * 1024
"""Segment's per-message limit; bigger messages have their largest values truncated."""

TRUNCATION_MARK = "…[truncated]"

Message = Dict[str, Any]

EmailLookup = Callable[[], Optional[str]]
"""The user's email while they are opted in to sending it (the in-process delivery
passes one; the relay, far from the user's consent file, does not)."""

_CAMEL_IDS = (
    (keys.USER_ID, "userId"),
    (keys.ANONYMOUS_ID, "anonymousId"),
    (keys.GROUP_ID, "groupId"),
    (keys.PREVIOUS_ID, "previousId"),
)


_last_second: Tuple[int, str] = (-1, "")


def iso_timestamp(time_ns: Optional[int]) -> str:
    """ISO-8601 UTC with milliseconds, as Segment expects (``...T09:00:00.123Z``).

    Integer arithmetic on the nanoseconds (no float rounding); the date and time of
    the last second formatted are kept, since a batch's events share a few seconds.
    """
    global _last_second
    seconds, rest = divmod(time.time_ns() if time_ns is None else time_ns, 1_000_000_000)
    second, prefix = _last_second
    if second != seconds:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, prefix)
    return f"{prefix}.{rest // 1_000_000:03d}Z"


def message_from_attributes(
    attributes: Mapping[str, Any],
    time_ns: Optional[int],
    trace_id: int = 0,
    span_id: int = 0,
    email: Optional[EmailLookup] = None,
) -> Message:
    """The Segment message that a set of ``zenml.analytics.*`` attributes describes.

    ``email`` adds the user's email to the properties of a track message that was
    tracked with the email opt-in, when the user is still opted in now.
    """
    get = attributes.get
    message_type = str(attributes[keys.TYPE])
    message: Message = {"type": message_type, "messageId": str(attributes[keys.MESSAGE_ID])}
    for key, field in _CAMEL_IDS:
        value = get(key)
        if value is not None:
            message[field] = value if type(value) is str else str(value)
    if message_type == "track":
        message["event"] = str(get(keys.EVENT, ""))
        properties = keys.decode_payload(keys.PROPERTIES_PREFIX, attributes)
        if email is not None and get(keys.EMAIL_OPT_IN) is True and "email" not in properties:
            address = email()
            if address:
                properties["email"] = address
        message["properties"] = properties
    elif message_type in ("identify", "group"):
        message["traits"] = keys.decode_payload(keys.TRAITS_PREFIX, attributes)
    message["timestamp"] = iso_timestamp(time_ns)
    encoded_source = get(keys.SOURCE)
    library_name, library_version, os_name, os_version = _source(
        encoded_source if isinstance(encoded_source, str) else "")
    context: Dict[str, Any] = {
        "library": {"name": library_name, "version": library_version},
        "os": {"name": os_name, "version": os_version},
    }
    if trace_id:
        context["trace_id"] = format(trace_id, "032x")
    if span_id:
        context["span_id"] = format(span_id, "016x")
    message["context"] = context
    message["integrations"] = {}
    if get(keys.DEBUG):
        message["debug"] = True
    return message


@keys.once_per_short_text
def _source(encoded: str) -> Tuple[str, str, str, str]:
    """Library name and version, OS name and version of an encoded ``SOURCE`` attribute
    (every message of a process carries the same one)."""
    source = keys.decode_object(encoded) if encoded else {}
    library = _object(source.get("library"))
    system = _object(source.get("os"))
    return (str(library.get("name", "otel-zenml-analytics")), str(library.get("version", "")),
            str(system.get("name", "")), str(system.get("version", "")))


def _object(value: Any) -> Dict[str, Any]:
    return value if isinstance(value, dict) else {}


Recorded = Tuple[Dict[str, Any], Optional[int], int, int]
"""One analytics event as an SDK signal recorded it: its attributes (a plain copy), its
time, and the trace and span ids (0 when none)."""

Claim = Callable[[str], bool]
"""Says whether an event, by its message id, is wanted (the delivery's de-duplication):
an unwanted event is never copied."""


def events_of_span(span: ReadableSpan, claim: Optional[Claim] = None) -> List[Recorded]:
    """The analytics events of an ended span (those ``claim`` accepts, when given)."""
    context = span.get_span_context()
    trace_id = context.trace_id if context is not None else 0
    span_id = context.span_id if context is not None else 0
    return [(_plain(event.attributes), event.timestamp, trace_id, span_id)
            for event in span.events if _wanted(event.attributes, claim)]


def event_of_log_record(record: Any, claim: Optional[Claim] = None) -> Optional[Recorded]:
    """The analytics event of an SDK ``ReadableLogRecord``, or None when it is not one
    (or ``claim`` does not accept it)."""
    log_record = getattr(record, "log_record", record)
    name = getattr(log_record, "event_name", None)
    attrs = log_record.attributes
    if not name or not str(name).startswith(keys.EVENT_NAME_PREFIX) or not _wanted(attrs, claim):
        return None
    time_ns = log_record.timestamp or log_record.observed_timestamp
    return _plain(attrs), time_ns, log_record.trace_id or 0, log_record.span_id or 0


def _wanted(attributes: Optional[Mapping[str, Any]], claim: Optional[Claim]) -> bool:
    if not keys.is_analytics(attributes):
        return False
    return claim is None or claim(str(attributes[keys.MESSAGE_ID]))  # type: ignore[index]


def _plain(attributes: Any) -> Dict[str, Any]:
    """A plain dict copy of an SDK signal's attributes.

    The SDK's ``BoundedAttributes`` reads item by item under a lock, about a
    microsecond per attribute; it keeps its items in a dict, which is copied in one
    step where present (any other mapping is copied item by item).
    """
    inner = getattr(attributes, "_dict", None)
    return dict(inner) if isinstance(inner, dict) else dict(attributes)


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (ASCII text, the usual case, is not re-encoded)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def fit_size(message: Message, measure: Callable[[Message], int],
             limit: int = MAX_MESSAGE_BYTES) -> Message:
    """Truncate the largest payload values until the message fits ``limit`` bytes.

    ``measure`` gives a message's size in its wire form. Truncated keys are listed
    in ``context.truncated``; the message is never dropped here. Only when
    identifiers alone exceed the limit does it stay too large: it is then logged here
    and sent as it is (a refusal by the destination is reported by the delivery).
    """
    size = measure(message)
    if size <= limit:
        return message
    payload_field = "properties" if message.get("type") == "track" else "traits"
    payload = message.get(payload_field)
    if not isinstance(payload, dict) or not payload:
        return message
    truncated: List[str] = []
    payload = dict(payload)
    message = {**message, payload_field: payload}
    context = message.get("context")
    message["context"] = {**(context if isinstance(context, dict) else {}), "truncated": truncated}
    size = measure(message)
    # Each value's encoded size is taken once and the message's size kept as a running
    # sum: re-measuring the message per key was quadratic. A value alone is not always
    # written as inside the message (the encoder is chosen per document: 1e-05 or
    # 0.00001), so the sum drifts, and the wire form is measured whenever the sum says
    # the message fits or counts half of the excess last measured as cut since then.
    sizes = {key: utf8_size(dumps(value)) for key, value in payload.items()}
    mark_size = utf8_size(dumps(TRUNCATION_MARK))
    measured, cut_since = size, 0
    for key in sorted(payload, key=sizes.__getitem__, reverse=True):
        if size <= limit or sizes[key] <= mark_size:
            break  # it fits, or no value left (the largest first) is longer than the mark
        text = payload[key] if isinstance(payload[key], str) else dumps(payload[key])
        keep = max(0, len(text) - (size - limit) - len(TRUNCATION_MARK) * 4 - 64)
        entry = f"{payload_field}.{key}"
        listed = utf8_size(dumps(entry)) + (1 if truncated else 0)
        truncated.append(entry)
        # Cut by characters, then check in bytes: multi-byte text may need another pass.
        while True:
            payload[key] = text[:keep] + TRUNCATION_MARK
            size_after = size - sizes[key] + utf8_size(dumps(payload[key])) + listed
            if size_after <= limit or keep == 0:
                break
            keep //= 2
        cut_since += size - size_after
        size = size_after
        if size <= limit or 2 * cut_since >= measured - limit:
            size = measured = measure(message)
            cut_since = 0
            # Each character cut takes at least a byte out of the wire form.
            while size > limit and keep > 0:
                keep = max(0, keep - (size - limit) - 64)
                payload[key] = text[:keep] + TRUNCATION_MARK
                size = measured = measure(message)
    # A size within the limit was measured (the sum is checked whenever it says so).
    if size > limit and measure(message) > limit:
        _logger.warning("Analytics message %s is over %d bytes even after truncating its "
                        "values.", message.get("messageId"), limit)
    return message


def to_snake_case(message: Message) -> Message:
    """The ZenML wire form of a message: snake_case keys, as ZenML's client sends."""
    out: Message = {_SNAKE.get(key, key): value for key, value in message.items()}
    out["debug"] = bool(message.get("debug", False))
    return out


_SNAKE = {
    "messageId": "message_id",
    "userId": "user_id",
    "anonymousId": "anonymous_id",
    "groupId": "group_id",
    "previousId": "previous_id",
    "sentAt": "sent_at",
}
