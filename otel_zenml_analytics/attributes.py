"""The ``zenml.analytics.*`` attribute keys, and the one codec between a payload and them.

Span events and log records carry the same attributes. Primitive property
values keep their OTel type (str, bool, int, float); anything else (None,
dicts, lists, UUIDs, big ints, ...) is JSON-encoded, and its attribute key is
listed in ``zenml.analytics.json_keys`` so the mapping can decode it exactly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar

from otel_zenml_analytics.encoding import dumps, json_key, utf8_safe
from otel_zenml_analytics.settings import warn_once

_logger = logging.getLogger(__name__)

PREFIX = "zenml.analytics."

TYPE = "zenml.analytics.type"
MESSAGE_ID = "zenml.analytics.message_id"
USER_ID = "zenml.analytics.user_id"
ANONYMOUS_ID = "zenml.analytics.anonymous_id"
EVENT = "zenml.analytics.event"
GROUP_ID = "zenml.analytics.group_id"
PREVIOUS_ID = "zenml.analytics.previous_id"
SOURCE = "zenml.analytics.source"
"""JSON ``{"library": {...}, "os": {...}}``: the sending process's library and OS, one
precomputed attribute rather than four (each attribute costs the SDK a validation)."""
FACTS = "zenml.analytics.facts"
"""JSON object of the system facts ``AnalyticsContext.track`` adds to every event
(os, python_version, client_id, ...), packed like ``SOURCE``; flat properties win."""
EMAIL_OPT_IN = "zenml.analytics.email_opt_in"
"""True when the user had opted in to sending their email when the event was tracked.
The email itself is never an attribute: the in-process delivery adds it to the
message it sends, so traces and logs never carry it."""
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


class PackedFacts:
    """Process-constant properties and their JSON, encoded once and reused per call."""

    __slots__ = ("values", "json", "_items")

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values: Dict[str, Any] = dict(values)
        self.json = dumps(self.values)
        self._items = tuple(self.values.items())

    def packable(self, payload: Mapping[Any, Any]) -> bool:
        """True when ``payload`` holds every fact as the very object packed here.

        ``AnalyticsContext.track`` copies the facts into each payload, so identity is
        the cheap exact test; a caller's override of any fact (even by an equal value)
        makes the whole payload travel flat.
        """
        get = payload.get
        for key, value in self._items:  # noqa: SIM110 - all() of a generator costs more
            if get(key, _ABSENT) is not value:
                return False
        return True


_ABSENT = object()


def encode_payload(prefix: str, payload: Optional[Mapping[Any, Any]], into: Attributes,
                   facts: Optional[PackedFacts] = None) -> None:
    """Flatten ``payload`` into ``into`` under ``prefix``, JSON-encoding non-primitives.

    With ``facts`` that the payload holds unchanged, those keys travel as the one
    precomputed ``FACTS`` attribute instead of one attribute each.
    """
    if not payload:
        return
    packed: Mapping[Any, Any] = {}
    if facts is not None and facts.packable(payload):
        into[FACTS] = facts.json
        packed = facts.values
    if len(payload) - len(packed) > MAX_FLAT_KEYS:
        whole = prefix[:-1]
        into[whole] = dumps({key: value for key, value in payload.items() if key not in packed})
        into[JSON_KEYS] = tuple(into.get(JSON_KEYS, ())) + (whole,)
        if not all(type(key) is str and (key.isascii() or utf8_safe(key) == key)
                   for key in payload):
            _warn_if_keys_collide(prefix, payload, _json_spelling)
        return
    json_keys: Dict[str, None] = {}  # a set in insertion order
    renamed = False
    for key, value in payload.items():
        if key in packed:
            continue
        if isinstance(key, str):
            name = prefix + key
        else:
            name = prefix + json_key(key)
            renamed = True
        if not name.isascii():
            safe = utf8_safe(name)
            renamed = renamed or safe != name
            name = safe
        kind = type(value)
        if kind is str:
            # An OTLP exporter cannot encode a lone surrogate: it would fail the host's batch.
            into[name] = value if value.isascii() else utf8_safe(value)
        elif kind is bool or kind is float or (
            kind is int and _INT64_MIN <= value <= _INT64_MAX
        ):
            into[name] = value
        else:
            into[name] = dumps(value)
            json_keys[name] = None
            continue
        if renamed:
            # A key spelt as an earlier one may have replaced its JSON value by a plain one.
            json_keys.pop(name, None)
    if json_keys:
        into[JSON_KEYS] = tuple(into.get(JSON_KEYS, ())) + tuple(json_keys)
    if renamed:
        _warn_if_keys_collide(prefix, payload, _attribute_key)


def _attribute_key(key: Any) -> str:
    """A payload key as it ends an attribute's name (UTF-8, as OTLP needs)."""
    return utf8_safe(json_key(key))


