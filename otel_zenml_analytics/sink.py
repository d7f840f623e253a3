"""A local analytics server ("sink") that stores analytics batches in SQLite.

The sink accepts two wire formats and normalises both to one canonical, camelCase
message before storing it:

* Segment format: ``POST /v1/batch`` with ``{"batch": [...], "sentAt": "..."}``,
  optionally protected by a write key sent as the HTTP Basic auth user name.
* ZenML format: ``POST /batch`` with a bare JSON array of snake_case messages.

Both accept ``Content-Encoding: gzip``. Stored events can be read back with
``GET /v1/events`` or directly from the SQLite file (see :mod:`otel_zenml_analytics.events`).

For tests, the sink injects faults (``fail_first``, :meth:`SinkServer.set_faults` or
``POST /_sink/faults``): the next N batch requests answered with an error status
(``status``), stored but answered only after a delay (``slow``), stored and then the
connection reset with nothing or half of the answer written (``reset``, ``reset_mid``),
or the port closed for a while so that connections are refused (``refuse``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import math
import os
import shutil
import socket
import sqlite3
import struct
import sys
import tempfile
import threading
import time
import uuid
import weakref
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, cast
from urllib.parse import parse_qs, urlsplit

import orjson

from otel_zenml_analytics._net import QuickBindHTTPServer, host_port, run_until_stop_signal
from otel_zenml_analytics.encoding import compact_encoder, utf8_safe

__all__ = [
    "FAULT_MODES",
    "MAX_BODY_BYTES",
    "MAX_CONTENT_LENGTH",
    "MESSAGE_TYPES",
    "BatchError",
    "EventStore",
    "SinkServer",
    "main_sink",
    "normalize_batch",
]

logger = logging.getLogger("otel_zenml_analytics.sink")

JSONDict = Dict[str, Any]

#: Largest accepted (decompressed) request body, in bytes.
MAX_BODY_BYTES = 512_000
#: Largest accepted Content-Length (bytes on the wire); checked before reading the body.
MAX_CONTENT_LENGTH = 10_000_000
#: Message types the sink accepts.
MESSAGE_TYPES = frozenset({"track", "identify", "group", "alias", "page", "screen"})

#: Fault modes of :meth:`SinkServer.set_faults`.
FAULT_MODES = ("status", "slow", "reset", "reset_mid", "refuse")
#: How long a refused port is retried when it cannot be bound again at once.
_REBIND_SECONDS = 10.0

SEGMENT_FORMAT = "segment"
ZENML_FORMAT = "zenml"

_SEGMENT_PATH = "/v1/batch"
_ZENML_PATH = "/batch"
_EVENTS_PATH = "/v1/events"
_STATS_PATH = "/v1/stats"
_HEALTH_PATH = "/health"
_FAULTS_PATH = "/_sink/faults"

_ROUTES: Dict[str, str] = {
    _SEGMENT_PATH: "POST",
    _ZENML_PATH: "POST",
    _FAULTS_PATH: "POST",
    _EVENTS_PATH: "GET",
    _STATS_PATH: "GET",
    _HEALTH_PATH: "GET",
}

_MAX_QUERY_LIMIT = 10_000
_MAX_CONTROL_BODY = 64 * 1024

# snake_case keys of the ZenML format and their canonical camelCase names.
_ZENML_KEYS: Dict[str, str] = {
    "message_id": "messageId",
    "user_id": "userId",
    "anonymous_id": "anonymousId",
    "group_id": "groupId",
    "previous_id": "previousId",
}
_ZENML_KEYS_REVERSED: Dict[str, str] = {camel: snake for snake, camel in _ZENML_KEYS.items()}

_OBJECT_FIELDS = ("properties", "traits", "context", "integrations")


class BatchError(Exception):
    """A request the sink rejects; ``status`` is the HTTP status to answer with."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        headers: Optional[Mapping[str, str]] = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers: Dict[str, str] = dict(headers or {})
        self.close = close


