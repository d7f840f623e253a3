"""``encoding.dumps`` writes with orjson what orjson writes as the standard library would,
and hands everything else to the standard library's path: the same JSON values either way."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import json
import uuid
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from otel_zenml_analytics.encoding import _standard_dumps, dumps
from otel_zenml_analytics.enums import AnalyticsEvent


class _Float(float):
    pass


class _Text(str):
    pass


class _Color(enum.Enum):
    RED = "red"


class _Size(enum.IntEnum):
    LARGE = 3


_Point = collections.namedtuple("_Point", "x y")


@dataclasses.dataclass
class _Step:
    name: str
    took: datetime.timedelta


class _Opaque:
    def __str__(self) -> str:
        return "opaque"


_ODD = [
    uuid.UUID(int=7), AnalyticsEvent.RUN_PIPELINE, _Color.RED, _Size.LARGE, _Float(2.5),
    _Text("text"), _Point(1, 2), _Step("train", datetime.timedelta(seconds=1.5)),
    datetime.datetime(2026, 1, 2, 3, 4, 5, 6),
    datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone(datetime.timedelta(hours=5))),
    datetime.date(2026, 1, 2), datetime.time(1, 2, 3, 4), decimal.Decimal("1.10"),
    b"\xff\x00", b"bytes", {3, 1}, frozenset(), _Opaque(), 2**64, -(2**63) - 1,
    float("nan"), float("inf"), float("-inf"), None, "null",
]

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
                     st.sampled_from(_ODD))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans()),
                        inner, max_size=4)),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(value=_VALUES)
def test_dumps_writes_the_values_the_standard_library_path_writes(value: Any) -> None:
    assert json.loads(dumps(value)) == json.loads(_standard_dumps(value))


def test_nan_anywhere_becomes_a_string_and_nothing_is_null_that_was_not_none() -> None:
    text = dumps({"a": [1, {"b": float("nan")}], "c": None, "d": float("-inf")})
    assert json.loads(text) == {"a": [1, {"b": "NaN"}], "c": None, "d": "-Infinity"}


def test_a_message_orjson_writes_is_compact_json_with_text_unescaped() -> None:
    assert dumps({"event": "Pipeline run", "ok": True, "n": 1.5, "é": ["ü"]}) == (
        '{"event":"Pipeline run","ok":true,"n":1.5,"é":["ü"]}')
