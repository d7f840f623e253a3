"""The demo end to end, and the exit hook flushing a process that never flushed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from otel_zenml_analytics.sink import SinkServer

from .conftest import CLI


def test_demo_loses_nothing() -> None:
    for wire_format in ("segment", "zenml"):
        out = subprocess.run([CLI, "demo", "--format", wire_format], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        last = out.stdout.strip().splitlines()[-1]
        sent = int(last.split()[1].rstrip(","))
        assert sent >= 7
        assert last == f"sent {sent}, received {sent}, lost 0"
        assert "Pipeline run" in out.stdout and "ValueError" in out.stdout


def _run_to_exit(script: str, sink: SinkServer) -> None:
    """Run ``script`` in a Python of its own, delivering to ``sink``; it must exit 0."""
    env = {**os.environ, "OTEL_ZENML_ANALYTICS_ENDPOINT": sink.url,
           "OTEL_ZENML_ANALYTICS_FLUSH_INTERVAL": "5"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_exit_hook_delivers_what_was_queued(sink: SinkServer) -> None:
    script = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from otel_zenml_analytics import signals, track
        from otel_zenml_analytics.processor import SegmentSpanProcessor
        # No SDK exit hook (shutdown_on_exit=False): only the package's own must deliver.
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(SegmentSpanProcessor())
        signals.use_providers(provider)
        for i in range(50):
            track("At exit", {"i": i})
        """
    )
    _run_to_exit(script, sink)
    assert sink.store.count() == 50


def test_exit_hook_delivers_spans_the_caller_ended_last(sink: SinkServer) -> None:
    # The signals thread starts (and registers its exit hook) before the delivery module
    # is imported, so the delivery's exit hook runs first: it must still take the spans
    # that callers ended and handed to the signals thread, busy in a slow host exporter.
    script = textwrap.dedent(
        """
        import threading, time
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (SimpleSpanProcessor, SpanExporter,
                                                    SpanExportResult)
        from otel_zenml_analytics import signals, track

        class SlowOnTheSignalsThread(SpanExporter):
            def export(self, spans):
                if threading.current_thread().name == "otel-zenml-analytics-signals":
                    time.sleep(1)
                return SpanExportResult.SUCCESS

        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(SlowOnTheSignalsThread()))
        signals.use_providers(provider)
        track("Early", {})
        from otel_zenml_analytics.processor import SegmentSpanProcessor
        provider.add_span_processor(SegmentSpanProcessor())
        tracer = provider.get_tracer("app")
        track("Outside", {})
        for i in range(20):
            with tracer.start_as_current_span("work"):
                track("Inside", {"i": i})
        """
    )
    _run_to_exit(script, sink)
    assert len(sink.store.query(event="Inside")) == 20


@pytest.mark.parametrize("sdk_exit_hook", ["none", "provider made first", "thread started first",
                                           "a provider made during exit"])
def test_exit_is_not_held_by_a_host_exporter_stuck_on_the_signals_thread(
    sink: SinkServer, sdk_exit_hook: str
) -> None:
    # The waits at exit for pending signals (the package's two exit hooks and, with the
    # SDK's exit hook, the provider's shutdown and the processor's within it) share one
    # bound, shortened here to 1 s; the processor's own bound is raised to an hour, so
    # this process would never exit (the test's 60 s timeout) if any of them waited on
    # its own bound: the processor's did, until they shared one. The SDK's hook runs
    # first when the provider is made after the signals thread started (hooks run newest
    # first), unless the package's hook moves after it; and once exit has begun, a
    # provider made by a host's exit hook must not move it (past the end, it never ran).
    script = textwrap.dedent(
        """
        import atexit, threading, time
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (SimpleSpanProcessor, SpanExporter,
                                                    SpanExportResult)
        from otel_zenml_analytics import delivery, signals, track
        from otel_zenml_analytics import processor
        from otel_zenml_analytics.processor import SegmentSpanProcessor

        entered = threading.Event()

        class StuckOnTheSignalsThread(SpanExporter):
            def export(self, spans):
                if threading.current_thread().name == "otel-zenml-analytics-signals":
                    entered.set()
                    threading.Event().wait()
                return SpanExportResult.SUCCESS

        signals.EXIT_FLUSH_SECONDS = delivery.EXIT_FLUSH_SECONDS = 1.0
        processor.SHUTDOWN_SECONDS = 3600.0
        if HOOK in ("thread started first", "a provider made during exit"):
            signals.use_providers(TracerProvider(shutdown_on_exit=False))
            track("Starts the signals thread", {})
            signals.flush()
        provider = TracerProvider(shutdown_on_exit=HOOK != "none")
        provider.add_span_processor(SimpleSpanProcessor(StuckOnTheSignalsThread()))
        provider.add_span_processor(SegmentSpanProcessor())
        signals.use_providers(provider)
        track("Stuck", {})
        assert entered.wait(10)
        track("Pending", {})
        if HOOK == "a provider made during exit":
            # (an empty resource: the default one's detectors need a thread pool)
            atexit.register(lambda: TracerProvider(resource=Resource.get_empty(),
                                                   shutdown_on_exit=False))
        """
    ).replace("HOOK", repr(sdk_exit_hook))
    _run_to_exit(script, sink)
