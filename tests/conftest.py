"""Fixtures: an isolated consent file, a real sink, and real SDK pipelines."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import requests
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_zenml_analytics import consent, signals
from otel_zenml_analytics.sdk import AnalyticsSDK, configure_sdk
from otel_zenml_analytics.settings import Settings
from otel_zenml_analytics.sink import SinkServer

try:
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
except ImportError:  # older SDKs
    from opentelemetry.sdk._logs.export import (  # type: ignore[attr-defined,no-redef]
        InMemoryLogExporter as InMemoryLogRecordExporter,
    )

PYTHON = sys.executable
BIN = os.path.dirname(sys.executable)
CLI = os.path.join(BIN, "otel-zenml-analytics")


def clean_env(config_dir: Any, **extra: str) -> Dict[str, str]:
    """The environment of a child process: none of the caller's OTel or analytics settings,
    the consent file in ``config_dir``, plus ``extra``."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("OTEL_", "ZENML_"))}
    env["OTEL_ZENML_ANALYTICS_CONFIG_DIR"] = str(config_dir)
    env.update(extra)
    return env


def free_port() -> int:
    """A local TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def silent_endpoint() -> Iterator[str]:
    """The URL of a destination that accepts connections and never answers."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        yield f"http://127.0.0.1:{hole.getsockname()[1]}"


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0,
               diagnose: Optional[Callable[[], str]] = None) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; fail naming
    ``what`` after ``timeout`` seconds. A connection error (a server still starting)
    counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (requests.RequestException, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}" + (f"\n{diagnose()}" if diagnose else ""))
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every test gets its own consent file and no analytics env vars from outside."""
    for name in list(os.environ):
        if name.startswith(("OTEL_ZENML_ANALYTICS_", "ZENML_")):
            monkeypatch.delenv(name, raising=False)
    config = tmp_path / "config"
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_CONFIG_DIR", str(config))
    consent.forget_cache()
    yield str(config)
    consent.forget_cache()
    signals.use_providers()


@pytest.fixture
def sink(tmp_path: Any) -> Iterator[SinkServer]:
    """A real analytics server on a free port."""
    server = SinkServer(port=0, db_path=str(tmp_path / "sink.db")).start()
    yield server
    server.stop()


class Pipeline:
    """Real SDK providers with the analytics components, plus in-memory copies."""

    def __init__(self, sdk: AnalyticsSDK) -> None:
        self.sdk = sdk
        self.spans = InMemorySpanExporter()
        self.logs = InMemoryLogRecordExporter()
        sdk.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        sdk.logger_provider.add_log_record_processor(SimpleLogRecordProcessor(self.logs))
        self.tracer = sdk.tracer_provider.get_tracer("tests")

    def flush(self) -> None:
        assert self.sdk.force_flush(10_000)

    @property
    def stats(self) -> dict:  # type: ignore[type-arg]
        return self.sdk.span_processor.delivery.stats()


@pytest.fixture
def make_pipeline() -> Iterator[Callable[..., Pipeline]]:
    """Build pipelines with ``Settings.resolve(**kwargs)``; shut down after the test."""
    made: List[Pipeline] = []

    def make(**kwargs: Any) -> Pipeline:
        pipeline = Pipeline(configure_sdk(Settings.resolve(**kwargs)))
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.sdk.shutdown()


def track_one(make_pipeline: Callable[..., Pipeline], endpoint: str, **settings: Any
              ) -> Pipeline:
    """A pipeline to ``endpoint`` (no retries beyond one): one ``track()`` inside a span,
    then a flush."""
    import otel_zenml_analytics

    pipeline = make_pipeline(endpoint=endpoint, max_retries=1, **settings)
    with pipeline.tracer.start_as_current_span("work"):
        assert otel_zenml_analytics.track("Pipeline run", {"n": 1}) is True
    pipeline.flush()
    return pipeline
