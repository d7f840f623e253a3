"""A bounded queue for one consumer thread that producers feed without taking a lock.

``queue.Queue`` takes its mutex on every put and every get. When the consumer runs on
another thread, a producer often finds that mutex held, gives up the GIL and waits for a
thread switch before it can go on: under load, the delivery's queue spent more CPU there
than on anything else of its own. Here a producer appends to a deque (atomic under the
GIL) and wakes the consumer only when it sleeps, by releasing a lock (one C call).

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
from typing import Any, Deque, Optional

CONTROL_ROOM = 64
"""Places past the bound for control items, so that a flush need not wait for room, yet
a host that keeps flushing while the consumer is stuck cannot grow the queue for ever."""


class Inbox:
    """Items for one consumer thread, oldest first: at most ``maxsize`` offered ones,
    and ``CONTROL_ROOM`` more put ones."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: Deque[Any] = collections.deque()
        self._wake_up = threading.Lock()
        """Held while no wake-up is pending: a producer releases it to wake the consumer."""
        self._wake_up.acquire()
        self._sleeping = False

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    def offer(self, item: Any) -> bool:
        """Append ``item`` unless ``maxsize`` items wait; never blocks. Producers racing
        for the last place may pass the bound by one each."""
        items = self._items
        if len(items) >= self.maxsize:
            return False
        items.append(item)
        self._notify()
        return True

    def put(self, item: Any) -> bool:
        """Append a control item (a flush marker, the stop), past the bound: it must not
        wait for the consumer to make room. False when the room kept for them is full too."""
        items = self._items
        if len(items) >= self.maxsize + CONTROL_ROOM:
            return False
        items.append(item)
        self._notify()
        return True

    def _notify(self) -> None:
        # The consumer announces its sleep before its last look at the items, and a
        # producer looks at that announcement after appending: one of them sees the other.
        if self._sleeping:
            self._sleeping = False
            try:  # noqa: SIM105 - contextlib.suppress costs a context manager per call
                self._wake_up.release()
            except RuntimeError:  # another producer's wake-up is already pending
                pass

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
            self._sleeping = True
            if items:
                self._sleeping = False
                continue
            self._wake_up.acquire(timeout=remaining)  # a stale wake-up only loops once
            self._sleeping = False

    def get_nowait(self) -> Any:
        """The oldest item, or ``queue.Empty``."""
        try:
            return self._items.popleft()
        except IndexError:
            raise queue.Empty from None
