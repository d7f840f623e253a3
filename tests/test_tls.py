"""TLS verification: on by default, off or narrowed only explicitly, against a real
HTTPS server (the project's sink behind a certificate of a private CA)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator, Tuple

import pytest

from otel_zenml_analytics import settings as settings_module
from otel_zenml_analytics.settings import Settings
from otel_zenml_analytics.sink import SinkServer

from .conftest import Pipeline, track_one
from .tls import Certificates, make_certificates, tls_sink

WRITE_KEY = "wk_TLS_0123456789"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def https_sink(tmp_path: Path, certificates: Certificates) -> Iterator[Tuple[SinkServer, str]]:
    with tls_sink(tmp_path / "tls-sink.db", certificates, WRITE_KEY) as served:
        yield served


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The insecure warning is once per host and process: start each test afresh."""
    monkeypatch.setattr(settings_module, "_warned", set())


def test_verification_is_on_unless_turned_off_explicitly(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings.resolve().verify is True
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_INSECURE", "false")
    assert Settings.resolve().verify is True
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_INSECURE", "true")
    assert Settings.resolve().verify is False


def test_by_default_an_untrusted_certificate_fails_clearly_and_is_not_retried_forever(
    https_sink: Tuple[SinkServer, str], make_pipeline: Callable[..., Pipeline],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink, url = https_sink
    caplog.set_level(logging.DEBUG)
    # returns: the caller is never blocked
    pipeline = track_one(make_pipeline, url, write_key=WRITE_KEY)
    stats = pipeline.stats
    assert (stats["delivered"], stats["failed"], stats["retries"]) == (0, 1, 1)
    assert sink.store.count() == 0 and sink.stats()["requests"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    host = url.removeprefix("https://")
    assert any("Giving up on 1 analytics messages after 2 attempts" in e
               and f"TLS with the analytics destination {host} failed: certificate verify "
                   "failed" in e
               and "OTEL_ZENML_ANALYTICS_CA_BUNDLE" in e for e in errors), errors
    everything = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert WRITE_KEY not in everything


def test_a_ca_bundle_makes_the_private_certificate_trusted(
    https_sink: Tuple[SinkServer, str], make_pipeline: Callable[..., Pipeline],
    certificates: Certificates, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink, url = https_sink
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_CA_BUNDLE", str(certificates.ca))
    caplog.set_level(logging.WARNING)
    pipeline = track_one(make_pipeline, url, write_key=WRITE_KEY)
    assert pipeline.sdk.span_processor.settings.verify == str(certificates.ca)
    assert pipeline.stats["delivered"] == 1
    assert [m["message"]["event"] for m in sink.store.query()] == ["Pipeline run"]
    assert "verification is OFF" not in caplog.text


def test_insecure_delivers_and_warns_once_naming_the_host_not_the_key(
    https_sink: Tuple[SinkServer, str], make_pipeline: Callable[..., Pipeline],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    sink, url = https_sink
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_INSECURE", "true")
    caplog.set_level(logging.WARNING)
    pipeline = track_one(make_pipeline, url, write_key=WRITE_KEY)
    Settings.resolve(endpoint=url, write_key=WRITE_KEY)  # a second start-up: no new warning
    assert pipeline.stats["delivered"] == 1
    assert sink.store.count() == 1
    warnings = [r.getMessage() for r in caplog.records
                if "TLS certificate verification is OFF" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "analytics destination 127.0.0.1 " in warnings[0]
    assert "OTEL_ZENML_ANALYTICS_INSECURE=true" in warnings[0]
    assert WRITE_KEY not in caplog.text


def test_insecure_and_a_ca_bundle_together_are_a_configuration_error(
    certificates: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_INSECURE", "true")
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_CA_BUNDLE", str(certificates.ca))
    with pytest.raises(settings_module.ConfigurationError, match="expected one of them"):
        Settings.resolve()
