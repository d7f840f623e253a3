"""Malformed configuration anywhere fails at start-up, naming the setting and its form.

Parametrized over every constant of ``environment_variables.py`` and every key a
``[[targets]]`` table accepts: a new setting without a malformed example here, or
without validation, is a failing case.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics.exporter import SegmentLogExporter
from otel_zenml_analytics.instrumentation import ZenMLAnalyticsInstrumentor
from otel_zenml_analytics.instrumentation.targets import _TOML_KEYS, load_targets
from otel_zenml_analytics.processor import SegmentSpanProcessor
from otel_zenml_analytics.relay import Relay
from otel_zenml_analytics.settings import CHECKED_ELSEWHERE, ConfigurationError, Settings

from .conftest import CLI, clean_env

ALL_VARIABLES = sorted(value for name, value in vars(env).items()
                       if name.isupper() and isinstance(value, str))

# Placeholders: {file} an existing regular file, {dir} an existing directory, {missing} a
# path that does not exist, {badtoml} a file that is not TOML.
MALFORMED: Dict[str, List[Tuple[str, str]]] = {
    env.OTEL_ZENML_ANALYTICS_ENDPOINT: [
        ("localhost:8800", "expected http(s)://HOST[:PORT][/PATH]"),
        ("http://", "expected http(s)://HOST[:PORT][/PATH]"),
        ("ftp://example.com", "expected http(s)://HOST[:PORT][/PATH]"),
        ("http://127.0.0.1:port", "malformed port"),
        ("http://127.0.0.1:8800/?x=1", "query or fragment"),
    ],
    env.OTEL_ZENML_ANALYTICS_FORMAT: [("xml", "expected one of segment, zenml")],
    env.OTEL_ZENML_ANALYTICS_WRITE_KEY: [
        ("two words", "expected visible ASCII characters without spaces and no ':'"),
        ("user:password", "no ':'"),
        ("clé", "visible ASCII"),
    ],
    env.OTEL_ZENML_ANALYTICS_GZIP: [("maybe", "expected true or false")],
    env.OTEL_ZENML_ANALYTICS_TIMEOUT: [
        ("soon", "expected a number of at least 0.001"),
        ("0", "must be at least 0.001"),
        ("nan", "not a finite number"),
        ("inf", "not a finite number"),
    ],
    env.OTEL_ZENML_ANALYTICS_MAX_QUEUE_SIZE: [
        ("many", "expected an integer of at least 1"),
        ("1.5", "expected an integer"),
        ("0", "must be at least 1"),
    ],
    env.OTEL_ZENML_ANALYTICS_BATCH_SIZE: [("0", "must be at least 1"),
                                          ("ten", "expected an integer")],
    env.OTEL_ZENML_ANALYTICS_FLUSH_INTERVAL: [("-1", "must be at least 0"),
                                              ("nan", "not a finite number")],
    env.OTEL_ZENML_ANALYTICS_MAX_RETRIES: [("-1", "must be at least 0"),
                                           ("three", "expected an integer")],
    env.OTEL_ZENML_ANALYTICS_STRICT_EVENTS: [("strict", "expected true or false")],
    env.OTEL_ZENML_ANALYTICS_CONFIG_DIR: [("{file}", "expected the path of a folder")],
    env.ZENML_ANALYTICS_OPT_IN: [("perhaps", "expected true or false")],
    env.ZENML_SERVER: [("server", "expected true or false")],
    env.ZENML_DEBUG: [("verbose", "expected true or false")],
    env.OTEL_ZENML_ANALYTICS_TRACKED: [
        ("shop:place_order", "missing '=EVENT'; expected MODULE:QUALNAME=EVENT"),
        ("shop place_order=Order placed", "is not MODULE:QUALNAME: expected"),
        ("shop:place_order= ", "the event is empty: expected an AnalyticsEvent member name"),
    ],
    env.OTEL_ZENML_ANALYTICS_CONFIG: [
        ("{missing}", "cannot read the file"),
        ("{badtoml}", "not valid TOML"),
        ("{file}", "no [[targets]] tables"),
    ],
    env.OTEL_ZENML_ANALYTICS_SPOOL: [("{dir}", "expected the path of an SQLite file")],
    env.OTEL_ZENML_ANALYTICS_SPOOL_MAX_BYTES: [("10", "must be at least 1024"),
                                               ("100MB", "expected an integer")],
    env.OTEL_ZENML_ANALYTICS_SPOOL_MAX_AGE: [("0.5", "must be at least 1"),
                                             ("inf", "not a finite number")],
    env.OTEL_ZENML_ANALYTICS_RELAY_TOKEN: [("two words", "expected visible ASCII")],
    env.OTEL_ZENML_ANALYTICS_REDACT: [("email,hash:", "expected KEY, a pattern like *token*")],
    env.OTEL_ZENML_ANALYTICS_INSECURE: [("please", "expected true or false")],
    env.OTEL_ZENML_ANALYTICS_CA_BUNDLE: [("{missing}", "expected the path of a PEM file")],
    env.OTEL_ZENML_ANALYTICS_SPAN_END: [("sideways", "expected background or caller")],
}

CASES = [pytest.param(name, value, words, id=f"{name}={value}")
         for name in ALL_VARIABLES
         for value, words in MALFORMED.get(name, [("<no example>", "")])]

SECRET_VARIABLES = {env.OTEL_ZENML_ANALYTICS_WRITE_KEY, env.OTEL_ZENML_ANALYTICS_RELAY_TOKEN}


def _materialize(value: str, tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("# nothing here\n")
    (tmp_path / "a-dir").mkdir(exist_ok=True)
    (tmp_path / "bad.toml").write_text("[[targets]\ntarget = \n")
    return (value.replace("{file}", str(tmp_path / "a-file"))
            .replace("{dir}", str(tmp_path / "a-dir"))
            .replace("{missing}", str(tmp_path / "does-not-exist" / "x.pem"))
            .replace("{badtoml}", str(tmp_path / "bad.toml")))


def _assert_names(message: str, name: str, words: str, value: str) -> None:
    assert name in message, message
    assert words in message, message
    if name in SECRET_VARIABLES:
        assert value not in message, f"the secret itself is in the message: {message}"


@pytest.mark.parametrize(("name", "value", "words"), CASES)
def test_every_variable_rejects_a_malformed_value_at_start_up(
    name: str, value: str, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if value == "<no example>":
        pytest.fail(f"{name} has no malformed example in MALFORMED: add one, and its "
                    "validation (settings.ENVIRONMENT_CHECKS or Settings.resolve)")
    value = _materialize(value, tmp_path)
    if name != env.OTEL_ZENML_ANALYTICS_ENDPOINT:
        monkeypatch.setenv(env.OTEL_ZENML_ANALYTICS_ENDPOINT, "http://127.0.0.1:9")
    monkeypatch.setenv(name, value)

    if name in CHECKED_ELSEWHERE:
        # The instrumentation's settings: `check` lists the problem, and at start-up the
        # instrumentor logs it and tracks the well-formed targets only, while the
        # components still start.
        _, problems = load_targets()
        assert problems, f"{name}={value!r} was accepted"
        _assert_names("\n".join(problems), name, words, value)
        instrumentor = ZenMLAnalyticsInstrumentor()
        with caplog.at_level(logging.ERROR, logger="otel_zenml_analytics"):
            instrumentor.instrument(attach_span_processor=False)
        instrumentor.uninstrument()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("not tracked" in e and name in e for e in errors), errors
        Settings.resolve()
        return

    for start in (Settings.resolve, SegmentSpanProcessor, SegmentLogExporter,
                  lambda: Relay(http_port=0, grpc_port=None)):
        with pytest.raises(ConfigurationError) as info:
            started = start()
            getattr(started, "shutdown", lambda: None)()
        _assert_names(str(info.value), name, words, value)


def test_the_check_command_and_the_relay_command_name_the_variable(tmp_path: Path) -> None:
    base = clean_env(tmp_path / "config", OTEL_ZENML_ANALYTICS_TRACKED="shop:place_order",
                     OTEL_ZENML_ANALYTICS_ENDPOINT="http://127.0.0.1:9",
                     OTEL_ZENML_ANALYTICS_TIMEOUT="nan")
    out = subprocess.run([CLI, "check"], env=base, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "OTEL_ZENML_ANALYTICS_TRACKED entry 1 'shop:place_order': missing '=EVENT'" in out.stderr
    assert "OTEL_ZENML_ANALYTICS_TIMEOUT='nan' is not a finite number" in out.stderr

    relay = subprocess.run([CLI, "relay", "--http-port", "0", "--no-grpc"],
                           env={**base, "OTEL_ZENML_ANALYTICS_RELAY_TOKEN": "not one word"},
                           capture_output=True, text=True, timeout=60)
    assert relay.returncode == 2
    assert "configuration error" in relay.stderr
    assert "OTEL_ZENML_ANALYTICS_RELAY_TOKEN" in relay.stderr
    assert "not one word" not in relay.stderr + relay.stdout


TOML_MALFORMED: Dict[str, List[Tuple[str, str]]] = {
    "target": [("target = 3", "'target' is required and must be a string: expected"),
               ('target = "shop.place_order"', "'target' = 'shop.place_order' is not "
                                               "MODULE:QUALNAME: expected")],
    "event": [("event = 5", "'event' is required and must be a string: expected"),
              ('event = "  "', "'event' = '  ': the event is empty: expected")],
    "metadata": [('metadata = "api"', "'metadata' must be a table: expected")],
    "arguments": [('arguments = "name"', "'arguments' must be a list of argument names"),
                  ("arguments = [1]", "'arguments' must be a list of argument names"),
                  ('arguments = ["not a name"]', "expected e.g. arguments = [")],
    "span": [('span = "yes"', "'span' must be true or false: expected")],
}

TOML_CASES = [pytest.param(key, line, words, id=f"{key}:{line}")
              for key in sorted(_TOML_KEYS)
              for line, words in TOML_MALFORMED.get(key, [("<no example>", "")])]


@pytest.mark.parametrize(("key", "line", "words"), TOML_CASES)
def test_every_toml_key_rejects_a_malformed_value(
    key: str, line: str, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if line == "<no example>":
        pytest.fail(f"the [[targets]] key {key!r} has no malformed example in TOML_MALFORMED")
    good = {"target": 'target = "shop:place_order"', "event": 'event = "Order placed"'}
    good[key] = line
    path = tmp_path / "tracking.toml"
    path.write_text("[[targets]]\n" + "\n".join(good.values()) + "\n")
    monkeypatch.setenv(env.OTEL_ZENML_ANALYTICS_CONFIG, str(path))
    targets, problems = load_targets()
    assert targets == []
    assert len(problems) == 1, problems
    assert f"{env.OTEL_ZENML_ANALYTICS_CONFIG}={path}: [[targets]] number 1" in problems[0]
    assert words in problems[0], problems[0]


@pytest.mark.parametrize(("text", "words"), [
    ('[[targets]]\ntarget = "a:b"\nevent = "E"\ncolour = "red"\n',
     "unknown key(s) 'colour'; expected arguments, event, metadata, span, target"),
    ('targets = "a:b"\n', "'targets' must be an array of tables ([[targets]])"),
    ('[[targets]]\ntarget = "a:b"\nevent = "E"\n[other]\nx = 1\n',
     "unknown top-level key 'other' (expected [[targets]] tables)"),
])
def test_toml_structure_errors_name_the_key(
    text: str, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tracking.toml"
    path.write_text(text)
    monkeypatch.setenv(env.OTEL_ZENML_ANALYTICS_CONFIG, str(path))
    _, problems = load_targets()
    assert any(words in p for p in problems), problems


def test_well_formed_values_of_every_variable_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the validation does not reject everything."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    tracking = tmp_path / "tracking.toml"
    tracking.write_text('[[targets]]\ntarget = "shop:other"\nevent = "RUN_PIPELINE"\n'
                        'metadata = { source = "api" }\narguments = ["name"]\nspan = false\n')
    good = {
        env.OTEL_ZENML_ANALYTICS_ENDPOINT: "https://user:pw@analytics.example.com:8443/base/",
        env.OTEL_ZENML_ANALYTICS_FORMAT: "ZenML",
        env.OTEL_ZENML_ANALYTICS_WRITE_KEY: "AbC123_-.~+/=",
        env.OTEL_ZENML_ANALYTICS_GZIP: "Yes",
        env.OTEL_ZENML_ANALYTICS_TIMEOUT: "2.5",
        env.OTEL_ZENML_ANALYTICS_MAX_QUEUE_SIZE: "5",
        env.OTEL_ZENML_ANALYTICS_BATCH_SIZE: "7",
        env.OTEL_ZENML_ANALYTICS_FLUSH_INTERVAL: "0",
        env.OTEL_ZENML_ANALYTICS_MAX_RETRIES: "0",
        env.OTEL_ZENML_ANALYTICS_STRICT_EVENTS: "off",
        env.OTEL_ZENML_ANALYTICS_CONFIG_DIR: str(tmp_path / "new-config-dir"),
        env.ZENML_ANALYTICS_OPT_IN: "False",
        env.ZENML_SERVER: "1",
        env.ZENML_DEBUG: "",
        env.OTEL_ZENML_ANALYTICS_TRACKED: "shop:place=Order placed;shop:Cls.m=RUN_PIPELINE",
        env.OTEL_ZENML_ANALYTICS_CONFIG: str(tracking),
        env.OTEL_ZENML_ANALYTICS_SPOOL: str(tmp_path / "spool.db"),
        env.OTEL_ZENML_ANALYTICS_SPOOL_MAX_BYTES: "1024",
        env.OTEL_ZENML_ANALYTICS_SPOOL_MAX_AGE: "60",
        env.OTEL_ZENML_ANALYTICS_RELAY_TOKEN: "tok-en_123",
        env.OTEL_ZENML_ANALYTICS_REDACT: "email,*password*,hash:user_name",
        env.OTEL_ZENML_ANALYTICS_INSECURE: "false",
        env.OTEL_ZENML_ANALYTICS_CA_BUNDLE: str(bundle),
        env.OTEL_ZENML_ANALYTICS_SPAN_END: " Caller ",
    }
    assert sorted(good) == ALL_VARIABLES, "add a well-formed value of the new variable here"
    for name, value in good.items():
        monkeypatch.setenv(name, value)
    settings = Settings.resolve()
    assert settings.endpoint == "https://user:pw@analytics.example.com:8443/base"
    assert "pw" not in repr(settings) and "AbC123" not in repr(settings)
    assert (settings.format, settings.gzip, settings.verify) == ("zenml", True, str(bundle))
    targets, problems = load_targets()
    assert problems == [] and len(targets) == 3
