"""Network address formatting shared by the servers (sink, relay)."""

from __future__ import annotations


def host_port(host: str, port: object) -> str:
    """``HOST:PORT``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
