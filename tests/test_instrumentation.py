"""Zero-code tracking: the real ``opentelemetry-instrument`` command on a sample app."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics.sink import SinkServer

from .conftest import BIN, CLI, Pipeline

APPS = Path(__file__).parent / "apps"
TRACKED = ";".join([
    "sample_app.shop:place_order=Order placed",
    "sample_app.shop:decorated=Decorated",
    "sample_app.shop:Stacks.register=REGISTERED_STACK",
    "sample_app.shop:Stacks.upgrade=Stack updated",
    "sample_app.shop:Stacks.count=Stacks counted",
    "sample_app.shop:Stacks.validate=Stack validated",
    "sample_app.shop:Stacks.Inner.deep=Deep call",
    "sample_app.shop:fetch=Fetched",
    "sample_app.shop:fail_checkout=Checkout",
    "sample_app.late:late_call=Late call",
])
EVENTS = ["Order placed", "Decorated", "Stack registered", "Stack updated", "Stacks counted",
          "Stack validated", "Deep call", "Fetched", "Checkout", "Late call"]


def _env(sink: SinkServer, config_dir: str, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_", "ZENML_"))}
    env.update({
        "PYTHONPATH": str(APPS),
        "OTEL_ZENML_ANALYTICS_CONFIG_DIR": config_dir,
        "OTEL_ZENML_ANALYTICS_ENDPOINT": sink.url,
        "OTEL_ZENML_ANALYTICS_TRACKED": TRACKED,
        "OTEL_SERVICE_NAME": "sample-shop",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    })
    env.update(extra)
    return env


def _instrumented(env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    command = [os.path.join(BIN, "opentelemetry-instrument"), sys.executable,
               str(APPS / "run_shop.py"), *args]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def _importable(root: Path, monkeypatch: pytest.MonkeyPatch, path: str, source: str) -> None:
    """Write ``source`` to ``root/path`` and put ``root`` first on ``sys.path``."""
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(source)
    monkeypatch.syspath_prepend(str(root))


@contextlib.contextmanager
def _instrumented_in(pipeline: Pipeline, targets: Any, **options: Any) -> Iterator[None]:
    """``targets`` instrumented in this process with ``pipeline``'s providers."""
    from otel_zenml_analytics.instrumentation import ZenMLAnalyticsInstrumentor

    instrumentor = ZenMLAnalyticsInstrumentor()
    instrumentor.instrument(targets=targets, tracer_provider=pipeline.sdk.tracer_provider,
                            logger_provider=pipeline.sdk.logger_provider,
                            attach_span_processor=False, **options)
    try:
        yield
    finally:
        instrumentor.uninstrument()


def _by_event(sink: SinkServer) -> Dict[str, Dict[str, Any]]:
    events = sink.store.query(limit=1000)
    names = [e["event"] for e in events]
    assert len(names) == len(set(names)), f"an event arrived twice: {sorted(names)}"
    return {e["event"]: e["message"] for e in events}


@pytest.mark.parametrize("logs_exporter", ["zenml_analytics", "none"],
                         ids=["logs-exporter-and-span-processor", "span-processor-only"])
def test_every_target_kind_is_tracked_once(
    sink: SinkServer, isolated_env: str, logs_exporter: str
) -> None:
    out = _instrumented(_env(sink, isolated_env, OTEL_LOGS_EXPORTER=logs_exporter))
    assert "caught ValueError card declined" in out.stdout  # the app still sees its exception
    assert "decorated 2 decorated" in out.stdout  # return value and functools.wraps name kept
    assert "fetch 40" in out.stdout and "deep deep" in out.stdout
    events = _by_event(sink)
    assert sorted(events) == sorted(EVENTS)
    assert sink.stats()["received_messages"] == len(EVENTS)
    for name, message in events.items():
        assert len(message["context"]["trace_id"]) == 32, name
        expected = name != "Checkout"
        assert message["properties"]["event_success"] is expected, name
    assert events["Checkout"]["properties"]["event_error_type"] == "ValueError"
    assert events["Stack registered"]["properties"]["name"] == "prod"  # from the model argument
    assert events["Stack updated"]["properties"]["flavor"] == "upgraded"  # from the return value


def test_uninstrument_restores_the_originals(sink: SinkServer, isolated_env: str) -> None:
    out = _instrumented(_env(sink, isolated_env), "--uninstrument")
    assert "restored sample_app.shop classmethod function" in out.stdout
    assert [e["event"] for e in sink.store.query(event="Order placed")] == ["Order placed"]


