"""What the servers (sink, relay) share: address formatting, a quick-binding HTTP server,
and running until a stop signal."""

from __future__ import annotations

import signal
import socketserver
import threading
from http.server import ThreadingHTTPServer
from typing import Any, Callable


def host_port(host: str, port: object) -> str:
    """``HOST:PORT``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class QuickBindHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server whose bind skips ``HTTPServer``'s reverse DNS lookup
    (slow, sometimes seconds, and useless for a loopback service)."""

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


def run_until_stop_signal(start: Callable[[], None]) -> None:
    """Call ``start``, then block until SIGINT or SIGTERM (for a server run from the
    command line); the previous handlers are back when this returns or raises.

    Both signals get a handler of their own, from before ``start``: a shell starts a
    background command with SIGINT ignored, and SIGTERM (``kill``) would otherwise end
    the process on the spot, before the server could stop cleanly.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        start()
        while not stop.wait(1.0):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
