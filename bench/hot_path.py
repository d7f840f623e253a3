"""Scenario: the caller's cost of one ``track()``, this package against Segment's SDK.

Same run, same user, event and properties, both delivering to the local sink:
this package with the full OTel SDK pipeline (TracerProvider with
``SegmentSpanProcessor``, LoggerProvider with ``SegmentLogExporter``), the peer
``segment.analytics.Client.track`` enqueueing to its own consumer thread.
"""

from __future__ import annotations

import uuid
from typing import List

from bench.harness import Result, interleaved
from bench.procs import own_consent_dir
from bench.sides import PROPERTIES

OURS_LABEL = "otel-zenml-analytics track()"
PEER_LABEL = "segment-analytics-python track()"


def run(calls: int, rounds: int) -> List[Result]:
    """Median/p99 µs per call of both ``track()`` calls, alternating round by round."""
    own_consent_dir()
    import segment.analytics as segment  # type: ignore[import-untyped]

    import otel_zenml_analytics as oza
    from otel_zenml_analytics.enums import AnalyticsEvent
    from otel_zenml_analytics.sdk import configure_sdk
    from otel_zenml_analytics.settings import Settings
    from otel_zenml_analytics.sink import SinkServer

    user = str(uuid.uuid4())
    with SinkServer(port=0) as sink:
        sdk = configure_sdk(Settings.resolve(endpoint=sink.url))
        peer = segment.Client(write_key="bench", host=sink.url)
        def settle() -> None:
            sdk.force_flush()
            peer.flush()

        try:
            return interleaved([
                (OURS_LABEL, lambda: oza.track(AnalyticsEvent.RUN_PIPELINE, PROPERTIES)),
                (PEER_LABEL,
                 lambda: peer.track(user, AnalyticsEvent.RUN_PIPELINE.value, PROPERTIES)),
            ], calls, rounds, settle)
        finally:
            peer.shutdown()
            sdk.shutdown()
