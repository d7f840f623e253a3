"""The ``zenml.analytics.*`` attribute keys, and the one codec between a payload and them.

Span events and log records carry the same attributes. Primitive property
values keep their OTel type (str, bool, int, float); anything else (None,
dicts, lists, UUIDs, big ints, ...) is JSON-encoded, and its attribute key is
listed in ``zenml.analytics.json_keys`` so the mapping can decode it exactly.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Dict, Mapping, Optional

from otel_zenml_analytics.encoding import dumps

PREFIX = "zenml.analytics."

TYPE = "zenml.analytics.type"
MESSAGE_ID = "zenml.analytics.message_id"
USER_ID = "zenml.analytics.user_id"
ANONYMOUS_ID = "zenml.analytics.anonymous_id"
EVENT = "zenml.analytics.event"
GROUP_ID = "zenml.analytics.group_id"
PREVIOUS_ID = "zenml.analytics.previous_id"
LIBRARY_NAME = "zenml.analytics.library.name"
LIBRARY_VERSION = "zenml.analytics.library.version"
OS_NAME = "zenml.analytics.os.name"
OS_VERSION = "zenml.analytics.os.version"
DEBUG = "zenml.analytics.debug"
JSON_KEYS = "zenml.analytics.json_keys"

PROPERTIES_PREFIX = "zenml.analytics.properties."
TRAITS_PREFIX = "zenml.analytics.traits."

EVENT_NAME_PREFIX = "zenml.analytics."
"""Log records of analytics calls have ``event_name`` = this prefix + the message type."""

MESSAGE_TYPES = ("track", "identify", "group", "alias")

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

MAX_FLAT_KEYS = 96
"""Above this many keys a payload travels as one JSON attribute, so the SDK's default
limit of 128 attributes per event or record cannot drop any of it."""

AttributeValue = Any
Attributes = Dict[str, AttributeValue]


def encode_payload(prefix: str, payload: Optional[Mapping[Any, Any]], into: Attributes) -> None:
    """Flatten ``payload`` into ``into`` under ``prefix``, JSON-encoding non-primitives."""
    if not payload:
        return
    if len(payload) > MAX_FLAT_KEYS:
        whole = prefix[:-1]
        into[whole] = dumps(payload)
        into[JSON_KEYS] = tuple(into.get(JSON_KEYS, ())) + (whole,)
        return
    json_keys = []
    for key, value in payload.items():
        name = prefix + (key if isinstance(key, str) else str(getattr(key, "value", key)))
        kind = type(value)
        if kind is str or kind is bool or kind is float or (
            kind is int and _INT64_MIN <= value <= _INT64_MAX
        ):
            into[name] = value
        else:
            into[name] = dumps(value)
            json_keys.append(name)
    if json_keys:
        into[JSON_KEYS] = tuple(into.get(JSON_KEYS, ())) + tuple(json_keys)


def decode_payload(prefix: str, attributes: Mapping[str, Any]) -> Dict[str, Any]:
    """The payload that :func:`encode_payload` stored under ``prefix``."""
    json_keys = set(attributes.get(JSON_KEYS) or ())
    payload: Dict[str, Any] = {}
    whole = attributes.get(prefix[:-1])
    if isinstance(whole, str) and prefix[:-1] in json_keys:
        try:
            decoded = json.loads(whole)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            payload.update(decoded)
    start = len(prefix)
    for name, value in attributes.items():
        if not name.startswith(prefix):
            continue
        if name in json_keys and isinstance(value, str):
            with contextlib.suppress(ValueError):  # not ours to fail on: keep the string
                value = json.loads(value)
        elif isinstance(value, tuple):
            value = list(value)
        payload[name[start:]] = value
    return payload


def is_analytics(attributes: Optional[Mapping[str, Any]]) -> bool:
    """True when a span event's or log record's attributes are an analytics message."""
    return bool(attributes) and TYPE in attributes and MESSAGE_ID in attributes  # type: ignore[operator]
