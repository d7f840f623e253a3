"""Reading and printing events stored by the local sink (the ``events`` command).

Events come either straight from the sink's SQLite file (``db``) or from a running
sink's ``GET /v1/events`` endpoint (``url``). Each event is a dict with the keys
``seq, messageId, type, event, userId, anonymousId, timestamp, receivedAt, format,
success, errorType, traceId, message`` (``message`` is the full canonical message).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import requests

from otel_zenml_analytics.sink import EventStore

__all__ = [
    "EventSourceError",
    "fetch_events",
    "format_table",
    "main_events",
]

JSONDict = Dict[str, Any]

_HEADERS: Tuple[str, ...] = ("time", "type", "event", "success", "error type", "user", "trace id")
# Starting column widths for --follow, where rows are printed as they arrive.
_FOLLOW_WIDTHS: Tuple[int, ...] = (24, 8, 24, 7, 12, 9, 32)
_NAMELESS_TYPES = frozenset({"identify", "group", "alias"})
_USER_WIDTH = 8
_FOLLOW_PAGE = 1000
_HTTP_TIMEOUT = 10.0
_sleep = time.sleep  # module-level so tests can step through --follow polls


class EventSourceError(Exception):
    """The events could not be read: missing database file, unreachable sink, bad answer."""


def fetch_events(
    db: Optional[str] = None,
    url: Optional[str] = None,
    event: Optional[str] = None,
    type: Optional[str] = None,
    user: Optional[str] = None,
    limit: int = 100,
    after_seq: Optional[int] = None,
    *,
    oldest_first: bool = False,
    timeout: float = _HTTP_TIMEOUT,
) -> List[JSONDict]:
    """Stored events from a sink database file (``db``) or a running sink (``url``).

    Exactly one of ``db`` and ``url`` must be given (``ValueError`` otherwise). Events
    come newest first, or oldest first with ``oldest_first=True``. ``user`` matches
    userId or anonymousId; ``after_seq`` keeps events with a higher ``seq``.
    Raises :class:`EventSourceError` when the source cannot be read.
    """
    if (db is None) == (url is None):
        raise ValueError("pass exactly one of db or url")
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if db is not None:
        return _fetch_from_db(db, event, type, user, limit, after_seq, oldest_first)
    assert url is not None
    return _fetch_from_url(url, event, type, user, limit, after_seq, oldest_first, timeout)


def _fetch_from_db(
    db: str,
    event: Optional[str],
    type: Optional[str],
    user: Optional[str],
    limit: int,
    after_seq: Optional[int],
    oldest_first: bool,
) -> List[JSONDict]:
    if not os.path.isfile(db):
        raise EventSourceError(f"database file not found: {db}")
    try:
        store = EventStore(db, readonly=True)
        try:
            return store.query(
                event=event,
                type=type,
                user=user,
                limit=limit,
                after_seq=after_seq,
                oldest_first=oldest_first,
            )
        finally:
            store.close()
    except sqlite3.Error as exc:
        raise EventSourceError(f"cannot read events from {db}: {exc}") from None


def _fetch_from_url(
    url: str,
    event: Optional[str],
    type: Optional[str],
    user: Optional[str],
    limit: int,
    after_seq: Optional[int],
    oldest_first: bool,
    timeout: float,
) -> List[JSONDict]:
    params: Dict[str, str] = {"limit": str(limit)}
    if event:
        params["event"] = event
    if type:
        params["type"] = type
    if user:
        params["user"] = user
    if after_seq is not None:
        params["after"] = str(after_seq)
    if oldest_first:
        params["order"] = "asc"
    endpoint = f"{url.rstrip('/')}/v1/events"
    try:
        response = requests.get(endpoint, params=params, timeout=timeout)
    except requests.RequestException as exc:
        raise EventSourceError(f"cannot reach the sink at {url}: {exc}") from None
    try:
        payload: Any = response.json()
    except ValueError:
        payload = None
    if response.status_code != 200:
        detail = payload.get("error") if isinstance(payload, dict) else None
        reason = detail or response.reason or "error"
        raise EventSourceError(f"sink at {url} answered {response.status_code}: {reason}")
    events = payload.get("events") if isinstance(payload, dict) else None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise EventSourceError(f"unexpected answer from {endpoint}: no 'events' list")
    return events


# --------------------------------------------------------------------------- formatting


def _clean(text: str) -> str:
    """Keep table rows on one line and free of terminal control sequences."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _short_user(user: str) -> str:
    return user if len(user) <= _USER_WIDTH + 1 else user[:_USER_WIDTH] + "…"


