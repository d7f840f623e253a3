"""Scenario: what an instrumented call adds over the bare call and a hand-written span.

All variants run in one process with the same SDK pipeline: a TracerProvider with
``SegmentSpanProcessor`` and a LoggerProvider with ``SegmentLogExporter``, delivering
to the local sink.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, List

from bench import workload
from bench.harness import Result, interleaved
from bench.procs import own_consent_dir

HAND_WRITTEN_LABEL = "hand-written span + 1 event"
INSTRUMENTED_LABEL = "instrumented call (span + analytics event)"


@contextmanager
def instrumented(sdk: Any, event: str, **options: Any) -> Iterator[None]:
    """``bench.workload.work`` tracked as ``event`` through ``sdk`` (a configured SDK
    pipeline), the instrumentation undone and the pipeline shut down on leaving;
    ``options`` go to ``instrument()``."""
    from otel_zenml_analytics.instrumentation import ZenMLAnalyticsInstrumentor

    instrumentor = ZenMLAnalyticsInstrumentor()
    instrumentor.instrument(targets=f"bench.workload:work={event}",
                            tracer_provider=sdk.tracer_provider,
                            logger_provider=sdk.logger_provider,
                            attach_span_processor=False, **options)
    try:
        yield
    finally:
        instrumentor.uninstrument()
        sdk.shutdown()


def run(calls: int, rounds: int) -> List[Result]:
    """Bare call, hand-written span with one event, and the instrumented call."""
    own_consent_dir()
    from otel_zenml_analytics.sdk import configure_sdk
    from otel_zenml_analytics.settings import Settings
    from otel_zenml_analytics.sink import SinkServer

    bare = workload.work
    with SinkServer(port=0) as sink:
        sdk = configure_sdk(Settings.resolve(endpoint=sink.url))
        tracer = sdk.tracer_provider.get_tracer("bench")

        def handwritten() -> int:
            with tracer.start_as_current_span("bench.workload.work") as span:
                result = bare()
                span.add_event("Work done", {"zenml.analytics.event": "Work done",
                                             "event_success": True})
                return result

        with instrumented(sdk, "Work done"):
            results = interleaved([
                ("bare call", bare),
                (HAND_WRITTEN_LABEL, handwritten),
                (INSTRUMENTED_LABEL, workload.work),
            ], calls, rounds, sdk.force_flush)
    return results
