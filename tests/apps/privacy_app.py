"""Every kind of analytics call, then flush and exit (run by tests/test_privacy.py).

    python tests/apps/privacy_app.py plain      # the calls as they are
    python tests/apps/privacy_app.py disabler   # the calls inside `with analytics_disabler():`

The destination and the consent come from the environment. Prints one JSON line: how
many calls reported the message as recorded.
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import List

from otel_zenml_analytics import alias, group, identify, track
from otel_zenml_analytics.context import AnalyticsContext
from otel_zenml_analytics.enums import AnalyticsEvent
from otel_zenml_analytics.sdk import configure_sdk
from otel_zenml_analytics.utils import (
    analytics_disabler,
    email_opt_int,
    track_decorator,
    track_handler,
)


@track_decorator(AnalyticsEvent.CREATED_TAG)
def create_tag() -> str:
    return "tag"


def calls(tracer: object) -> List[bool]:
    results = []
    with tracer.start_as_current_span("work"):  # type: ignore[attr-defined]
        results.append(track(AnalyticsEvent.RUN_PIPELINE, {"pipeline": "training"}))
    results.append(track("Custom event", {"n": 1}))
    results.append(identify({"role": "tester"}))
    results.append(group(uuid.uuid4(), {"size": 3}))
    results.append(alias(uuid.uuid4(), uuid.uuid4()))
    with AnalyticsContext() as context:
        results.append(context.track(AnalyticsEvent.CREATED_FLAVOR, {"flavor": "x"}))
    with track_handler(AnalyticsEvent.CREATED_SECRET, {"kind": "env"}):
        pass
    create_tag()
    email_opt_int(True, "someone@example.com", "privacy test")
    return results


def main(mode: str) -> int:
    sdk = configure_sdk()
    tracer = sdk.tracer_provider.get_tracer("privacy-app")
    if mode == "disabler":
        with analytics_disabler():
            results = calls(tracer)
    else:
        results = calls(tracer)
    sdk.force_flush(30_000)
    sdk.shutdown()
    print(json.dumps({"recorded": sum(results)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