def _row(event: JSONDict) -> Tuple[str, ...]:
    msg_type = str(event.get("type") or "")
    name = event.get("event")
    if msg_type in _NAMELESS_TYPES or not name:
        message = event.get("message")
        page_name = message.get("name") if isinstance(message, dict) else None
        name = page_name if msg_type in ("page", "screen") and page_name else msg_type
    success = event.get("success")
    success_cell = "-" if success is None else ("true" if success else "false")
    user = event.get("userId") or event.get("anonymousId")
    cells = (
        str(event.get("timestamp") or event.get("receivedAt") or "-"),
        msg_type or "-",
        str(name or "-"),
        success_cell,
        str(event.get("errorType") or "-"),
        _short_user(str(user)) if user else "-",
        str(event.get("traceId") or "-"),
    )
    return tuple(_clean(cell) for cell in cells)


def _render(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()


def _widths(rows: Sequence[Sequence[str]], minimum: Sequence[int]) -> List[int]:
    widths = [max(len(h), m) for h, m in zip(_HEADERS, minimum)]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    return widths


def _header(widths: Sequence[int]) -> List[str]:
    return [_render(_HEADERS, widths), _render(["-" * w for w in widths], widths)]


def format_table(events: List[JSONDict]) -> str:
    """A plain-text table of events (in the given order), one row per event.

    Columns: time, type, event (the type for identify/group/alias), success,
    error type, user (userId or anonymousId, shortened), trace id.
    """
    if not events:
        return "(no events)"
    rows = [_row(event) for event in events]
    widths = _widths(rows, [0] * len(_HEADERS))
    return "\n".join(_header(widths) + [_render(row, widths) for row in rows])


# --------------------------------------------------------------------------- command


def _write(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _follow(
    db: Optional[str],
    url: Optional[str],
    as_json: bool,
    initial: List[JSONDict],
    event: Optional[str],
    type: Optional[str],
    user: Optional[str],
    poll_interval: float,
) -> int:
    events = list(reversed(initial))  # oldest first from here on
    last_seq = max((int(e.get("seq") or 0) for e in events), default=0)
    rows = [_row(e) for e in events]
    widths = _widths(rows, _FOLLOW_WIDTHS)
    if as_json:
        for item in events:
            _write(json.dumps(item, ensure_ascii=False))
    else:
        for line in _header(widths) + [_render(row, widths) for row in rows]:
            _write(line)
    while True:
        _sleep(poll_interval)
        while True:
            try:
                batch = fetch_events(
                    db=db,
                    url=url,
                    event=event,
                    type=type,
                    user=user,
                    limit=_FOLLOW_PAGE,
                    after_seq=last_seq,
                    oldest_first=True,
                )
            except EventSourceError as exc:
                print(f"otel-zenml-analytics events: {exc}", file=sys.stderr)
                return 2
            for item in batch:
                if as_json:
                    _write(json.dumps(item, ensure_ascii=False))
                else:
                    row = _row(item)
                    widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
                    _write(_render(row, widths))
                last_seq = max(last_seq, int(item.get("seq") or 0))
            if len(batch) < _FOLLOW_PAGE:
                break


def main_events(
    db: Optional[str],
    url: Optional[str],
    as_json: bool,
    follow: bool,
    event: Optional[str] = None,
    type: Optional[str] = None,
    user: Optional[str] = None,
    limit: int = 100,
    *,
    poll_interval: float = 0.5,
) -> int:
    """The ``events`` command: print stored events as a table or JSON.

    Without ``follow``: the newest ``limit`` events, newest first, as a table or as one
    JSON array (``as_json``). With ``follow``: the newest ``limit`` events oldest first,
    then every ``poll_interval`` seconds the newer ones, until KeyboardInterrupt (with
    ``as_json`` one JSON object per line). Returns 0, or 2 with a message on stderr when
    the source cannot be read.
    """
    prog = "otel-zenml-analytics events"
    if (db is None) == (url is None):
        print(f"{prog}: pass exactly one of --db or --url", file=sys.stderr)
        return 2
    if limit < 1:
        print(f"{prog}: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        events = fetch_events(db=db, url=url, event=event, type=type, user=user, limit=limit)
    except EventSourceError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        if follow:
            return _follow(db, url, as_json, events, event, type, user, poll_interval)
        if as_json:
            _write(json.dumps(events, ensure_ascii=False, indent=2))
        else:
            _write(format_table(events))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0
