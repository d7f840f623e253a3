"""``python -m bench.reliability``: every fault of issue 6 with real processes and
sockets, and ``bench/reliability.md``, one table row per fault.

An application process (the public API: ``track`` with ``configure_sdk``, configured
through the environment) sends events, each with a unique ``(run, i)``, to the
project's sink while the sink injects a fault (:meth:`SinkServer.set_faults`); the
row counts what the sink stored. ``tests/test_faults.py`` runs the same functions at
a small size and asserts on their results, so the figures and the proof are one code.

    python -m bench.reliability            # full size, writes bench/reliability.md (~6 min)
    python -m bench.reliability --quick    # the sizes of the tests, prints the table only

Columns: *sent* (``track`` accepted the event), *delivered* (distinct events stored by
the sink), *rejected* (refused for good by a 4xx: not retried, by design), *lost*
(sent − delivered − rejected), *stored twice* (one event stored under two rows: must
be 0), *copies on the wire* (messages the sink received again and de-duplicated by
message id: at-least-once delivery at work).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench import readme
from otel_zenml_analytics.sink import SinkServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EVENT = "Reliability check"
APP_TIMEOUT = 600.0
"""Seconds an application run may take at most (a hang fails, it does not block)."""

APP = r'''
import json, os, sys, threading, time

mode, label, count, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
page = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * page


from otel_zenml_analytics import signals, track

if mode == "otlp":  # standard OTLP exporters only: the Collector and the relay do the rest
    from tests.test_relay_app import _otlp_providers

    providers = _otlp_providers()
    signals.use_providers()
    sdk = None
else:
    from otel_zenml_analytics.sdk import configure_sdk

    sdk = configure_sdk(set_global=True)
baseline = peak = rss()
done = threading.Event()


def sample():
    global peak
    while not done.wait(0.05):
        peak = max(peak, rss())


threading.Thread(target=sample, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
start = time.monotonic()
tracked = 0
for i in range(count):
    if rate:
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    tracked += bool(track("Reliability check", {"run": label, "i": i}))
summary = {"tracked": tracked, "send_seconds": time.monotonic() - start}
if "--hang" in sys.argv:
    print(json.dumps(summary), flush=True)
    time.sleep(3600)
if sdk is not None:
    sdk.force_flush(120_000)
    sdk.shutdown()
    summary["stats"] = sdk.span_processor.delivery.stats()
else:
    for provider in providers:
        provider.shutdown()
done.set()
summary.update(rss_baseline=baseline, rss_peak=max(peak, rss()))
print(json.dumps(summary), flush=True)
'''


# -- sizes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is."""

    events: int
    """Events per fault row."""
    rate: float
    """Events per second in the fault rows."""
    outage: float
    """Seconds the destination refuses connections under steady load."""
    outage_lead: float
    """Seconds of load before the outage."""
    outage_tail: float
    """Seconds of load after the outage."""
    outage_rate: float
    outage_queue: Optional[int]
    """``OTEL_ZENML_ANALYTICS_MAX_QUEUE_SIZE`` of the outage without spool (None: default)."""
    kill_events: int
    """Events waiting in the spool when the application is killed."""
    relay_seconds: float
    relay_rate: float


FULL = Sizes(events=3000, rate=500.0, outage=60.0, outage_lead=5.0, outage_tail=15.0,
             outage_rate=300.0, outage_queue=None, kill_events=3000, relay_seconds=60.0,
             relay_rate=200.0)
QUICK = Sizes(events=300, rate=150.0, outage=3.0, outage_lead=1.0, outage_tail=4.0,
              outage_rate=150.0, outage_queue=200, kill_events=200, relay_seconds=4.0,
              relay_rate=60.0)


# -- results ------------------------------------------------------------------------------


@dataclass
class Result:
    """What one scenario did, from the sink's and the application's side."""

    scenario: str
    sent: int
    delivered: int
    """Distinct events stored by the sink."""
    rejected: int = 0
    """Events refused for good by the server (4xx): reported, not retried."""
    stored_twice: int = 0
    """Rows beyond one per event: the same event stored twice (must be 0)."""
    wire_duplicates: int = 0
    """Messages the sink received again and did not store again."""
    sink: Dict[str, int] = field(default_factory=dict)
    app: Dict[str, int] = field(default_factory=dict)
    """The application's delivery counters (summed over its runs)."""
    rss_peak_mb: Optional[float] = None
    rss_growth_mb: Optional[float] = None
    seconds: float = 0.0
    runs: int = 1
    """Application processes it took (later ones deliver what a spool kept)."""
    log: str = ""
    """Everything the application processes wrote to stderr."""
    notes: str = ""

    @property
    def lost(self) -> int:
        return self.sent - self.delivered - self.rejected


