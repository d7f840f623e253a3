"""Consent: opted out means nothing reaches the sink, except the opt-out event itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

import otel_zenml_analytics as oza
from otel_zenml_analytics import consent
from otel_zenml_analytics.context import AnalyticsContext
from otel_zenml_analytics.enums import AnalyticsEvent
from otel_zenml_analytics.sink import SinkServer
from otel_zenml_analytics.utils import analytics_disabler, email_opt_int

from .conftest import CLI, Pipeline


def _nothing_sent(sink: SinkServer) -> None:
    assert sink.stats()["requests"] == 0
    assert sink.store.count() == 0


def test_config_file_keeps_one_anonymous_id(isolated_env: str) -> None:
    first = consent.state().anonymous_id
    consent.forget_cache()
    assert consent.state().anonymous_id == first
    stored = json.loads((Path(isolated_env) / "config.json").read_text())
    assert stored["anonymous_id"] == first and stored["analytics_opt_in"] is True
    uuid.UUID(first)


@pytest.mark.parametrize("how", ["file", "env", "disabler"])
def test_opted_out_nothing_reaches_the_sink(
    how: str, sink: SinkServer, make_pipeline: Callable[..., Pipeline],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    if how == "file":
        consent.update(analytics_opt_in=False)
    elif how == "env":
        monkeypatch.setenv("ZENML_ANALYTICS_OPT_IN", "false")
    with analytics_disabler() if how == "disabler" else contextlib.nullcontext():
        assert oza.track(AnalyticsEvent.RUN_PIPELINE) is False
        assert oza.identify({"a": 1}) is False
        assert oza.group(uuid.uuid4()) is False
        assert oza.alias(uuid.uuid4(), uuid.uuid4()) is False
        with AnalyticsContext() as analytics:
            assert analytics.track("Custom") is False
    pipeline.flush()
    _nothing_sent(sink)
    assert pipeline.spans.get_finished_spans() == ()  # not even a local signal


def test_an_opt_out_inside_an_open_context_is_honoured(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    # The context read the consent on entry (opted in); the opt-out after it still wins.
    pipeline = make_pipeline(endpoint=sink.url)
    with AnalyticsContext() as analytics:
        with analytics_disabler():
            assert analytics.track(AnalyticsEvent.RUN_PIPELINE, {"n": 1}) is False
        consent.update(analytics_opt_in=False)
        assert analytics.track(AnalyticsEvent.RUN_PIPELINE, {"n": 2}) is False
        assert analytics.track(AnalyticsEvent.OPT_OUT_ANALYTICS) is True
    pipeline.flush()
    assert [e["event"] for e in sink.store.query()] == ["Analytics opt-out"]


def test_opt_out_event_is_still_sent(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    monkeypatch.setenv("ZENML_ANALYTICS_OPT_IN", "false")
    assert oza.track(AnalyticsEvent.OPT_OUT_ANALYTICS) is True
    assert oza.track(AnalyticsEvent.RUN_PIPELINE) is False
    pipeline.flush()
    assert [e["event"] for e in sink.store.query()] == ["Analytics opt-out"]


def test_email_only_after_email_opt_in(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline]
) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    oza.track("Before")
    email_opt_int(True, "dev@example.com", "zenml go")
    oza.track("After")
    pipeline.flush()
    events = {e["event"] or e["type"]: e["message"] for e in sink.store.query()}
    assert "email" not in events["Before"]["properties"]
    assert events["After"]["properties"]["email"] == "dev@example.com"
    assert events["identify"]["traits"] == {"email": "dev@example.com", "source": "zenml go"}
    assert events["Response for Email prompt"]["properties"]["opted_in"] is True


@pytest.mark.parametrize("rule", ["email", "hash:email"])
def test_the_opted_in_email_follows_the_redaction_rules(
    rule: str, sink: SinkServer, make_pipeline: Callable[..., Pipeline],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from otel_zenml_analytics.redaction import hash_value

    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_REDACT", rule)
    pipeline = make_pipeline(endpoint=sink.url)
    email_opt_int(True, "dev@example.com", "zenml go")
    oza.track("After")
    pipeline.flush()
    events = {e["event"] or e["type"]: e["message"] for e in sink.store.query()}
    expected = {} if rule == "email" else {"email": hash_value("dev@example.com")}
    assert {k: v for k, v in events["After"]["properties"].items() if k == "email"} == expected
    assert {k: v for k, v in events["identify"]["traits"].items() if k == "email"} == expected
    assert "dev@example.com" not in json.dumps([e["message"] for e in sink.store.query()])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_child_forked_while_a_thread_reads_the_consent_does_not_wait_for_it() -> None:
    holding, release = threading.Event(), threading.Event()

    def read_slowly() -> None:
        with consent._store._lock:  # as a thread does around the config file's stat
            holding.set()
            release.wait(30)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    holding.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: read the consent afresh, then report through the exit code
            try:
                consent.forget_cache()
                consent.analytics_enabled()
            finally:
                os._exit(0)
        deadline = time.monotonic() + 20
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child waited for its parent's consent lock")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(status[1]) == 0
    finally:
        release.set()
        reader.join()


def test_strict_events(sink: SinkServer, make_pipeline: Callable[..., Pipeline],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = make_pipeline(endpoint=sink.url)
    assert oza.track("Custom event") is True
    assert oza.track("") is False
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_STRICT_EVENTS", "true")
    assert oza.track("Custom event") is False
    assert oza.track(AnalyticsEvent.RUN_PIPELINE) is True
    pipeline.flush()
    assert sorted(e["event"] for e in sink.store.query()) == ["Custom event", "Pipeline run"]


def _cli(*args: str, env: Any) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_opt_out_opt_in_status(sink: SinkServer, isolated_env: str) -> None:
    env = {**os.environ, "OTEL_ZENML_ANALYTICS_ENDPOINT": sink.url}
    out = _cli("analytics", "opt-out", env=env)
    assert out.returncode == 0, out.stderr
    assert "disabled" in out.stdout
    assert json.loads((Path(isolated_env) / "config.json").read_text())["analytics_opt_in"] is False
    status = _cli("analytics", "status", env=env)
    assert "opted out" in status.stdout
    assert _cli("analytics", "opt-in", env=env).returncode == 0
    assert "opted in" in _cli("analytics", "status", env=env).stdout
    assert sorted(e["event"] for e in sink.store.query()) == ["Analytics opt-in",
                                                              "Analytics opt-out"]
    override = _cli("analytics", "status", env={**env, "ZENML_ANALYTICS_OPT_IN": "false"})
    assert "opted out" in override.stdout and "overrides" in override.stdout


def test_redacted_keys_never_leave_the_process(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    from otel_zenml_analytics.redaction import hash_value

    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_REDACT", "email, *password*, hash:user_name")
    pipeline = make_pipeline(endpoint=sink.url)
    oza.track("Signed up", {"email": "a@b.c", "db_password": "hunter2", "user_name": "ann",
                            "plan": "free"})
    oza.identify({"email": "a@b.c", "role": "dev"})
    pipeline.flush()
    events = {e["type"]: e["message"] for e in sink.store.query()}
    assert events["track"]["properties"]["user_name"] == hash_value("ann")
    assert events["track"]["properties"]["plan"] == "free"
    assert "email" not in events["track"]["properties"]
    assert "db_password" not in events["track"]["properties"]
    assert events["identify"]["traits"] == {"role": "dev"}
    every_attribute = " ".join(
        f"{k}={v}" for span in pipeline.spans.get_finished_spans() for event in span.events
        for k, v in (event.attributes or {}).items())
    every_attribute += " ".join(
        f"{k}={v}" for r in pipeline.logs.get_finished_logs()
        for k, v in (r.log_record.attributes or {}).items())
    for secret in ("a@b.c", "hunter2", "=ann"):
        assert secret not in every_attribute  # not in any OTel signal either


def test_malformed_redaction_is_a_start_up_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_zenml_analytics.processor import SegmentSpanProcessor
    from otel_zenml_analytics.settings import ConfigurationError

    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_REDACT", "email,hash:")
    with pytest.raises(ConfigurationError, match="OTEL_ZENML_ANALYTICS_REDACT entry 'hash:'"):
        SegmentSpanProcessor(endpoint="http://127.0.0.1:9")


@pytest.mark.parametrize("content", ['{"analytics_opt_in": "false"}', "{not json", "[1, 2]"])
def test_unreadable_consent_fails_closed_and_is_kept(isolated_env: str, content: str) -> None:
    path = Path(isolated_env) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    consent.forget_cache()
    assert consent.analytics_enabled() is False
    assert oza.track("Anything") is False
    assert path.read_text() == content  # the user's file is not overwritten


def test_opt_out_without_an_id_keeps_the_opt_out(isolated_env: str) -> None:
    path = Path(isolated_env) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"analytics_opt_in": false}')
    consent.forget_cache()
    assert consent.analytics_enabled() is False
    stored = json.loads(path.read_text())
    assert stored["analytics_opt_in"] is False and uuid.UUID(stored["anonymous_id"])


def test_cli_opt_out_holds_even_when_the_event_cannot_be_sent(isolated_env: str) -> None:
    env = {**os.environ, "OTEL_ZENML_ANALYTICS_ENDPOINT": "http://127.0.0.1:9",
           "OTEL_ZENML_ANALYTICS_BATCH_SIZE": "0"}  # a malformed, unrelated setting
    out = _cli("analytics", "opt-out", env=env)
    assert out.returncode == 0
    assert "was not sent" in out.stderr
    assert "opted out" in _cli("analytics", "status", env=env).stdout
