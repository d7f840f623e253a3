"""A bounded queue for one consumer thread that producers feed without taking a lock.

``queue.Queue`` takes its mutex on every put and every get. When the consumer runs on
another thread, a producer often finds that mutex held, gives up the GIL and waits for a
thread switch before it can go on: under load, the delivery's queue spent more CPU there
than on anything else of its own. Here a producer appends to a deque (atomic under the
GIL) and wakes the consumer only when it sleeps, by releasing a lock (one C call):
:class:`WakeUp`, which the signals thread's job queue uses too.

Usage::

    inbox = Inbox(maxsize=10_000)
    inbox.offer(item)          # any thread: False when full, never blocks
    inbox.put(control)         # any thread: past the bound, into the room kept for
                               # control items (a flush marker, the stop)
    item = inbox.get(0.5)      # the consumer: waits, then raises queue.Empty
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Any, Deque, Optional, Sized

CONTROL_ROOM = 64
"""Places past the bound for control items, so that a flush need not wait for room, yet
a host that keeps flushing while the consumer is stuck cannot grow the queue for ever."""


class WakeUp:
    """One consumer thread's sleep, and its producers' wake-up, with no lock taken by a
    producer that finds the consumer awake.

    A producer appends, then ``if wake_up.sleeping: wake_up.notify()`` (the check inline:
    the common case, an awake consumer, costs no call). The consumer, finding its items
    empty, calls :meth:`sleep`: it announces the sleep before its last look at them, and a
    producer looks at that announcement after appending, so one of them sees the other.
    """

    def __init__(self, sleeping: bool = False) -> None:
        self.sleeping = sleeping
        self._lock = threading.Lock()
        """Held while no wake-up is pending: a producer releases it (a C call, where
        ``threading.Event.set`` runs Python code under a condition's lock)."""
        self._lock.acquire()

    def notify(self) -> None:
        """Wake the consumer: once per sleep, since the producers until it runs (it
        waits for the GIL, up to a switch interval) see it awake and skip the lock."""
        self.sleeping = False
        try:  # noqa: SIM105 - contextlib.suppress costs a context manager per call
            self._lock.release()
        except RuntimeError:  # another producer's wake-up is already pending
            pass

    def sleep(self, items: Sized, timeout: float = -1) -> None:
        """Sleep until a producer's wake-up or ``timeout`` seconds (-1: for ever), unless
        ``items`` is no longer empty. A stale wake-up only returns once too early."""
        self.sleeping = True
        if not items:
            self._lock.acquire(timeout=timeout)
        self.sleeping = False


class Inbox:
    """Items for one consumer thread, oldest first: at most ``maxsize`` offered ones,
    and ``CONTROL_ROOM`` more put ones."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: Deque[Any] = collections.deque()
        self._wake_up = WakeUp()

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    def offer(self, item: Any) -> bool:
        """Append ``item`` unless ``maxsize`` items wait; never blocks. Producers racing
        for the last place may pass the bound by one each."""
        return self._append(item, self.maxsize)

    def put(self, item: Any) -> bool:
        """Append a control item (a flush marker, the stop), past the bound: it must not
        wait for the consumer to make room. False when the room kept for them is full too."""
        return self._append(item, self.maxsize + CONTROL_ROOM)

    def _append(self, item: Any, limit: int) -> bool:
        items = self._items
        if len(items) >= limit:
            return False
        items.append(item)
        if self._wake_up.sleeping:
            self._wake_up.notify()
        return True

    def get(self, timeout: Optional[float] = None) -> Any:
        """The oldest item, waiting at most ``timeout`` seconds (None: for ever) before
        raising ``queue.Empty``. For the consumer thread only."""
        items = self._items
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return items.popleft()
            except IndexError:
                pass
            remaining = -1.0 if deadline is None else deadline - time.monotonic()
            if deadline is not None and remaining <= 0:
                raise queue.Empty
            self._wake_up.sleep(items, remaining)

    def get_nowait(self) -> Any:
        """The oldest item, or ``queue.Empty``."""
        try:
            return self._items.popleft()
        except IndexError:
            raise queue.Empty from None
