"""Delivery: a bounded queue, background threads, batching, de-duplication, retries.

The thread that submits a signal claims its message ids at the door (so a span
processor and a log exporter configured together deliver each event once) and puts a
copy of its events on the queue (never blocking: a full queue drops and counts). The
worker maps them to messages (the submitting thread does, when the queue is long) and
batches them by count, bytes and interval; a sender thread posts each batch
(:mod:`connection`: one send and one read) while the worker makes the next (one batch
waits at most), with
exponential backoff and jitter on network errors, 5xx and 429 (honouring
``Retry-After``). Other 4xx answers are logged with the server's words and not
retried. Components with the same destination share one :class:`Delivery`
(:func:`acquire`/:func:`release`); an exit hook flushes every live one.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import queue
import random
import sqlite3
import sys
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple, Union

import requests
from opentelemetry import context as otel_context

from otel_zenml_analytics import consent, mapping, redaction, signals
from otel_zenml_analytics.connection import BatchConnection
from otel_zenml_analytics.destinations import encode_fitted, new_session, post_encoded
from otel_zenml_analytics.errors import AnalyticsAPIError
from otel_zenml_analytics.inbox import Inbox
from otel_zenml_analytics.settings import ConfigurationError, Settings, redact_url
from otel_zenml_analytics.spool import Spool, destination_id

_logger = logging.getLogger(__name__)

MAX_BATCH_BYTES = 475_000
"""A batch stops growing here (Segment's server limit is 500 KB)."""
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504}) | frozenset(range(505, 600))
BACKOFF_BASE = 0.25
BACKOFF_MAX = 10.0
RETRY_AFTER_MAX = 60.0
SEEN_IDS = 100_000
"""Message ids remembered for de-duplication."""
OVERFLOW_BATCH = 256
"""Messages that overflowed the queue are written to the spool this many at a time."""
BATCHES_WAITING = 1
"""Batches made ready while the sender posts one. Posting a batch waits for the server,
and a worker that waited with it left the queue to fill: in 100,000 calls in a tight
loop (the delivery scenario's side alone, four runs each, alternating), the worker that
posted its own batches lost 5,360 to 12,528 events, the one handing them over none."""
SUBMITTERS_ENCODE_FROM = 0.1
"""From this share of the queue's size on, a signal is mapped and encoded by the thread
that submits it (the signals thread, or a caller recording its own signals because that
thread is behind), and the worker only batches it.

The worker shares the GIL with the threads that submit. In a burst they outran it: the
queue filled and signals were dropped while the sender waited for work. The submitters
now pay for the encoding they would otherwise leave to the worker, which paced them
while a lock guarded the memory of message ids (see :class:`_RecentIds`). In
100,000 calls in a tight loop (the delivery scenario's side alone, five runs each,
alternating, 2026-12-02): every run lost events before (299 to 24,486), none after,
at the same rate (5,712-7,120 calls/s before, 5,963-7,410 after)."""
SENDER_CHECK_SECONDS = 1.0
"""How often a worker waiting on the sender, or idle while a batch waits for it, checks
that the sender still runs."""
MAX_IDLE_SESSIONS = 8
"""HTTP sessions (each with its kept-alive connection) the relay's threads share."""
EXIT_FLUSH_SECONDS = signals.EXIT_FLUSH_SECONDS
"""The exit hook's bound, the same as the signals thread's."""
SHUTDOWN_SECONDS = 10.0
"""How long a component's ``shutdown`` (the SDK calls it at exit) may take at most;
requests are cut to the time left, so a silent server cannot hold the exit longer."""

Encoded = Tuple[str, str]
"""A message ready for the wire: ``(message id, JSON in the destination's format)``."""

_Outgoing = Union[List[str], threading.Event, None]
"""What the worker gives the sender: a batch to post, an event to set once everything
given before it was posted, or None to stop."""

Item = Tuple[str, Any]
"""A signal: ``("span", ReadableSpan)``, ``("log", ReadableLogRecord)`` or
``("message", dict)``; queued as ``("events", [Recorded, ...])`` (the analytics events
claimed at the door), or, when the queue is long (``SUBMITTERS_ENCODE_FROM``), as
``("encoded", ([Encoded, ...], truncated))``, mapped and encoded at the door."""


@dataclass
class DeliveryStats:
    """Counters of one delivery; read with :meth:`Delivery.stats`."""

    accepted: int = 0
    duplicates: int = 0
    delivered: int = 0
    rejected: int = 0
    failed: int = 0
    dropped_queue_full: int = 0
    dropped_unmappable: int = 0
    dropped_after_shutdown: int = 0
    truncated: int = 0
    batches: int = 0
    retries: int = 0
    spooled: int = 0
    spooled_on_overflow: int = 0
    encoded_on_submit: int = 0
    """Accepted messages that the thread that submitted them mapped and encoded, the
    queue being long (``SUBMITTERS_ENCODE_FROM``)."""


@dataclass(frozen=True)
class SendOutcome:
    """What :meth:`Delivery.send_now` achieved for one set of messages."""

    delivered: int
    duplicates: int
    retryable: bool = False
    """True when the destination failed in a way worth retrying (network, 5xx, 429)."""
    retry_after: Optional[float] = None
    rejected_status: Optional[int] = None
    """Set when the destination refused messages for good (a 4xx but 429): those of
    ``refused_ids``; the other batches were still posted."""
    error: str = ""
    refused_ids: FrozenSet[str] = frozenset()

    @property
    def ok(self) -> bool:
        """Everything was delivered (or had been already)."""
        return not self.retryable and self.rejected_status is None


