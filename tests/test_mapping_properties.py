"""Property-based tests of the one mapping: any properties, never raises, never silently lost."""

from __future__ import annotations

import datetime
import enum
import json
import math
import uuid
from typing import Any, Dict, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics import settings as settings_module
from otel_zenml_analytics.destinations import encode_fitted
from otel_zenml_analytics.encoding import dumps, jsonable
from otel_zenml_analytics.mapping import MAX_MESSAGE_BYTES, fit_size, message_from_attributes
from otel_zenml_analytics.redaction import Redactor
from otel_zenml_analytics.settings import Settings
from otel_zenml_analytics.signals import to_attributes

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=200),
    st.uuids(), st.datetimes(), st.binary(max_size=50),
    st.text(min_size=5_000, max_size=40_000),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=10), inner, max_size=5),
                            st.frozensets(st.integers(), max_size=5)),
    max_leaves=20,
)
properties = st.dictionaries(st.text(min_size=1, max_size=30), values, max_size=12)


def _roundtrip(props: Any) -> dict:  # type: ignore[type-arg]
    message = {"type": "track", "messageId": str(uuid.uuid4()), "userId": "u",
               "event": "Property test", "properties": props}
    return message_from_attributes(to_attributes(message), 1_700_000_000_000_000_000, 1, 2)


def _on_the_wire(props: Any, wire_format: str) -> tuple[bytes, bool]:
    """The message as the delivery would send it, and whether it was marked truncated."""
    settings = Settings(endpoint="http://127.0.0.1:9", format=wire_format)
    text, truncated = encode_fitted(settings, _roundtrip(props))
    return text.encode("utf-8"), truncated


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return actual == "NaN"
    return bool(jsonable(expected) == actual or dumps(expected) == dumps(actual))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(properties)
def test_any_properties_map_without_raising_and_fit_or_are_marked(props: Any) -> None:
    for wire_format in ("segment", "zenml"):
        wire, marked = _on_the_wire(props, wire_format)
        message = json.loads(wire)  # strict JSON, whatever came in
        json.dumps(message, allow_nan=False)
        truncated = set(message["context"].get("truncated", []))
        assert marked == bool(truncated)
        assert len(wire) <= MAX_MESSAGE_BYTES or not message["properties"]
        assert set(message["properties"]) == set(props)  # no key silently dropped
        for key, value in props.items():
            if f"properties.{key}" not in truncated:
                assert _same(value, message["properties"][key]), key


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=20),
                       st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1),
                                 st.text(max_size=50),
                                 st.floats(allow_nan=False, allow_infinity=False)),
                       max_size=20))
def test_primitives_keep_their_type_as_attributes(props: Any) -> None:
    attrs = to_attributes({"type": "track", "messageId": "m", "event": "e", "properties": props})
    for key, value in props.items():
        stored = attrs[keys.PROPERTIES_PREFIX + key]
        assert type(stored) is type(value) and stored == value
    assert _roundtrip(props)["properties"] == props


def test_dates_and_uuids_become_strings() -> None:
    when = datetime.datetime(2026, 11, 23, 9, 0)
    props = _roundtrip({"when": when, "id": uuid.UUID(int=5)})["properties"]
    assert props == {"when": "2026-11-23T09:00:00", "id": str(uuid.UUID(int=5))}


def test_a_json_keys_attribute_from_elsewhere_is_read_leniently() -> None:
    """A relayed record's ``json_keys`` may list anything: the listed string keys are
    decoded, other entries (and a value that is not a list) are ignored, and thousands
    of entries are looked up in a set."""
    prefix = keys.PROPERTIES_PREFIX
    listed = tuple(f"{prefix}k{i}" for i in range(5000)) + (7, None, prefix + "doc")
    attributes = {prefix + "doc": '{"a": 1}', prefix + "raw": '{"b": 2}', keys.JSON_KEYS: listed,
                  **{f"{prefix}k{i}": str(i) for i in range(5000)}}
    payload = keys.decode_payload(prefix, attributes)
    assert payload["doc"] == {"a": 1} and payload["raw"] == '{"b": 2}'
    assert payload["k42"] == 42
    for odd in (7, "zenml.analytics.properties.doc", True):
        assert keys.decode_payload(prefix, {**attributes, keys.JSON_KEYS: odd})["doc"] == \
            '{"a": 1}'


