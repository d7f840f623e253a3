"""Opted out, not one byte leaves for the destination (a proxy counts every byte).

A byte-counting TCP proxy sits in front of the real sink; an application subprocess
makes every kind of analytics call opted out by the config file (set with the CLI), by
``ZENML_ANALYTICS_OPT_IN=false`` and inside ``analytics_disabler``, then flushes and
exits. Only the CLI's own "Analytics opt-out" event may arrive, as the seed specifies;
it is counted message by message. The control run, opted in, must show bytes arriving.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from otel_zenml_analytics.sink import SinkServer

from .conftest import CLI, clean_env

APP = Path(__file__).parent / "apps" / "privacy_app.py"
EVENTS_OF_THE_APP = {"Pipeline run", "Custom event", "Flavor created", "Secret created",
                     "Tag created", "Response for Email prompt"}


class CountingProxy:
    """A TCP proxy that keeps every byte a client sends, then forwards it upstream."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self.received = bytearray()
        self.connections = 0
        self._threads: List[threading.Thread] = []
        self._open: List[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream, timeout=30)
            with self._lock:
                self.connections += 1
                self._open += [client, upstream]
            for source, target, counted in ((client, upstream, True),
                                            (upstream, client, False)):
                thread = threading.Thread(target=self._pump, args=(source, target, counted),
                                          daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, target: socket.socket, counted: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if counted:
                    with self._lock:
                        self.received += data
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                sock.close()
        for thread in self._threads:
            thread.join(10)

    def requests(self) -> List[Dict[str, Any]]:
        """The HTTP requests in the bytes received: method, path and the JSON body."""
        data = bytes(self.received)
        out = []
        while data:
            head, sep, rest = data.partition(b"\r\n\r\n")
            assert sep, f"an incomplete request: {data[:200]!r}"
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:])}
            assert "content-encoding" not in headers
            length = int(headers["content-length"])
            method, path, _ = lines[0].split(" ", 2)
            out.append({"method": method, "path": path, "body": json.loads(rest[:length])})
            data = rest[length:]
        return out


@pytest.fixture
def proxy(sink: SinkServer) -> Iterator[CountingProxy]:
    server = CountingProxy(sink.port)
    yield server
    server.close()


def _env(proxy: CountingProxy, config_dir: str, **extra: str) -> Dict[str, str]:
    return clean_env(config_dir, OTEL_ZENML_ANALYTICS_ENDPOINT=proxy.url,
                     OTEL_ZENML_ANALYTICS_FLUSH_INTERVAL="0.05", **extra)


def _run_app(mode: str, env: Dict[str, str]) -> int:
    out = subprocess.run([sys.executable, str(APP), mode], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return int(json.loads(out.stdout.strip().splitlines()[-1])["recorded"])


def test_control_opted_in_bytes_arrive(proxy: CountingProxy, sink: SinkServer,
                                       isolated_env: str) -> None:
    recorded = _run_app("plain", _env(proxy, isolated_env))
    assert recorded == 6  # the six calls that return a result
    assert len(proxy.received) > 0 and proxy.connections >= 1
    events = {e["event"] for e in sink.store.query(type="track", limit=100)}
    assert events == EVENTS_OF_THE_APP
    # identify (x2: the app's and email_opt_int's), group, alias and six tracks
    assert sink.store.count() == 10
    posted = sum(len(r["body"]["batch"]) for r in proxy.requests())
    assert posted == 10


def test_opted_out_with_the_cli_only_the_opt_out_event_leaves(
    proxy: CountingProxy, sink: SinkServer, isolated_env: str
) -> None:
    env = _env(proxy, isolated_env)
    out = subprocess.run([CLI, "analytics", "opt-out"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    requests = proxy.requests()
    messages = [m for r in requests for m in r["body"]["batch"]]
    assert [(r["method"], r["path"]) for r in requests] == [("POST", "/v1/batch")]
    assert [(m["type"], m["event"]) for m in messages] == [("track", "Analytics opt-out")]
    opt_out_bytes = len(proxy.received)

    assert _run_app("plain", env) == 0
    assert len(proxy.received) == opt_out_bytes, bytes(proxy.received[opt_out_bytes:])[:500]
    assert sink.store.count() == 1


def test_opted_out_by_the_environment_not_one_byte(
    proxy: CountingProxy, sink: SinkServer, isolated_env: str
) -> None:
    assert _run_app("plain", _env(proxy, isolated_env, ZENML_ANALYTICS_OPT_IN="false")) == 0
    assert (len(proxy.received), proxy.connections) == (0, 0)
    assert sink.store.count() == 0


def test_inside_analytics_disabler_not_one_byte(
    proxy: CountingProxy, sink: SinkServer, isolated_env: str
) -> None:
    assert _run_app("disabler", _env(proxy, isolated_env)) == 0
    assert (len(proxy.received), proxy.connections) == (0, 0)
    assert sink.store.count() == 0
