"""OTLP requests in, analytics messages out: the relay's decoding half.

Decodes ``ExportLogsServiceRequest``/``ExportTraceServiceRequest`` bodies (protobuf or
OTLP/JSON) with the ``opentelemetry.proto`` classes, turns the attributes of analytics
log records and analytics span events into plain Python values and hands them to
:func:`otel_zenml_analytics.mapping.message_from_attributes`, the one mapping the
in-process components use too. Everything else in a request is ignored. A protobuf body,
once checked, is read through :mod:`.otlp_view`, which leaves attributes encoded: most
repeat from record to record, and a repeated one is then a dictionary lookup.
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Collection,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
    Union,
)

from google.protobuf import json_format  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics import otlp_view
from otel_zenml_analytics.mapping import Message, message_from_attributes

LOGS = "logs"
TRACES = "traces"
SIGNALS = (LOGS, TRACES)

Request = Union[ExportLogsServiceRequest, ExportTraceServiceRequest]
Body = Union[bytes, bytearray]
"""An export request's body: the relay reads an HTTP body into a bytearray, not copied."""
Response = Union[ExportLogsServiceResponse, ExportTraceServiceResponse]

_EVENT_NAME_ATTRIBUTE = "event.name"
"""Where SDKs older than the ``event_name`` field put a log record's event name."""

# OTLP/JSON encodes these bytes fields as hex, where the protobuf JSON mapping expects base64.
_HEX_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


class OTLPDecodeError(ValueError):
    """A request body is not a valid OTLP export request; the message says what is wrong."""


ERRORS_KEPT = 3
"""Reasons kept per request, for OTLP partial success; the others are only counted (a
request of a million unmappable records would otherwise hold a million strings)."""


@dataclass
class Extracted:
    """The analytics messages of one export request, and what could not be mapped."""

    messages: List[Message] = field(default_factory=list)
    analytics_items: int = 0
    """Log records or spans that carried at least one mappable analytics message."""
    rejected: int = 0
    """Log records or spans (the unit OTLP partial success counts) that could not be mapped."""
    errors: List[str] = field(default_factory=list)
    """The first :data:`ERRORS_KEPT` reasons (:meth:`add_error`)."""
    more_errors: int = 0
    item_of: List[int] = field(default_factory=list)
    """For each message, the number of the log record or span that carried it."""
    rejected_items: Set[int] = field(default_factory=set)
    """The numbers of the spans counted in ``rejected`` whose other events were mapped."""

    def items_holding(self, message_ids: Collection[str]) -> int:
        """How many log records or spans not yet counted in ``rejected`` carried at least
        one of ``message_ids``."""
        return len({item for item, message in zip(self.item_of, self.messages)
                    if message["messageId"] in message_ids} - self.rejected_items)

    def add_error(self, reason: str, first: bool = False) -> None:
        """Keep ``reason`` if fewer than :data:`ERRORS_KEPT` are kept (or, with ``first``,
        in front of them), else count it."""
        if first:
            self.errors.insert(0, reason)
        else:
            self.errors.append(reason)
        if len(self.errors) > ERRORS_KEPT:
            self.errors.pop()
            self.more_errors += 1

    def error_message(self) -> str:
        """The first few reasons, for OTLP partial success."""
        more = self.more_errors
        return "; ".join(self.errors) + (f"; and {more} more" if more else "")


def new_request(signal: str) -> Request:
    """An empty export request of ``signal`` (``logs`` or ``traces``)."""
    return ExportLogsServiceRequest() if signal == LOGS else ExportTraceServiceRequest()


def decode_protobuf(signal: str, body: Body) -> Any:
    """Parse a binary protobuf export request: checked as the OTLP request it must be,
    returned as its :mod:`.otlp_view` (attributes left encoded, read by :func:`extract`)."""
    _check_protobuf(signal, body)
    return otlp_view.parse(traces=signal != LOGS, body=body)


def _check_protobuf(signal: str, body: Body) -> None:
    """Raise :class:`OTLPDecodeError` unless ``body`` parses as the real request. The
    parsed request is dropped on return, before the view is built: each takes memory in
    proportion to the number of messages in the body."""
    request = new_request(signal)
    try:
        request.ParseFromString(body)
    except (DecodeError, ValueError, RecursionError) as exc:
        raise OTLPDecodeError(
            f"body is not a valid protobuf {type(request).__name__}: {exc}"
        ) from None


MAX_JSON_DEPTH = 128
"""Deepest nesting of arrays and objects accepted in an OTLP/JSON body: about 30 levels of
nested ``kvlistValue`` (protobuf bodies have protobuf's own limit of 100 messages). It
keeps the parsers' recursion far from Python's recursion limit."""


