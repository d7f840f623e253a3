"""Starting the benchmark's helper processes and reading their JSON lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).parent.parent


def own_consent_dir(environ: Optional[Dict[str, str]] = None) -> None:
    """Give this process (or ``environ``) a fresh consent folder unless one is set, so a
    benchmark never reads or writes the user's analytics config."""
    target = os.environ if environ is None else environ
    if not target.get("OTEL_ZENML_ANALYTICS_CONFIG_DIR"):
        target["OTEL_ZENML_ANALYTICS_CONFIG_DIR"] = tempfile.mkdtemp(prefix="oza-bench-config-")


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a child: no analytics settings from outside, its own consent
    file, the repository importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OTEL_ZENML_ANALYTICS_", "ZENML_"))}
    own_consent_dir(env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def start_python(args: List[str], env: Optional[Dict[str, str]] = None,
                 stdin: bool = False) -> subprocess.Popen[str]:
    """``python ARGS`` with pipes for stdout (and stdin); stderr goes to a temp file so
    a chatty client cannot fill a pipe, and :func:`stderr_tail` shows it on failure."""
    # Open for the process's lifetime; finish() closes it.
    err = tempfile.TemporaryFile(mode="w+", prefix="oza-bench-stderr-")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env or child_env(),
                            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=err, text=True)
    proc._bench_stderr = err  # type: ignore[attr-defined]
    return proc


def stderr_tail(proc: subprocess.Popen[str], chars: int = 2000) -> str:
    """The last ``chars`` characters the process wrote to stderr."""
    err: IO[str] = proc._bench_stderr  # type: ignore[attr-defined]
    err.flush()
    err.seek(0)
    return err.read()[-chars:]


def read_json(proc: subprocess.Popen[str]) -> Dict[str, Any]:
    """The next JSON line of the process; a clear error when it died instead."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=30)
        raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before answering:\n"
                           f"{stderr_tail(proc)}")
    document: Dict[str, Any] = json.loads(line)
    return document


def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Wait for the process to end; kill it (only it) if it does not."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    proc._bench_stderr.close()  # type: ignore[attr-defined]


def start_cli(args: List[str], ready: str, cpus: Optional[Set[int]] = None
              ) -> Tuple[subprocess.Popen[str], str]:
    """Start ``otel-zenml-analytics ARGS`` (pinned to ``cpus`` when given); it and the URL
    it prints after ``ready``."""
    proc = start_python(["-m", "otel_zenml_analytics.cli", *args], env=child_env())
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(ready + r" (http://\S+)", line)
    if not match:
        finish(proc, timeout=5.0)
        raise RuntimeError(f"{args[0]} did not start: {line!r}\n{stderr_tail(proc)}")
    return proc, match.group(1)


def stop_cli(proc: subprocess.Popen[str]) -> None:
    """Stop what :func:`start_cli` started, as Ctrl-C does (SIGINT), and wait for it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    finish(proc, timeout=15.0)