# --------------------------------------------------------------------------- validation


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _normalize_message(index: int, raw: Any, fmt: str) -> JSONDict:
    prefix = f"message {index}"
    if not isinstance(raw, dict):
        raise BatchError(f"{prefix}: expected a JSON object, got {_json_type(raw)}")

    zenml = fmt == ZENML_FORMAT

    def name(camel: str) -> str:
        # Error messages use the key names of the format the client sent.
        return _ZENML_KEYS_REVERSED.get(camel, camel) if zenml else camel

    msg: JSONDict = {}
    if zenml:
        for key, value in raw.items():
            camel = _ZENML_KEYS.get(key)
            if camel is not None:
                msg[camel] = value
            elif key in _ZENML_KEYS_REVERSED and _ZENML_KEYS_REVERSED[key] in raw:
                continue  # the snake_case spelling wins when both are present
            else:
                msg[key] = value
    else:
        msg = dict(raw)

    msg_type = msg.get("type")
    if msg_type is None:
        raise BatchError(f"{prefix}: missing 'type'")
    if not isinstance(msg_type, str):
        raise BatchError(f"{prefix}: 'type' must be a string, got {_json_type(msg_type)}")
    if msg_type not in MESSAGE_TYPES:
        raise BatchError(f"{prefix}: unknown type {msg_type!r}")

    message_id = msg.get("messageId")
    if message_id is None:
        if not zenml:
            raise BatchError(f"{prefix}: missing '{name('messageId')}'")
        message_id = str(uuid.uuid4())
        msg["messageId"] = message_id
    if not isinstance(message_id, str) or not message_id:
        raise BatchError(f"{prefix}: '{name('messageId')}' must be a non-empty string")

    for key in ("userId", "anonymousId"):
        value = msg.get(key)
        if value is not None and not isinstance(value, str):
            raise BatchError(f"{prefix}: '{name(key)}' must be a string, got {_json_type(value)}")
    if not msg.get("userId") and not msg.get("anonymousId"):
        raise BatchError(f"{prefix}: needs {name('userId')} or {name('anonymousId')}")

    timestamp = msg.get("timestamp")
    if timestamp is not None and not isinstance(timestamp, str):
        raise BatchError(f"{prefix}: 'timestamp' must be a string, got {_json_type(timestamp)}")

    for key in _OBJECT_FIELDS:
        value = msg.get(key)
        if value is not None and not isinstance(value, dict):
            raise BatchError(f"{prefix}: '{key}' must be an object, got {_json_type(value)}")

    if msg_type == "track":
        event = msg.get("event")
        if event is None:
            raise BatchError(f"{prefix}: missing 'event' (required for track)")
        if not isinstance(event, str) or not event:
            raise BatchError(f"{prefix}: 'event' must be a non-empty string")
    elif msg_type == "group":
        group_id = msg.get("groupId")
        if group_id is None or group_id == "":
            raise BatchError(f"{prefix}: missing '{name('groupId')}' (required for group)")
        if not isinstance(group_id, (str, int)) or isinstance(group_id, bool):
            raise BatchError(f"{prefix}: '{name('groupId')}' must be a string")
    elif msg_type == "alias":
        previous_id = msg.get("previousId")
        if previous_id is None or previous_id == "":
            raise BatchError(f"{prefix}: missing '{name('previousId')}' (required for alias)")
        if not isinstance(previous_id, str):
            raise BatchError(f"{prefix}: '{name('previousId')}' must be a string")
    return msg


def normalize_batch(payload: Any, fmt: str) -> List[JSONDict]:
    """Validate a parsed request body and return its canonical camelCase messages.

    ``fmt`` is ``"segment"`` (``{"batch": [...]}``) or ``"zenml"`` (a bare array).
    Raises :class:`BatchError` (status 400) naming the first problem found.
    """
    if fmt == SEGMENT_FORMAT:
        if not isinstance(payload, dict) or not isinstance(payload.get("batch"), list):
            raise BatchError("segment format expects a JSON object with a 'batch' array")
        sent_at = payload.get("sentAt")
        if sent_at is not None and not isinstance(sent_at, str):
            raise BatchError(f"'sentAt' must be a string, got {_json_type(sent_at)}")
        raw_messages: List[Any] = payload["batch"]
    elif fmt == ZENML_FORMAT:
        if not isinstance(payload, list):
            raise BatchError("zenml format expects a JSON array of messages")
        raw_messages = payload
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return [_normalize_message(i, raw, fmt) for i, raw in enumerate(raw_messages)]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name!r}")


def _parse_json(body: bytes) -> Any:
    """A request body's JSON. orjson reads valid bodies (several times faster); what it
    refuses is read again by the standard library, for its message and for what only it
    accepts (lone surrogate escapes, integers beyond 64 bits)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BatchError(f"request body is not valid UTF-8: {exc}") from None
    try:
        return _utf8_safe_values(json.loads(text, parse_constant=_reject_constant))
    except json.JSONDecodeError as exc:
        raise BatchError(f"invalid JSON: {exc}") from None
    except ValueError as exc:
        raise BatchError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise BatchError("invalid JSON: nested too deeply") from None


def _utf8_safe_values(value: Any) -> Any:
    """``value`` with the lone surrogates of its strings (``"\\ud800"`` escapes, valid
    JSON that orjson refuses) replaced by U+FFFD, as Segment's server reads them: SQLite
    stores UTF-8 only."""
    if isinstance(value, str):
        return utf8_safe(value)
    if isinstance(value, list):
        return [_utf8_safe_values(item) for item in value]
    if isinstance(value, dict):
        return {utf8_safe(key): _utf8_safe_values(item) for key, item in value.items()}
    return value


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress (possibly multi-member) gzip data, never producing more than limit+1 bytes."""
    out = bytearray()
    remaining = data
    try:
        while True:
            decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
            # max_length is >= 1 here because len(out) <= limit (0 would mean unlimited).
            out += decomp.decompress(remaining, limit + 1 - len(out))
            if len(out) > limit:
                raise BatchError(
                    f"decompressed request body is larger than the limit of {limit} bytes "
                    f"(decompression stopped after {len(out)} bytes)",
                    413,
                )
            if not decomp.eof:
                raise BatchError("invalid gzip body: unexpected end of compressed data")
            remaining = decomp.unused_data
            if not remaining:
                return bytes(out)
    except zlib.error as exc:
        raise BatchError(f"invalid gzip body: {exc}") from None