def decode_json(signal: str, body: Body) -> Request:
    """Parse an OTLP/JSON export request (hex trace and span ids, unknown fields ignored)."""
    try:
        document = json.loads(body)
    except UnicodeDecodeError as exc:
        raise OTLPDecodeError(f"body is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise OTLPDecodeError(_too_deep()) from None
    except ValueError as exc:
        raise OTLPDecodeError(f"body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise OTLPDecodeError(
            f"body must be a JSON object (an OTLP export request), not {_json_type(document)}"
        )
    _hex_ids_to_base64(document)
    request = new_request(signal)
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise OTLPDecodeError(
            f"body is not a valid OTLP/JSON {type(request).__name__}: {exc}"
        ) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # Values the JSON mapping does not expect where it does not expect them
        raise OTLPDecodeError(
            f"body is not a valid OTLP/JSON {type(request).__name__}: "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    return request


def _too_deep() -> str:
    return (f"body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep: "
            "expected an OTLP/JSON export request")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return "a number" if isinstance(value, (int, float)) else type(value).__name__


def _hex_ids_to_base64(document: Dict[str, Any]) -> None:
    """Rewrite OTLP/JSON's hex ids in place into the base64 that protobuf's JSON parser
    reads; refuse documents nested deeper than :data:`MAX_JSON_DEPTH`. Iterative, so that
    no nesting can exhaust the stack."""
    stack: List[Tuple[Any, str, int]] = [(document, "$", 1)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise OTLPDecodeError(_too_deep())
        if isinstance(node, list):
            stack.extend((item, f"{where}[{index}]", depth + 1)
                         for index, item in enumerate(node) if isinstance(item, (dict, list)))
            continue
        for name, value in node.items():
            if name in _HEX_ID_FIELDS and isinstance(value, str):
                try:
                    raw = bytes.fromhex(value)
                except ValueError:
                    raise OTLPDecodeError(
                        f"body is not valid OTLP/JSON: {where}.{name} is not a hex-encoded "
                        f"id: {value[:64]!r}"
                    ) from None
                node[name] = base64.b64encode(raw).decode("ascii")
            elif isinstance(value, (dict, list)):
                stack.append((value, f"{where}.{name}", depth + 1))


_PRIMITIVE_FIELDS = frozenset(("string_value", "bool_value", "int_value", "double_value"))


def any_value(value: AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a Python value: primitives as such, arrays as tuples,
    key-value lists as dicts, bytes as base64 text; an empty value is None."""
    kind = value.WhichOneof("value")
    if kind in _PRIMITIVE_FIELDS:
        # Each read of a decoded protobuf field is a call into upb: a primitive, by far
        # the usual value, is read once, by the name of the field that is set.
        return getattr(value, kind)
    if kind == "array_value":
        return tuple(any_value(item) for item in value.array_value.values)
    if kind == "kvlist_value":
        return {item.key: any_value(item.value) for item in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return None


def attribute_dict(attributes: Iterable[KeyValue]) -> Dict[str, Any]:
    """OTLP attributes as a plain dict (the last of repeated keys wins)."""
    return {item.key: any_value(item.value) for item in attributes}


def _attribute_reader(request: Any) -> Callable[[Any], Dict[str, Any]]:
    """How to read the attributes of ``request``'s records: decoded, or (a view) encoded."""
    if otlp_view.is_view(request):
        return functools.partial(otlp_view.attribute_dict, decode_value=any_value,
                                 unique_key=keys.MESSAGE_ID)
    return attribute_dict


def _id(raw: bytes, size: int, what: str) -> int:
    if not raw:
        return 0
    if len(raw) != size:
        raise ValueError(f"{what} has {len(raw)} bytes, expected {size}")
    return int.from_bytes(raw, "big")


_TEXT_KEYS = (keys.USER_ID, keys.ANONYMOUS_ID, keys.GROUP_ID, keys.PREVIOUS_ID, keys.EVENT)
_VALUE_KINDS = {bool: "a boolean", int: "an integer", float: "a double", bytes: "bytes",
                tuple: "an array", list: "an array", dict: "a key-value list"}
"""What the Python value an ``AnyValue`` decoded to was, in OTLP's words."""


def _map(attrs: Mapping[str, Any], time_ns: Optional[int], trace_id: int, span_id: int
         ) -> Message:
    """One message, or ValueError saying why these analytics attributes cannot be mapped."""
    message_type = attrs.get(keys.TYPE)
    if message_type not in keys.MESSAGE_TYPES:
        raise ValueError(f"{keys.TYPE}={message_type!r} is not one of "
                         f"{', '.join(keys.MESSAGE_TYPES)}")
    message_id = attrs.get(keys.MESSAGE_ID)
    if not isinstance(message_id, str) or not message_id:
        raise ValueError(f"{keys.MESSAGE_ID} must be a non-empty string")
    for key in _TEXT_KEYS:
        value = attrs.get(key)
        # Ids may come as integers from other SDKs; a list, a map or a flag is no id.
        if value is not None and not (type(value) is str or (
                type(value) is int and key != keys.EVENT)):
            kind = _VALUE_KINDS.get(type(value), type(value).__name__)
            raise ValueError(f"{key} must be a string, not {kind}")
    if message_type == "track" and not attrs.get(keys.EVENT):
        raise ValueError(f"a track message needs {keys.EVENT}")
    if not attrs.get(keys.USER_ID) and not attrs.get(keys.ANONYMOUS_ID):
        raise ValueError(f"needs {keys.USER_ID} or {keys.ANONYMOUS_ID}")
    if message_type == "group" and not attrs.get(keys.GROUP_ID):
        raise ValueError(f"a group message needs {keys.GROUP_ID}")
    if message_type == "alias" and not attrs.get(keys.PREVIOUS_ID):
        raise ValueError(f"an alias message needs {keys.PREVIOUS_ID}")
    try:
        return message_from_attributes(attrs, time_ns, trace_id, span_id)
    except Exception as exc:  # noqa: BLE001 - any mapping failure is this record's problem
        raise ValueError(f"cannot be mapped: {type(exc).__name__}: {exc}") from None


def extract_logs(request: Any) -> Extracted:
    """The messages of the analytics log records of a logs export request (or its view)."""
    out = Extracted()
    messages = out.messages
    attributes_of = _attribute_reader(request)
    for r, resource_logs in enumerate(request.resource_logs):
        for s, scope_logs in enumerate(resource_logs.scope_logs):
            for i, record in enumerate(scope_logs.log_records):
                attrs = attributes_of(record.attributes)
                name = record.event_name or str(attrs.get(_EVENT_NAME_ATTRIBUTE) or "")
                if not name.startswith(keys.EVENT_NAME_PREFIX):
                    continue
                try:
                    if not keys.is_analytics(attrs):
                        raise ValueError(f"no {keys.TYPE} and {keys.MESSAGE_ID} attributes")
                    trace_id = _id(record.trace_id, 16, "traceId")
                    span_id = _id(record.span_id, 8, "spanId")
                    time_ns = record.time_unix_nano or record.observed_time_unix_nano or None
                    messages.append(_map(attrs, time_ns, trace_id, span_id))
                    out.item_of.append(len(out.item_of))
                except ValueError as exc:
                    out.rejected += 1
                    out.add_error(
                        f"resourceLogs[{r}].scopeLogs[{s}].logRecords[{i}] ({name}): {exc}")
    out.analytics_items = len(messages)
    return out


def extract_traces(request: Any) -> Extracted:
    """The messages of the analytics span events of a traces export request (or its view)."""
    out = Extracted()
    attributes_of = _attribute_reader(request)
    number = 0
    for r, resource_spans in enumerate(request.resource_spans):
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            for i, span in enumerate(scope_spans.spans):
                found, failed = _span_messages(span, f"resourceSpans[{r}].scopeSpans[{s}]"
                                                     f".spans[{i}]", out, attributes_of, number)
                if failed:
                    out.rejected += 1
                    if found:
                        out.rejected_items.add(number)
                elif found:
                    out.analytics_items += 1
                number += 1
    return out


def _span_messages(span: Any, where: str, out: Extracted,
                   attributes_of: Callable[[Any], Dict[str, Any]], number: int
                   ) -> Tuple[int, bool]:
    found, failed = 0, False
    ids: Optional[Tuple[int, int]] = None
    for e, event in enumerate(span.events):
        attrs = attributes_of(event.attributes)
        if not keys.is_analytics(attrs):
            continue
        try:
            if ids is None:
                ids = (_id(span.trace_id, 16, "traceId"), _id(span.span_id, 8, "spanId"))
            message = _map(attrs, event.time_unix_nano or None, ids[0], ids[1])
        except ValueError as exc:
            failed = True
            out.add_error(f"{where}.events[{e}] ({event.name}): {exc}")
            continue
        out.messages.append(message)
        out.item_of.append(number)
        found += 1
    return found, failed


def extract(signal: str, request: Any) -> Extracted:
    """The analytics messages of an export request of ``signal`` (decoded, or its view)."""
    return extract_logs(request) if signal == LOGS else extract_traces(request)


def response(signal: str, rejected: int = 0, error_message: str = "") -> Response:
    """An export response; with ``rejected`` or ``error_message`` a partial success."""
    if signal == LOGS:
        logs = ExportLogsServiceResponse()
        if rejected or error_message:
            logs.partial_success.CopyFrom(
                ExportLogsPartialSuccess(rejected_log_records=rejected,
                                         error_message=error_message))
        return logs
    traces = ExportTraceServiceResponse()
    if rejected or error_message:
        traces.partial_success.CopyFrom(
            ExportTracePartialSuccess(rejected_spans=rejected, error_message=error_message))
    return traces


def to_json(message: Any) -> bytes:
    """A protobuf message as OTLP/JSON (camelCase names, int64 as JSON strings)."""
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":")).encode()
