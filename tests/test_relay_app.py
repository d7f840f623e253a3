"""An application that speaks only standard OTLP, run as a subprocess by the relay and
Collector tests (this module holds no tests; pytest imports it harmlessly).

    python tests/test_relay_app.py otlp COUNT RUN        # OTLP exporters only
    python tests/test_relay_app.py inprocess COUNT RUN   # the in-process components

Environment: ``APP_OTLP_PROTOCOL`` (``grpc`` or ``http``, default ``http``) with the
standard ``OTEL_EXPORTER_OTLP_*`` variables for the OTLP mode; the package's own
settings (``OTEL_ZENML_ANALYTICS_ENDPOINT``) for the in-process mode;
``APP_EXTRA_PROPERTIES`` (a JSON object) is added to every event's properties. With
``APP_WAIT_AFTER=K`` and ``APP_WAIT_FILE=PATH`` the app flushes after K events, prints
``waiting`` and goes on only once PATH exists. Prints one JSON line at the end: the
number of events tracked and the hex trace ids of their spans.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, List

SERVICE_NAME = "zenml-relay-test-app"


def properties(run: str, index: int) -> Dict[str, Any]:
    """Every kind of value a property can have: primitives, a list, a dict, None."""
    extra = json.loads(os.environ.get("APP_EXTRA_PROPERTIES", "{}"))
    return {"run": run, "i": index, "ok": index % 2 == 0, "ratio": index / 4,
            "tags": ["a", "b"], "nested": {"k": index, "v": [1, 2]}, "missing": None, **extra}


def _wait_for(path: str, flush: List[Callable[[], Any]]) -> None:
    for step in flush:
        step()
    print("waiting", flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {path}")
        time.sleep(0.05)


def _otlp_providers() -> Any:
    from opentelemetry import _logs, trace
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if os.environ.get("APP_OTLP_PROTOCOL", "http") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # type: ignore[assignment]
            OTLPLogExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                               SERVICE_NAME)})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=200))
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(
        BatchLogRecordProcessor(OTLPLogExporter(), schedule_delay_millis=200))
    trace.set_tracer_provider(tracer_provider)
    _logs.set_logger_provider(logger_provider)
    return tracer_provider, logger_provider


def main(argv: List[str]) -> int:
    mode, count, run = argv[0], int(argv[1]), argv[2]
    from opentelemetry import trace

    import otel_zenml_analytics
    from otel_zenml_analytics import signals

    if mode == "otlp":
        tracer_provider, logger_provider = _otlp_providers()
        signals.use_providers()  # the global providers: plain OTLP, no analytics component
        flush = [tracer_provider.force_flush, logger_provider.force_flush]
        shutdown = [tracer_provider.shutdown, logger_provider.shutdown]
    else:
        from otel_zenml_analytics.sdk import configure_sdk

        sdk = configure_sdk(set_global=True)
        flush = [lambda: sdk.force_flush(30_000)]
        shutdown = [*flush, sdk.shutdown]
    tracer = trace.get_tracer("zenml-relay-test-app")
    wait_after = int(os.environ.get("APP_WAIT_AFTER", "0"))
    trace_ids = []
    tracked = 0
    for index in range(count):
        with tracer.start_as_current_span(f"step {index}") as span:
            trace_ids.append(format(span.get_span_context().trace_id, "032x"))
            tracked += bool(otel_zenml_analytics.track("Pipeline run", properties(run, index)))
        if wait_after and index + 1 == wait_after:
            _wait_for(os.environ["APP_WAIT_FILE"], flush)
    for step in shutdown:
        step()
    print(json.dumps({"tracked": tracked, "trace_ids": trace_ids}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
