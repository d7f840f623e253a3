"""Settings: arguments win over env vars; malformed values name the setting."""

from __future__ import annotations

import os

import pytest

from otel_zenml_analytics.settings import ConfigurationError, Settings


def test_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_ENDPOINT", "http://env:1/")
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_FORMAT", "zenml")
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_GZIP", "true")
    monkeypatch.setenv("OTEL_ZENML_ANALYTICS_TIMEOUT", "2.5")
    from_env = Settings.resolve()
    assert (from_env.endpoint, from_env.format, from_env.gzip, from_env.timeout) == (
        "http://env:1", "zenml", True, 2.5)
    explicit = Settings.resolve(endpoint="http://arg:2", format="segment", gzip=False)
    assert (explicit.endpoint, explicit.format, explicit.gzip) == ("http://arg:2", "segment",
                                                                   False)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("OTEL_ZENML_ANALYTICS_FORMAT", "xml", "expected one of segment, zenml"),
        ("OTEL_ZENML_ANALYTICS_GZIP", "maybe", "not a boolean"),
        ("OTEL_ZENML_ANALYTICS_TIMEOUT", "soon", "is not a number"),
        ("OTEL_ZENML_ANALYTICS_BATCH_SIZE", "0", "must be at least 1"),
        ("OTEL_ZENML_ANALYTICS_ENDPOINT", "localhost:8800", "is not a URL"),
    ],
)
def test_malformed_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        Settings.resolve()
    assert name in str(info.value) and words in str(info.value)


def test_write_key_never_in_repr() -> None:
    settings = Settings.resolve(endpoint="http://x:1", write_key="top-secret")
    assert "top-secret" not in repr(settings) and "top-secret" not in str(settings)


def test_the_fast_environment_reader_sees_what_os_environ_sees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from unittest import mock

    from otel_zenml_analytics import environment_variables as env

    name = "OTEL_ZENML_ANALYTICS_TEST_READER"
    monkeypatch.delenv(name, raising=False)
    assert env.get(name) is None
    monkeypatch.setenv(name, "ünïcode value")
    assert env.get(name) == os.environ[name] == "ünïcode value"
    with mock.patch.dict(os.environ, {name: "patched"}):
        assert env.get(name) == "patched"
    assert env.get(name) == "ünïcode value"
    monkeypatch.delenv(name)
    assert env.get(name) is None
    # A host that swapped os.environ for a plain mapping is still read correctly.
    monkeypatch.setattr(os, "environ", {name: "plain"})
    assert env.get(name) == "plain"
