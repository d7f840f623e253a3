"""``otel-zenml-analytics check``: parse the tracking configuration and resolve every target."""

from __future__ import annotations

import importlib
from typing import List, Tuple

from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics.instrumentation.targets import load_targets
from otel_zenml_analytics.settings import ConfigurationError, Settings


def check_configuration() -> Tuple[List[str], List[str]]:
    """Lines for each target that resolves, and every problem found."""
    targets, problems = load_targets()
    if not targets and not problems:
        problems.append(f"nothing to track: set {env.OTEL_ZENML_ANALYTICS_TRACKED} or "
                        f"{env.OTEL_ZENML_ANALYTICS_CONFIG}")
    try:
        if Settings.resolve().endpoint is None:
            problems.append(f"no destination: set {env.OTEL_ZENML_ANALYTICS_ENDPOINT}")
    except ConfigurationError as exc:
        problems.append(str(exc))
    resolved: List[str] = []
    for target in targets:
        try:
            obj = importlib.import_module(target.module)
        except Exception as exc:  # noqa: BLE001 - report any import failure
            problems.append(f"{target.spec}: cannot import {target.module!r}: "
                            f"{type(exc).__name__}: {exc}")
            continue
        try:
            for name in target.qualname.split("."):
                obj = getattr(obj, name)
        except AttributeError:
            problems.append(f"{target.spec}: module {target.module!r} has no attribute "
                            f"{target.qualname!r}")
            continue
        if not callable(obj):
            problems.append(f"{target.spec}: {target.qualname!r} is not callable")
            continue
        event = getattr(target.event, "value", target.event)
        resolved.append(f"ok  {target.spec} -> {event!r}")
    return resolved, problems