def test_fitting_a_message_of_many_values_measures_it_a_few_times_only() -> None:
    """A relayed record with thousands of small properties: the message is measured in its
    wire form a few times, not once per key (that was quadratic: a 620 kB body of 10,000
    properties took 15 s of a request thread)."""
    measured = []

    def measure(message: Any) -> int:
        measured.append(1)
        return len(dumps(message).encode("utf-8"))

    many = {f"k{i:05d}": "v" * 20 for i in range(2_000)}
    one_big = {"blob": "x" * 100_000, "small": 1}
    for props in (many, one_big):
        measured.clear()
        fitted = fit_size({"type": "track", "messageId": "m", "event": "e", "userId": "u",
                           "properties": props}, measure)
        assert len(measured) <= 4, len(measured)
        assert set(fitted["properties"]) == set(props)
    assert measure(fitted) <= MAX_MESSAGE_BYTES  # one big value: it fits
    assert fitted["context"]["truncated"] == ["properties.blob"]


@pytest.mark.parametrize(("props", "cut", "at_least"), [
    ({"learning_rates": [1e-05] * 6_000, "checkpoint": None}, ["learning_rates"], 31_000),
    # The cut of "big" is computed from its orjson text, shorter than the message's own.
    ({"big": [1e-9] * 40_000, "n": None, **{f"k{i}": i for i in range(2_000)}}, ["big"],
     23_000),
    ({"floats": [1e-05] * 6_000, "text": "x" * 47_999, "score": float("nan")},
     ["floats", "text"], 31_000),
], ids=["sum-too-low", "sum-too-high", "sum-too-low-then-a-string"])
@pytest.mark.parametrize("wire_format", ["segment", "zenml"])
def test_values_written_otherwise_inside_the_message_are_cut_just_enough(
    props: Dict[str, Any], cut: List[str], at_least: int, wire_format: str
) -> None:
    """``dumps`` picks its encoder per document (a ``null`` anywhere sends it to the
    standard library, which writes 1e-05 and 1e-09 where orjson writes 0.00001 and 1e-9):
    a value's size alone is not its size in the message, so the running sum drifts both
    ways. The message must fit, with the keys cut that must be and no more."""
    settings = Settings(endpoint="http://127.0.0.1:9", format=wire_format)
    text, truncated = encode_fitted(settings, {"type": "track", "messageId": "m",
                                               "event": "e", "userId": "u",
                                               "properties": props})
    assert truncated and at_least <= len(text.encode("utf-8")) <= MAX_MESSAGE_BYTES
    assert json.loads(text)["context"]["truncated"] == [f"properties.{key}" for key in cut]


def test_a_json_listed_value_too_deep_to_parse_is_kept_as_its_string() -> None:
    deep = "[" * 5_000 + "]" * 5_000
    name = keys.PROPERTIES_PREFIX + "deep"
    attributes = {name: deep, keys.JSON_KEYS: (name,), keys.FACTS: deep}
    assert keys.decode_payload(keys.PROPERTIES_PREFIX, attributes) == {"deep": deep}


