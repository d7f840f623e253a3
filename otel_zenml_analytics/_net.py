"""Network address formatting shared by the servers (sink, relay)."""

from __future__ import annotations

import socketserver
from http.server import ThreadingHTTPServer


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
