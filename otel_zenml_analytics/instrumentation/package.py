"""The libraries this instrumentation instruments: none in particular, any configured code."""

from __future__ import annotations

_instruments: tuple[str, ...] = ()