class _Flush:
    """A queue marker: set once everything queued before it was handled.

    With a spool, the worker also tries to empty the spool before ``deadline``
    (``retry``: with backoff, as often as the deadline allows; otherwise once).
    """

    def __init__(self, deadline: float, retry: bool) -> None:
        self.done = threading.Event()
        self.deadline = deadline
        self.retry = retry
        self.delivered = True


class _StillInFlight(Exception):
    """A copy's first attempt did not finish in time: the copy must be retried later."""


_STOP = object()
_WAKE = object()
"""Wakes the worker to drain the spool (after the relay wrote to it)."""


def _recorded_events(item: Item, claim: mapping.Claim) -> Optional[List[mapping.Recorded]]:
    """The analytics events of an SDK signal that ``claim`` accepts (None for other
    items): a compact copy, so the queue holds attributes rather than whole spans and
    log records."""
    kind, payload = item
    if kind == "span":
        return mapping.events_of_span(payload, claim)
    if kind == "log":
        recorded = mapping.event_of_log_record(payload, claim)
        return [] if recorded is None else [recorded]
    return None


def _opted_in_email() -> Optional[str]:
    """The user's email for a message tracked with the email opt-in, as the redaction
    rules leave any property named ``email``: removed (None) or hashed."""
    address = consent.opted_in_email()
    if address:
        redactor = redaction.from_environment()
        if redactor:
            return redactor.payload({"email": address}).get("email")
    return address


def _messages_of(item: Item) -> Iterable[mapping.Message]:
    kind, payload = item
    if kind == "events":
        return [mapping.message_from_attributes(attributes, time_ns, trace_id, span_id,
                                                email=_opted_in_email)
                for attributes, time_ns, trace_id, span_id in payload]
    return (payload,)


@contextlib.contextmanager
def _uninstrumented() -> Iterator[None]:
    """The delivery's own HTTP calls must not be traced by a host that instruments
    requests/urllib3: that would feed analytics traffic back into telemetry."""
    token = otel_context.attach(
        otel_context.set_value(
            otel_context._SUPPRESS_HTTP_INSTRUMENTATION_KEY,
            True,
            otel_context.set_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY, True),
        )
    )
    try:
        yield
    finally:
        otel_context.detach(token)


def backoff_delay(attempt: int) -> float:
    """Exponential backoff with jitter for retry number ``attempt`` (0-based)."""
    ceiling = min(BACKOFF_MAX, BACKOFF_BASE * (2**attempt))
    return _jitter.uniform(ceiling / 2, ceiling)


_jitter = random.Random()
"""Our own generator, so a host's ``random.seed`` neither affects nor is affected by us."""


class _RecentIds:
    """The last ``capacity`` message ids, for de-duplication in bounded memory.

    No lock: ``setdefault``, ``pop`` and ``popitem`` with string keys each change the C
    ``OrderedDict`` in one step that neither runs Python code nor gives up the GIL (a
    garbage collection may start in ``popitem``, but only once the item is out), so
    each is atomic. A ``discard`` between another thread's length check and its trim
    or two adds racing at the bound may leave one id fewer remembered: harmless. (A build
    of Python without the GIL gets :class:`_LockedRecentIds`.)

    Every call's two signals claim an id here. With a lock, a thread that found it held
    gave up the GIL and waited for a switch: in 100,000 calls in a tight loop (the
    delivery scenario's side alone, four runs each, alternating, 2026-12-02),
    5,133-5,565 events/s and 174-193 µs of process CPU per event with the lock,
    5,946-6,458/s and 148-158 µs without. The lock also paced the threads that submit
    signals: without it they outran the delivery in some runs, until its posts made
    fewer system calls (:mod:`connection`), the door counted copies without a lock
    (:class:`_Tally`) and the worker counted once per batch.
    """

    def __init__(self, capacity: int) -> None:
        self._ids: OrderedDict[str, object] = OrderedDict()
        self._capacity = capacity

    def add(self, message_id: str) -> bool:
        """Remember ``message_id``; False when it was already there."""
        mine = object()
        if self._ids.setdefault(message_id, mine) is not mine:
            return False
        if len(self._ids) > self._capacity:
            try:  # noqa: SIM105 - once full, every add trims: no context manager per call
                self._ids.popitem(last=False)
            except KeyError:  # emptied meanwhile by other trims and discards (tiny capacity)
                pass
        return True

    def add_each(self, message_ids: Iterable[str]) -> List[bool]:
        """:meth:`add` of each id in turn."""
        return [self.add(message_id) for message_id in message_ids]

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def discard(self, message_id: str) -> None:
        """Forget ``message_id`` (its delivery failed, so a retry must not count as a copy)."""
        self._ids.pop(message_id, None)


