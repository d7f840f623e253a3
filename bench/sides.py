"""The two sides of the delivery and memory scenarios, each set up in its own process.

``ours``: the full OTel SDK pipeline of this package (``configure_sdk`` with default
settings, so a TracerProvider with ``SegmentSpanProcessor`` and a LoggerProvider with
``SegmentLogExporter``) and the public ``track()``. ``peer``:
``segment.analytics.Client`` with default settings. Both send the same event with the
same properties. Only public entry points are used, so the scenarios keep working
while the package's internals change.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

from bench.procs import own_consent_dir

OURS = "ours"
PEER = "peer"
SIDES = (OURS, PEER)

EVENT_NAME = "Pipeline run"
PROPERTIES = {"pipeline": "training", "steps": 3, "orchestrator": "local", "success": True}


@dataclass
class Side:
    """One configured client: ``track()`` returns whether the call was accepted."""

    name: str
    track: Callable[[], bool]
    counters: Callable[[], Dict[str, int]]
    """The client's own view of what it dropped, failed or still holds."""
    flush: Callable[[], None]
    """Returns once everything the client still holds was sent (or given up on)."""


def open_side(name: str, endpoint: str) -> Side:
    """Configure side ``name`` to deliver to ``endpoint`` (a Segment-compatible URL)."""
    return _open_ours(endpoint) if name == OURS else _open_peer(endpoint)


def _open_ours(endpoint: str) -> Side:
    own_consent_dir()
    import otel_zenml_analytics as oza
    from otel_zenml_analytics.delivery import live_deliveries
    from otel_zenml_analytics.enums import AnalyticsEvent
    from otel_zenml_analytics.sdk import configure_sdk
    from otel_zenml_analytics.settings import Settings

    sdk = configure_sdk(Settings.resolve(endpoint=endpoint))
    event = AnalyticsEvent(EVENT_NAME)

    def track() -> bool:
        return bool(oza.track(event, PROPERTIES))

    def counters() -> Dict[str, int]:
        # Counted per queued signal: each track() queues a span and a log record with one
        # message id, and the delivery keeps one of the two.
        total: Dict[str, int] = {}
        for delivery in live_deliveries():
            for key, value in delivery.stats().items():
                total[key] = total.get(key, 0) + int(value)
        return total

    def flush() -> None:
        sdk.force_flush()

    return Side(OURS, track, counters, flush)


def _open_peer(endpoint: str) -> Side:
    import segment.analytics as segment  # type: ignore[import-untyped]

    failed: List[int] = [0]

    def on_error(error: Exception, batch: List[Any]) -> None:
        failed[0] += len(batch)

    client = segment.Client(write_key="bench", host=endpoint, on_error=on_error)
    user = str(uuid.uuid4())

    def track() -> bool:
        accepted, _ = client.track(user, EVENT_NAME, PROPERTIES)
        return bool(accepted)

    def counters() -> Dict[str, int]:
        return {"failed_on_error": failed[0], "still_queued": client.queue.qsize()}

    return Side(PEER, track, counters, client.flush)


def rss_kib() -> Dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of this process, in KiB, from /proc."""
    out: Dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out
