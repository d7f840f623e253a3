"""Every environment variable the package reads, one documented constant each (the
upper-case names of this module are exactly those variables), and
:func:`get`, the reader the per-call paths use."""

import os
import sys
from typing import Dict, Optional

OTEL_ZENML_ANALYTICS_ENDPOINT = "OTEL_ZENML_ANALYTICS_ENDPOINT"
"""Base URL of the analytics server (``/v1/batch`` or ``/batch`` is appended)."""

OTEL_ZENML_ANALYTICS_FORMAT = "OTEL_ZENML_ANALYTICS_FORMAT"
"""Wire format: ``segment`` (default) or ``zenml``."""

OTEL_ZENML_ANALYTICS_WRITE_KEY = "OTEL_ZENML_ANALYTICS_WRITE_KEY"
"""Segment write key, sent as the Basic-auth user name (segment format only)."""

OTEL_ZENML_ANALYTICS_GZIP = "OTEL_ZENML_ANALYTICS_GZIP"
"""``true`` to gzip request bodies."""

OTEL_ZENML_ANALYTICS_TIMEOUT = "OTEL_ZENML_ANALYTICS_TIMEOUT"
"""HTTP timeout in seconds for one request (default 15)."""

OTEL_ZENML_ANALYTICS_MAX_QUEUE_SIZE = "OTEL_ZENML_ANALYTICS_MAX_QUEUE_SIZE"
"""Messages waiting for delivery at most (default 10000); overflow is dropped and counted."""

OTEL_ZENML_ANALYTICS_BATCH_SIZE = "OTEL_ZENML_ANALYTICS_BATCH_SIZE"
"""Messages per request at most (default 512, ``settings.BATCH_SIZE``; and 475,000 bytes)."""

OTEL_ZENML_ANALYTICS_FLUSH_INTERVAL = "OTEL_ZENML_ANALYTICS_FLUSH_INTERVAL"
"""Seconds a batch may wait to fill before it is sent (default 0.5)."""

OTEL_ZENML_ANALYTICS_MAX_RETRIES = "OTEL_ZENML_ANALYTICS_MAX_RETRIES"
"""Retries of one batch after the first attempt (default 6)."""

OTEL_ZENML_ANALYTICS_STRICT_EVENTS = "OTEL_ZENML_ANALYTICS_STRICT_EVENTS"
"""``true`` to accept only ``AnalyticsEvent``/``LegacyAnalyticsEvent`` members in ``track``."""

OTEL_ZENML_ANALYTICS_CONFIG_DIR = "OTEL_ZENML_ANALYTICS_CONFIG_DIR"
"""Folder of the consent file (default: the user's config directory)."""

ZENML_ANALYTICS_OPT_IN = "ZENML_ANALYTICS_OPT_IN"
"""Overrides the stored consent: ``true`` or ``false``."""

ZENML_SERVER = "ZENML_SERVER"
"""Truthy when the code runs inside a ZenML server (``AnalyticsContext.in_server``)."""

ZENML_DEBUG = "ZENML_DEBUG"
"""Truthy to mark messages as debug (``"debug": true`` in the zenml wire format)."""

OTEL_ZENML_ANALYTICS_TRACKED = "OTEL_ZENML_ANALYTICS_TRACKED"
"""Functions to track without code changes: ``pkg.mod:func=EVENT;pkg.mod:Cls.method=EVENT``."""

OTEL_ZENML_ANALYTICS_CONFIG = "OTEL_ZENML_ANALYTICS_CONFIG"
"""Path of a TOML file with ``[[targets]]`` tables (the long form of the tracked functions)."""

OTEL_ZENML_ANALYTICS_SPAN_END = "OTEL_ZENML_ANALYTICS_SPAN_END"
"""Where the span of a tracked call ends: ``background`` (the default: on the analytics
thread, which adds its event first) or ``caller`` (on the caller's thread, as it returns)."""

OTEL_ZENML_ANALYTICS_SPOOL = "OTEL_ZENML_ANALYTICS_SPOOL"
"""Path of an SQLite spool: undelivered messages wait there, across restarts."""

OTEL_ZENML_ANALYTICS_SPOOL_MAX_BYTES = "OTEL_ZENML_ANALYTICS_SPOOL_MAX_BYTES"
"""Bytes the spool may hold (default 100 MiB); the oldest messages are evicted beyond."""

OTEL_ZENML_ANALYTICS_SPOOL_MAX_AGE = "OTEL_ZENML_ANALYTICS_SPOOL_MAX_AGE"
"""Seconds a message may wait in the spool (default 7 days); older ones are evicted."""

OTEL_ZENML_ANALYTICS_RELAY_TOKEN = "OTEL_ZENML_ANALYTICS_RELAY_TOKEN"
"""Bearer token the relay requires from OTLP senders (unset: no authentication)."""

OTEL_ZENML_ANALYTICS_REDACT = "OTEL_ZENML_ANALYTICS_REDACT"
"""Property/trait keys to remove (``KEY``, ``*pattern*``) or hash (``hash:KEY``) before sending."""

OTEL_ZENML_ANALYTICS_INSECURE = "OTEL_ZENML_ANALYTICS_INSECURE"
"""``true`` to turn TLS certificate verification of the destination off (logged as a warning)."""

OTEL_ZENML_ANALYTICS_CA_BUNDLE = "OTEL_ZENML_ANALYTICS_CA_BUNDLE"
"""Path of a PEM file of CA certificates to verify the destination with (a private CA)."""


_posix = os.name == "posix"
_fs_encoding = sys.getfilesystemencoding()
_encoded_names: Dict[str, bytes] = {}


def get(name: str) -> Optional[str]:
    """``os.environ.get(name)``, at a tenth of its cost for the variables every call reads.

    ``os.environ.get`` of an unset variable costs over a microsecond (it goes through a
    ``KeyError``), and an analytics call reads five of them, most of them unset. On
    POSIX ``os.environ`` keeps its values in a dict of bytes, which it updates on every
    change: that dict is read directly, decoded as ``os.environ`` decodes. Elsewhere,
    or if ``os.environ`` was replaced by a plain mapping, this is ``os.environ.get``.
    """
    environ = os.environ
    data = getattr(environ, "_data", None)
    if not _posix or type(data) is not dict:
        return environ.get(name)
    key = _encoded_names.get(name)
    if key is None:
        key = _encoded_names[name] = name.encode(_fs_encoding, "surrogateescape")
    raw = data.get(key)
    return None if raw is None else raw.decode(_fs_encoding, "surrogateescape")
