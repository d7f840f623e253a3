"""Delivery settings: constructor arguments over environment variables, resolved once.

Every component (span processor, log exporter, relay) builds one immutable
:class:`Settings`; malformed values fail here with a message that names the
setting and the expected form, never later on a background thread.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, TypeVar, Union
from urllib.parse import urlsplit

from otel_zenml_analytics import environment_variables as env

_logger = logging.getLogger(__name__)

FORMATS = ("segment", "zenml")
BATCH_SIZE = 512
"""Messages per request to the analytics server at most (and at most 475,000 bytes): the
OTel SDK's export batch (``max_export_batch_size``), where Segment's and ZenML's SDKs send
100. Fewer, larger requests are what lets the delivery keep up with a burst: 100,000
calls in a tight loop lost 28,000 to 46,000 events with batches of 100 and 750 to 10,000
with 512 (three runs each, alternating). For the relay, one OTLP request from an SDK is
one request to the server."""
_TRUE = frozenset({"1", "true", "yes", "on", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "n", ""})

T = TypeVar("T")


class ConfigurationError(ValueError):
    """A setting has a value the package cannot use; the message names it."""


def is_true(raw: Optional[str]) -> bool:
    """Whether a flag's raw value is one of the words :func:`parse_bool` reads as true
    (for flags read on every call, where a malformed value was named at start-up)."""
    return raw is not None and raw.strip().lower() in _TRUE


def parse_bool(name: str, raw: str) -> bool:
    """Read a boolean setting, naming it when the value is not one."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean: expected true or false")


def _parse_number(name: str, raw: str, kind: Callable[[str], T], minimum: float) -> T:
    what = "an integer" if kind is int else "a number"
    expected = f"expected {what} of at least {minimum:g}"
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not {what}: {expected}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigurationError(f"{name}={raw!r} is not a finite number: {expected}")
    if value < minimum:  # type: ignore[operator]
        raise ConfigurationError(f"{name}={raw!r} must be at least {minimum:g}: {expected}")
    return value


def _check_endpoint(name: str, value: str) -> None:
    """A base URL with a scheme and a host; never echoes credentials written into it."""
    shown = redact_url(value)
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigurationError(f"{name}={shown!r} has a malformed port: expected "
                                 "http(s)://HOST[:PORT][/PATH]") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{name}={shown!r} is not a URL: expected "
                                 "http(s)://HOST[:PORT][/PATH]")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{name}={shown!r} has a query or fragment: expected "
                                 "http(s)://HOST[:PORT][/PATH]")


