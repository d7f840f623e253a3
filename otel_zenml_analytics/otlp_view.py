"""A view of OTLP protobuf requests that leaves each attribute encoded, for the relay.

Reading an attribute out of a decoded ``opentelemetry.proto`` message costs Python five
calls into upb (the item, its key, its value, which value, the value itself), about two
thirds of the relay's decoding. Here the same bytes are parsed a second time with
message types that mirror OTLP's wire format for the fields the relay reads, except
that an attribute (a ``KeyValue``) stays its encoded bytes. Those bytes repeat from
record to record (the same source, user, event and properties; only the message id
differs), so an attribute already seen is one dictionary lookup away.

:func:`parse` expects a body that the real ``ExportLogsServiceRequest`` or
``ExportTraceServiceRequest`` accepted, so a malformed request is refused exactly as
OTLP defines it (see :func:`otel_zenml_analytics.otlp.decode_protobuf`). The views
have the field names of the real messages they mirror, so the extraction reads both.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Tuple, Union

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # type: ignore[import-untyped]
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

_PACKAGE = "otel_zenml_analytics.otlp_view"
_F = descriptor_pb2.FieldDescriptorProto

# (message, [(field, number, type, repeated, message type)]): OTLP's field numbers.
_SCHEMA = (
    ("LogsRequest", [("resource_logs", 1, _F.TYPE_MESSAGE, True, "ResourceLogs")]),
    ("ResourceLogs", [("scope_logs", 2, _F.TYPE_MESSAGE, True, "ScopeLogs")]),
    ("ScopeLogs", [("log_records", 2, _F.TYPE_MESSAGE, True, "LogRecord")]),
    ("LogRecord", [("time_unix_nano", 1, _F.TYPE_FIXED64, False, ""),
                   ("attributes", 6, _F.TYPE_BYTES, True, ""),
                   ("trace_id", 9, _F.TYPE_BYTES, False, ""),
                   ("span_id", 10, _F.TYPE_BYTES, False, ""),
                   ("observed_time_unix_nano", 11, _F.TYPE_FIXED64, False, ""),
                   ("event_name", 12, _F.TYPE_STRING, False, "")]),
    ("TracesRequest", [("resource_spans", 1, _F.TYPE_MESSAGE, True, "ResourceSpans")]),
    ("ResourceSpans", [("scope_spans", 2, _F.TYPE_MESSAGE, True, "ScopeSpans")]),
    ("ScopeSpans", [("spans", 2, _F.TYPE_MESSAGE, True, "Span")]),
    ("Span", [("trace_id", 1, _F.TYPE_BYTES, False, ""),
              ("span_id", 2, _F.TYPE_BYTES, False, ""),
              ("events", 11, _F.TYPE_MESSAGE, True, "Event")]),
    ("Event", [("time_unix_nano", 1, _F.TYPE_FIXED64, False, ""),
               ("name", 2, _F.TYPE_STRING, False, ""),
               ("attributes", 3, _F.TYPE_BYTES, True, "")]),
)


def _message_classes() -> Dict[str, Any]:
    """The view classes, built once from :data:`_SCHEMA` in a pool of their own."""
    file = descriptor_pb2.FileDescriptorProto(
        name="otel_zenml_analytics/otlp_view.proto", package=_PACKAGE, syntax="proto3")
    for name, fields in _SCHEMA:
        message = file.message_type.add(name=name)
        for field, number, kind, repeated, type_name in fields:
            added = message.field.add(
                name=field, number=number, type=kind,
                label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
            if type_name:
                added.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"{_PACKAGE}.{name}")) for name in ("LogsRequest", "TracesRequest")}


_CLASSES = _message_classes()
_VIEW_TYPES = tuple(_CLASSES.values())


def parse(traces: bool, body: Union[bytes, bytearray]) -> Any:
    """The view of a logs (or, with ``traces``, a traces) export request body."""
    return _CLASSES["TracesRequest" if traces else "LogsRequest"].FromString(body)


def is_view(request: Any) -> bool:
    """True for a request parsed by :func:`parse`."""
    return isinstance(request, _VIEW_TYPES)


_SHAREABLE = frozenset((str, bool, int, float))
"""Decoded values that messages may share: immutable (arrays come as tuples that may hold
dicts, key-value lists as dicts)."""

MAX_KNOWN = 4096
"""Encoded attributes remembered at most; the memory is forgotten when full."""
MAX_KNOWN_BYTES = 512
"""Longer encoded attributes are decoded every time, never remembered."""

_known: Dict[bytes, Tuple[str, Any]] = {}


def attribute_dict(attributes: Iterable[bytes], decode_value: Callable[[Any], Any],
                   unique_key: str) -> Dict[str, Any]:
    """Encoded ``KeyValue`` attributes as a plain dict (the last of repeated keys wins).

    ``decode_value`` turns an ``AnyValue`` into a Python value. Attributes whose value
    is an immutable primitive are remembered by their bytes, except those under
    ``unique_key`` (the message id, different in every record).
    """
    known = _known
    out: Dict[str, Any] = {}
    for raw in attributes:
        pair = known.get(raw)
        if pair is None:
            item = KeyValue.FromString(raw)
            pair = (item.key, decode_value(item.value))
            if type(pair[1]) in _SHAREABLE and len(raw) <= MAX_KNOWN_BYTES \
                    and pair[0] != unique_key:
                if len(known) >= MAX_KNOWN:
                    known.clear()
                known[raw] = pair
        out[pair[0]] = pair[1]
    return out

