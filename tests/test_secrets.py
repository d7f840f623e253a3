"""Write keys and relay tokens never appear in logs, reprs, exception messages or the spool.

Everything is captured: the root logger at DEBUG (urllib3's own debug lines included) in
process, stdout and stderr of ``-v`` subprocesses, ``repr``/``str`` of every public object,
and the messages of the exceptions a caller can see. Each failure mode of a delivery is
exercised against the real sink: 401, a refused connection, a TLS failure.
"""

from __future__ import annotations

import base64
import logging
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest
import requests

import otel_zenml_analytics
from otel_zenml_analytics import request as seed_request
from otel_zenml_analytics.client import Client
from otel_zenml_analytics.delivery import Delivery
from otel_zenml_analytics.errors import AnalyticsAPIError
from otel_zenml_analytics.exporter import SegmentLogExporter
from otel_zenml_analytics.processor import SegmentSpanProcessor
from otel_zenml_analytics.relay import Relay
from otel_zenml_analytics.sdk import configure_sdk
from otel_zenml_analytics.settings import ConfigurationError, Settings
from otel_zenml_analytics.sink import SinkServer

from .conftest import CLI, Pipeline, clean_env, free_port, track_one
from .tls import make_certificates, tls_sink

WRITE_KEY = "wk_SECRET_4f1d2c9a7b"
TOKEN = "tok_SECRET_8e3b5a1c0d"
SECRETS = (WRITE_KEY, TOKEN)