class ScenarioError(RuntimeError):
    """A scenario could not run (a process failed or hung); the message says which."""


# -- the application process --------------------------------------------------------------


def child_env(config_dir: Path, **extra: str) -> Dict[str, str]:
    """The environment of the application: none of the caller's OTel or analytics settings
    (the same as the Collector tests' child processes get)."""
    from tests.test_collector import clean_env

    return clean_env(config_dir, **extra)


class App:
    """One application process: ``start`` waits until it is ready, ``go`` starts the load."""

    def __init__(self, env: Dict[str, str], label: str, count: int, rate: float,
                 mode: str = "analytics", hang: bool = False) -> None:
        argv = [sys.executable, "-c", APP, mode, label, str(count), str(rate)]
        if hang:
            argv.append("--hang")
        self.label = label
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finish/kill
        self.popen = subprocess.Popen(argv, env=env, cwd=str(ROOT), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        if self._line() != "ready":
            self.kill()
            raise ScenarioError(f"the application {label} did not start:\n{self.stderr()}")

    def _line(self) -> str:
        assert self.popen.stdout is not None
        return self.popen.stdout.readline().strip()

    def go(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write("go\n")
        self.popen.stdin.flush()

    def summary_line(self) -> Dict[str, Any]:
        """The JSON line printed after sending (for ``hang``) or at the end."""
        line = self._line()
        try:
            summary: Dict[str, Any] = json.loads(line)
        except ValueError:
            self.kill()
            raise ScenarioError(f"the application {self.label} printed {line!r}:\n"
                                f"{self.stderr()}") from None
        return summary

    def finish(self, timeout: float = APP_TIMEOUT) -> Dict[str, Any]:
        """Wait for the end; its summary. Fails on a non-zero exit or a hang."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ScenarioError(f"the application {self.label} hung for {timeout:.0f} s:\n"
                                f"{self.stderr()}") from None
        if self.popen.returncode != 0:
            raise ScenarioError(f"the application {self.label} exited with "
                                f"{self.popen.returncode}:\n{self.stderr()}")
        return self.summary_line()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(30)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", errors="replace")


def run_app(env: Dict[str, str], label: str, count: int, rate: float,
            during: Optional[Callable[[], None]] = None, mode: str = "analytics"
            ) -> Tuple[Dict[str, Any], str]:
    """Start the application, call ``during`` as the load starts, wait for the end."""
    app = App(env, label, count, rate, mode)
    app.go()
    try:
        if during is not None:
            during()
        summary = app.finish()
    finally:
        app.kill()
    return summary, app.stderr()


# -- counting -----------------------------------------------------------------------------


def stored_events(sink: SinkServer, label: str) -> Tuple[int, int]:
    """``(distinct events, extra rows)`` of run ``label`` in the sink."""
    keys: Dict[int, int] = {}
    for event in sink.store.query(event=EVENT, limit=10**7):
        properties = event["message"].get("properties", {})
        if properties.get("run") == label:
            keys[properties["i"]] = keys.get(properties["i"], 0) + 1
    return len(keys), sum(keys.values()) - len(keys)


def spool_pending(path: Path) -> int:
    """Messages waiting in a spool file."""
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])


def _add(into: Dict[str, int], stats: Dict[str, int]) -> None:
    for key, value in stats.items():
        into[key] = into.get(key, 0) + value


def _result(name: str, sink: SinkServer, label: str, sent: int, started: float,
            app: Dict[str, int], log: str, **extra: Any) -> Result:
    delivered, twice = stored_events(sink, label)
    stats = sink.stats()
    return Result(name, sent, delivered, rejected=app.get("rejected", 0), stored_twice=twice,
                  wire_duplicates=stats["duplicate_messages"], sink=stats, app=app,
                  seconds=time.monotonic() - started, log=log, **extra)


def _wait(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _drain(env: Dict[str, str], spool: Path, label: str, runs: int = 5
           ) -> Tuple[int, Dict[str, int], str]:
    """Start the application without events until the spool is empty ("the next start")."""
    done, stats, log = 0, {}, ""
    while spool_pending(spool) and done < runs:
        summary, err = run_app(env, f"{label}-next-start", 0, 0.0)
        _add(stats, summary["stats"])
        log += err
        done += 1
    return done, stats, log


# -- the fault rows -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``set_faults`` arguments and the application's settings."""

    name: str
    faults: Dict[str, Any]
    env: Dict[str, str] = field(default_factory=dict)


FAULTS: Dict[str, Fault] = {fault.name: fault for fault in (
    Fault("500 ×3", {"fail_next": 3, "status": 500}),
    Fault("503 ×3", {"fail_next": 3, "status": 503}),
    Fault("429 + Retry-After: 1 ×2", {"fail_next": 2, "status": 429, "retry_after": 1}),
    Fault("400 ×1", {"fail_next": 1, "status": 400}),
    Fault("slow 2.5 s > timeout 1 s ×2", {"fail_next": 2, "mode": "slow", "delay": 2.5},
          {"OTEL_ZENML_ANALYTICS_TIMEOUT": "1"}),
    Fault("connection refused 3 s, then back", {"mode": "refuse", "duration": 3.0}),
    Fault("reset before the answer ×2", {"fail_next": 2, "mode": "reset"}),
    Fault("reset mid-answer ×2", {"fail_next": 2, "mode": "reset_mid"}),
)}


def run_fault(name: str, sizes: Sizes, workdir: Path, *, spool: bool = False) -> Result:
    """``sizes.events`` events at ``sizes.rate`` per second while the sink injects ``name``.

    With ``spool``, what the application leaves in the spool at exit is delivered by
    its next start (counted in :attr:`Result.runs`).
    """
    fault = FAULTS[name]
    workdir.mkdir(parents=True, exist_ok=True)
    spool_path = workdir / "spool.db"
    started = time.monotonic()
    with SinkServer(port=0, db_path=str(workdir / "sink.db")) as sink:
        settings = {"OTEL_ZENML_ANALYTICS_ENDPOINT": sink.url, **fault.env}
        if spool:
            settings["OTEL_ZENML_ANALYTICS_SPOOL"] = str(spool_path)
        env = child_env(workdir / "config", **settings)
        app = App(env, "fault", sizes.events, sizes.rate)
        try:
            sink.set_faults(**fault.faults)  # once the application is up, as the load starts
            app.go()
            summary = app.finish()
        finally:
            app.kill()
        stats, log, runs = dict(summary["stats"]), app.stderr(), 0
        left = spool_pending(spool_path)
        if spool:
            runs, more, more_log = _drain(env, spool_path, "fault")
            _add(stats, more)
            log += more_log
        notes = f"{left} events left in the spool at exit, delivered by the next start" \
            if left else ""
        return _result(name + (", spool on" if spool else ""), sink, "fault",
                       summary["tracked"], started, stats, log, runs=1 + runs, notes=notes)


# -- SIGKILL with the spool on ------------------------------------------------------------


def run_sigkill(sizes: Sizes, workdir: Path) -> Result:
    """Events wait in the spool (the sink answers 503), the application is killed with
    SIGKILL, the sink recovers, and the next start of the application delivers them."""
    workdir.mkdir(parents=True, exist_ok=True)
    spool = workdir / "spool.db"
    started = time.monotonic()
    with SinkServer(port=0, db_path=str(workdir / "sink.db")) as sink:
        env = child_env(workdir / "config", OTEL_ZENML_ANALYTICS_ENDPOINT=sink.url,
                        OTEL_ZENML_ANALYTICS_SPOOL=str(spool), OTEL_ZENML_ANALYTICS_TIMEOUT="2")
        sink.set_faults(10**9, status=503)
        app = App(env, "killed", sizes.kill_events, 0.0, hang=True)
        try:
            app.go()
            sent = int(app.summary_line()["tracked"])
            if not _wait(lambda: spool_pending(spool) >= sent, 120):
                raise ScenarioError(f"the spool holds {spool_pending(spool)} of {sent} "
                                    f"events:\n{app.stderr()}")
        finally:
            app.kill()
        if app.popen.returncode != -signal.SIGKILL:
            raise ScenarioError(f"the application ended with {app.popen.returncode} "
                                f"before the kill:\n{app.stderr()}")
        sink.set_faults(0)
        runs, stats, log = _drain(env, spool, "killed")
        return _result("SIGKILL with events in the spool, next start", sink, "killed", sent,
                       started, stats, app.stderr() + log, runs=1 + runs,
                       notes=f"{sent} events waited in the spool at the kill")


# -- the destination down under steady load ----------------------------------------------


def run_outage(sizes: Sizes, workdir: Path, *, spool: bool) -> Result:
    """Steady load; the sink refuses connections for ``sizes.outage`` seconds in the middle.

    With the spool nothing may be lost (what is left at exit is delivered by the next
    start); without it the queue is bounded, so memory stays flat and the overflow is
    dropped and counted.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spool_path = workdir / "spool.db"
    seconds = sizes.outage_lead + sizes.outage + sizes.outage_tail
    count = int(sizes.outage_rate * seconds)
    started = time.monotonic()
    with SinkServer(port=0, db_path=str(workdir / "sink.db")) as sink:
        settings = {"OTEL_ZENML_ANALYTICS_ENDPOINT": sink.url, "OTEL_ZENML_ANALYTICS_TIMEOUT": "2"}
        if spool:
            settings["OTEL_ZENML_ANALYTICS_SPOOL"] = str(spool_path)
        elif sizes.outage_queue is not None:
            settings["OTEL_ZENML_ANALYTICS_MAX_QUEUE_SIZE"] = str(sizes.outage_queue)
        env = child_env(workdir / "config", **settings)

        def outage() -> None:
            time.sleep(sizes.outage_lead)
            sink.set_faults(mode="refuse", duration=sizes.outage)

        summary, log = run_app(env, "outage", count, sizes.outage_rate, outage)
        stats: Dict[str, int] = dict(summary["stats"])
        runs = 0
        if spool:
            runs, more, more_log = _drain(env, spool_path, "outage")
            _add(stats, more)
            log += more_log
        mb = 1024 * 1024
        peak, baseline = summary["rss_peak"], summary["rss_baseline"]
        name = (f"destination down {sizes.outage:g} s under {sizes.outage_rate:g} events/s, "
                + ("spool on" if spool else "no spool"))
        notes = (f"queue {sizes.outage_queue or 'default'}: dropped {stats['dropped_queue_full']}"
                 f" signals (queue full), gave up on {stats['failed']} messages"
                 if not spool else f"{stats['spooled']} messages went through the spool"
                 + (f"; {runs} next start(s) delivered the rest" if runs else ""))
        return _result(name, sink, "outage", summary["tracked"], started, stats, log,
                       rss_peak_mb=peak / mb, rss_growth_mb=(peak - baseline) / mb,
                       runs=1 + runs, notes=notes)


# -- the relay behind the real Collector ---------------------------------------------------


def collector_binary() -> Optional[str]:
    """The built Collector (``make collector``), or None."""
    out = subprocess.run([str(ROOT / "scripts" / "build-collector"), "--check"],
                         capture_output=True, text=True, timeout=60)
    lines = out.stdout.strip().splitlines()
    return lines[-1] if out.returncode == 0 and lines else None


def run_relay(sizes: Sizes, workdir: Path, otelcol: str, *, sink_failures: int = 0) -> Result:
    """An OTLP-only application sends ``sizes.relay_rate`` events per second for
    ``sizes.relay_seconds`` to the Collector (otelcol-dev.yaml), which forwards them to
    the relay, which delivers them to the sink. With ``sink_failures`` the sink answers
    503 to that many requests from the middle of the run on (the relay answers 503 and
    the Collector retries)."""
    from tests.conftest import free_port
    from tests.test_collector import SERVICE, Stack

    workdir.mkdir(parents=True, exist_ok=True)
    count = int(sizes.relay_rate * sizes.relay_seconds)
    started = time.monotonic()
    stack = Stack(workdir)
    try:
        with SinkServer(port=0, db_path=str(workdir / "sink.db")) as sink:
            relay_port = free_port()
            stack.relay(sink, relay_port)
            collector = stack.collector(otelcol, "otelcol-dev.yaml", relay_port)
            env = child_env(stack.config_dir, APP_OTLP_PROTOCOL="http",
                            OTEL_SERVICE_NAME=SERVICE, OTEL_EXPORTER_OTLP_ENDPOINT="http://"
                            + collector["OTELCOL_OTLP_HTTP_ENDPOINT"])

            def midway() -> None:
                if sink_failures:
                    time.sleep(sizes.relay_seconds / 2)
                    sink.set_faults(sink_failures, status=503)

            summary, log = run_app(env, "relay", count, sizes.relay_rate, midway, mode="otlp")
            sent = int(summary["tracked"])
            arrived = _wait(lambda: stored_events(sink, "relay")[0] >= sent, 180)
            name = (f"relay behind the Collector, {sizes.relay_seconds:g} s at "
                    f"{sizes.relay_rate:g} events/s"
                    + (f", sink 503 ×{sink_failures} midway" if sink_failures else ""))
            notes = "" if arrived else "gave up waiting after 180 s"
            return _result(name, sink, "relay", sent, started, {}, log, notes=notes)
    finally:
        stack.stop()


# -- the command --------------------------------------------------------------------------


def run_all(sizes: Sizes, workdir: Path, progress: Callable[[str], None] = print
            ) -> List[Result]:
    """Every scenario, in table order."""
    results: List[Result] = []

    def record(result: Result) -> None:
        results.append(result)
        progress(f"{result.scenario}: sent {result.sent}, delivered {result.delivered}, "
                 f"lost {result.lost} ({result.seconds:.0f} s)")

    for spool in (False, True):
        for index, name in enumerate(FAULTS):
            record(run_fault(name, sizes, workdir / f"fault-{index}-{spool}", spool=spool))
    record(run_sigkill(sizes, workdir / "sigkill"))
    record(run_outage(sizes, workdir / "outage-spool", spool=True))
    record(run_outage(sizes, workdir / "outage-no-spool", spool=False))
    otelcol = collector_binary()
    if otelcol is None:
        progress("the Collector is not built (make collector): relay rows skipped")
    else:
        record(run_relay(sizes, workdir / "relay", otelcol))
        record(run_relay(sizes, workdir / "relay-503", otelcol, sink_failures=20))
    return results


def table(results: List[Result]) -> List[str]:
    """The markdown table of ``results``."""
    lines = ["| fault | events sent | delivered (stored) | rejected (4xx, not retried) | lost "
             "| stored twice | copies on the wire | sink requests (faulted) | peak RSS "
             "(growth) | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        rss = ("–" if r.rss_peak_mb is None
               else f"{r.rss_peak_mb:.0f} MB (+{r.rss_growth_mb or 0:.0f} MB)")
        requests = f"{r.sink.get('requests', 0)} ({r.sink.get('faulted_requests', 0)})"
        lines.append(f"| {r.scenario} | {r.sent} | {r.delivered} | {r.rejected} | {r.lost} | "
                     f"{r.stored_twice} | {r.wire_duplicates} | {requests} | {rss} | "
                     f"{r.notes or '–'} |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the short sizes of the tests; prints the table, writes nothing "
                             "unless --output is given")
    parser.add_argument("--output", default=None,
                        help="where to write the table (default: bench/reliability.md for "
                             "the full run)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    output = args.output or (None if args.quick else str(HERE / "reliability.md"))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="otel-zenml-reliability-") as workdir:
        results = run_all(sizes, Path(workdir),
                          lambda line: print(line, file=sys.stderr, flush=True))
    wall = time.monotonic() - started
    command = "make reliability" + (" (python -m bench.reliability --quick)" if args.quick
                                    else "")
    lines = [
        "# Reliability under injected faults", "",
        f"Command: `{command}`, {dt.date.today().isoformat()}, wall time {wall / 60:.1f} min, "
        f"Python {platform.python_version()}, {os.cpu_count()} cores (shared). Each row is "
        "real processes and sockets: the application (`track` with `configure_sdk`), the "
        "project's sink with the fault injected, and for the relay rows the real "
        "OpenTelemetry Collector and the relay. The same scenario functions run at a small "
        "size in `tests/test_faults.py`, which asserts on their results.", "",
        *table(results), "",
        "*lost* = sent − delivered − rejected. *stored twice* counts an event stored in two "
        "rows (must be 0). *copies on the wire* are messages the sink received again after "
        "a retry of a request it had already stored (slow, reset): stored once by message "
        "id. With the spool, what a process leaves in the spool at exit is delivered by its "
        "next start (notes). Without the spool the delivery queue is bounded: what "
        "overflows during a long outage is dropped and counted, and memory stays flat.",
    ]
    text = "\n".join(lines) + "\n"
    if output:
        Path(output).write_text(text, encoding="utf-8")
        if Path(output).resolve() == (HERE / "reliability.md").resolve():
            readme.splice("reliability", text)
    print(text)
    lost = [r for r in results if r.lost and "no spool" not in r.scenario]
    return 1 if lost or any(r.stored_twice for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
