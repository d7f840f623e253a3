"""The end-to-end demo (``make demo``): analytics calls -> OTel SDK -> local sink.

It starts the sink on a free port with a temporary database and a temporary
consent file, wires both components into SDK providers, runs a small sample
"pipeline" (``track_decorator``, ``track_handler``, ``AnalyticsContext`` and a step
that fails), flushes, and prints what the sink received. "sent" counts the
analytics log records the SDK emitted, counted by an independent in-memory
exporter; the exit status is 0 only when the sink received every one of them.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, Dict, List

from opentelemetry import trace
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

try:
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
except ImportError:  # SDKs before the 1.39 rename
    from opentelemetry.sdk._logs.export import (  # type: ignore[attr-defined,no-redef]
        InMemoryLogExporter as InMemoryLogRecordExporter,
    )

from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics import consent
from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics.context import AnalyticsContext
from otel_zenml_analytics.enums import AnalyticsEvent
from otel_zenml_analytics.events import format_table
from otel_zenml_analytics.models import AnalyticsTrackedModelMixin
from otel_zenml_analytics.sdk import configure_sdk
from otel_zenml_analytics.settings import Settings
from otel_zenml_analytics.sink import SinkServer
from otel_zenml_analytics.utils import track_decorator, track_handler


class PipelineSpec(AnalyticsTrackedModelMixin):
    """A sample model whose listed fields become event metadata."""

    ANALYTICS_FIELDS = ["name", "step_count", "orchestrator"]

    def __init__(self, name: str, steps: List[str]) -> None:
        self.name = name
        self.steps = steps
        self.step_count = len(steps)
        self.orchestrator = "local"


@track_decorator(AnalyticsEvent.BUILD_PIPELINE)
def build_pipeline(spec: PipelineSpec) -> PipelineSpec:
    """A tracked function: its metadata comes from the model argument."""
    return spec


@track_decorator(AnalyticsEvent.RUN_PIPELINE)
def run_pipeline(spec: PipelineSpec, fail_at: str = "") -> PipelineSpec:
    """Runs each step in a span; raising from a step makes the event unsuccessful."""
    tracer = trace.get_tracer("otel_zenml_analytics.demo")
    for step in spec.steps:
        with tracer.start_as_current_span(f"step {step}"):
            if step == fail_at:
                raise ValueError(f"step {step!r} failed")
    return spec


def _sample_pipeline(tracer: trace.Tracer) -> None:
    with AnalyticsContext() as analytics:
        analytics.identify({"demo": True, "role": "ml engineer"})
        analytics.group(uuid.uuid4(), {"name": "demo team"})
    with tracer.start_as_current_span("register stack"), track_handler(
        AnalyticsEvent.REGISTERED_STACK, {"stack_name": "local", "components": 2}
    ):
        pass
    spec = build_pipeline(PipelineSpec("training", ["load", "train", "evaluate"]))
    with tracer.start_as_current_span("pipeline training"):
        run_pipeline(spec)
    try:
        with tracer.start_as_current_span("pipeline training (retry)"):
            run_pipeline(spec, fail_at="evaluate")
    except ValueError:
        pass  # the failure is tracked with event_success=False and the error type
    with AnalyticsContext() as analytics:
        analytics.track("Demo finished", {"pipelines": 2})


def run_demo(wire_format: str = "segment") -> int:
    """Run the demo; 0 when the sink received every event that was sent."""
    with tempfile.TemporaryDirectory(prefix="oza-demo-") as tmp:
        previous = os.environ.get(env.OTEL_ZENML_ANALYTICS_CONFIG_DIR)
        os.environ[env.OTEL_ZENML_ANALYTICS_CONFIG_DIR] = tmp
        consent.forget_cache()
        try:
            with SinkServer(port=0, db_path=os.path.join(tmp, "sink.db")) as sink:
                print(f"sink listening on {sink.url} ({wire_format} format)")
                sdk = configure_sdk(Settings.resolve(endpoint=sink.url, format=wire_format),
                                    service_name="otel-zenml-analytics-demo", set_global=True)
                counter = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
                sdk.logger_provider.add_log_record_processor(SimpleLogRecordProcessor(counter))
                _sample_pipeline(trace.get_tracer("otel_zenml_analytics.demo"))
                sdk.force_flush()
                sent = {
                    str(attrs[keys.MESSAGE_ID])
                    for attrs in (r.log_record.attributes for r in counter.get_finished_logs())
                    if attrs is not None and keys.is_analytics(attrs)
                }
                received: List[Dict[str, Any]] = sink.store.query(limit=10_000)
                sdk.shutdown()
        finally:
            if previous is None:
                os.environ.pop(env.OTEL_ZENML_ANALYTICS_CONFIG_DIR, None)
            else:
                os.environ[env.OTEL_ZENML_ANALYTICS_CONFIG_DIR] = previous
            consent.forget_cache()
    print(format_table(list(reversed(received))))
    got = {e["messageId"] for e in received}
    lost = len(sent - got)
    print(f"sent {len(sent)}, received {len(got & sent)}, lost {lost}")
    return 0 if sent and lost == 0 else 1
