"""Message ids: random version 4 UUIDs, cheap enough to make one per analytics call."""

from __future__ import annotations

import os
import random

_V4_BITS = (0x4 << 76) | (0x2 << 62)
_V4_MASK = ~((0xF << 76) | (0x3 << 62))


_rng = random.Random(os.urandom(32))
"""Our own generator: a host that calls ``random.seed(42)`` must neither make our ids
repeat nor see its own random sequence shifted by analytics calls."""


def _reseed_after_fork() -> None:
    _rng.seed(os.urandom(32))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_after_fork)


def new_message_id() -> str:
    """A random (version 4) UUID string.

    Built from a private ``random.Random`` seeded from ``os.urandom`` rather than
    ``uuid.uuid4()``, whose ``os.urandom`` call per id costs tens of microseconds on
    some virtual machines: message ids must be unique, not unguessable.
    """
    h = "%032x" % ((_rng.getrandbits(128) & _V4_MASK) | _V4_BITS)
    return "-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:]))