def _json_spelling(key: Any) -> str:
    """A payload key as it reads back from JSON (a surrogate pair written as two code
    points comes back as one character)."""
    spelt: str = json.loads(dumps(json_key(key)))
    return spelt


def _warn_if_keys_collide(prefix: str, payload: Mapping[Any, Any],
                          spelt: Callable[[Any], str]) -> None:
    """Warn (once per set of keys) when keys that differ in Python are spelt the same
    (``1`` and ``"1"``, an enum member and its value, texts that differ only in lone
    surrogates, which an attribute's name cannot hold): the last one's value is kept,
    as JSON (and so Segment's SDK) would keep it.

    Only called when some key was not already plain text, so the common call pays nothing.
    """
    texts: Dict[str, List[Any]] = {}
    for key in payload:
        texts.setdefault(spelt(key), []).append(key)
    for text, same in texts.items():
        if len(same) > 1:
            kind = prefix[len(PREFIX):-1]
            types = ", ".join(type(key).__name__ for key in same[:5])
            if len(same) > 5:
                types += f" and {len(same) - 5} more"
            shown = ascii(text if len(text) <= 60 else text[:57] + "...")
            # Types and the spelling only (never a repr): the same keys warn once, and
            # the first COLLISIONS_TOLD different ones do.
            warn_once(_logger, (
                f"Analytics {kind} have {len(same)} keys sent as {shown} ({types}): only the "
                "last one's value is kept. Give them distinct names."),
                family="collisions of keys", at_most=COLLISIONS_TOLD)


COLLISIONS_TOLD = 20
"""Different collisions of payload keys warned about per process, at most."""


def decode_payload(prefix: str, attributes: Mapping[str, Any]) -> Dict[str, Any]:
    """The payload that :func:`encode_payload` stored under ``prefix``."""
    get = attributes.get
    listed = get(JSON_KEYS)
    # A set, so that a relayed record listing thousands of keys costs no more than that;
    # entries that are not strings (or a value that is not a list) are not ours to fail on.
    json_keys = frozenset(key for key in listed if isinstance(key, str)) \
        if listed and isinstance(listed, (tuple, list)) else frozenset()
    payload: Dict[str, Any] = {}
    facts = get(FACTS) if prefix == PROPERTIES_PREFIX else None
    if isinstance(facts, str):
        payload.update(decode_object(facts))
    if json_keys:
        whole = get(prefix[:-1])
        if isinstance(whole, str) and prefix[:-1] in json_keys:
            payload.update(decode_object(whole))
    start = len(prefix)
    for name, value in attributes.items():
        if not name.startswith(prefix):
            continue
        if isinstance(value, tuple):
            value = list(value)
        elif json_keys and name in json_keys and isinstance(value, str):
            # Not ours to fail on (also too deep for the parser): keep the string.
            with contextlib.suppress(ValueError, RecursionError):
                value = json.loads(value)
        payload[name[start:]] = value
    return payload


SHORT_TEXT = 1024
"""Attribute texts up to this long are worth remembering: see :func:`once_per_short_text`."""

_T = TypeVar("_T")


def once_per_short_text(function: Callable[[str], _T]) -> Callable[[str], _T]:
    """``function`` with its results for the last 64 short texts remembered.

    ``SOURCE`` and ``FACTS`` repeat the same few short strings in every message of a
    process; a long text, only seen from a misbehaving sender to the relay, is not kept.
    Callers must not change what the remembered results hold.
    """
    remembered = functools.lru_cache(maxsize=64)(function)

    def call(text: str) -> _T:
        return remembered(text) if len(text) <= SHORT_TEXT else function(text)

    functools.update_wrapper(call, function)
    return call


def decode_object(text: str) -> Dict[str, Any]:
    """A JSON object attribute, or ``{}`` when it is not one (not ours to fail on);
    the caller gets its own top-level copy."""
    return dict(_decode(text))


@once_per_short_text
def _decode(text: str) -> Dict[str, Any]:
    try:
        decoded = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return decoded if isinstance(decoded, dict) else {}


def is_analytics(attributes: Optional[Mapping[str, Any]]) -> bool:
    """True when a span event's or log record's attributes are an analytics message."""
    return bool(attributes) and TYPE in attributes and MESSAGE_ID in attributes  # type: ignore[operator]