class _LockedRecentIds(_RecentIds):
    """:class:`_RecentIds` under a lock, for a build of Python without the GIL (where
    the ``OrderedDict``'s steps are not atomic)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._lock = threading.Lock()

    def add(self, message_id: str) -> bool:
        with self._lock:
            return super().add(message_id)

    def discard(self, message_id: str) -> None:
        with self._lock:
            super().discard(message_id)


class _Tally:
    """An exact counter that threads bump without a lock: ``next`` on an
    ``itertools.count`` is one C call, atomic under the GIL (CPython's ``threading``
    numbers its threads so). A read takes one ``next`` too, and subtracts the reads
    before it. (A build of Python without the GIL gets :class:`_LockedTally`.)

    Every call's second signal is a copy that the door counts. Under the delivery's
    lock, those counts and the worker's, one per message, made the lock the most
    contended of the package: in 100,000 calls in a tight loop, 250 to 1,115 waits for
    it, 4 to 9 s of the threads' time in all, up to 0.9 s in one batch of the worker
    while the queue filled.
    """

    def __init__(self) -> None:
        self._count = itertools.count()
        self._reads = 0
        self._read_lock = threading.Lock()

    def add(self, amount: int) -> None:
        for _ in range(amount):
            next(self._count)

    def value(self) -> int:
        with self._read_lock:
            self._reads += 1
            return next(self._count) - (self._reads - 1)

    def after_fork(self) -> None:
        """In a forked child: a parent's thread may have held the lock at the fork."""
        self._read_lock = threading.Lock()


class _LockedTally(_Tally):
    """:class:`_Tally` under a lock, for a build of Python without the GIL."""

    def add(self, amount: int) -> None:
        with self._read_lock:
            super().add(amount)


_GIL = bool(getattr(sys, "_is_gil_enabled", lambda: True)())
"""False on a free-threaded build (3.13+, with the GIL off)."""


