"""The seed API: same module paths, names, signatures and enum members."""

from __future__ import annotations

import asyncio
import inspect
import re
import uuid
from pathlib import Path
from typing import Any, ClassVar, Dict, List

import pytest

import otel_zenml_analytics as oza
from otel_zenml_analytics import client, context, enums, models, request, utils
from otel_zenml_analytics.encoding import AnalyticsEncoder, dumps

SEED = (Path(__file__).parent / "data" / "zenml_analytics_api_reference.txt").read_text()


def _seed_enum() -> Dict[str, str]:
    section = SEED.split("zenml.analytics.enums module")[1].split("zenml.analytics.models")[0]
    return dict(re.findall(r"#### (\w+) \*= '([^']+)'", section))


def test_analytics_event_has_exactly_the_seed_members() -> None:
    seed = _seed_enum()
    assert len(seed) == 37
    assert {e.name: e.value for e in enums.AnalyticsEvent} == seed


def test_legacy_events_are_the_dropped_older_ones() -> None:
    names = {e.name for e in enums.LegacyAnalyticsEvent}
    assert not names & {e.name for e in enums.AnalyticsEvent}
    assert enums.LegacyAnalyticsEvent.GET_PIPELINES.value == "Pipelines fetched"
    assert len(names) == 26


def _params(func: Any) -> List[str]:
    return [p for p in inspect.signature(func).parameters if p not in ("self", "anonymous_id")]


@pytest.mark.parametrize(
    ("func", "params"),
    [
        (oza.alias, ["user_id", "previous_id"]),
        (oza.group, ["group_id", "group_metadata"]),
        (oza.identify, ["metadata"]),
        (oza.track, ["event", "metadata"]),
        (client.Client.__init__, ["send", "timeout"]),
        (client.Client.alias, ["user_id", "previous_id"]),
        (client.Client.group, ["user_id", "group_id", "traits"]),
        (client.Client.identify, ["user_id", "traits"]),
        (client.Client.track, ["user_id", "event", "properties"]),
        (context.AnalyticsContext.alias, ["user_id", "previous_id"]),
        (context.AnalyticsContext.group, ["group_id", "traits"]),
        (context.AnalyticsContext.identify, ["traits"]),
        (context.AnalyticsContext.track, ["event", "properties"]),
        (request.post, ["batch", "timeout"]),
        (utils.AnalyticsAPIError.__init__, ["status", "message"]),
        (utils.email_opt_int, ["opted_in", "email", "source"]),
        (utils.track_decorator, ["event"]),
        (utils.track_handler.__init__, ["event", "metadata"]),
    ],
)
def test_signatures_match_the_seed(func: Any, params: List[str]) -> None:
    assert _params(func)[: len(params)] == params


def test_client_defaults_and_send_false_returns_message_without_emitting() -> None:
    c = client.Client()
    assert (c.send, c.timeout) == (True, 15)
    ok, msg = client.Client(send=False).track(uuid.uuid4(), enums.AnalyticsEvent.RUN_PIPELINE,
                                              {"a": 1})
    assert ok is True
    assert msg["type"] == "track" and msg["event"] == "Pipeline run"
    assert msg["properties"] == {"a": 1}


def test_api_error_string() -> None:
    assert str(utils.AnalyticsAPIError(400, "bad")) == "[ZenML Analytics] 400: bad"


def test_encoder_handles_what_json_cannot() -> None:
    import datetime
    import decimal

    class Weird:
        def __str__(self) -> str:
            return "weird"

    value = {
        "u": uuid.UUID(int=1),
        "e": enums.AnalyticsEvent.RUN_PIPELINE,
        "d": datetime.datetime(2026, 1, 2, 3, 4, 5),
        "b": b"\xff\x00",
        "s": {3, 1},
        "n": float("nan"),
        "i": float("-inf"),
        "o": Weird(),
        "m": decimal.Decimal("1.5"),
    }
    text = dumps(value)
    assert '"u":"00000000-0000-0000-0000-000000000001"' in text
    assert '"e":"Pipeline run"' in text and '"n":"NaN"' in text and '"i":"-Infinity"' in text
    assert '"o":"weird"' in text and '"s":[1,3]' in text
    import json

    assert json.dumps({"x": uuid.UUID(int=2)}, cls=AnalyticsEncoder) == (
        '{"x": "00000000-0000-0000-0000-000000000002"}')


class Stack(models.AnalyticsTrackedModelMixin):
    ANALYTICS_FIELDS = ["name", "flavor"]

    def __init__(self, name: str) -> None:
        self.name = name
        self.flavor = "local"


def test_mixin_as_plain_class_and_on_pydantic() -> None:
    assert Stack("s").get_analytics_metadata() == {"name": "s", "flavor": "local"}
    pydantic = pytest.importorskip("pydantic")  # a dev dependency: present in CI

    class Model(models.AnalyticsTrackedModelMixin, pydantic.BaseModel):
        ANALYTICS_FIELDS: ClassVar[List[str]] = ["name", "missing"]
        name: str

    assert Model(name="m").get_analytics_metadata() == {"name": "m", "missing": None}


def test_analytics_disabler_sets_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    with utils.analytics_disabler():
        assert os.environ["ZENML_ANALYTICS_OPT_IN"] == "False"
    assert "ZENML_ANALYTICS_OPT_IN" not in os.environ
    monkeypatch.setenv("ZENML_ANALYTICS_OPT_IN", "true")
    with utils.analytics_disabler():
        assert os.environ["ZENML_ANALYTICS_OPT_IN"] == "False"
    assert os.environ["ZENML_ANALYTICS_OPT_IN"] == "true"


def test_analytics_context_never_raises_and_in_server(monkeypatch: pytest.MonkeyPatch) -> None:
    with context.AnalyticsContext() as analytics:
        raise RuntimeError("swallowed, as in ZenML")
    assert analytics.in_server is False
    monkeypatch.setenv("ZENML_SERVER", "true")
    assert context.AnalyticsContext().in_server is True


@pytest.mark.parametrize("word", ["1", "true", "yes", "on", "y", " Y "])
def test_every_word_the_settings_accept_as_true_turns_the_flags_on(
    word: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZENML_DEBUG", word)
    monkeypatch.setenv("ZENML_SERVER", word)
    _, message = client.Client(send=False).track(uuid.uuid4(), "Flagged", {})
    assert message["debug"] is True
    assert context.AnalyticsContext().in_server is True


def test_track_decorator_keeps_results_and_exceptions() -> None:
    @utils.track_decorator(enums.AnalyticsEvent.REGISTERED_STACK)
    def register(stack: Stack) -> Stack:
        return stack

    @utils.track_decorator("Failing")
    def fail() -> None:
        raise KeyError("boom")

    @utils.track_decorator("Async")
    async def later(x: int) -> int:
        return x * 2

    stack = Stack("s")
    assert register(stack) is stack
    assert register.__name__ == "register"
    with pytest.raises(KeyError):
        fail()
    assert asyncio.run(later(2)) == 4


def test_track_handler_does_not_swallow() -> None:
    with pytest.raises(ValueError), utils.track_handler("x"):
        raise ValueError("kept")
