"""Delivery settings: constructor arguments over environment variables, resolved once.

Every component (span processor, log exporter, relay) builds one immutable
:class:`Settings`; malformed values fail here with a message that names the
setting and the expected form, never later on a background thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, TypeVar

from otel_zenml_analytics import environment_variables as env

FORMATS = ("segment", "zenml")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})

T = TypeVar("T")


class ConfigurationError(ValueError):
    """A setting has a value the package cannot use; the message names it."""


def parse_bool(name: str, raw: str) -> bool:
    """Read a boolean setting, naming it when the value is not one."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean: expected true or false")


def _parse_number(name: str, raw: str, kind: Callable[[str], T], minimum: float) -> T:
    try:
        value = kind(raw.strip())
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise ConfigurationError(f"{name}={raw!r} is not {expected}") from None
    if value < minimum:  # type: ignore[operator]
        raise ConfigurationError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


@dataclass(frozen=True)
class Settings:
    """Where and how analytics messages are delivered."""

    endpoint: Optional[str] = None
    format: str = "segment"
    write_key: Optional[str] = field(default=None, repr=False)
    gzip: bool = False
    timeout: float = 15.0
    max_queue_size: int = 10_000
    batch_size: int = 100
    flush_interval: float = 0.5
    max_retries: int = 6
    spool: Optional[str] = None
    spool_max_bytes: int = 100 * 1024 * 1024
    spool_max_age: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigurationError(
                f"format {self.format!r} is not supported: expected one of {', '.join(FORMATS)}"
            )
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"endpoint {self.endpoint!r} is not a URL: expected http://HOST[:PORT][/PATH]"
            )

    def __repr__(self) -> str:
        key = "set" if self.write_key else "unset"
        return (
            f"Settings(endpoint={self.endpoint!r}, format={self.format!r}, write_key=<{key}>, "
            f"gzip={self.gzip}, timeout={self.timeout}, spool={self.spool!r})"
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
        environ: Optional[Mapping[str, str]] = None,
    ) -> Settings:
        """Build settings from arguments, falling back to environment variables."""
        environ = os.environ if environ is None else environ

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

        resolved_endpoint = pick(endpoint, env.OTEL_ZENML_ANALYTICS_ENDPOINT, text, "") or None
        if resolved_endpoint is not None:
            resolved_endpoint = resolved_endpoint.rstrip("/")
            if not resolved_endpoint.startswith(("http://", "https://")):
                raise ConfigurationError(
                    f"{env.OTEL_ZENML_ANALYTICS_ENDPOINT}={resolved_endpoint!r} is not a URL: "
                    "expected http://HOST[:PORT][/PATH]"
                )
        return cls(
            endpoint=resolved_endpoint,
            format=pick(format, env.OTEL_ZENML_ANALYTICS_FORMAT, fmt, "segment"),
            write_key=pick(write_key, env.OTEL_ZENML_ANALYTICS_WRITE_KEY, text, "") or None,
            gzip=pick(gzip, env.OTEL_ZENML_ANALYTICS_GZIP, parse_bool, False),
            timeout=pick(timeout, env.OTEL_ZENML_ANALYTICS_TIMEOUT, number(0.001), 15.0),
            max_queue_size=pick(
                max_queue_size, env.OTEL_ZENML_ANALYTICS_MAX_QUEUE_SIZE, integer(1), 10_000
            ),
            batch_size=pick(batch_size, env.OTEL_ZENML_ANALYTICS_BATCH_SIZE, integer(1), 100),
            flush_interval=pick(
                flush_interval, env.OTEL_ZENML_ANALYTICS_FLUSH_INTERVAL, number(0.0), 0.5
            ),
            max_retries=pick(max_retries, env.OTEL_ZENML_ANALYTICS_MAX_RETRIES, integer(0), 6),
            spool=pick(spool, env.OTEL_ZENML_ANALYTICS_SPOOL, text, "") or None,
            spool_max_bytes=pick(spool_max_bytes, env.OTEL_ZENML_ANALYTICS_SPOOL_MAX_BYTES,
                                 integer(1024), 100 * 1024 * 1024),
            spool_max_age=pick(spool_max_age, env.OTEL_ZENML_ANALYTICS_SPOOL_MAX_AGE, number(1.0),
                               7 * 24 * 3600.0),
        )


def env_flag(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[bool]:
    """A boolean environment variable, or None when unset; malformed values raise."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or raw.strip() == "":
        return None
    return parse_bool(name, raw)