@pytest.fixture
def collisions_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test warns about collisions of keys afresh (they are told once per process)."""
    monkeypatch.setattr(settings_module, "_warned", set())
    monkeypatch.setattr(settings_module, "_warned_of", {})


@pytest.mark.parametrize("extra", [0, keys.MAX_FLAT_KEYS + 1])
def test_keys_that_are_the_same_text_keep_the_last_value_and_say_so(
        extra: int, caplog: pytest.LogCaptureFixture, collisions_told: None) -> None:
    filler = {f"filler {index}": index for index in range(extra)}
    high, low = chr(0xD800) + "x", chr(0xDC00) + "x"  # ruff reads both literals as one
    pair = chr(0xD83D) + chr(0xDE00)  # a surrogate pair as two code points: the same emoji
    props = {**filler, 1: "first", "1": "second", high: "a", low: "b",
             "\U0001F600": "emoji", pair: "pair"}
    with caplog.at_level("WARNING", logger="otel_zenml_analytics.attributes"):
        sent = _roundtrip(props)["properties"]
    said = caplog.text
    assert sent["1"] == "second" and sent["\U0001F600"] == "pair"
    assert "have 2 keys sent as '1' (int, str): only the last one's value is kept" in said
    assert "have 2 keys sent as '\\U0001f600' (str, str)" in said
    if extra:  # one JSON attribute: JSON spells a lone surrogate as an escape
        assert sent[high] == "a" and sent[low] == "b"
        assert len(sent) == extra + 4 and "x'" not in said
    else:  # an attribute's name cannot hold one
        assert sent["\ufffdx"] == "b" and len(sent) == 3
        assert "have 2 keys sent as '\\ufffdx' (str, str)" in said


class _One(enum.Enum):
    A = 1


@pytest.mark.parametrize(("props", "kept"), [
    ({1: None, "1": "42"}, "42"),
    ({1: [1], "1": "true"}, "true"),
    ({"1": [1], 1: "true"}, "true"),
    ({None: {"a": 1}, "null": "[1, 2]"}, "[1, 2]"),
    ({"null": "[1, 2]", None: {"a": 1}}, {"a": 1}),
    ({1: [1], "1": [2], _One.A: "42"}, "42"),
])
def test_the_last_value_of_keys_spelt_alike_is_kept_as_it_was(
        props: Dict[Any, Any], kept: Any, collisions_told: None) -> None:
    """A plain value that replaced a JSON-encoded one is not decoded as JSON."""
    (sent,) = _roundtrip(props)["properties"].values()
    assert sent == kept and type(sent) is type(kept)


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    __repr__ = __str__


def test_keys_that_cannot_be_printed_or_many_alike_do_not_break_the_call(
        caplog: pytest.LogCaptureFixture, collisions_told: None) -> None:
    with caplog.at_level("WARNING", logger="otel_zenml_analytics.attributes"):
        sent = _roundtrip({_Unprintable(): 1, _Unprintable(): 2})["properties"]
        assert sent == {"<unprintable _Unprintable>": 2}
        for index in range(keys.COLLISIONS_TOLD + 5):
            _roundtrip({index: 1, str(index): 2, float(index): 3})
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings[0].startswith("Analytics properties have 2 keys sent as "
                                  "'<unprintable _Unprintable>' (_Unprintable, _Unprintable)")
    assert len(warnings) == keys.COLLISIONS_TOLD
    assert warnings[-1].endswith("(Further collisions of keys are not reported.)")
    _roundtrip({"a": 1, "b": 2})
    assert len(caplog.records) == keys.COLLISIONS_TOLD


def test_keys_of_other_types_that_stay_distinct_are_not_warned_about(
        caplog: pytest.LogCaptureFixture, collisions_told: None) -> None:
    class Kind(enum.Enum):
        NOTHING = None
        YES = True

    with caplog.at_level("WARNING", logger="otel_zenml_analytics.attributes"):
        sent = _roundtrip({2: "two", "3": "three", None: "none", True: "yes",
                           "é": 1})["properties"]
        assert sent == {"2": "two", "3": "three", "null": "none", "true": "yes", "é": 1}
        sent = _roundtrip({Kind.NOTHING: "kind", Kind.YES: "kind too"})["properties"]
        assert sent == {"null": "kind", "true": "kind too"}
    assert caplog.text == ""


def test_redaction_matches_keys_as_they_are_sent() -> None:
    class Keys(enum.Enum):
        API_TOKEN = "api_token"

    redacted = Redactor("*token*,null,hash:true").payload(
        {Keys.API_TOKEN: "secret", None: "x", True: "y", 3: "z"})
    assert list(redacted) == [True, 3] and redacted[True].startswith("sha256:")