def test_malformed_entries_are_reported_and_the_others_still_tracked(
    sink: SinkServer, isolated_env: str
) -> None:
    env = _env(sink, isolated_env, OTEL_ZENML_ANALYTICS_TRACKED=(
        "sample_app.shop:place_order;bad target=X;sample_app.shop:decorated=Decorated"))
    out = _instrumented(env)
    assert ("OTEL_ZENML_ANALYTICS_TRACKED entry 1 'sample_app.shop:place_order': missing "
            "'=EVENT'") in out.stderr
    assert "entry 2 'bad target=X': 'bad target' is not MODULE:QUALNAME" in out.stderr
    assert "(the 1 well-formed target(s) are)" in out.stderr
    assert "place_order 2 x book" in out.stdout
    assert [e["event"] for e in sink.store.query()] == ["Decorated"]


def test_missing_targets_are_named_and_the_others_still_tracked(
    sink: SinkServer, isolated_env: str
) -> None:
    env = _env(sink, isolated_env, OTEL_ZENML_ANALYTICS_TRACKED=(
        "sample_app.shop:nope=X;no_such_module:f=Y;sample_app.shoop:g=Z;"
        "sample_app.shop:place_order=Order placed"))
    out = _instrumented(env)
    assert "cannot track sample_app.shop:nope" in out.stderr
    assert "cannot track no_such_module:f: module 'no_such_module' not found" in out.stderr
    # A misspelt submodule, named once the app imported its package.
    assert "cannot track sample_app.shoop:g: module 'sample_app.shoop' not found" in out.stderr
    assert [e["event"] for e in sink.store.query()] == ["Order placed"]


