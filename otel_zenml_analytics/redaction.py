"""Redaction of property and trait keys before anything leaves the process.

``OTEL_ZENML_ANALYTICS_REDACT`` lists keys, comma-separated: a name or an ``fnmatch``
pattern removes the matching keys, ``hash:`` before it replaces their values by
``sha256:<hex of the JSON value>`` (so they can still be counted and joined)::

    OTEL_ZENML_ANALYTICS_REDACT="email,*password*,hash:user_name"

In-process it applies when the client builds a message, so neither the span event
nor the log record (nor an OTLP exporter beside the analytics components) ever
carries the value; the relay applies it again to what it receives. Hashing is
idempotent: an already hashed value is left alone.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import re
from typing import Any, Dict, List, Mapping, Optional, Pattern, Tuple

from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics.encoding import dumps, json_key
from otel_zenml_analytics.settings import ConfigurationError

HASH_PREFIX = "sha256:"
_HASHED = re.compile(r"^sha256:[0-9a-f]{64}$")


class Redactor:
    """Removes or hashes the payload keys that match its rules."""

    def __init__(self, spec: str = "") -> None:
        remove: List[str] = []
        hashed: List[str] = []
        for raw in spec.split(","):
            entry = raw.strip()
            if not entry:
                continue
            target = hashed if entry.startswith("hash:") else remove
            pattern = entry[len("hash:"):].strip() if entry.startswith("hash:") else entry
            if not pattern:
                raise ConfigurationError(
                    f"{env.OTEL_ZENML_ANALYTICS_REDACT} entry {entry!r} names no key: expected "
                    "KEY, a pattern like *token*, or hash:KEY")
            target.append(fnmatch.translate(pattern))
        self._remove: Optional[Pattern[str]] = re.compile("|".join(remove)) if remove else None
        self._hash: Optional[Pattern[str]] = re.compile("|".join(hashed)) if hashed else None

    def __bool__(self) -> bool:
        return self._remove is not None or self._hash is not None

    def payload(self, payload: Mapping[str, Any]) -> Dict[str, Any]:
        """A copy of ``payload`` with matching keys removed or hashed."""
        out: Dict[str, Any] = {}
        for key, value in payload.items():
            name = json_key(key)  # as it is sent: None as "null", an enum by its value
            if self._remove is not None and self._remove.match(name):
                continue
            if self._hash is not None and self._hash.match(name):
                value = hash_value(value)
            out[key] = value
        return out

    def message(self, message: Dict[str, Any]) -> Dict[str, Any]:
        """The message with its properties and traits redacted (a copy when changed)."""
        if not self:
            return message
        changed = {field: self.payload(message[field]) for field in ("properties", "traits")
                   if isinstance(message.get(field), dict)}
        return {**message, **changed} if changed else message


def hash_value(value: Any) -> str:
    """``sha256:`` and the hex digest of the value's JSON; hashed values stay as they are."""
    if isinstance(value, str) and _HASHED.match(value):
        return value
    return HASH_PREFIX + hashlib.sha256(dumps(value).encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=4)
def _parse(spec: str) -> Redactor:
    return Redactor(spec)


def from_environment(environ: Optional[Mapping[str, str]] = None) -> Redactor:
    """The redactor ``OTEL_ZENML_ANALYTICS_REDACT`` describes (parsed once per value)."""
    raw = env.get(env.OTEL_ZENML_ANALYTICS_REDACT) if environ is None else environ.get(
        env.OTEL_ZENML_ANALYTICS_REDACT)
    return _parse(raw or "")


__all__: Tuple[str, ...] = ("Redactor", "from_environment", "hash_value")