def _decode_body(raw: bytes, content_encoding: str) -> bytes:
    encoding = content_encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return _gunzip(raw, MAX_BODY_BYTES)
    if encoding not in ("", "identity"):
        raise BatchError(f"unsupported Content-Encoding {content_encoding.strip()!r}", 415)
    if len(raw) > MAX_BODY_BYTES:
        raise BatchError(
            f"request body is {len(raw)} bytes, larger than the limit of {MAX_BODY_BYTES} bytes",
            413,
        )
    return raw


# --------------------------------------------------------------------------- store


def _utc_now_iso() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    event TEXT,
    user_id TEXT,
    anonymous_id TEXT,
    timestamp TEXT,
    received_at TEXT NOT NULL,
    format TEXT NOT NULL,
    success INTEGER,
    error_type TEXT,
    trace_id TEXT,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_event ON events (event);
CREATE INDEX IF NOT EXISTS events_user_id ON events (user_id);
CREATE INDEX IF NOT EXISTS events_anonymous_id ON events (anonymous_id);
"""

_COLUMNS = (
    "seq, message_id, type, event, user_id, anonymous_id, timestamp, received_at, "
    "format, success, error_type, trace_id, message"
)


def _optional_str(value: Any) -> Optional[str]:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _row_values(msg: JSONDict, fmt: str, received_at: str) -> Tuple[Any, ...]:
    properties = msg.get("properties")
    props: JSONDict = properties if isinstance(properties, dict) else {}
    context = msg.get("context")
    ctx: JSONDict = context if isinstance(context, dict) else {}
    success_raw = props.get("event_success")
    success = int(success_raw) if isinstance(success_raw, bool) else None
    error_type = _optional_str(props.get("event_error_type"))
    trace_id = ctx.get("trace_id")
    event = msg.get("event")
    timestamp = msg.get("timestamp")
    return (
        msg["messageId"],
        msg["type"],
        event if isinstance(event, str) else None,
        _optional_str(msg.get("userId")),
        _optional_str(msg.get("anonymousId")),
        timestamp if isinstance(timestamp, str) else received_at,
        received_at,
        fmt,
        success,
        error_type,
        trace_id if isinstance(trace_id, str) else None,
        _message_json(msg),
    )


_standard_message_json = compact_encoder(allow_nan=True)


def _message_json(message: JSONDict) -> str:
    """A stored message's JSON, compact: the values :func:`_parse_json` read (orjson,
    or the standard library for an integer beyond 64 bits)."""
    try:
        return orjson.dumps(message).decode("utf-8")
    except orjson.JSONEncodeError:
        return _standard_message_json(message)


def _row_to_event(row: Tuple[Any, ...]) -> JSONDict:
    success = row[9]
    return {
        "seq": row[0],
        "messageId": row[1],
        "type": row[2],
        "event": row[3],
        "userId": row[4],
        "anonymousId": row[5],
        "timestamp": row[6],
        "receivedAt": row[7],
        "format": row[8],
        "success": None if success is None else bool(success),
        "errorType": row[10],
        "traceId": row[11],
        "message": json.loads(row[12]),
    }


class EventStore:
    """SQLite storage for canonical messages, one row per message id.

    One connection (``check_same_thread=False``) guarded by a lock, WAL journal mode.
    With ``readonly=True`` an existing database is opened read-only and no schema is
    created (used by the ``events`` command to read a file a running sink writes to).
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = str(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        if readonly:
            uri = Path(self.path).resolve().as_uri() + "?mode=ro"
            self._conn: Optional[sqlite3.Connection] = sqlite3.connect(
                uri, uri=True, check_same_thread=False, timeout=10.0, isolation_level=None
            )
        else:
            conn = sqlite3.connect(
                self.path, check_same_thread=False, timeout=10.0, isolation_level=None
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def __repr__(self) -> str:
        return f"EventStore(path={self.path!r}, readonly={self.readonly})"

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("EventStore is closed")
        return self._conn

    def add(
        self, messages: List[JSONDict], fmt: str, received_at: Optional[str] = None
    ) -> Tuple[int, int]:
        """Store canonical messages; returns ``(stored, duplicates)``.

        Messages whose ``messageId`` is already stored (or repeated in ``messages``)
        are counted as duplicates and not stored again. All rows go in one transaction.
        """
        if fmt not in (SEGMENT_FORMAT, ZENML_FORMAT):
            raise ValueError(f"unknown format {fmt!r}")
        if not messages:
            return 0, 0
        received = received_at or _utc_now_iso()
        rows = [_row_values(msg, fmt, received) for msg in messages]
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                # rowcount sums the rows inserted; an ignored duplicate adds nothing.
                stored = conn.executemany(
                    "INSERT OR IGNORE INTO events (message_id, type, event, user_id, "
                    "anonymous_id, timestamp, received_at, format, success, error_type, "
                    "trace_id, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                ).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return stored, len(rows) - stored

    def query(
        self,
        event: Optional[str] = None,
        type: Optional[str] = None,
        user: Optional[str] = None,
        limit: int = 100,
        after_seq: Optional[int] = None,
        *,
        oldest_first: bool = False,
    ) -> List[JSONDict]:
        """Stored events, newest first (oldest first with ``oldest_first=True``).

        ``user`` matches either userId or anonymousId; ``after_seq`` keeps only events
        with a higher ``seq``.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        clauses: List[str] = []
        params: List[Any] = []
        if event:
            clauses.append("event = ?")
            params.append(event)
        if type:
            clauses.append("type = ?")
            params.append(type)
        if user:
            clauses.append("(user_id = ? OR anonymous_id = ?)")
            params.extend((user, user))
        if after_seq is not None:
            clauses.append("seq > ?")
            params.append(after_seq)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "ASC" if oldest_first else "DESC"
        sql = f"SELECT {_COLUMNS} FROM events{where} ORDER BY seq {order} LIMIT ?"
        params.append(limit)
        with self._lock:
            rows = self._connection().execute(sql, params).fetchall()
        return [_row_to_event(row) for row in rows]

    def count(self) -> int:
        """Number of stored events."""
        with self._lock:
            row = self._connection().execute("SELECT COUNT(*) FROM events").fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# --------------------------------------------------------------------------- HTTP server


class _SinkHTTPServer(QuickBindHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: Tuple[str, int], sink: SinkServer) -> None:
        self.sink = sink
        self._connections: Dict[socket.socket, None] = {}
        self._connections_lock = threading.Lock()
        super().__init__(address, _SinkRequestHandler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections[request] = None
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(request, None)

    def drop_connections(self, keep: Optional[socket.socket] = None) -> None:
        """End every open connection but ``keep``, as a stopped server would (kept-alive
        ones too)."""
        with self._connections_lock:
            connections = [sock for sock in self._connections if sock is not keep]
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _SinkHTTPServerV6(_SinkHTTPServer):
    address_family = socket.AF_INET6


@dataclass(frozen=True)
class _Fault:
    """One injected fault, taken by one batch request."""

    mode: str
    status: int
    retry_after: Optional[float]
    delay: float


def _format_retry_after(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class _SinkRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "otel-zenml-analytics-sink"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    sys_version = ""
    timeout = 30.0  # seconds a connection may stay idle / a read may block

    _body_consumed = False

    def version_string(self) -> str:
        return self.server_version

    def handle_expect_100(self) -> bool:
        # Refuse an oversized upload before the client sends it.
        length_text = self.headers.get("Content-Length", "").strip()
        if length_text.isdigit() and int(length_text) > MAX_CONTENT_LENGTH:
            if urlsplit(self.path).path.rstrip("/") in (_SEGMENT_PATH, _ZENML_PATH):
                self.sink._record(rejected=True)
            self._send_error_json(
                BatchError(
                    f"Content-Length of {int(length_text)} bytes is larger than the transfer "
                    f"limit of {MAX_CONTENT_LENGTH} bytes",
                    413,
                    close=True,
                )
            )
            return False
        return super().handle_expect_100()

    # -- plumbing

    @property
    def sink(self) -> SinkServer:
        return cast(_SinkHTTPServer, self.server).sink

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send_json(
        self, status: int, payload: Any, headers: Optional[Mapping[str, str]] = None
    ) -> None:
        body = json.dumps(payload).encode("utf-8")
        extra = dict(headers or {})
        if not self._body_consumed and self._has_body():
            # Unread request bytes would corrupt the next request on this connection.
            extra["Connection"] = "close"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in extra.items():
            self.send_header(key, value)  # "Connection: close" also sets close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error_json(self, err: BatchError) -> None:
        if err.close:
            self.close_connection = True
            err.headers.setdefault("Connection", "close")
        self._send_json(err.status, {"error": err.message}, err.headers)

    def _has_body(self) -> bool:
        if self.headers.get("Transfer-Encoding"):
            return True
        length = self.headers.get("Content-Length", "0").strip()
        return length not in ("", "0")

    def _read_chunked(self) -> bytes:
        data = bytearray()
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise BatchError("malformed chunked body", close=True)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BatchError("malformed chunk size in chunked body", close=True) from None
            if size < 0:
                raise BatchError("malformed chunk size in chunked body", close=True)
            if size == 0:
                break
            if len(data) + size > MAX_CONTENT_LENGTH:
                raise BatchError(
                    f"request body is larger than the transfer limit of {MAX_CONTENT_LENGTH} bytes",
                    413,
                    close=True,
                )
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise BatchError("incomplete chunked body", close=True)
            data += chunk
            if self.rfile.readline(16).strip():
                raise BatchError("malformed chunked body", close=True)
        # Trailer section, ends with an empty line.
        for _ in range(100):
            line = self.rfile.readline(8192)
            if not line.strip():
                break
        else:
            raise BatchError("too many trailers in chunked body", close=True)
        return bytes(data)

    def _read_body(self, max_length: int = MAX_CONTENT_LENGTH) -> bytes:
        transfer_encoding = self.headers.get("Transfer-Encoding", "").strip().lower()
        if transfer_encoding and transfer_encoding != "identity":
            if transfer_encoding != "chunked":
                raise BatchError(
                    f"unsupported Transfer-Encoding {transfer_encoding!r}", 501, close=True
                )
            body = self._read_chunked()
            self._body_consumed = True
            if len(body) > max_length:
                raise BatchError(
                    f"request body is {len(body)} bytes, larger than the transfer limit "
                    f"of {max_length} bytes",
                    413,
                )
            return body
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise BatchError("a Content-Length header is required", 411, close=True)
        try:
            length = int(length_text.strip())
        except ValueError:
            length = -1
        if length < 0:
            raise BatchError("invalid Content-Length header", close=True)
        if length > max_length:
            raise BatchError(
                f"Content-Length of {length} bytes is larger than the transfer limit "
                f"of {max_length} bytes",
                413,
                close=True,
            )
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            raise BatchError("incomplete request body", close=True)
        self._body_consumed = True
        return body

    # -- dispatch

    def _dispatch(self) -> None:
        self._body_consumed = False
        path = urlsplit(self.path).path
        if len(path) > 1:
            path = path.rstrip("/")
        try:
            allowed = _ROUTES.get(path)
            if allowed is None:
                raise BatchError(f"not found: {path}", 404)
            if self.command != allowed:
                raise BatchError(
                    f"method {self.command} not allowed on {path} (use {allowed})",
                    405,
                    headers={"Allow": allowed},
                )
            if path in (_SEGMENT_PATH, _ZENML_PATH):
                fmt = SEGMENT_FORMAT if path == _SEGMENT_PATH else ZENML_FORMAT
                self._handle_batch(fmt)
            elif path == _FAULTS_PATH:
                self._handle_faults()
            elif path == _EVENTS_PATH:
                self._handle_events()
            elif path == _STATS_PATH:
                self._send_json(200, self.sink.stats())
            else:
                self._send_json(200, {"status": "ok"})
        except BatchError as err:
            self._send_error_json(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nobody to answer
        except Exception:
            logger.exception("sink: error while handling %s %s", self.command, path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_json(500, {"error": "internal error"}, {"Connection": "close"})

    do_GET = _dispatch
    do_POST = _dispatch
    do_PUT = _dispatch
    do_DELETE = _dispatch
    do_PATCH = _dispatch
    do_HEAD = _dispatch
    do_OPTIONS = _dispatch

    # -- endpoints

    def _handle_batch(self, fmt: str) -> None:
        sink = self.sink
        try:
            raw = self._read_body()
        except BatchError:
            sink._record(rejected=True)
            raise
        fault = sink._take_fault()
        if fault is not None and fault.mode == "status":
            sink._record(faulted=True, nbytes=len(raw))
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = _format_retry_after(fault.retry_after)
            raise BatchError(
                f"injected fault: answering {fault.status}", fault.status, headers=headers
            )
        try:
            if fmt == SEGMENT_FORMAT and not sink._authorized(self.headers.get("Authorization")):
                raise BatchError(
                    "invalid or missing write key",
                    401,
                    headers={"WWW-Authenticate": 'Basic realm="otel-zenml-analytics sink"'},
                )
            body = _decode_body(raw, self.headers.get("Content-Encoding", ""))
            messages = normalize_batch(_parse_json(body), fmt)
        except BatchError:
            sink._record(rejected=True, nbytes=len(raw))
            raise
        stored, duplicates = sink.store.add(messages, fmt)
        sink._record(
            accepted=True,
            faulted=fault is not None,
            slow=fault is not None and fault.mode == "slow",
            reset=fault is not None and fault.mode in ("reset", "reset_mid"),
            nbytes=len(raw),
            received=len(messages),
            stored=stored,
            duplicates=duplicates,
        )
        answer = {"success": True, "stored": stored, "duplicates": duplicates}
        if fault is not None and fault.mode == "slow":
            # Stored, answered late: a client whose timeout is shorter sends it again.
            sink._wait(fault.delay)
        elif fault is not None:
            self._reset(json.dumps(answer).encode("utf-8"), partial=fault.mode == "reset_mid")
            return
        self._send_json(200, answer)

    def _reset(self, answer: bytes, *, partial: bool) -> None:
        """Abort the connection with a TCP reset (SO_LINGER 0), optionally after writing
        the status line, the headers and half of ``answer``."""
        if partial:
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(answer)}\r\n\r\n"
            ).encode("ascii")
            with contextlib.suppress(OSError):
                self.wfile.write(head + answer[: len(answer) // 2])
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The socket closes for real once its file objects are closed too.
        self.rfile.close()
        sock.close()

    def _handle_faults(self) -> None:
        raw = self._read_body(_MAX_CONTROL_BODY)
        payload = _parse_json(raw) if raw.strip() else {}
        if not isinstance(payload, dict):
            raise BatchError('faults expects a JSON object like {"fail_next": 2}')
        known = {"fail_next", "status", "retry_after", "mode", "delay", "duration"}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise BatchError(f"unknown fault setting(s): {', '.join(unknown)}")
        if payload.get("mode") == "refuse" and payload.get("duration") is None:
            # Nobody could reach this endpoint to open the port again.
            raise BatchError("'refuse' over HTTP needs a 'duration' in seconds")
        args = (payload.get("fail_next", 0), payload.get("status", 503),
                payload.get("retry_after"))
        options = {"mode": payload.get("mode", "status"), "delay": payload.get("delay", 0.0),
                   "duration": payload.get("duration")}
        try:
            fault, duration = _validate_faults(*args, **options)
        except (TypeError, ValueError) as exc:
            raise BatchError(str(exc)) from None
        # The port is closed before the answer, and this connection kept for it.
        self.sink._apply_faults(args[0], fault, duration, keep=self.connection)
        if fault.mode == "refuse":
            self.close_connection = True
            self._send_json(200, {"success": True, "mode": "refuse", "duration": duration},
                            {"Connection": "close"})
            return
        self._send_json(200, {"success": True, **self.sink._fault_settings()})

    def _handle_events(self) -> None:
        params = parse_qs(urlsplit(self.path).query)

        def param(key: str) -> Optional[str]:
            values = params.get(key)
            return values[-1] if values else None

        def int_param(key: str, default: Optional[int], low: int, high: int) -> Optional[int]:
            text = param(key)
            if text is None:
                return default
            try:
                value = int(text)
            except ValueError:
                value = low - 1
            if not low <= value <= high:
                raise BatchError(f"'{key}' must be an integer between {low} and {high}")
            return value

        limit = int_param("limit", 100, 1, _MAX_QUERY_LIMIT)
        after = int_param("after", None, 0, 2**63 - 1)
        order = param("order") or "desc"
        if order not in ("asc", "desc"):
            raise BatchError("'order' must be 'asc' or 'desc'")
        events = self.sink.store.query(
            event=param("event"),
            type=param("type"),
            user=param("user"),
            limit=limit if limit is not None else 100,
            after_seq=after,
            oldest_first=order == "asc",
        )
        self._send_json(200, {"events": events, "count": len(events)})


def _check_seconds(name: str, value: Any, *, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"'{name}' must be a non-negative number of seconds")
    return float(value)


def _validate_faults(
    fail_next: Any,
    status: Any,
    retry_after: Any,
    *,
    mode: Any,
    delay: Any,
    duration: Any,
) -> Tuple[_Fault, Optional[float]]:
    """The checked arguments of :meth:`SinkServer.set_faults`; ValueError naming the
    first bad one."""
    if not isinstance(fail_next, int) or isinstance(fail_next, bool) or fail_next < 0:
        raise ValueError("'fail_next' must be a non-negative integer")
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        raise ValueError("'status' must be an integer HTTP error status (400-599)")
    retry_after_s = _check_seconds("retry_after", retry_after, optional=True)
    if mode not in FAULT_MODES:
        raise ValueError(f"'mode' must be one of {', '.join(FAULT_MODES)}")
    delay_s = _check_seconds("delay", delay)
    assert delay_s is not None
    if mode == "slow" and delay_s <= 0:
        raise ValueError("'slow' needs a positive 'delay' in seconds")
    duration_s = _check_seconds("duration", duration, optional=True)
    return _Fault(str(mode), status, retry_after_s, delay_s), duration_s


class SinkServer:
    """The local analytics sink: a threading HTTP server plus its :class:`EventStore`.

    The socket is bound in the constructor (``port=0`` picks a free port, see
    :attr:`port`). ``db_path=None`` uses a fresh temporary SQLite file which is deleted
    by :meth:`stop`. An empty ``write_key`` means no key is required.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8800,
        db_path: str | os.PathLike[str] | None = None,
        write_key: Optional[str] = None,
        fail_first: int = 0,
    ) -> None:
        self._host = host
        self._write_key = write_key or None
        self._lock = threading.Lock()
        self._fail_next = 0
        self._fault = _Fault("status", 503, None, 0.0)
        self._stopping = threading.Event()
        # Set while the port is open; the serving loop waits on it while refusing.
        self._listening = threading.Event()
        self._refuse_generation = 0
        self._refuse_timer: Optional[threading.Timer] = None
        self._refusing_until: Optional[float] = None
        # The HTTP server the serving loop is in: only that one may be shut down (the
        # shutdown of a server that is not served would wait forever).
        self._active: Optional[_SinkHTTPServer] = None
        self._refused = False  # the port was closed by a "refuse" fault
        self._stopped = False
        self.set_faults(fail_first)
        self._stats: Dict[str, int] = {
            "requests": 0,
            "accepted_requests": 0,
            "rejected_requests": 0,
            "faulted_requests": 0,
            "slow_requests": 0,
            "reset_requests": 0,
            "refusals": 0,
            "received_messages": 0,
            "stored_messages": 0,
            "duplicate_messages": 0,
            "bytes_received": 0,
        }
        self._thread: Optional[threading.Thread] = None
        self._serving = False
        self._tmpdir_cleanup: Optional[weakref.finalize[Any, Any]] = None
        if db_path is None:
            tmpdir = tempfile.mkdtemp(prefix="otel-zenml-sink-")
            # Removed by stop(), or at exit / garbage collection if stop() is never called.
            self._tmpdir_cleanup = weakref.finalize(self, shutil.rmtree, tmpdir, True)
            db_path = os.path.join(tmpdir, "events.db")
        self._db_path = str(db_path)
        try:
            self._store = EventStore(self._db_path)
        except BaseException:
            self._remove_tmpdir()
            raise
        try:
            self._httpd: Optional[_SinkHTTPServer] = self._bind(port)
        except BaseException:
            self._store.close()
            self._remove_tmpdir()
            raise
        self._port = int(self._httpd.server_address[1])
        self._listening.set()

    def __repr__(self) -> str:
        key = "<set>" if self._write_key else None
        return f"SinkServer(url={self.url!r}, db_path={self._db_path!r}, write_key={key})"

    def __enter__(self) -> SinkServer:
        if self._thread is None and not self._serving:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    def _bind(self, port: int) -> _SinkHTTPServer:
        server_cls = _SinkHTTPServerV6 if ":" in self._host else _SinkHTTPServer
        return server_cls((self._host, port), self)

    # -- properties

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the same while refusing and after opening again)."""
        return self._port

    @property
    def url(self) -> str:
        return f"http://{host_port(self._host, self.port)}"

    @property
    def db_path(self) -> str:
        return self._db_path

    @property
    def store(self) -> EventStore:
        return self._store

    @property
    def requires_write_key(self) -> bool:
        return self._write_key is not None

    # -- lifecycle

    def start(self) -> SinkServer:
        """Serve on a daemon thread; returns self."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("sink has been stopped")
            if self._thread is not None or self._serving:
                raise RuntimeError("sink is already serving")
            self._serving = True
            self._thread = threading.Thread(
                target=self._serve,
                args=(0.1,),
                name=f"otel-zenml-sink-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` or KeyboardInterrupt."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("sink has been stopped")
            if self._thread is not None or self._serving:
                raise RuntimeError("sink is already serving")
            self._serving = True
        self._serve(0.2)

    def _serve(self, poll_interval: float) -> None:
        """Serve the current HTTP server; while the port is closed (``refuse``), wait
        for it to open again, then serve the new one."""
        try:
            while not self._stopping.is_set():
                with self._lock:
                    httpd = self._active = self._httpd
                if httpd is None:
                    self._listening.wait(poll_interval)
                    continue
                try:
                    httpd.serve_forever(poll_interval=poll_interval)
                finally:
                    with self._lock:
                        self._active = None
        finally:
            with self._lock:
                self._serving = False

    def stop(self) -> None:
        """Stop serving, close the store and remove a temporary database (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            self._listening.set()
            self._refuse_generation += 1
            timer, self._refuse_timer = self._refuse_timer, None
            thread = self._thread
            httpd, self._httpd = self._httpd, None
            served = httpd is not None and httpd is self._active
        _close_listener(timer, httpd, served)
        if thread is not None:
            thread.join(timeout=5.0)
        self._store.close()
        self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir_cleanup is not None:
            self._tmpdir_cleanup()

    def _wait(self, seconds: float) -> None:
        """Sleep for a slow answer; cut short by :meth:`stop`."""
        self._stopping.wait(seconds)

    # -- faults

    def set_faults(
        self,
        fail_next: int = 0,
        status: int = 503,
        retry_after: Optional[float] = None,
        *,
        mode: str = "status",
        delay: float = 0.0,
        duration: Optional[float] = None,
    ) -> None:
        """Inject faults into the next ``fail_next`` batch requests.

        ``mode`` (one of :data:`FAULT_MODES`):

        * ``"status"``: answer ``status`` and store nothing; ``retry_after`` (seconds)
          is sent as a ``Retry-After`` header when given.
        * ``"slow"``: store the batch, answer 200 only after ``delay`` seconds (longer
          than the client's timeout: the client sends the batch again).
        * ``"reset"``: store the batch, then reset the connection (TCP RST, SO_LINGER 0)
          before writing a byte of the answer.
        * ``"reset_mid"``: store the batch, write the status line, the headers and half
          of the body, then reset the connection.
        * ``"refuse"``: close the port now, dropping open connections, so that new ones
          are refused as by a stopped server; open the same port again after
          ``duration`` seconds (``None``: at the next ``set_faults`` call).
          ``fail_next`` is not used.

        Any call replaces the pending faults and ends a refusal; ``set_faults(0)``
        clears everything.
        """
        fault, duration_s = _validate_faults(
            fail_next, status, retry_after, mode=mode, delay=delay, duration=duration
        )
        self._apply_faults(fail_next, fault, duration_s)

    def _apply_faults(
        self,
        fail_next: int,
        fault: _Fault,
        duration: Optional[float],
        keep: Optional[socket.socket] = None,
    ) -> None:
        with self._lock:
            self._fail_next = 0 if fault.mode == "refuse" else fail_next
            self._fault = fault
        if fault.mode == "refuse":
            self._refuse(duration, keep)
        elif self._refused:
            self._open_port()

    def _fault_settings(self) -> JSONDict:
        with self._lock:
            fault, fail_next = self._fault, self._fail_next
            until = self._refusing_until
            refusing = self._httpd is None and not self._stopped
        settings: JSONDict = {
            "fail_next": fail_next,
            "status": fault.status,
            "retry_after": fault.retry_after,
        }
        if fault.mode != "status":
            settings.update(mode=fault.mode, delay=fault.delay)
            if fault.mode == "refuse":
                settings["refusing"] = refusing
                settings["duration"] = (
                    None if until is None else max(0.0, round(until - _monotonic(), 3))
                )
        return settings

    def _take_fault(self) -> Optional[_Fault]:
        with self._lock:
            if self._fail_next <= 0:
                return None
            self._fail_next -= 1
            return self._fault

    def _refuse(self, duration: Optional[float], keep: Optional[socket.socket] = None) -> None:
        """Close the port and the open connections (but ``keep``); open it again after
        ``duration`` seconds."""
        with self._lock:
            if self._stopped:
                return
            self._refuse_generation += 1
            generation = self._refuse_generation
            timer, self._refuse_timer = self._refuse_timer, None
            httpd, self._httpd = self._httpd, None
            served = httpd is not None and httpd is self._active
            self._listening.clear()
            self._refused = True
            self._refusing_until = None if duration is None else _monotonic() + duration
            if httpd is not None:
                self._stats["refusals"] += 1
        _close_listener(timer, httpd, served)
        if httpd is not None:
            httpd.drop_connections(keep)
        if duration is not None:
            timer = threading.Timer(duration, self._open_port, kwargs={"generation": generation})
            timer.daemon = True
            with self._lock:
                if self._refuse_generation == generation and not self._stopped:
                    self._refuse_timer = timer
                    timer.start()

    def _open_port(self, generation: Optional[int] = None) -> None:
        """Bind the same port again after a refusal (no-op when it is open)."""
        with self._lock:
            if self._stopped or not self._refused:
                return
            if generation is not None and generation != self._refuse_generation:
                return  # a later call decided otherwise
            self._refuse_generation += 1
            self._refusing_until = None
            timer, self._refuse_timer = self._refuse_timer, None
        if timer is not None and generation is None:
            timer.cancel()
        deadline = _monotonic() + _REBIND_SECONDS
        while True:
            try:
                httpd = self._bind(self._port)
                break
            except OSError as exc:
                if _monotonic() > deadline or self._stopping.is_set():
                    logger.error("sink: cannot open port %s again: %s", self._port, exc)
                    return
                self._stopping.wait(0.05)
        with self._lock:
            if self._stopped or self._httpd is not None:
                httpd.server_close()
                return
            self._httpd = httpd
            self._refused = False
            self._listening.set()

    # -- auth and stats

    def _authorized(self, header: Optional[str]) -> bool:
        key = self._write_key
        if key is None:
            return True
        if not header:
            return False
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user = decoded.partition(b":")[0]
        return hmac.compare_digest(user, key.encode("utf-8"))

    def _record(
        self,
        *,
        accepted: bool = False,
        rejected: bool = False,
        faulted: bool = False,
        slow: bool = False,
        reset: bool = False,
        nbytes: int = 0,
        received: int = 0,
        stored: int = 0,
        duplicates: int = 0,
    ) -> None:
        with self._lock:
            stats = self._stats
            stats["requests"] += 1
            stats["accepted_requests"] += int(accepted)
            stats["rejected_requests"] += int(rejected)
            stats["faulted_requests"] += int(faulted)
            stats["slow_requests"] += int(slow)
            stats["reset_requests"] += int(reset)
            stats["bytes_received"] += nbytes
            stats["received_messages"] += received
            stats["stored_messages"] += stored
            stats["duplicate_messages"] += duplicates

    def stats(self) -> Dict[str, int]:
        """Counters since start (same as ``GET /v1/stats``).

        ``requests`` counts every batch request: ``accepted_requests`` (stored),
        ``rejected_requests`` (4xx answers) and the injected ``status`` faults.
        ``faulted_requests`` counts every injected fault; the ``slow_requests`` and
        ``reset_requests`` among them stored their batch, so they are counted in
        ``accepted_requests`` too. ``refusals`` counts the times the port was closed.
        ``duplicate_messages`` are messages received again (already stored by id):
        copies on the wire, each stored once.
        """
        with self._lock:
            return dict(self._stats)


def _monotonic() -> float:
    return time.monotonic()


def main_sink(
    host: str, port: int, db: Optional[str], write_key: Optional[str], fail_first: int = 0
) -> int:
    """Run the sink until SIGINT or SIGTERM, then stop it cleanly, removing a temporary
    database (for the CLI)."""
    try:
        sink = SinkServer(
            host=host, port=port, db_path=db, write_key=write_key, fail_first=fail_first
        )
    except (OSError, sqlite3.Error, ValueError) as exc:
        print(f"otel-zenml-analytics sink: cannot start on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    def start() -> None:
        sink.start()
        print(f"otel-zenml-analytics sink listening on {sink.url} (db: {sink.db_path})",
              flush=True)

    try:
        run_until_stop_signal(start)
    finally:
        sink.stop()
    return 0


def _close_listener(timer: Optional[threading.Timer], httpd: Any, served: bool) -> None:
    """Cancel a pending reopen and close the listening server (stopping its loop first
    when it is being served; never called on the serving thread itself)."""
    if timer is not None:
        timer.cancel()
    if httpd is not None:
        if served:
            httpd.shutdown()
        httpd.server_close()