def redact_url(url: str) -> str:
    """``url`` with whatever may hold a secret masked, for messages and reprs: everything
    up to the last ``@`` before the query (a ``user:password@``, also in a URL missing
    its ``//``) becomes ``***@``, a query ``?***`` and a fragment ``#***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    rest, fragment, _ = rest.partition("#")
    rest, query, _ = rest.partition("?")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}{'?***' if query else ''}{'#***' if fragment else ''}"


_TOKEN_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


def check_secret(name: str, value: str, allow_colon: bool = True) -> None:
    """A credential sent in an HTTP header: visible ASCII without spaces (the value
    itself is never part of the message)."""
    bad = [c for c in value if c not in _TOKEN_CHARS or (c == ":" and not allow_colon)]
    if bad:
        extra = "" if allow_colon else " and no ':'"
        raise ConfigurationError(
            f"{name} contains {len(bad)} character(s) that cannot be sent in an HTTP header: "
            f"expected visible ASCII characters without spaces{extra} (value not shown)")


Verify = Union[bool, str]
"""TLS verification as ``requests`` takes it: True, False, or the path of a CA bundle."""

_warned: set[str] = set()
_warned_of: Dict[str, int] = {}
"""How many different messages of each ``family`` were warned about."""
_warned_lock = threading.Lock()


def warn_once(logger: logging.Logger, message: str, family: Optional[str] = None,
              at_most: int = 0) -> None:
    """Log ``message`` as a warning once per process: a setting or input read on every
    call must not repeat its complaint on every call. Messages that vary with the input
    name a ``family`` and warn about ``at_most`` different messages of it, the last one
    saying that further ones are not reported."""
    with _warned_lock:
        if message in _warned:
            return
        if family is not None:
            told = _warned_of.get(family, 0)
            if told >= at_most:
                return
            _warned_of[family] = told + 1
            if told + 1 == at_most:
                message += f" (Further {family} are not reported.)"
        _warned.add(message)
    logger.warning(message)


def _warn_insecure(endpoint: Optional[str]) -> None:
    """Once per destination host and process: certificates are not being checked."""
    if endpoint is None or not endpoint.startswith("https://"):
        return
    host = urlsplit(endpoint).hostname or "?"
    warn_once(_logger, (
        f"TLS certificate verification is OFF for the analytics destination {host} "
        f"({env.OTEL_ZENML_ANALYTICS_INSECURE}=true): anyone on the network path can read "
        f"and alter what is sent. Prefer {env.OTEL_ZENML_ANALYTICS_CA_BUNDLE}=PATH to trust "
        "a private CA."))


@dataclass(frozen=True)
class Settings:
    """Where and how analytics messages are delivered."""

    endpoint: Optional[str] = None
    format: str = "segment"
    write_key: Optional[str] = field(default=None, repr=False)
    gzip: bool = False
    timeout: float = 15.0
    max_queue_size: int = 10_000
    batch_size: int = BATCH_SIZE
    flush_interval: float = 0.5
    max_retries: int = 6
    spool: Optional[str] = None
    spool_max_bytes: int = 100 * 1024 * 1024
    spool_max_age: float = 7 * 24 * 3600.0
    verify: Verify = True
    """TLS verification of the destination: True (default), a CA bundle path, or False."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigurationError(
                f"format {self.format!r} is not supported: expected one of {', '.join(FORMATS)}"
            )
        if self.endpoint is not None:
            _check_endpoint("endpoint", self.endpoint)
        if self.write_key is not None:
            check_secret("write_key", self.write_key, allow_colon=False)

    def __repr__(self) -> str:
        key = "set" if self.write_key else "unset"
        endpoint = None if self.endpoint is None else redact_url(self.endpoint)
        return (
            f"Settings(endpoint={endpoint!r}, format={self.format!r}, write_key=<{key}>, "
            f"gzip={self.gzip}, timeout={self.timeout}, spool={self.spool!r}, "
            f"verify={self.verify!r})"
        )

    @property
    def destination_key(self) -> tuple[object, ...]:
        """What identifies one destination: components sharing it share one delivery."""
        return (self.endpoint, self.format, self.write_key)

    @classmethod
    def resolve(
        cls,
        endpoint: Optional[str] = None,
        format: Optional[str] = None,
        write_key: Optional[str] = None,
        gzip: Optional[bool] = None,
        timeout: Optional[float] = None,
        max_queue_size: Optional[int] = None,
        batch_size: Optional[int] = None,
        flush_interval: Optional[float] = None,
        max_retries: Optional[int] = None,
        spool: Optional[str] = None,
        spool_max_bytes: Optional[int] = None,
        spool_max_age: Optional[float] = None,
        verify: Optional[Verify] = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> Settings:
        """Build settings from arguments, falling back to environment variables.

        Every other variable of :mod:`.environment_variables` (consent, redaction, relay
        token, ...) is checked here too, so that whatever starts (a component, the relay,
        the CLI) fails at once with a message naming the variable.
        """
        environ = os.environ if environ is None else environ
        problems = check_environment(environ)
        if problems:
            raise ConfigurationError("; ".join(problems))

        def pick(arg: Optional[T], name: str, parse: Callable[[str, str], T], default: T) -> T:
            if arg is not None:
                return arg
            raw = environ.get(name)
            if raw is None or raw.strip() == "":
                return default
            return parse(name, raw)

        def text(name: str, raw: str) -> str:
            return raw.strip()

        def fmt(name: str, raw: str) -> str:
            value = raw.strip().lower()
            if value not in FORMATS:
                raise ConfigurationError(
                    f"{name}={raw!r} is not a known format: expected one of {', '.join(FORMATS)}"
                )
            return value

        def integer(minimum: int) -> Callable[[str, str], int]:
            return lambda name, raw: _parse_number(name, raw, int, minimum)

        def number(minimum: float) -> Callable[[str, str], float]:
            return lambda name, raw: _parse_number(name, raw, float, minimum)

        def secret(name: str, raw: str) -> str:
            value = raw.strip()
            check_secret(name, value, allow_colon=False)
            return value

        resolved_endpoint = pick(endpoint, env.OTEL_ZENML_ANALYTICS_ENDPOINT, text, "") or None
        if resolved_endpoint is not None:
            resolved_endpoint = resolved_endpoint.rstrip("/")
            _check_endpoint(env.OTEL_ZENML_ANALYTICS_ENDPOINT, resolved_endpoint)
        resolved_verify = verify if verify is not None else tls_verify(environ)
        if resolved_verify is False:
            _warn_insecure(resolved_endpoint)
        return cls(
            endpoint=resolved_endpoint,
            format=pick(format, env.OTEL_ZENML_ANALYTICS_FORMAT, fmt, "segment"),
            write_key=pick(write_key, env.OTEL_ZENML_ANALYTICS_WRITE_KEY, secret, "") or None,
            gzip=pick(gzip, env.OTEL_ZENML_ANALYTICS_GZIP, parse_bool, False),
            timeout=pick(timeout, env.OTEL_ZENML_ANALYTICS_TIMEOUT, number(0.001), 15.0),
            max_queue_size=pick(
                max_queue_size, env.OTEL_ZENML_ANALYTICS_MAX_QUEUE_SIZE, integer(1), 10_000
            ),
            batch_size=pick(
                batch_size, env.OTEL_ZENML_ANALYTICS_BATCH_SIZE, integer(1), BATCH_SIZE
            ),
            flush_interval=pick(
                flush_interval, env.OTEL_ZENML_ANALYTICS_FLUSH_INTERVAL, number(0.0), 0.5
            ),
            max_retries=pick(max_retries, env.OTEL_ZENML_ANALYTICS_MAX_RETRIES, integer(0), 6),
            spool=pick(spool, env.OTEL_ZENML_ANALYTICS_SPOOL, text, "") or None,
            spool_max_bytes=pick(spool_max_bytes, env.OTEL_ZENML_ANALYTICS_SPOOL_MAX_BYTES,
                                 integer(1024), 100 * 1024 * 1024),
            spool_max_age=pick(spool_max_age, env.OTEL_ZENML_ANALYTICS_SPOOL_MAX_AGE, number(1.0),
                               7 * 24 * 3600.0),
            verify=resolved_verify,
        )


def tls_verify(environ: Optional[Mapping[str, str]] = None) -> Verify:
    """``OTEL_ZENML_ANALYTICS_INSECURE`` / ``..._CA_BUNDLE`` as ``requests``' ``verify=``."""
    environ = os.environ if environ is None else environ
    insecure = env_flag(env.OTEL_ZENML_ANALYTICS_INSECURE, environ)
    bundle = (environ.get(env.OTEL_ZENML_ANALYTICS_CA_BUNDLE) or "").strip()
    if insecure and bundle:
        raise ConfigurationError(
            f"{env.OTEL_ZENML_ANALYTICS_INSECURE}=true and {env.OTEL_ZENML_ANALYTICS_CA_BUNDLE} "
            "are both set: expected one of them (a CA bundle keeps verification on)")
    if insecure:
        return False
    if bundle:
        _check_ca_bundle(env.OTEL_ZENML_ANALYTICS_CA_BUNDLE, bundle)
        return bundle
    return True


def _check_ca_bundle(name: str, raw: str) -> None:
    if not os.path.isfile(raw):
        raise ConfigurationError(
            f"{name}={raw!r} is not a file: expected the path of a PEM file of CA certificates")


def _check_bool(name: str, raw: str) -> None:
    parse_bool(name, raw)


def _check_directory(name: str, raw: str) -> None:
    if os.path.exists(raw) and not os.path.isdir(raw):
        raise ConfigurationError(
            f"{name}={raw!r} is not a directory: expected the path of a folder (created when "
            "missing)")


def _check_spool_path(name: str, raw: str) -> None:
    if os.path.isdir(raw):
        raise ConfigurationError(
            f"{name}={raw!r} is a directory: expected the path of an SQLite file (created "
            "when missing)")


def _check_redact(name: str, raw: str) -> None:
    from otel_zenml_analytics.redaction import Redactor

    Redactor(raw)


SPAN_ENDS = ("background", "caller")
"""Where the span of a tracked call may end (``OTEL_ZENML_ANALYTICS_SPAN_END``)."""


def parse_span_end(name: str, raw: str) -> str:
    """``background`` or ``caller``, naming the setting when it is neither."""
    value = raw.strip().lower() if isinstance(raw, str) else raw
    if value not in SPAN_ENDS:
        raise ConfigurationError(f"{name}={raw!r} is not where a span can end: expected "
                                 "background or caller")
    return value


def _check_span_end(name: str, raw: str) -> None:
    parse_span_end(name, raw)


def _check_nothing(name: str, raw: str) -> None:
    """Checked elsewhere: see :data:`CHECKED_ELSEWHERE`."""


CHECKED_ELSEWHERE: Dict[str, str] = {
    env.OTEL_ZENML_ANALYTICS_TRACKED: "instrumentation.targets.load_targets",
    env.OTEL_ZENML_ANALYTICS_CONFIG: "instrumentation.targets.load_targets",
}
"""Variables of the instrumentation: a mistake there disables the instrumentation (with an
error naming the entry) but not the analytics components of the seed API."""

Check = Callable[[str, str], None]

ENVIRONMENT_CHECKS: Dict[str, Check] = {
    env.OTEL_ZENML_ANALYTICS_STRICT_EVENTS: _check_bool,
    env.OTEL_ZENML_ANALYTICS_CONFIG_DIR: _check_directory,
    env.ZENML_ANALYTICS_OPT_IN: _check_bool,
    env.ZENML_SERVER: _check_bool,
    env.ZENML_DEBUG: _check_bool,
    env.OTEL_ZENML_ANALYTICS_SPOOL: _check_spool_path,
    env.OTEL_ZENML_ANALYTICS_RELAY_TOKEN: check_secret,
    env.OTEL_ZENML_ANALYTICS_REDACT: _check_redact,
    env.OTEL_ZENML_ANALYTICS_TRACKED: _check_nothing,
    env.OTEL_ZENML_ANALYTICS_CONFIG: _check_nothing,
    env.OTEL_ZENML_ANALYTICS_SPAN_END: _check_span_end,
}
"""How :func:`check_environment` validates the variables that are not fields of
:class:`Settings` (those are parsed by :meth:`Settings.resolve` itself)."""


def check_environment(environ: Optional[Mapping[str, str]] = None) -> List[str]:
    """One problem per malformed variable of :data:`ENVIRONMENT_CHECKS` (unset and empty
    values are fine)."""
    environ = os.environ if environ is None else environ
    problems: List[str] = []
    for name, check in ENVIRONMENT_CHECKS.items():
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            check(name, raw.strip())
        except ConfigurationError as exc:
            problems.append(str(exc))
    return problems


def env_flag(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[bool]:
    """A boolean environment variable, or None when unset; malformed values raise."""
    raw = env.get(name) if environ is None else environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    return parse_bool(name, raw)