def assert_clean(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into {where}: ...{text[-2000:]}"
    # the Basic-auth header value would be base64 of "KEY:"
    assert base64.b64encode(f"{WRITE_KEY}:".encode()).decode() not in text, where


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The root logger at DEBUG: every library's records, ours and urllib3's."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    text = caplog.text + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert_clean(text, "the log output")


def test_401_from_the_sink(all_logs: pytest.LogCaptureFixture, tmp_path: Path,
                           make_pipeline: Callable[..., Pipeline]) -> None:
    with SinkServer(port=0, db_path=str(tmp_path / "k.db"), write_key="another-key") as sink:
        pipeline = track_one(make_pipeline, sink.url, write_key=WRITE_KEY)
        assert pipeline.stats["rejected"] == 1
        assert sink.stats()["rejected_requests"] == 1
    assert any("401" in r.getMessage() for r in all_logs.records if r.levelno >= logging.ERROR)


def test_refused_connection(all_logs: pytest.LogCaptureFixture,
                            make_pipeline: Callable[..., Pipeline]) -> None:
    pipeline = track_one(make_pipeline, f"http://127.0.0.1:{free_port()}", write_key=WRITE_KEY)
    assert pipeline.stats["failed"] == 1
    assert any("ConnectionError" in r.getMessage() for r in all_logs.records)


def test_tls_failure(all_logs: pytest.LogCaptureFixture, tmp_path: Path,
                     make_pipeline: Callable[..., Pipeline]) -> None:
    with tls_sink(tmp_path / "t.db", make_certificates(tmp_path), WRITE_KEY) as (_, url):
        pipeline = track_one(make_pipeline, url, write_key=WRITE_KEY)
    assert pipeline.stats["failed"] == 1
    assert any("certificate verify failed" in r.getMessage() for r in all_logs.records)


def test_seed_request_post_exception_messages(
    all_logs: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_WRITE_KEY", WRITE_KEY)
    message = {"type": "track", "message_id": "m-1", "user_id": "u", "event": "E",
               "properties": {}}
    with SinkServer(port=0, db_path=str(tmp_path / "k.db"), write_key="another-key") as sink:
        monkeypatch.setenv("OTEL_ZENML_ANALYTICS_ENDPOINT", sink.url)
        with pytest.raises(AnalyticsAPIError) as refused:
            seed_request.post([message], timeout=10)
    assert refused.value.status == 401
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(requests.ConnectionError) as unreachable:
        seed_request.post([message], timeout=10)
    for exc in (refused.value, unreachable.value):
        assert_clean(f"{exc}\n{exc!r}\n{exc.args!r}", "an exception message")


def test_malformed_secrets_are_named_but_not_shown() -> None:
    for make in (lambda: Settings.resolve(endpoint="http://x:1", write_key=WRITE_KEY + " x"),
                 lambda: Relay(Settings.resolve(endpoint="http://x:1"), token=TOKEN + "\n",
                               http_port=0, grpc_port=None)):
        with pytest.raises(ConfigurationError) as info:
            make()
        assert_clean(str(info.value), "a configuration error")


@pytest.mark.parametrize("endpoint", [
    f"https://api.example.com/v1?api_key={WRITE_KEY}",
    f"https://user:{WRITE_KEY}@api.example.com#fragment",
    f"user:{WRITE_KEY}@api.example.com",
    f"https//user:{WRITE_KEY}@api.example.com",
    f"https://user:{WRITE_KEY}@api.example.com:80:80",
])
def test_an_endpoint_refused_for_its_form_is_named_without_its_secret(endpoint: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.resolve(endpoint=endpoint)
    assert "api.example.com" in str(info.value)
    assert_clean(str(info.value), "a configuration error")


def test_the_relays_banner_hides_credentials_in_the_endpoint(
    tmp_path: Path, isolated_env: str
) -> None:
    from .test_relay import cli_relay

    env = clean_env(isolated_env, OTEL_ZENML_ANALYTICS_ENDPOINT=(
        f"http://analytics:{WRITE_KEY}@127.0.0.1:{free_port()}"))
    with cli_relay(["relay", "--http-port", "0", "--grpc-port", "0"], env) as (relay, banner):
        assert "delivering to http://***@127.0.0.1:" in banner, banner
        assert_clean(banner, "the relay's banner")


def test_no_public_object_shows_a_secret_in_its_repr(tmp_path: Path) -> None:
    with SinkServer(port=0, db_path=str(tmp_path / "k.db"), write_key=WRITE_KEY) as sink:
        settings = Settings.resolve(endpoint=sink.url, write_key=WRITE_KEY)
        in_url = Settings.resolve(endpoint=sink.url.replace("//", f"//user:{WRITE_KEY}@"))
        sdk = configure_sdk(settings)
        processor = SegmentSpanProcessor(endpoint=sink.url, write_key=WRITE_KEY)
        exporter = SegmentLogExporter(endpoint=sink.url, write_key=WRITE_KEY)
        delivery = Delivery(settings)
        try:
            with Relay(settings, http_port=0, grpc_port=0, token=TOKEN) as relay:
                objects: List[Any] = [settings, in_url, sdk, processor, exporter, delivery,
                                      relay, sink, Client(), relay.stats()]
                for obj in objects:
                    assert_clean(f"{obj!r}\n{obj}", f"repr of {type(obj).__name__}")
                assert "user:***" not in repr(in_url) and "***@" in repr(in_url)
        finally:
            delivery.shutdown()
            processor.shutdown()
            exporter.shutdown()
            sdk.shutdown()


def test_the_spool_holds_no_key(tmp_path: Path, make_pipeline: Callable[..., Pipeline]) -> None:
    spool = tmp_path / "spool.db"
    pipeline = make_pipeline(endpoint=f"http://127.0.0.1:{free_port()}", write_key=WRITE_KEY,
                             spool=str(spool), max_retries=0)
    with pipeline.tracer.start_as_current_span("work"):
        assert otel_zenml_analytics.track("Pipeline run", {"n": 1})
    assert not pipeline.sdk.force_flush(10_000)  # the destination is down: kept in the spool
    with sqlite3.connect(spool) as db:
        rows = [repr(row) for table, in db.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")
                for row in db.execute(f"SELECT * FROM {table}")]
    assert any("Pipeline run" in row for row in rows)  # the message is really there
    assert_clean("\n".join(rows) + spool.read_bytes().decode("latin-1"), "the spool")


def test_relay_binds_to_loopback_by_default(tmp_path: Path) -> None:
    with SinkServer(port=0, db_path=str(tmp_path / "k.db")) as sink, \
            Relay(Settings.resolve(endpoint=sink.url), http_port=0, grpc_port=None) as relay:
        assert relay.host == "127.0.0.1"
        assert relay._http is not None
        assert relay._http.socket.getsockname()[0] == "127.0.0.1"


def test_subprocesses_with_debug_logging(tmp_path: Path, isolated_env: str) -> None:
    """The CLI at -v (DEBUG to stderr): a consent event refused with 401, and a relay with
    a token whose destination refuses its key; every byte of their output is searched."""
    from .test_relay import PROTOBUF, cli_relay, http_url_of, record

    with SinkServer(port=0, db_path=str(tmp_path / "k.db"), write_key="another-key") as sink:
        env = clean_env(isolated_env, OTEL_ZENML_ANALYTICS_ENDPOINT=sink.url,
                        OTEL_ZENML_ANALYTICS_WRITE_KEY=WRITE_KEY,
                        OTEL_ZENML_ANALYTICS_RELAY_TOKEN=TOKEN)
        consent = subprocess.run([CLI, "-v", "analytics", "opt-in"], env=env,
                                 capture_output=True, text=True, timeout=120)
        assert consent.returncode == 0, consent.stderr
        assert "401" in consent.stderr
        assert_clean(consent.stdout + consent.stderr, "the CLI's output")

        with cli_relay(["-v", "relay", "--http-port", "0", "--grpc-port", "0"],
                       env) as (relay, banner):
            url = http_url_of(banner)
            body = record(1).logs_request().SerializeToString()
            answers = [requests.post(url + "/v1/logs", data=body, timeout=30,
                                     headers={**PROTOBUF, **auth}).status_code
                       for auth in ({}, {"Authorization": "Bearer " + TOKEN[:-1]},
                                    {"Authorization": "Bearer " + TOKEN})]
            assert answers == [401, 401, 200]
            relay.send_signal(signal.SIGTERM)
            out, err = relay.communicate(timeout=60)
        assert "refused" in err and "401" in err, err
        assert_clean(banner + out + err, "the relay's output")
