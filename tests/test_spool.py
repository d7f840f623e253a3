"""The durable spool: nothing lost while the destination is down, across restarts and kills."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Dict

import pytest

import otel_zenml_analytics as oza
from otel_zenml_analytics.sink import SinkServer
from otel_zenml_analytics.spool import Spool

from .conftest import Pipeline, silent_endpoint, wait_until

APP = textwrap.dedent(
    """
    import sys, time
    from otel_zenml_analytics import track
    from otel_zenml_analytics.sdk import configure_sdk
    configure_sdk(set_global=True)
    label, count = sys.argv[1], int(sys.argv[2])
    for i in range(count):
        track("Spooled", {"label": label, "i": i})
    print("tracked", flush=True)
    if "--hang" in sys.argv:
        time.sleep(600)
    """
)


def _pending(spool_path: Path) -> int:
    if not spool_path.exists():
        return 0
    with sqlite3.connect(spool_path) as db:
        return int(db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])


def _run_app(env: Dict[str, str], label: str, count: int) -> None:
    """``APP`` to its end: ``count`` tracks labelled ``label``, then the exit's flush."""
    out = subprocess.run([sys.executable, "-c", APP, label, str(count)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _app_env(sink: SinkServer, spool_path: Path, config_dir: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ZENML_"))}
    env.update(OTEL_ZENML_ANALYTICS_ENDPOINT=sink.url, OTEL_ZENML_ANALYTICS_SPOOL=str(spool_path),
               OTEL_ZENML_ANALYTICS_CONFIG_DIR=config_dir, OTEL_ZENML_ANALYTICS_TIMEOUT="2")
    return env


def test_destination_down_then_up_delivers_everything_in_order(
    sink: SinkServer, make_pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    sink.set_faults(10_000, status=503)
    pipeline = make_pipeline(endpoint=sink.url, spool=str(tmp_path / "spool.db"), max_retries=1)
    for i in range(30):
        oza.track("Ordered", {"i": i})
    # A flush retries what waits in the spool, and says so when the destination stays down.
    assert not pipeline.sdk.force_flush(10_000)
    assert _pending(tmp_path / "spool.db") == 30
    assert sink.store.count() == 0
    sink.set_faults(0)
    oza.track("Ordered", {"i": 30})  # the next successful request drains the spool
    pipeline.flush()
    wait_until(lambda: sink.store.count() == 31, "31 events stored")
    order = [e["message"]["properties"]["i"] for e in sink.store.query(limit=100,
                                                                        oldest_first=True)]
    assert order == list(range(31))
    # The worker deletes a batch from the spool once the server's answer is in.
    wait_until(lambda: _pending(tmp_path / "spool.db") == 0, "an empty spool")
    assert sink.stats()["duplicate_messages"] == 0


def _spooled_while_down(sink: SinkServer, spool_path: Path, config_dir: str,
                        count: int) -> Dict[str, str]:
    """An app's environment, after one run of it tracked ``count`` events while the
    destination answered 503: they wait in the spool."""
    env = _app_env(sink, spool_path, config_dir)
    sink.set_faults(10_000, status=503)
    _run_app(env, "first", count)
    assert _pending(spool_path) == count and sink.store.count() == 0
    return env


def test_next_start_delivers_what_an_earlier_process_left(
    sink: SinkServer, tmp_path: Path, isolated_env: str
) -> None:
    spool_path = tmp_path / "spool.db"
    env = _spooled_while_down(sink, spool_path, isolated_env, 40)
    sink.set_faults(0)
    _run_app(env, "second", 0)
    assert sink.store.count() == 40 and _pending(spool_path) == 0
    assert sink.stats()["duplicate_messages"] == 0


def test_sigkill_with_messages_waiting_loses_nothing(
    sink: SinkServer, tmp_path: Path, isolated_env: str
) -> None:
    spool_path = tmp_path / "spool.db"
    env = _app_env(sink, spool_path, isolated_env)
    sink.set_faults(10_000, status=503)
    app = subprocess.Popen([sys.executable, "-c", APP, "killed", "60", "--hang"], env=env,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None and app.stdout.readline().strip() == "tracked"
        wait_until(lambda: _pending(spool_path) == 60, "60 messages spooled")
    finally:
        app.send_signal(signal.SIGKILL)
        app.wait(30)
    assert app.returncode == -signal.SIGKILL
    sink.set_faults(0)
    _run_app(env, "restart", 0)
    assert sink.store.count() == 60
    assert sink.stats()["received_messages"] == 60  # nothing twice


def test_two_processes_share_one_spool(sink: SinkServer, tmp_path: Path,
                                       isolated_env: str) -> None:
    spool_path = tmp_path / "spool.db"
    env = _app_env(sink, spool_path, isolated_env)
    sink.set_faults(5, status=503)
    apps = [subprocess.Popen([sys.executable, "-c", APP, label, "150"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for label in ("a", "b")]
    for app in apps:
        app.wait(120)
        assert app.returncode == 0, app.stderr.read() if app.stderr else ""
    for _ in range(5):  # a process that ends during backoff leaves the rest for the next start
        if not _pending(spool_path):
            break
        subprocess.run([sys.executable, "-c", APP, "drain", "0"], env=env, timeout=120,
                       check=True)
    assert sink.stats()["faulted_requests"] == 5
    assert sink.store.count() == 300
    assert sink.stats()["received_messages"] == 300


def test_spool_is_bounded_and_counts_evictions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    spool = Spool(str(tmp_path / "small.db"), max_bytes=10_000)
    body = "x" * 1000
    spool.add("dest", [(f"id-{i}", body) for i in range(30)])
    assert spool.pending("dest") <= 10
    assert spool.evicted >= 20
    assert "evicted the" in caplog.text
    oldest = spool.claim("dest", 1, 10**6)
    spool.release(oldest.ids)
    assert oldest.bodies == [body]
    spool.close()


def test_unusable_spool_path_is_a_clear_start_up_error(tmp_path: Path) -> None:
    from otel_zenml_analytics.processor import SegmentSpanProcessor
    from otel_zenml_analytics.settings import ConfigurationError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigurationError, match="OTEL_ZENML_ANALYTICS_SPOOL"):
        SegmentSpanProcessor(endpoint="http://127.0.0.1:9", spool=str(blocker / "spool.db"))


def test_a_full_queue_overflows_into_the_spool(
    make_pipeline: Callable[..., Pipeline], tmp_path: Path
) -> None:
    """A destination that accepts connections and never answers holds the worker in its
    first request; with a queue of one, the other events overflow: kept for the spool,
    written there together (at the latest when the worker's request times out)."""
    with silent_endpoint() as endpoint:
        pipeline = make_pipeline(endpoint=endpoint, spool=str(tmp_path / "spool.db"),
                                 max_queue_size=1, batch_size=1, timeout=2)
        tracer = pipeline.tracer
        for i in range(20):
            with tracer.start_as_current_span("work"):  # the span ends on this thread
                assert oza.track("Overflowing", {"i": i})
        wait_until(lambda: _pending(tmp_path / "spool.db") == 20, "20 messages spooled", 30)
        stats = pipeline.stats
        assert stats["dropped_queue_full"] == 0
        assert stats["spooled_on_overflow"] >= 18