class Delivery:
    """Delivers analytics signals to one destination, off the caller's thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stats = DeliveryStats()
        self._queue = Inbox(settings.max_queue_size)
        self._encode_on_submit_from = max(1, int(settings.max_queue_size *
                                                 SUBMITTERS_ENCODE_FROM))
        self._seen = (_RecentIds if _GIL else _LockedRecentIds)(SEEN_IDS)
        self._copies_at_door = (_Tally if _GIL else _LockedTally)()
        self._lock = threading.Lock()
        self._in_flight: Dict[str, threading.Event] = {}
        self._overflow_lock = threading.Lock()
        self._overflowed: List[Encoded] = []
        self._thread: Optional[threading.Thread] = None
        self._outbox: queue.Queue[_Outgoing] = queue.Queue(maxsize=BATCHES_WAITING)
        self._sender: Optional[threading.Thread] = None
        self._closed = False
        self._give_up_at: Optional[float] = None
        self._last_overflow_log = 0.0
        self._connection: Optional[BatchConnection] = None
        self._idle_sessions: List[requests.Session] = []
        self._spool: Optional[Spool] = None
        self._spool_key = destination_id(settings.destination_key)
        self._spool_retry_at: Optional[float] = None
        self._spool_attempt = 0
        if settings.endpoint is None:
            _logger.warning(
                "No analytics endpoint is configured (set OTEL_ZENML_ANALYTICS_ENDPOINT or pass "
                "endpoint=...): analytics events will not be sent."
            )
        elif settings.spool:
            self._spool = _open_spool(settings)
            if self._spool.pending(self._spool_key):
                # Messages an earlier process left behind: deliver them now.
                self._spool_retry_at = time.monotonic()
                self._start()

    def __repr__(self) -> str:
        return f"Delivery({self.settings!r})"

    # -- caller side ---------------------------------------------------------------

    def submit(self, item: Item) -> bool:
        """Queue a signal for delivery; never blocks on the network, never raises.

        The span event and the log record of one call both arrive here: the second
        is recognised by its message id at the door and never queued. When the queue
        is long, this thread maps and encodes the events (``SUBMITTERS_ENCODE_FROM``).
        When the queue is full, the signal goes to the spool if there is one (a local
        SQLite write on the submitting thread, only under overload); otherwise it is
        dropped and counted.
        """
        if self._closed:
            self._refuse_after_shutdown()
            return False
        if self.settings.endpoint is None:
            return False
        thread = self._thread
        if (thread is None or not thread.is_alive()) and not self._start():
            return False
        if self._spool is None and self._queue.full():
            return self._refuse_while_full(item)
        offered = 0
        claimed: List[str] = []

        def claim(message_id: str) -> bool:
            nonlocal offered
            offered += 1
            if not self._seen.add(message_id):
                return False
            claimed.append(message_id)
            return True

        events = _recorded_events(item, claim)
        if events is not None:
            if offered > len(claimed):
                self._copies_at_door.add(offered - len(claimed))
            if not events:
                return True
            item = ("events", events)
            if len(self._queue) >= self._encode_on_submit_from:
                item = self._encoded_here(item)
        if self._queue.offer(item):
            return True
        if self._spool is not None and self._spool_overflow(item):
            return True
        for message_id in claimed:
            self._seen.discard(message_id)
        self._overflow()
        return False

    def _encoded_here(self, item: Item) -> Item:
        """The events of ``item`` mapped and encoded on this thread (see
        ``SUBMITTERS_ENCODE_FROM``); counted when the worker takes them. Anything odd
        (a mapping that fails) leaves ``item`` as it is, for the worker to report."""
        encoded: List[Encoded] = []
        truncated = 0
        try:
            for message in _messages_of(item):
                message_id = str(message.get("messageId") or "")
                if not message_id:
                    return item
                text, was_truncated = encode_fitted(self.settings, message)
                encoded.append((message_id, text))
                truncated += was_truncated
        except Exception:  # noqa: BLE001 - submit never raises; the worker tries again
            return item
        return ("encoded", (encoded, truncated)) if encoded else item

    def _refuse_while_full(self, item: Item) -> bool:
        """Count a signal that finds the queue full (and no spool to take it) without
        claiming its ids: a copy of a message already queued is a duplicate, anything
        else is dropped. Under overload every call's two signals end here, so this
        path stays cheap: no copy of the attributes, no lock per id."""
        copies = fresh = 0

        def count(message_id: str) -> bool:
            nonlocal copies, fresh
            if message_id in self._seen:
                copies += 1
            else:
                fresh += 1
            return False

        events = _recorded_events(item, count)
        self._copies_at_door.add(copies)
        if events is not None and not fresh:
            return True
        self._overflow()
        return False

    def _refuse_after_shutdown(self) -> None:
        """Count a signal that arrives once the delivery is shut down (a span handed
        to the signals thread whose job ran after the shutdown gave up waiting for
        it); the first one is logged."""
        with self._lock:
            self._stats.dropped_after_shutdown += 1
            first = self._stats.dropped_after_shutdown == 1
        if first:
            _logger.warning("An analytics signal arrived after the delivery to %s was shut "
                            "down: dropped (later ones are counted, not logged).",
                            redact_url(self.settings.endpoint or ""))

    def _spool_overflow(self, item: Item) -> bool:
        """Keep an item that found the queue full for the spool.

        It is encoded here and written with the next ``OVERFLOW_BATCH`` overflowing
        items in one transaction (or by the worker's next round, whichever is first),
        so an overloaded caller pays for one encoding, not for one disk commit.
        """
        encoded: List[Encoded] = []
        counts: Counter[str] = Counter()
        self._encode(item, encoded, counts)
        self._count(**counts)
        with self._overflow_lock:
            self._overflowed.extend(encoded)
            if len(self._overflowed) < OVERFLOW_BATCH:
                return True
        return self._write_overflow()

    def _write_overflow(self) -> bool:
        """Write the overflowed messages to the spool; False (logged) if SQLite failed."""
        assert self._spool is not None
        with self._overflow_lock:
            batch, self._overflowed = self._overflowed, []
        if not batch:
            return True
        try:
            self._spool.add(self._spool_key, batch)
        except sqlite3.Error as exc:
            self._count(failed=len(batch))
            _logger.error("Analytics spool %s failed: %s", self._spool.path, exc)
            return False
        self._count(spooled=len(batch), spooled_on_overflow=len(batch))
        return True

    def _overflow(self) -> None:
        with self._lock:
            self._stats.dropped_queue_full += 1
            now = time.monotonic()
            if now - self._last_overflow_log >= 10.0:
                self._last_overflow_log = now
                _logger.warning(
                    "Analytics queue is full (%d): dropped %d events so far.",
                    self.settings.max_queue_size,
                    self._stats.dropped_queue_full,
                )

    def stats(self) -> Dict[str, int]:
        """A snapshot of the counters."""
        with self._lock:
            snapshot = asdict(self._stats)
        snapshot["duplicates"] += self._copies_at_door.value()
        return snapshot

    def send_now(self, messages: List[mapping.Message]) -> SendOutcome:
        """Deliver ``messages`` on the calling thread, one attempt, for the relay.

        The relay acknowledges a request only once its messages were delivered, and
        leaves retrying to its client (the Collector): so there is no queue and no
        retry here. Ids already delivered are skipped; ids of a failed attempt are
        forgotten again so that the client's retry is not taken for a duplicate.
        """
        if self.settings.endpoint is None:
            return SendOutcome(0, 0, retryable=True, error="no endpoint configured")
        try:
            fresh, encoded, duplicates = self._claim_fresh(messages)
        except _StillInFlight:
            return SendOutcome(0, 0, retryable=True, retry_after=1.0,
                               error="a copy of these messages is still being delivered")
        self._count(duplicates=duplicates)
        if not fresh:
            return SendOutcome(delivered=0, duplicates=duplicates)
        posted: List[str] = []
        refused: List[str] = []
        refusal: Optional[AnalyticsAPIError] = None
        failure: Optional[SendOutcome] = None
        session: Optional[requests.Session] = None
        try:
            session = self._borrow_session()
            # Every batch is posted: one refused for good (an oversized message, say) does
            # not take the others with it. A retryable failure stops here: the client
            # retries the request, and what was posted is then a duplicate.
            for chunk in _chunks(encoded, self.settings.batch_size):
                ids = [message_id for message_id, _ in chunk]
                try:
                    post_encoded(self.settings, [text for _, text in chunk], session)
                except AnalyticsAPIError as exc:
                    if exc.status in RETRYABLE_STATUS:
                        failure = SendOutcome(len(posted), duplicates, retryable=True,
                                              retry_after=exc.retry_after, error=str(exc))
                        break
                    refusal = refusal or exc
                    refused += ids
                    continue
                posted += ids
                self._count(batches=1)
        except requests.RequestException as exc:
            failure = SendOutcome(len(posted), duplicates, retryable=True,
                                  error=f"{type(exc).__name__}: {exc}")
        finally:
            if session is not None:
                self._return_session(session, reusable=failure is None and refusal is None)
            done = set(posted)
            self._settle(posted, True)
            self._settle([message_id for message_id, _ in encoded if message_id not in done],
                         False)
        self._count(accepted=len(posted), delivered=len(posted), rejected=len(refused))
        if failure is not None:
            return failure
        if refusal is not None:
            return SendOutcome(len(posted), duplicates, rejected_status=refusal.status,
                               error=str(refusal), refused_ids=frozenset(refused))
        return SendOutcome(delivered=len(posted), duplicates=duplicates)

    def _borrow_session(self) -> requests.Session:
        """A session for :meth:`send_now` (the relay calls it from many threads, and a
        session is not thread-safe): an idle one, keeping its connection, or a new one."""
        with self._lock:
            if self._idle_sessions:
                return self._idle_sessions.pop()
        return new_session(self.settings)

    def _return_session(self, session: requests.Session, reusable: bool) -> None:
        """Keep a session for the next call, unless its request failed (its connection
        may be broken) or enough are idle already."""
        with self._lock:
            if reusable and not self._closed and len(self._idle_sessions) < MAX_IDLE_SESSIONS:
                self._idle_sessions.append(session)
                return
        session.close()

    def accept_durably(self, messages: List[mapping.Message]) -> Optional[SendOutcome]:
        """Write ``messages`` to the spool and let the worker deliver them.

        The relay's acknowledgement point when a spool is configured: the outcome's
        ``delivered`` counts the messages now safe in the spool; ids already accepted
        are skipped as duplicates. None without a spool (or after shutdown). SQLite
        errors propagate, with the ids forgotten so that a retry is not a duplicate.
        """
        if self._spool is None or self._closed:
            return None
        try:
            fresh, encoded, duplicates = self._claim_fresh(messages)
        except _StillInFlight:
            return SendOutcome(0, 0, retryable=True, retry_after=1.0,
                               error="a copy of these messages is still being written")
        stored = False
        try:
            if encoded:
                self._spool.add(self._spool_key, encoded)
            stored = True
        finally:
            self._settle([message_id for message_id, _ in encoded], stored)
        self._count(spooled=len(encoded), accepted=len(encoded), duplicates=duplicates)
        self._start()
        self._queue.offer(_WAKE)  # when the queue is full, the worker is awake anyway
        return SendOutcome(delivered=len(encoded), duplicates=duplicates)

    def _claim_fresh(
        self, messages: List[mapping.Message]
    ) -> Tuple[List[mapping.Message], List[Encoded], int]:
        """The messages whose ids were not accepted before (now remembered, and marked
        in flight until :meth:`_settle`), encoded for the wire, and how many of
        ``messages`` were copies of accepted ones.

        A copy of messages still in flight (a sender's retry after its own timeout)
        waits for the first attempt's outcome: acknowledged as a duplicate only once
        delivered, claimed again if that attempt failed.
        """
        ids = [str(m["messageId"]) for m in messages]
        deadline = time.monotonic() + self.settings.timeout + 1.0
        while True:
            with self._lock:
                in_flight = self._in_flight
                pending = [in_flight[i] for i in ids if i in in_flight]
                if not pending:
                    claimed = [(m, i) for m, i, new in zip(messages, ids,
                                                           self._seen.add_each(ids)) if new]
                    flight = threading.Event()  # one per call: set when they settle
                    in_flight.update((i, flight) for _, i in claimed)
                    break
            for event in pending:
                if not event.wait(max(0.0, deadline - time.monotonic())):
                    raise _StillInFlight()
        fresh = [m for m, _ in claimed]
        encoded: List[Encoded] = []
        truncated = 0
        settings = self.settings
        for message, message_id in claimed:
            text, was_truncated = encode_fitted(settings, message)
            encoded.append((message_id, text))
            truncated += was_truncated
        if truncated:
            self._count(truncated=truncated)
        return fresh, encoded, len(messages) - len(fresh)

    def _settle(self, message_ids: List[str], delivered: bool) -> None:
        """End the flight of claimed messages; a failed one is forgotten, so that a
        retry is not taken for a duplicate."""
        flights = set()
        with self._lock:
            for message_id in message_ids:
                if not delivered:
                    self._seen.discard(message_id)
                flight = self._in_flight.pop(message_id, None)
                if flight is not None:
                    flights.add(flight)
        for flight in flights:
            flight.set()

    def force_flush(self, timeout: float = 30.0, retry: bool = True) -> bool:
        """Deliver everything queued so far; False if ``timeout`` seconds were not enough.

        With a spool, what waits there is tried now rather than at its next scheduled
        retry (and retried while the deadline allows when ``retry``); False while
        messages of this destination are still in the spool.
        """
        if self._thread is None or not self._thread.is_alive():
            return not self._queue and not self._spool_pending()
        deadline = time.monotonic() + timeout
        marker = _Flush(deadline, retry)
        if not self._queue.put(marker):  # the worker is stuck behind a full queue
            return False
        return marker.done.wait(max(0.0, deadline - time.monotonic())) and marker.delivered

    def _spool_pending(self) -> int:
        if self._spool is None:
            return 0
        try:
            return self._spool.pending(self._spool_key)
        except sqlite3.Error:
            return 0

    def shutdown(self, timeout: float = 30.0) -> bool:
        """Flush, then stop the worker; later submissions are ignored. Idempotent."""
        if self._closed:
            return True
        deadline = time.monotonic() + timeout
        self._give_up_at = deadline
        # With a spool, what is left stays safe on disk: one more attempt, no waiting.
        flushed = self.force_flush(timeout, retry=False)
        self._closed = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(max(0.0, deadline - time.monotonic()))
        self._spool_leftovers()
        if self._connection is not None:
            self._connection.close()
        with self._lock:
            idle, self._idle_sessions = self._idle_sessions, []
        for session in idle:
            session.close()
        return flushed

    def _spool_leftovers(self) -> None:
        """On the way out, what is still queued goes to the spool instead of being lost."""
        if self._spool is None:
            return
        leftovers: List[Encoded] = []
        counts: Counter[str] = Counter()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                self._encode(item, leftovers, counts)
        self._count(**counts)
        if leftovers:
            with contextlib.suppress(sqlite3.Error):
                self._spool.add(self._spool_key, leftovers)
                self._count(spooled=len(leftovers))
        self._write_overflow()

    def _start(self) -> bool:
        """Start (or restart) the worker; False when no thread can be started (at exit)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return True
            thread = threading.Thread(
                target=self._run, name="otel-zenml-analytics-delivery", daemon=True
            )
            try:
                thread.start()
            except RuntimeError as exc:  # "can't create new thread at interpreter shutdown"
                _logger.warning("Analytics delivery cannot start its thread: %s", exc)
                return False
            self._thread = thread
            return True

    def _after_fork(self) -> None:
        # Locks may have been held by a parent thread at the fork, and SQLite connections
        # must not cross a fork: the child gets fresh ones.
        self._queue = Inbox(self.settings.max_queue_size)
        self._lock = threading.Lock()
        self._copies_at_door.after_fork()
        self._thread = None
        self._outbox = queue.Queue(maxsize=BATCHES_WAITING)
        self._sender = None
        self._connection = None
        self._idle_sessions = []
        if self._spool is not None:
            self._spool = _open_spool(self.settings)

    # -- worker side ---------------------------------------------------------------

    def _run(self) -> None:
        with _uninstrumented():
            # With a spool, the worker writes each batch there and drains it itself.
            self._sender = None if self._spool is not None else self._start_sender()
            try:
                self._work()
            finally:
                self._to_sender(None)  # the stop: nothing to do when there is no sender
                if self._sender is not None:  # None also when it ended and none could start
                    self._sender.join()

    def _work(self) -> None:
        stop = False
        while not stop:
            markers: List[_Flush] = []
            handled = False
            try:
                encoded, markers, stop = self._collect()
                if self._spool is not None:
                    self._write_overflow()
                    self._spool_and_drain(encoded)
                    for marker in markers:
                        self._drain_for_flush(marker)
                elif encoded or markers or stop:
                    self._hand_over(encoded, wait=bool(markers) or stop)
                handled = True
            except Exception:  # noqa: BLE001 - the worker must outlive any one batch
                _logger.exception("Analytics delivery failed unexpectedly; continuing")
            finally:
                for marker in markers:  # a flush that met a failure does not report success
                    marker.delivered = marker.delivered and handled
                    marker.done.set()

    def _hand_over(self, encoded: List[Encoded], wait: bool) -> None:
        """Give the batches to the sender (or post them here, when it could not start);
        with ``wait`` (a flush, the stop), return once all it was given is posted."""
        for chunk in _chunks(encoded, self.settings.batch_size):
            self._to_sender([text for _, text in chunk])
        if wait and self._sender is not None:
            posted = threading.Event()
            self._to_sender(posted)
            while not posted.wait(SENDER_CHECK_SECONDS):
                self._check_sender()

    def _to_sender(self, item: _Outgoing) -> None:
        """Put ``item`` in the outbox; handle it on this thread when no sender can run."""
        while True:
            sender = self._check_sender()
            if sender is None:
                self._post_here(item)
                return
            try:
                self._outbox.put(item, timeout=SENDER_CHECK_SECONDS)
                return
            except queue.Full:
                continue

    def _check_sender(self) -> Optional[threading.Thread]:
        """The live sender: one that a ``BaseException`` ended (no ``except Exception``
        stops it) is replaced, or, when no thread can start, what it left in the outbox is
        posted here."""
        sender = self._sender
        if sender is None or sender.is_alive():
            return sender
        _logger.warning("The analytics sender thread ended unexpectedly; starting another")
        self._sender = self._start_sender()
        if self._sender is None:
            with contextlib.suppress(queue.Empty):
                while True:
                    self._post_here(self._outbox.get_nowait())
        return self._sender

    def _start_sender(self) -> Optional[threading.Thread]:
        thread = threading.Thread(target=self._send_loop, name="otel-zenml-analytics-sender",
                                  daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # at interpreter shutdown: the worker posts itself
            _logger.debug("Analytics delivery posts on its worker: %s", exc)
            return None
        return thread

    def _send_loop(self) -> None:
        with _uninstrumented():
            while True:
                item = self._outbox.get()
                if item is None:
                    return
                try:
                    self._post_here(item)
                except Exception:  # noqa: BLE001 - the sender must outlive any one batch
                    _logger.exception("Analytics delivery failed unexpectedly; continuing")

    def _post_here(self, item: _Outgoing) -> None:
        """Post a batch of the outbox, or mark that all before ``item`` was posted."""
        if isinstance(item, threading.Event):
            item.set()
        elif item is not None:
            self._send_with_retries(item)

    def _collect(self) -> Tuple[List[Encoded], List[_Flush], bool]:
        """Wait for a batch: full, or its interval passed, or a flush/stop arrived.

        With messages waiting in the spool, it also returns when their retry is due.
        While a batch waits in the outbox, it checks every ``SENDER_CHECK_SECONDS`` that
        a sender is there to take it. What it counts is counted once, at the end (see
        :class:`_Tally`).
        """
        counts: Counter[str] = Counter()
        try:
            return self._fill(counts)
        finally:
            if counts:
                self._count(**counts)

    def _fill(self, counts: Counter[str]) -> Tuple[List[Encoded], List[_Flush], bool]:
        encoded: List[Encoded] = []
        deadline: Optional[float] = None
        while True:
            due = deadline if deadline is not None else self._spool_retry_at
            timeout = None if due is None else max(0.0, due - time.monotonic())
            watching = timeout is None and self._sender is not None and \
                not self._outbox.empty()
            try:
                item = self._queue.get(timeout=SENDER_CHECK_SECONDS if watching else timeout)
            except queue.Empty:
                if watching:
                    self._check_sender()
                    continue
                return encoded, [], False
            if item is _STOP:
                return encoded, [], True
            if isinstance(item, _Flush):
                return encoded, [item], False
            if item is _WAKE:
                return encoded, [], False
            self._encode(item, encoded, counts)
            if len(encoded) >= self.settings.batch_size:
                return encoded, [], False
            if deadline is None:
                deadline = time.monotonic() + self.settings.flush_interval

    def _encode(self, item: Item, into: List[Encoded], counts: Counter[str]) -> None:
        """Map an item and encode its messages (counted as accepted, into ``counts``).
        The events of SDK signals had their ids claimed at the door (:meth:`submit`);
        other items are de-duplicated here."""
        if item[0] == "encoded":  # mapped and encoded at the door
            encoded, truncated = item[1]
            into.extend(encoded)
            counts["accepted"] += len(encoded)
            counts["truncated"] += truncated
            counts["encoded_on_submit"] += len(encoded)
            return
        try:
            messages = list(_messages_of(item))
        except Exception as exc:  # noqa: BLE001 - one bad signal must not stop delivery
            counts["dropped_unmappable"] += 1
            _logger.warning("Cannot map an analytics %s to a message: %r", item[0], exc)
            return
        claimed_at_door = item[0] == "events"
        for message in messages:
            message_id = str(message.get("messageId") or "")
            if not message_id:
                counts["dropped_unmappable"] += 1
                _logger.warning("Dropping an analytics message without a messageId")
            elif not claimed_at_door and not self._seen.add(message_id):
                counts["duplicates"] += 1
            else:
                text, truncated = encode_fitted(self.settings, message)
                counts["accepted"] += 1
                counts["truncated"] += truncated
                into.append((message_id, text))

    def _post_once(self, chunk: List[str]) -> Tuple[str, Optional[float], str]:
        """One request: ``("ok"|"rejected"|"retry"|"failed", retry_after, reason)``."""
        if self._connection is None:
            self._connection = BatchConnection(self.settings)
        timeout = self.settings.timeout
        if self._give_up_at is not None:
            timeout = max(0.05, min(timeout, self._give_up_at - time.monotonic()))
        try:
            self._connection.post(chunk, timeout)
            return "ok", None, ""
        except AnalyticsAPIError as exc:
            if exc.status not in RETRYABLE_STATUS:
                return "rejected", None, str(exc)
            return "retry", exc.retry_after, str(exc)
        except requests.RequestException as exc:
            return "retry", None, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - the worker must survive anything
            _logger.exception("Unexpected error delivering analytics messages")
            return "failed", None, repr(exc)

    def _send_with_retries(self, chunk: List[str]) -> None:
        """Without a spool: retry in place with backoff, then give up (logged, counted)."""
        count = len(chunk)
        attempt = 0
        while True:
            outcome, delay, reason = self._post_once(chunk)
            if outcome == "ok":
                self._count(delivered=count, batches=1)
                return
            if outcome == "rejected":
                self._count(rejected=count)
                _logger.error("Analytics server rejected %d messages, not retrying: %s",
                              count, reason)
                return
            delay = min(backoff_delay(attempt) if delay is None else delay, RETRY_AFTER_MAX)
            give_up_at = self._give_up_at
            if outcome == "failed" or attempt >= self.settings.max_retries or (
                give_up_at is not None and time.monotonic() + delay > give_up_at
            ):
                self._count(failed=count)
                _logger.error("Giving up on %d analytics messages after %d attempts: %s",
                              count, attempt + 1, reason)
                return
            _logger.info("Analytics delivery failed (%s); retry %d in %.2fs.",
                         reason, attempt + 1, delay)
            self._count(retries=1)
            time.sleep(delay)
            attempt += 1

    def _drain_for_flush(self, marker: _Flush) -> None:
        """A flush tries the spool now, then at each scheduled retry before its deadline."""
        assert self._spool is not None
        self._spool_retry_at = None
        attempts = 0
        while True:
            self._spool_and_drain([])
            attempts += 1
            retry_at = self._spool_retry_at
            if retry_at is None:
                break
            if not marker.retry or attempts > self.settings.max_retries or \
                    retry_at >= marker.deadline:
                break
            time.sleep(max(0.0, retry_at - time.monotonic()))
        marker.delivered = not self._spool_pending()

    def _spool_and_drain(self, encoded: List[Encoded]) -> None:
        """With a spool: write ahead, then deliver from the spool, oldest first.

        A failed attempt leaves the messages in the spool and schedules the next
        attempt with backoff; the queue keeps draining into the spool meanwhile.
        """
        spool = self._spool
        assert spool is not None
        try:
            if encoded:
                spool.add(self._spool_key, encoded)
                self._count(spooled=len(encoded))
            if self._spool_retry_at is not None and time.monotonic() < self._spool_retry_at:
                return
            while True:
                batch = spool.claim(self._spool_key, self.settings.batch_size, MAX_BATCH_BYTES)
                if not batch.ids:
                    self._spool_retry_at = None
                    self._spool_attempt = 0
                    return
                outcome, delay, reason = self._post_once(batch.bodies)
                if outcome in ("ok", "rejected"):
                    spool.delete(batch.ids)
                    if outcome == "ok":
                        self._count(delivered=len(batch.ids), batches=1)
                    else:
                        self._count(rejected=len(batch.ids))
                        _logger.error("Analytics server rejected %d messages, not retrying: %s",
                                      len(batch.ids), reason)
                    continue
                spool.release(batch.ids)
                wait = min(backoff_delay(self._spool_attempt) if delay is None else delay,
                           RETRY_AFTER_MAX)
                self._spool_attempt += 1
                self._spool_retry_at = time.monotonic() + wait
                self._count(retries=1)
                _logger.info("Analytics delivery failed (%s); %d messages stay in the spool, "
                             "next attempt in %.2fs.", reason, spool.pending(self._spool_key),
                             wait)
                return
        except sqlite3.Error as exc:
            self._count(failed=len(encoded))
            _logger.error("Analytics spool %s failed: %s", spool.path, exc)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)


def _chunks(encoded: List[Encoded], batch_size: int) -> Iterator[List[Encoded]]:
    """Split into batches of at most ``batch_size`` messages and ``MAX_BATCH_BYTES``."""
    chunk: List[Encoded] = []
    size = 0
    for item in encoded:
        length = mapping.utf8_size(item[1]) + 1
        if chunk and (len(chunk) >= batch_size or size + length > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += length
    if chunk:
        yield chunk


# -- sharing between components -------------------------------------------------------

_registry_lock = threading.Lock()
_registry: Dict[Tuple[object, ...], Tuple[Delivery, int]] = {}


def acquire(settings: Settings) -> Delivery:
    """The shared delivery of ``settings``' destination; pair with :func:`release`."""
    key = settings.destination_key
    with _registry_lock:
        delivery, users = _registry.get(key, (None, 0))
        if delivery is None:
            delivery = Delivery(settings)
        elif delivery.settings != settings:
            _logger.warning(
                "Analytics components for the same destination share one delivery: the "
                "settings of the first (%r) apply, not %r.", delivery.settings, settings)
        _registry[key] = (delivery, users + 1)
        return delivery


def release(delivery: Delivery, timeout: float = SHUTDOWN_SECONDS) -> bool:
    """One user fewer; the last one out shuts the delivery down (flushing it).

    The others return at once: the delivery goes on for its remaining users, and
    nobody waits while holding the registry lock.
    """
    key = delivery.settings.destination_key
    with _registry_lock:
        current, users = _registry.get(key, (None, 0))
        if current is delivery and users > 1:
            _registry[key] = (delivery, users - 1)
            return True
        if current is delivery:
            del _registry[key]
    return delivery.shutdown(timeout)


def live_deliveries() -> List[Delivery]:
    """Every delivery still in use."""
    with _registry_lock:
        return [delivery for delivery, _ in _registry.values()]


def _flush_at_exit() -> None:
    # Spans handed to the signals thread (SegmentSpanProcessor.on_end) are submitted
    # first: this hook may run before the signals module's own (hooks run newest first).
    # The two share one bound for that wait; the sending below has its own.
    signals.flush_at_exit()
    deadline = time.monotonic() + EXIT_FLUSH_SECONDS
    for delivery in live_deliveries():
        delivery.force_flush(max(0.0, deadline - time.monotonic()))
        delivery._spool_leftovers()


def _open_spool(settings: Settings) -> Spool:
    assert settings.spool is not None
    try:
        return Spool(settings.spool, settings.spool_max_bytes, settings.spool_max_age)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigurationError(
            f"OTEL_ZENML_ANALYTICS_SPOOL={settings.spool!r} cannot be opened as an SQLite "
            f"spool: {exc}") from None


def _reset_after_fork() -> None:
    for delivery in live_deliveries():
        delivery._after_fork()


atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)

