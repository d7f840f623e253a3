"""JSON encoding that never raises, for property values of any type.

``AnalyticsEncoder`` is the seed's encoder (UUID -> str, enum -> value) extended so
that nothing a user passes as a property can make encoding fail: datetimes become
ISO-8601, bytes are decoded (or base64), sets and tuples become lists, NaN and the
infinities become the strings ``"NaN"``/``"Infinity"``/``"-Infinity"`` (JSON has no
spelling for them), and any other object becomes its ``str()``.

:func:`dumps`, which every message, batch and attribute goes through, tries ``orjson``
first: about ten times faster than the standard library's C encoder on a Segment
message, a fifth of the relay's CPU before. What it cannot write exactly as the
standard library would (NaN, which it writes as ``null``; keys that are not strings;
integers beyond 64 bits; cycles) takes the standard library's path.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import decimal
import enum
import json
import math
import re
import uuid
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from pathlib import PurePath
from typing import Any, Callable

import orjson


def _fallback(obj: Any) -> Any:
    if isinstance(obj, float):  # a subclass of float, which orjson does not write itself
        return float(obj)
    if isinstance(obj, (list, tuple)):  # a subclass of tuple (a named tuple): a list
        return list(obj)
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if isinstance(obj, _dt.timedelta):
        return obj.total_seconds()
    if isinstance(obj, decimal.Decimal):
        return str(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        raw = bytes(obj)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii")
    if isinstance(obj, (set, frozenset)):
        return sorted((_fallback_scalar(v) for v in obj), key=repr)
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    dump = getattr(obj, "model_dump", None)  # pydantic v2 models
    if callable(dump):
        try:
            return dump(mode="json")
        except Exception:  # noqa: BLE001 - any failure falls back to str()
            pass
    try:
        return str(obj)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break analytics
        return f"<unprintable {type(obj).__name__}>"


def _fallback_scalar(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return _fallback(value)


def _finite(value: Any) -> Any:
    """Replace NaN/inf floats, anywhere in a JSON-like value, by strings."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, dict):
        return {json_key(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_key(key: Any) -> str:
    """A dict key as ``json`` writes it (``True`` -> ``"true"``), extended to any type
    (an enum member by its value): how a property key is spelt, in an attribute's
    name or in JSON."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or key is None:
        return json.dumps(key)
    if isinstance(key, enum.Enum):
        return json_key(key.value)
    try:
        return str(key)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break analytics
        return f"<unprintable {type(key).__name__}>"


class AnalyticsEncoder(json.JSONEncoder):
    """Helper encoder class for JSON serialization."""

    def default(self, obj: Any) -> Any:
        """Handle UUID and ``AnalyticsEvent`` objects, and every other type sensibly.

        Args:
            obj: The object to encode.

        Returns:
            The encoded object.
        """
        return _fallback(obj)


def compact_encoder(allow_nan: bool = False) -> Callable[[Any], str]:
    """Compact JSON (``ensure_ascii=False``), as ``json.dumps`` writes it, faster.

    ``JSONEncoder.encode`` runs a few microseconds of Python around the C encoder on
    every call (a third of the cost of a message); here the C encoder is made and called
    directly, with a circular-reference table of its own per call as in ``json.dumps``
    (a cycle raises ``ValueError``, however high the recursion limit). NaN raises
    ``ValueError`` unless ``allow_nan``; a key of an odd type raises ``TypeError``;
    any other value :class:`AnalyticsEncoder` converts. Where the C encoder is missing
    (another Python implementation), ``JSONEncoder.encode``.
    """
    strict = AnalyticsEncoder(separators=(",", ":"), allow_nan=allow_nan, ensure_ascii=False)
    if c_make_encoder is None:
        return strict.encode
    default = strict.default

    def compact(value: Any) -> str:
        if isinstance(value, str):
            return encode_basestring(value)  # type: ignore[no-any-return]
        encode = c_make_encoder({}, default, encode_basestring, None, ":", ",",
                                False, False, allow_nan)
        return "".join(encode(value, 0))

    return compact


_compact = compact_encoder()
"""The first try of :func:`dumps`: what it refuses takes the careful path."""


def jsonable(value: Any) -> Any:
    """A copy of ``value`` made only of JSON types (never raises)."""
    try:
        return _finite(json.loads(json.dumps(value, cls=AnalyticsEncoder, allow_nan=True)))
    except (ValueError, TypeError, RecursionError):
        # Circular references or keys json cannot sort: keep what str() can say.
        return _fallback(value)


def dumps(value: Any) -> str:
    """Compact, strict JSON of ``value`` (never raises, NaN-safe).

    The common case is written by ``orjson``. Its output holding ``null`` (which may be
    where a NaN or an infinity was) or a value it refuses (a key that is not a string,
    an integer beyond 64 bits, a cycle, nesting deeper than 254) goes to the standard
    library's C encoder, and what that refuses takes the careful path.
    """
    try:
        encoded = orjson.dumps(value, default=_fallback)
    except TypeError:  # orjson.JSONEncodeError
        pass
    else:
        if b"null" not in encoded:
            return encoded.decode("utf-8")
    return _standard_dumps(value)


def _standard_dumps(value: Any) -> str:
    """:func:`dumps` by the standard library alone: what it returns when orjson cannot."""
    try:
        text = _compact(value)
    except (ValueError, TypeError, RecursionError):
        try:
            text = json.dumps(_finite(value), cls=AnalyticsEncoder, separators=(",", ":"),
                              allow_nan=False, ensure_ascii=False)
        except (ValueError, TypeError, RecursionError):
            text = json.dumps(jsonable(value), separators=(",", ":"), allow_nan=False,
                              ensure_ascii=False)
    return text if text.isascii() else _SURROGATE.sub(_escaped, text)


_SURROGATE = re.compile("[\ud800-\udfff]")
"""A surrogate code point: never valid UTF-8 on its own (a file name decoded with
``surrogateescape`` holds some), so JSON text must spell it as a ``\\u`` escape."""


def _escaped(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def utf8_safe(text: str) -> str:
    """``text`` as it can be encoded in UTF-8 (an OTLP string must be): surrogate pairs
    joined, lone surrogates replaced by U+FFFD as Segment's server does on receipt."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
