"""A durable SQLite spool: messages wait here until their destination takes them.

With a spool configured, the delivery writes each batch here before sending it
(write-ahead), then drains the spool oldest first: claim a batch, post it,
delete it. So messages survive a destination that is down, retries that run
out, and the process ending or being killed; the next process that opens the
same spool delivers them. Several processes may share one spool: a batch is
claimed by one process at a time, and claims of dead processes (or older than
the lease) are taken over. The spool is bounded by bytes and by age; what it
evicts (oldest first) is counted and logged.

Rows are keyed by a hash of the destination (endpoint, format, write key), so the
write key itself is never written to disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

_logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_AGE = 7 * 24 * 3600.0
LEASE_SECONDS = 120.0
"""A claim older than this is taken over, even if its process still runs."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    claimed_by TEXT,
    claimed_at REAL,
    UNIQUE (destination, message_id)
);
CREATE INDEX IF NOT EXISTS spool_destination ON spool (destination, id);
"""


def destination_id(key: Tuple[object, ...]) -> str:
    """A stable, non-secret name for a destination key."""
    return hashlib.sha256(repr(key).encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class SpooledBatch:
    """A claimed batch: row ids and encoded messages, oldest first."""

    ids: List[int]
    bodies: List[str]


class Spool:
    """One SQLite spool file, shared safely by threads and processes."""

    def __init__(self, path: str, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_age: float = DEFAULT_MAX_AGE) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.evicted = 0
        self._owner = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._set_up(deadline=time.monotonic() + 30.0)

    def _set_up(self, deadline: float) -> None:
        # Switching a new file to WAL answers "locked" at once, without waiting, while
        # another process does the same: retry until the deadline.
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __repr__(self) -> str:
        return f"Spool({self.path!r})"

    def add(self, destination: str, messages: Sequence[Tuple[str, str]]) -> int:
        """Store ``(message_id, body)`` pairs; returns how many were new."""
        now = time.time()
        rows = [(destination, mid, body, len(body.encode("utf-8")), now) for mid, body in messages]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany(
                    "INSERT OR IGNORE INTO spool (destination, message_id, body, bytes, created) "
                    "VALUES (?, ?, ?, ?, ?)", rows)
                added = self._db.total_changes - before
                evicted = self._evict(now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if evicted:
            self.evicted += evicted
            _logger.warning("Analytics spool %s is over its bounds (%d bytes, %.0f s): evicted "
                            "the %d oldest messages (%d so far).", self.path, self.max_bytes,
                            self.max_age, evicted, self.evicted)
        return added

    def _evict(self, now: float) -> int:
        before = self._db.total_changes
        self._db.execute("DELETE FROM spool WHERE created < ?", (now - self.max_age,))
        total = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM spool").fetchone()[0]
        if total > self.max_bytes:
            excess = total - self.max_bytes
            # The shortest oldest-first prefix whose bytes cover the excess.
            self._db.execute(
                "DELETE FROM spool WHERE id IN (SELECT id FROM (SELECT id, SUM(bytes) OVER "
                "(ORDER BY id) - bytes AS before FROM spool) WHERE before < ?)", (excess,))
        return self._db.total_changes - before

    def claim(self, destination: str, limit: int, max_bytes: int) -> SpooledBatch:
        """Claim up to ``limit`` of the oldest unclaimed messages (at most ``max_bytes``)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT id, body, bytes, claimed_by, claimed_at FROM spool "
                    "WHERE destination = ? ORDER BY id LIMIT ?", (destination, limit)).fetchall()
                ids: List[int] = []
                bodies: List[str] = []
                size = 0
                for row_id, body, length, owner, claimed_at in rows:
                    if owner is not None and not self._claim_expired(owner, claimed_at, now):
                        break  # keep order: never skip past a batch another process holds
                    if ids and size + length > max_bytes:
                        break
                    ids.append(row_id)
                    bodies.append(body)
                    size += length
                if ids:
                    self._db.executemany("UPDATE spool SET claimed_by = ?, claimed_at = ? "
                                         "WHERE id = ?", [(self._owner, now, i) for i in ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return SpooledBatch(ids, bodies)

    def _claim_expired(self, owner: str, claimed_at: float, now: float) -> bool:
        if owner == self._owner or now - claimed_at > LEASE_SECONDS:
            return True
        host, _, pid = owner.rpartition(":")
        return host == socket.gethostname() and not _alive(int(pid))

    def delete(self, ids: Sequence[int]) -> None:
        """Forget delivered messages."""
        with self._lock:
            self._db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])

    def release(self, ids: Sequence[int]) -> None:
        """Give claimed messages back (their delivery failed)."""
        with self._lock:
            self._db.executemany("UPDATE spool SET claimed_by = NULL, claimed_at = NULL "
                                 "WHERE id = ?", [(i,) for i in ids])

    def pending(self, destination: str) -> int:
        """Messages waiting for ``destination``."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM spool WHERE destination = ?",
                                   (destination,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
