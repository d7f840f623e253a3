"""What to track: targets from ``OTEL_ZENML_ANALYTICS_TRACKED`` and the TOML config file.

Short form (environment variable), entries separated by ``;``::

    OTEL_ZENML_ANALYTICS_TRACKED="shop.orders:place=Order placed;\
    shop.stacks:Stack.register=REGISTERED_STACK"

Long form (``OTEL_ZENML_ANALYTICS_CONFIG=tracking.toml``)::

    [[targets]]
    target = "shop.stacks:Stack.register"   # module:qualified.name
    event = "REGISTERED_STACK"              # enum member name, enum value or custom string
    metadata = { source = "api" }           # static properties (optional)
    arguments = ["name", "flavor"]          # argument values sent as properties (optional)
    span = true                             # a span per call (optional, default true)

An event is resolved by ``AnalyticsEvent`` member name, then ``LegacyAnalyticsEvent``
member name, then by either enum's value; anything else is a custom event, unless
``OTEL_ZENML_ANALYTICS_STRICT_EVENTS=true``.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics.enums import AnalyticsEvent, LegacyAnalyticsEvent
from otel_zenml_analytics.settings import ConfigurationError, env_flag

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

Event = Union[AnalyticsEvent, LegacyAnalyticsEvent, str]

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_TOML_KEYS = frozenset({"target", "event", "metadata", "arguments", "span"})
SHORT_FORM = "MODULE:QUALNAME=EVENT, e.g. shop.orders:Order.place=Order placed"
EVENT_FORM = ("an AnalyticsEvent member name (e.g. RUN_PIPELINE), an event value "
              "(e.g. 'Pipeline run') or a custom event name")


@dataclass(frozen=True)
class Target:
    """One function to track: where it is and how to track it."""

    module: str
    qualname: str
    event: Event
    metadata: Mapping[str, Any] = field(default_factory=dict)
    arguments: Tuple[str, ...] = ()
    span: bool = True

    @property
    def spec(self) -> str:
        """``module:qualname``, as written in the configuration."""
        return f"{self.module}:{self.qualname}"

    @property
    def span_name(self) -> str:
        """``pkg.mod.Class.method``: the name of the span of each call."""
        return f"{self.module}.{self.qualname}"


def resolve_event(raw: str, strict: bool = False) -> Event:
    """An event from a member name, a value, or (not strict) a custom string."""
    name = raw.strip()
    for enum in (AnalyticsEvent, LegacyAnalyticsEvent):
        if name in enum.__members__:
            return enum[name]  # type: ignore[no-any-return]
    for enum in (AnalyticsEvent, LegacyAnalyticsEvent):
        try:
            return enum(name)  # type: ignore[no-any-return]
        except ValueError:
            pass
    if not name:
        raise ValueError(f"the event is empty: expected {EVENT_FORM}")
    if strict:
        raise ValueError(
            f"event {name!r} is not an AnalyticsEvent or LegacyAnalyticsEvent member name or "
            f"value ({env.OTEL_ZENML_ANALYTICS_STRICT_EVENTS}=true)"
        )
    return name


def _split_target(text: str, label: str = "") -> Tuple[str, str]:
    module, sep, qualname = text.strip().partition(":")
    if not sep or not _DOTTED.match(module) or not _DOTTED.match(qualname):
        raise ValueError(f"{label}{text.strip()!r} is not MODULE:QUALNAME: expected e.g. "
                         "shop.orders:Order.place")
    return module, qualname


def parse_tracked(value: str, strict: bool = False) -> Tuple[List[Target], List[str]]:
    """Targets of the short form, and one problem per malformed entry."""
    targets: List[Target] = []
    problems: List[str] = []
    entries = [e for e in value.split(";") if e.strip()]
    for number, entry in enumerate(entries, start=1):
        where = f"{env.OTEL_ZENML_ANALYTICS_TRACKED} entry {number} {entry.strip()!r}"
        target_text, sep, event_text = entry.partition("=")
        if not sep:
            problems.append(f"{where}: missing '=EVENT'; expected {SHORT_FORM}")
            continue
        try:
            module, qualname = _split_target(target_text)
            targets.append(Target(module, qualname, resolve_event(event_text, strict)))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    return targets, problems


def parse_config_file(path: str, strict: bool = False) -> Tuple[List[Target], List[str]]:
    """Targets of the TOML long form, and one problem per malformed table or value."""
    where_file = f"{env.OTEL_ZENML_ANALYTICS_CONFIG}={path}"
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        return [], [f"{where_file}: cannot read the file: {exc.strerror or exc}; expected the "
                    "path of a TOML file with [[targets]] tables"]
    except tomllib.TOMLDecodeError as exc:
        return [], [f"{where_file}: not valid TOML: {exc}; expected [[targets]] tables"]
    tables = data.get("targets")
    unknown_top = sorted(set(data) - {"targets"})
    problems = [f"{where_file}: unknown top-level key {k!r} (expected [[targets]] tables)"
                for k in unknown_top]
    if tables is None:
        return [], problems + [f"{where_file}: no [[targets]] tables"]
    if not isinstance(tables, list):
        return [], problems + [f"{where_file}: 'targets' must be an array of tables ([[targets]])"]
    targets: List[Target] = []
    for number, table in enumerate(tables, start=1):
        try:
            targets.append(_target_from_table(table, strict))
        except ValueError as exc:
            label = table.get("target") if isinstance(table, dict) else None
            problems.append(f"{where_file}: [[targets]] number {number}"
                            f"{f' ({label!r})' if label else ''}: {exc}")
    return targets, problems


def _target_from_table(table: Any, strict: bool) -> Target:
    if not isinstance(table, dict):
        raise ValueError("must be a table")
    unknown = sorted(set(table) - _TOML_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"expected {', '.join(sorted(_TOML_KEYS))}")
    for key, form in (("target", "MODULE:QUALNAME"), ("event", EVENT_FORM)):
        if not isinstance(table.get(key), str):
            raise ValueError(f"'{key}' is required and must be a string: expected {form}")
    module, qualname = _split_target(table["target"], "'target' = ")
    metadata = table.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("'metadata' must be a table: expected e.g. "
                         "metadata = { source = \"api\" }")
    arguments = table.get("arguments", [])
    if not isinstance(arguments, list) or not all(
            isinstance(a, str) and a.isidentifier() for a in arguments):
        raise ValueError("'arguments' must be a list of argument names: expected e.g. "
                         "arguments = [\"name\", \"flavor\"]")
    span = table.get("span", True)
    if not isinstance(span, bool):
        raise ValueError("'span' must be true or false: expected span = true or span = false")
    try:
        event = resolve_event(table["event"], strict)
    except ValueError as exc:
        raise ValueError(f"'event' = {table['event']!r}: {exc}") from None
    return Target(module, qualname, event, dict(metadata), tuple(arguments), span)


def load_targets(environ: Optional[Mapping[str, str]] = None) -> Tuple[List[Target], List[str]]:
    """All configured targets (env var, then config file) and every problem found."""
    environ = os.environ if environ is None else environ
    problems: List[str] = []
    try:
        strict = bool(env_flag(env.OTEL_ZENML_ANALYTICS_STRICT_EVENTS, environ))
    except ConfigurationError as exc:
        problems.append(str(exc))
        strict = False
    targets: List[Target] = []
    tracked = environ.get(env.OTEL_ZENML_ANALYTICS_TRACKED, "")
    if tracked.strip():
        found, issues = parse_tracked(tracked, strict)
        targets += found
        problems += issues
    path = environ.get(env.OTEL_ZENML_ANALYTICS_CONFIG, "").strip()
    if path:
        found, issues = parse_config_file(path, strict)
        targets += found
        problems += issues
    seen: Dict[str, Target] = {}
    for target in targets:
        if target.spec in seen:
            problems.append(f"target {target.spec!r} is configured twice")
        seen[target.spec] = target
    return list(seen.values()), problems