def test_a_package_that_needs_the_apps_set_up_is_not_imported_at_start_up(
    sink: SinkServer, isolated_env: str, tmp_path: Path
) -> None:
    package = tmp_path / "needs_setup"
    package.mkdir()
    (package / "__init__.py").write_text('import os\nDB_URL = os.environ["APP_DB_URL"]\n')
    (package / "mod.py").write_text("def f():\n    return 'f ran'\n")
    app = tmp_path / "app.py"
    app.write_text('import os\nos.environ["APP_DB_URL"] = "sqlite://"\n'
                   "import needs_setup.mod\nprint(needs_setup.mod.f())\n")
    env = _env(sink, isolated_env, PYTHONPATH=str(tmp_path), OTEL_ZENML_ANALYTICS_TRACKED=(
        "needs_setup.mod:f=Set up first;no_such_package.mod:g=Never"))
    out = subprocess.run([os.path.join(BIN, "opentelemetry-instrument"), sys.executable,
                          str(app)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "f ran" in out.stdout, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "cannot track no_such_package.mod:g: module 'no_such_package' not found" in (
        out.stderr)
    assert [e["event"] for e in sink.store.query()] == ["Set up first"]


def test_check_command(sink: SinkServer, isolated_env: str, tmp_path: Path) -> None:
    env = _env(sink, isolated_env)
    ok = subprocess.run([CLI, "check"], env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "ok  sample_app.shop:Stacks.register -> 'Stack registered'" in ok.stdout
    assert "10 target(s) ok, 0 problem(s)" in ok.stdout
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text('[[targets]]\ntarget = "sample_app.shop:place_order"\nevent = 3\n')
    env.update(OTEL_ZENML_ANALYTICS_TRACKED="sample_app.shop:gone=X;no_such_module:f=Y",
               OTEL_ZENML_ANALYTICS_CONFIG=str(bad_toml))
    bad = subprocess.run([CLI, "check"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "sample_app.shop:gone: module 'sample_app.shop' has no attribute 'gone'" in bad.stderr
    assert "no_such_module:f: cannot import 'no_such_module'" in bad.stderr
    assert "[[targets]] number 1 ('sample_app.shop:place_order'): 'event' is required" in (
        bad.stderr)


def test_in_process_instrument_with_toml_options(
    make_pipeline: Callable[..., Pipeline], sink: SinkServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(APPS))
    from sample_app import shop

    from otel_zenml_analytics.instrumentation import ZenMLAnalyticsInstrumentor
    from otel_zenml_analytics.instrumentation.targets import parse_config_file

    config = tmp_path / "tracking.toml"
    config.write_text(
        '[[targets]]\ntarget = "sample_app.shop:place_order"\nevent = "RUN_PIPELINE"\n'
        'metadata = { source = "toml" }\narguments = ["item", "quantity"]\nspan = false\n'
        '[[targets]]\ntarget = "sample_app.shop:Stacks.count"\nevent = "Pipeline built"\n')
    targets, problems = parse_config_file(str(config))
    assert problems == []
    original_count = vars(shop.Stacks)["count"]
    original_place = shop.place_order
    pipeline = make_pipeline(endpoint=sink.url)
    instrumentor = ZenMLAnalyticsInstrumentor()
    instrumentor.instrument(targets=targets, tracer_provider=pipeline.sdk.tracer_provider,
                            logger_provider=pipeline.sdk.logger_provider,
                            attach_span_processor=False)
    try:
        assert shop.place_order("pen", quantity=3) == "3 x pen"
        assert shop.Stacks.count() == 3
    finally:
        instrumentor.uninstrument()
    assert shop.place_order is original_place
    assert vars(shop.Stacks)["count"] is original_count
    pipeline.flush()
    props = sink.store.query(event="Pipeline run")[0]["message"]["properties"]
    assert (props["source"], props["item"], props["quantity"]) == ("toml", "pen", 3)
    span_names: List[str] = [s.name for s in pipeline.spans.get_finished_spans()]
    assert "sample_app.shop.Stacks.count" in span_names
    assert "sample_app.shop.place_order" not in span_names  # span = false


def test_model_metadata_that_is_not_a_dict_is_left_out_and_never_raises(
    make_pipeline: Callable[..., Pipeline], sink: SinkServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    _importable(tmp_path, monkeypatch, "odd_models.py",
                "from otel_zenml_analytics.models import AnalyticsTrackedModelMixin\n"
                "class Odd(AnalyticsTrackedModelMixin):\n"
                "    def get_analytics_metadata(self):\n"
                "        return [('flavor', 'local')]\n"
                "def register(model):\n"
                "    return 'registered'\n"
                "def create():\n"
                "    return Odd()\n")
    import odd_models  # type: ignore[import-not-found]

    from otel_zenml_analytics.utils import track_decorator

    pipeline = make_pipeline(endpoint=sink.url)
    with _instrumented_in(pipeline, "odd_models:register=Registered;odd_models:create=Created"):
        assert odd_models.register(odd_models.Odd()) == "registered"
        assert isinstance(odd_models.create(), odd_models.Odd)
    assert track_decorator("Decorated")(odd_models.register)(odd_models.Odd()) == "registered"
    pipeline.flush()
    assert sorted(e["event"] for e in sink.store.query()) == ["Created", "Decorated",
                                                              "Registered"]
    assert "Odd.get_analytics_metadata() returned list, not a dict" in caplog.text


@pytest.mark.parametrize("span_end", ["background", "caller"])
def test_a_tracked_call_is_one_span_holding_its_children_its_event_and_its_exception(
    make_pipeline: Callable[..., Pipeline], sink: SinkServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, span_end: str,
) -> None:
    # By default the call's span is ended, and its analytics event added, by the signals
    # thread: the trace must show what the caller's thread records with span_end=caller.
    _importable(tmp_path, monkeypatch, "checkout_app.py",
                "def pay(tracer, fail):\n"
                "    with tracer.start_as_current_span('charge card'):\n"
                "        pass\n"
                "    if fail:\n"
                "        raise ValueError('card declined')\n"
                "    return 42\n"
                "def order(tracer):\n"
                "    try:\n"
                "        return pay(tracer, True)\n"
                "    except ValueError as exc:\n"
                "        exc.args = ('changed after the call',)\n"
                "        raise\n")
    import checkout_app  # type: ignore[import-not-found]

    pipeline = make_pipeline(endpoint=sink.url)
    with _instrumented_in(pipeline, "checkout_app:pay=Checkout", span_end=span_end):
        assert checkout_app.pay(pipeline.tracer, False) == 42
        if span_end == "caller":  # ended as the call returned
            assert [s.name for s in pipeline.spans.get_finished_spans()] == [
                "charge card", "checkout_app.pay"]
        with pytest.raises(ValueError, match="changed after the call"):
            checkout_app.order(pipeline.tracer)
        returned_at = time.time_ns()
    pipeline.flush()
    spans = pipeline.spans.get_finished_spans()
    assert not [s.name for s in spans if s.name.startswith("analytics ")]
    calls = sorted((s for s in spans if s.name == "checkout_app.pay"), key=_started)
    children = sorted((s for s in spans if s.name == "charge card"), key=_started)
    assert len(calls) == len(children) == 2
    records = {r.log_record.attributes[SUCCESS]: r.log_record
               for r in pipeline.logs.get_finished_logs()}
    for call, child, success in zip(calls, children, (True, False)):
        assert call.attributes["code.function.name"] == "checkout_app.pay"
        assert child.parent is not None and child.parent.span_id == call.context.span_id
        assert call.start_time <= child.start_time <= child.end_time <= call.end_time
        assert call.end_time <= returned_at
        [event] = [e for e in call.events if e.name == "Checkout"]
        assert call.start_time <= event.timestamp <= call.end_time
        assert event.attributes[SUCCESS] is success
        assert records[success].span_id == call.context.span_id
    ok, failed = calls
    assert ok.status.status_code is StatusCode.UNSET
    # The exception as it left the call: recorded on the caller's thread, then.
    assert (failed.status.status_code, failed.status.description) == (
        StatusCode.ERROR, "ValueError: card declined")
    # Recorded as it left the call, before the analytics event that says it failed.
    assert [e.name for e in failed.events] == ["exception", "Checkout"]
    events = {e.name: e for e in failed.events}
    assert events["exception"].timestamp <= events["Checkout"].timestamp
    assert events["exception"].attributes["exception.type"] == "ValueError"
    stacktrace = events["exception"].attributes["exception.stacktrace"]
    assert "in pay" in stacktrace and "in order" not in stacktrace
    assert sorted(e["message"]["properties"]["event_success"]
                  for e in sink.store.query(event="Checkout")) == [False, True]


def test_a_tracked_call_leaves_no_garbage_cycle(
    make_pipeline: Callable[..., Pipeline], sink: SinkServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A host may turn the cycle collector off: each call's span (with its events and
    # context) must be freed when its last reference goes, not left for the collector.
    _importable(tmp_path, monkeypatch, "cycle_app.py", "def pay(fail):\n"
                "    if fail:\n        raise ValueError('declined')\n    return 1\n")
    import cycle_app  # type: ignore[import-not-found]

    pipeline = make_pipeline(endpoint=sink.url)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with _instrumented_in(pipeline, "cycle_app:pay=Paid"):
            for n in range(20):
                with contextlib.suppress(ValueError):
                    cycle_app.pay(n % 2)
            pipeline.flush()
        pipeline.spans.clear()
        pipeline.logs.clear()
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, ReadableSpan)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == []
    assert len(sink.store.query(event="Paid")) == 20


SUCCESS = keys.PROPERTIES_PREFIX + "event_success"


def _started(span: Any) -> int:
    return int(span.start_time)


def test_a_submodule_made_at_run_time_is_tracked_without_a_false_warning(
    make_pipeline: Callable[..., Pipeline], sink: SinkServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    _importable(tmp_path, monkeypatch, "made_at_run_time/__init__.py",
                "import sys, types\n"
                "generated = types.ModuleType(__name__ + '.generated')\n"
                "exec('def f():\\n    return 42', generated.__dict__)\n"
                "sys.modules[generated.__name__] = generated\n")
    import made_at_run_time  # type: ignore[import-not-found]  # noqa: F401

    pipeline = make_pipeline(endpoint=sink.url)
    with _instrumented_in(pipeline, "made_at_run_time.generated:f=Generated"):
        assert sys.modules["made_at_run_time.generated"].f() == 42
    pipeline.flush()
    assert [e["event"] for e in sink.store.query()] == ["Generated"]
    assert "not found" not in caplog.text


def test_a_malformed_span_end_raises_before_anything_changes() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from otel_zenml_analytics import signals
    from otel_zenml_analytics.instrumentation import ZenMLAnalyticsInstrumentor
    from otel_zenml_analytics.settings import ConfigurationError

    tracer = signals._providers.tracer
    for value, shown in ((True, "span_end=True"), ("sideways", "span_end='sideways'")):
        with pytest.raises(ConfigurationError, match=f"{shown} is not where a span can end"):
            ZenMLAnalyticsInstrumentor().instrument(targets="shop:pay=Paid", span_end=value,
                                                    tracer_provider=TracerProvider())
        ZenMLAnalyticsInstrumentor().uninstrument()
    assert signals._providers.tracer is tracer  # the analytics calls' providers: unchanged


def test_explicit_malformed_targets_raise() -> None:
    from otel_zenml_analytics.instrumentation import ZenMLAnalyticsInstrumentor
    from otel_zenml_analytics.settings import ConfigurationError

    with pytest.raises(ConfigurationError, match="missing '=EVENT'"):
        ZenMLAnalyticsInstrumentor().instrument(targets="pkg.mod:func")
    ZenMLAnalyticsInstrumentor().uninstrument()
