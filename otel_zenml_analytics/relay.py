"""The relay: an OTLP receiver that delivers the analytics events it is sent.

Point an OpenTelemetry Collector (or any OTLP exporter) at it, and it turns analytics
log records and analytics span events into Segment messages with the mapping of the
in-process components and delivers them with the same delivery code. Everything else
it is sent is accepted and ignored.

Run it
======

.. code-block:: bash

    OTEL_ZENML_ANALYTICS_ENDPOINT=http://127.0.0.1:8800 otel-zenml-analytics relay
    # OTLP/HTTP on 127.0.0.1:14318 (POST /v1/logs, /v1/traces; GET /health)
    # OTLP/gRPC on 127.0.0.1:14317

The destination comes from the same settings as the components
(``OTEL_ZENML_ANALYTICS_ENDPOINT``, ``..._FORMAT``, ``..._WRITE_KEY``, ...): batches of up
to 512 messages (:data:`~otel_zenml_analytics.settings.BATCH_SIZE`, the SDK's export batch,
so one OTLP request from an SDK is one request to the server).

Acknowledgement
===============

A request is acknowledged only once its analytics messages were delivered (or, with a
spool configured, ``OTEL_ZENML_ANALYTICS_SPOOL``, written to it), so the sender's retry
and queue keep the data while the analytics server is failing: the relay then answers
HTTP 503 with ``Retry-After``, or gRPC ``UNAVAILABLE``. Message ids
already delivered are skipped, so an application exporting both logs and traces gets
each event delivered once. Records the mapping cannot use, and messages the server
refuses for good, are reported through OTLP partial success (no retry). Malformed
bodies get HTTP 400 / ``INVALID_ARGUMENT`` with a message that says what is wrong.

In tests
========

.. code-block:: python

    with Relay(Settings.resolve(endpoint=sink.url), http_port=0, grpc_port=0) as relay:
        requests.post(relay.http_url + "/v1/logs", data=body,
                      headers={"Content-Type": "application/x-protobuf"})
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import http.client
import json
import logging
import math
import os
import socket
import sqlite3
import sys
import threading
import time
import zlib
from concurrent import futures
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple, Type, Union
from urllib.parse import urlsplit

# Neither grpcio nor protobuf ship type information; both come with the OTLP exporters.
import grpc  # type: ignore[import-untyped]
from google.protobuf.duration_pb2 import Duration  # type: ignore[import-untyped]
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]

from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics import otlp, redaction
from otel_zenml_analytics._net import QuickBindHTTPServer, host_port, run_until_stop_signal
from otel_zenml_analytics.delivery import Delivery, acquire, release
from otel_zenml_analytics.settings import ConfigurationError, Settings, check_secret, redact_url

_logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRPC_PORT = 14317
DEFAULT_HTTP_PORT = 14318
"""The standard OTLP ports plus 10000: a Collector (or Jaeger) on the same machine keeps
4317/4318."""
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
"""Largest request accepted, on the wire and decompressed. Decoding a body takes memory in
proportion to the messages in it: a few times its size for real analytics records, 70 to
90 times for a body of nothing but empty records or spans, protobuf or OTLP/JSON (1.1 to
1.4 GB measured for 16 MiB). The relay decodes one request at a time, so that is its
bound; a smaller limit (``--max-request-bytes``) lowers it."""
DEFAULT_MAX_DECODE_WAIT = 5.0
"""Seconds the oldest request waiting for the decoding thread may have waited: beyond, new
requests are asked to retry rather than queue behind it (a few milliseconds per batch of
real records, seconds for a body of millions of empty ones)."""
MAX_DECODE_QUEUE = 16
"""Requests waiting for the decoding thread at most; beyond, new ones are asked to retry.
A Collector's exporter sends at most 10 at once (its sending queue's consumers), and the
gRPC receiver runs 8: this bounds the bodies held, and the wait, under a flood."""
HTTP_BODIES_HELD = MAX_DECODE_QUEUE + 1
"""Bodies of ``--max-request-bytes`` the HTTP side holds at most at once, in bytes: as many
as the decoding queue admits (waiting, and the one being decoded). Each connection has a
thread of its own, and a body is read before that queue can refuse it: without this bound,
a thousand senders of 16 MiB bodies would make the relay read 16 GB. A body counts what
has been read of it until its answer (a slow sender holds what it sent), and a gzip body
what it may inflate to while it inflates, then what it did. A request that would pass
the bound is answered 503 with ``Retry-After``, the rest of its body read and dropped.
Not counted: the spare room of the buffer a body is read into (an eighth at most), and the
members of a gzip body of several while they are joined."""
BODY_READ_STEP = 64 * 1024
"""A body is read at most this much at a time, counted before it is read."""
BODY_READ_SECONDS = 60.0
"""A body must have arrived this long after its headers (a Collector's exporter gives up
after 30 s by default): a sender that trickles bytes cannot hold its share for ever."""
MAX_CONNECTIONS = 256
"""OTLP/HTTP connections served at once (a thread each); beyond, a new connection is
answered 503 and closed. A Collector's exporter opens at most 10 (its consumers)."""
HEAD_SECONDS = 20.0
"""A request's line and headers must have arrived this long after the connection began to
wait for them, else the connection is closed (so is a kept-alive connection idle this
long): each read's 30 s timeout alone let a sender hold a connection for ever by writing
a byte every 29 s."""
MAX_HEADER_BYTES = 64 * 1024
"""The header section of a request, at most: http.server alone allows 100 lines of 64 KiB
(6.4 MB a connection, held for as long as a sender trickles it)."""
MAX_GZIP_MEMBERS = 64
"""A gzip body is one member as a rule; each further member costs a copy of the rest of
the body (zlib's ``unused_data``), so a body of a million tiny members would cost
minutes of CPU."""
DISCARD_SECONDS = 5.0
"""How long the rest of a refused body is read and dropped at most, so that its sender
reads the answer rather than a reset (Go's HTTP client reports the failed write instead
of an answer sent while it was still writing)."""
DEFAULT_RETRY_AFTER = 2.0
"""Seconds a sender is asked to wait when the destination failed without saying how long."""
MAX_RETRY_AFTER = 60.0

RELAY_TOKEN_ENV = env.OTEL_ZENML_ANALYTICS_RELAY_TOKEN
"""Bearer token the relay requires when set (the ``--token`` default)."""

LOGS_PATH = "/v1/logs"
TRACES_PATH = "/v1/traces"
HEALTH_PATH = "/health"
_PATHS = {LOGS_PATH: otlp.LOGS, TRACES_PATH: otlp.TRACES}

_PROTOBUF_TYPES = frozenset({"application/x-protobuf", "application/protobuf"})
_JSON_TYPE = "application/json"

_GRPC_SERVICES = {
    otlp.LOGS: "opentelemetry.proto.collector.logs.v1.LogsService",
    otlp.TRACES: "opentelemetry.proto.collector.trace.v1.TraceService",
}


@dataclass
class RelayStats:
    """Counters of one relay; read with :meth:`Relay.stats`."""

    requests: int = 0
    bad_requests: int = 0
    """Requests answered 4xx / a gRPC client error (malformed, unauthorized, too large)."""
    unavailable: int = 0
    """Requests answered 503 / ``UNAVAILABLE``: the destination failed, or the relay is
    busy or stopping."""
    refused_connections: int = 0
    """OTLP/HTTP connections answered 503 at once: MAX_CONNECTIONS were open."""
    messages: int = 0
    """Analytics messages found in requests (each copy counted)."""
    delivered: int = 0
    duplicates: int = 0
    spooled: int = 0
    """Messages acknowledged once written to the spool (when one is configured)."""
    rejected_records: int = 0
    """Log records and spans reported as rejected through partial success."""


@dataclass(frozen=True)
class ExportResult:
    """The relay's answer to one decoded export request: an OTLP response, or (when
    ``response`` is None) a request to retry after ``retry_after`` seconds."""

    response: Optional[otlp.Response] = None
    retry_after: float = 0.0
    error: str = ""

    @property
    def retryable(self) -> bool:
        return self.response is None


class Relay:
    """OTLP/HTTP and OTLP/gRPC receivers in front of one analytics delivery.

    Ports are bound in :meth:`start`; ``0`` picks a free port (read :attr:`http_port`
    and :attr:`grpc_port` after starting), ``None`` disables that protocol. ``token``
    requires ``Authorization: Bearer TOKEN`` on every export request. Without
    ``settings``: :meth:`Settings.resolve` (the environment).
    """

    def __init__(
        self,
        settings: Optional[Settings] = None,
        host: str = DEFAULT_HOST,
        http_port: Optional[int] = DEFAULT_HTTP_PORT,
        grpc_port: Optional[int] = DEFAULT_GRPC_PORT,
        token: Optional[str] = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_decode_wait: float = DEFAULT_MAX_DECODE_WAIT,
    ) -> None:
        self.settings = settings if settings is not None else Settings.resolve()
        if self.settings.endpoint is None:
            raise ConfigurationError(
                "the relay needs a destination: set OTEL_ZENML_ANALYTICS_ENDPOINT "
                "(or pass endpoint=...)"
            )
        if http_port is None and grpc_port is None:
            raise ConfigurationError("the relay needs an HTTP port, a gRPC port or both")
        if max_request_bytes < 1:
            raise ConfigurationError(f"max_request_bytes={max_request_bytes} must be at least 1")
        if token:
            check_secret("the relay token", token)
        self.host = host
        self.max_request_bytes = max_request_bytes
        self._token = token.encode("utf-8") if token else None
        self._redactor = redaction.from_environment()
        self._wanted_ports = (http_port, grpc_port)
        self._stats = RelayStats()
        self._lock = threading.Lock()
        self._decoder: Optional[futures.ThreadPoolExecutor] = None
        self.max_decode_wait = max_decode_wait
        self._waiting: Deque[float] = collections.deque()
        """When each body submitted to the decoder and not yet picked up by it was
        submitted (monotonic), oldest first; under _lock."""
        self._delivery: Optional[Delivery] = None
        self._http: Optional[_RelayHTTPServer] = None
        self._http_thread: Optional[threading.Thread] = None
        self._grpc: Any = None
        self._grpc_port: Optional[int] = None

    def __repr__(self) -> str:
        return (f"Relay(settings={self.settings!r}, host={self.host!r}, "
                f"http_port={self.http_port}, grpc_port={self.grpc_port})")

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Relay:
        """Bind the ports and serve on background threads; returns self."""
        if self._delivery is not None:
            raise RuntimeError("the relay is already running")
        http_port, grpc_port = self._wanted_ports
        self._delivery = acquire(self.settings)
        self._decoder = futures.ThreadPoolExecutor(1, thread_name_prefix="otel-zenml-relay-decode")
        with self._lock:  # a new one: an earlier stop() cancelled bodies that were waiting
            self._waiting = collections.deque()
        try:
            # Its thread starts now, so that submitting later fails only once it is shut down.
            self._decoder.submit(int).result()
            self._register_for_exit()
            if http_port is not None:
                server_cls = _RelayHTTPServerV6 if ":" in self.host else _RelayHTTPServer
                self._http = server_cls((self.host, http_port), self)
                self._http_thread = threading.Thread(
                    target=self._http.serve_forever, kwargs={"poll_interval": 0.2},
                    name=f"otel-zenml-relay-http-{self.http_port}", daemon=True)
                self._http_thread.start()
            if grpc_port is not None:
                self._start_grpc(grpc_port)
        except BaseException:
            self.stop()
            raise
        return self

    def _register_for_exit(self) -> None:
        """Let an exit without :meth:`stop` wait for one decode, not for every body queued.

        At exit the interpreter joins the decoding thread (``concurrent.futures`` does,
        once it has run every queued body); :func:`_cancel_waiting_decodes` runs before
        that, being registered after it, and cancels the bodies still waiting (their
        senders are asked to retry). CPython only: the hook is its private
        ``threading._register_atexit``, which ``concurrent.futures`` uses too."""
        global _exit_hook_registered
        with _exit_lock:
            if self._decoder is not None:
                _running_decoders.add(self._decoder)
            if _exit_hook_registered:
                return
            _exit_hook_registered = True
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            with contextlib.suppress(RuntimeError):  # the interpreter is exiting already
                register(_cancel_waiting_decodes)

    def _start_grpc(self, port: int) -> None:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="otel-zenml-relay-grpc"),
            options=[
                ("grpc.max_receive_message_length", self.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        for signal_name, service in _GRPC_SERVICES.items():
            handler = grpc.unary_unary_rpc_method_handler(self._grpc_export(signal_name))
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, {"Export": handler}),))
        address = host_port(self.host, port)
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpcio raises where older versions returned 0
            raise OSError(f"cannot bind the gRPC port {address}: {exc}") from None
        if not bound:
            raise OSError(f"cannot bind the gRPC port {address}")
        server.start()
        self._grpc, self._grpc_port = server, bound

    def stop(self, grace: float = 2.0) -> None:
        """Stop both receivers (requests in flight get ``grace`` seconds), then the
        decoding (requests still waiting for it are asked to retry; a decode under way
        finishes: milliseconds for a real batch, seconds for a body of millions of empty
        records), then release the delivery. Idempotent."""
        server, self._grpc = self._grpc, None
        if server is not None:
            server.stop(grace).wait(grace + 1.0)
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()
            http.close_connections(grace)
            http.stop_watching()  # it watched the connections until they closed
        thread, self._http_thread = self._http_thread, None
        if thread is not None:
            thread.join(grace + 1.0)
        decoder, self._decoder = self._decoder, None
        if decoder is not None:
            with _exit_lock:
                _running_decoders.discard(decoder)
            decoder.shutdown(wait=True, cancel_futures=True)
        delivery, self._delivery = self._delivery, None
        if delivery is not None:
            release(delivery, timeout=grace)

    def serve_forever(self) -> None:
        """Start, block until SIGINT or SIGTERM, then stop (for the command line)."""

        def start() -> None:
            if self._delivery is None:
                self.start()

        try:
            run_until_stop_signal(start)
        finally:
            self.stop()

    # -- properties ----------------------------------------------------------------------

    @property
    def http_port(self) -> Optional[int]:
        """The bound OTLP/HTTP port, None when not serving HTTP."""
        return None if self._http is None else int(self._http.server_address[1])

    @property
    def grpc_port(self) -> Optional[int]:
        """The bound OTLP/gRPC port, None when not serving gRPC."""
        return None if self._grpc is None else self._grpc_port

    @property
    def http_url(self) -> str:
        """``http://HOST:PORT`` of the OTLP/HTTP receiver (append ``/v1/logs``...)."""
        return f"http://{host_port(self.host, self.http_port)}"

    @property
    def grpc_endpoint(self) -> str:
        """``HOST:PORT`` of the OTLP/gRPC receiver."""
        return host_port(self.host, self.grpc_port)

    def stats(self) -> Dict[str, int]:
        """A snapshot of the counters."""
        with self._lock:
            return asdict(self._stats)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    # -- the one export path of both protocols ------------------------------------------

    def authorized(self, header: Optional[str]) -> bool:
        """Whether an ``Authorization`` header value carries the required bearer token."""
        if self._token is None:
            return True
        scheme, _, credentials = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode("utf-8"), self._token)

    def export(self, signal_name: str, body: otlp.Body, protobuf: bool = True,
               wanted: Callable[[], bool] = lambda: True) -> ExportResult:
        """Decode an export request body (binary protobuf, or OTLP/JSON), deliver its
        analytics messages and build the answer. A malformed body raises
        :class:`~otel_zenml_analytics.otlp.OTLPDecodeError`. ``wanted`` says, when the
        body's turn to be decoded comes, whether the sender still waits for the answer."""
        extracted = self._decode(signal_name, body, protobuf, wanted)
        if isinstance(extracted, ExportResult):
            return extracted
        rejected = extracted.rejected
        if self._redactor:
            extracted.messages[:] = [self._redactor.message(m) for m in extracted.messages]
        self._count(messages=len(extracted.messages))
        delivery = self._delivery
        if extracted.messages:
            if delivery is None:
                return _STOPPING
            if self.settings.spool:
                # With a spool, written to it is delivered as far as the sender is concerned:
                # the delivery's worker drains it, surviving restarts of the relay.
                try:
                    spooled = delivery.accept_durably(extracted.messages)
                except (sqlite3.Error, OSError) as exc:
                    _logger.error("Cannot write to the analytics spool: %s", exc)
                    spooled = None
                if spooled is None or spooled.retryable:  # retryable: a copy still in flight
                    return ExportResult(retry_after=DEFAULT_RETRY_AFTER, error=(
                        spooled.error if spooled is not None
                        else "the analytics spool cannot take the messages"))
                self._count(spooled=spooled.delivered, duplicates=spooled.duplicates)
            else:
                outcome = delivery.send_now(extracted.messages)
                self._count(delivered=outcome.delivered, duplicates=outcome.duplicates)
                if outcome.retryable:
                    retry_after = outcome.retry_after or DEFAULT_RETRY_AFTER
                    _logger.warning("Analytics delivery failed, asking the sender to retry: %s",
                                    outcome.error)
                    return ExportResult(retry_after=min(retry_after, MAX_RETRY_AFTER),
                                   error=f"analytics destination unavailable: {outcome.error}")
                if outcome.rejected_status is not None:
                    refused = len(outcome.refused_ids)
                    _logger.error("Analytics server refused %d of %d messages for good: %s",
                                  refused, len(extracted.messages), outcome.error)
                    rejected += extracted.items_holding(outcome.refused_ids)
                    extracted.add_error(f"the analytics server refused {refused} of "
                                        f"{len(extracted.messages)} messages: {outcome.error}",
                                        first=True)
        if rejected:
            self._count(rejected_records=rejected)
            return ExportResult(response=otlp.response(signal_name, rejected,
                                                       extracted.error_message()))
        return ExportResult(response=otlp.response(signal_name))

    def _decode(self, signal_name: str, body: otlp.Body, protobuf: bool, wanted: Callable[[], bool]
                ) -> Union[otlp.Extracted, ExportResult]:
        """The analytics messages of a body, decoded on the relay's one decoding thread, or
        the answer when it is not decoded (the relay is stopping or busy, the sender left).

        Decoded, a body takes memory in proportion to its messages, not its bytes (see
        :data:`DEFAULT_MAX_REQUEST_BYTES`). On one thread, requests arriving together take
        turns in arrival order, and each reuses the memory the one before it freed (glibc
        keeps freed memory in the arena of the thread that used it). The GIL would run
        their decoding one at a time anyway; delivery stays on the request's thread.
        """
        decoder = self._decoder
        with self._lock:
            now, waiting = time.monotonic(), self._waiting
            if len(waiting) >= MAX_DECODE_QUEUE or (
                    waiting and now - waiting[0] > self.max_decode_wait):
                return ExportResult(retry_after=DEFAULT_RETRY_AFTER, error=(
                    f"the relay is busy decoding: {len(waiting)} waiting, the oldest for "
                    f"{now - waiting[0]:.1f} s"))
            if decoder is None:
                return _STOPPING
            try:
                # Submitted under the lock, so the decoder picks bodies up in this order.
                decoded = decoder.submit(_decode_in_turn, self._lock, waiting, signal_name,
                                         body, protobuf, wanted)
            except RuntimeError:  # stopped (the thread runs from start(), so nothing else)
                return _STOPPING
            waiting.append(now)
        try:
            outcome = decoded.result()
        except futures.CancelledError:
            return _STOPPING
        finally:
            # An error raised here holds this frame, which holds the future, which holds
            # the error: a cycle that would keep the body until the garbage collector runs.
            del decoded
        if outcome is None:
            return ExportResult(retry_after=DEFAULT_RETRY_AFTER, error="the sender left")
        if isinstance(outcome, str):
            raise otlp.OTLPDecodeError(outcome)
        return outcome

    # -- gRPC ----------------------------------------------------------------------------

    def _grpc_export(self, signal_name: str) -> Callable[[bytes, Any], bytes]:
        def export(body: bytes, context: Any) -> bytes:
            self._count(requests=1)
            metadata = dict(context.invocation_metadata() or ())
            if not self.authorized(metadata.get("authorization")):
                self._count(bad_requests=1)
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              "missing or wrong bearer token (authorization: Bearer TOKEN)")
            try:
                result = self.export(signal_name, body, wanted=context.is_active)
            except otlp.OTLPDecodeError as exc:
                self._count(bad_requests=1)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                raise AssertionError("unreachable: abort raises") from None
            response = result.response
            if response is None:
                self._count(unavailable=1)
                context.set_trailing_metadata(
                    (("grpc-status-details-bin", _retry_status(result).SerializeToString()),))
                context.abort(grpc.StatusCode.UNAVAILABLE, result.error)
                raise AssertionError("unreachable: abort raises")
            return bytes(response.SerializeToString())

        return export


_running_decoders: Set[futures.ThreadPoolExecutor] = set()
"""The decoding threads of relays started and not stopped; under ``_exit_lock``."""
_exit_lock = threading.Lock()
_exit_hook_registered = False


def _cancel_waiting_decodes() -> None:
    """The exit hook (see ``Relay._register_for_exit``). It must not raise: the interpreter
    would skip the exit hooks after it and the joining of the threads."""
    try:
        with _exit_lock:
            decoders = list(_running_decoders)
        for decoder in decoders:
            decoder.shutdown(wait=False, cancel_futures=True)
    except Exception as exc:  # noqa: BLE001 - see above
        _logger.debug("Cancelling the relay's queued decoding at exit failed: %r", exc)


def _forget_decoders_after_fork() -> None:
    """A forked child has none of its parent's threads (nor perhaps an unheld lock)."""
    global _exit_lock
    _exit_lock = threading.Lock()
    _running_decoders.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_decoders_after_fork)


def _decode_in_turn(lock: threading.Lock, waiting: Deque[float], signal_name: str,
                    body: otlp.Body, protobuf: bool, wanted: Callable[[], bool]
                    ) -> Union[otlp.Extracted, str, None]:
    """On the decoding thread, once the body leaves the queue (``waiting``) of the decoder
    it was submitted to: its analytics messages or, when it is malformed, what is wrong
    with it. Only the text leaves this thread, so the partly decoded request that the
    error's traceback holds is freed before the next body is decoded. None when the
    sender no longer waits (a gRPC deadline passed): it will send the body again."""
    with lock:
        waiting.popleft()
    if not wanted():
        return None
    try:
        request = (otlp.decode_protobuf(signal_name, body) if protobuf
                   else otlp.decode_json(signal_name, body))
    except otlp.OTLPDecodeError as exc:
        return str(exc)
    return otlp.extract(signal_name, request)


_STOPPING = ExportResult(retry_after=DEFAULT_RETRY_AFTER, error="the relay is stopping")


def _retry_status(result: ExportResult) -> status_pb2.Status:
    """A ``google.rpc.Status`` with ``RetryInfo``: how long the sender should wait."""
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=result.error)
    delay = Duration()
    delay.FromNanoseconds(int(result.retry_after * 1e9))
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


# -- HTTP ---------------------------------------------------------------------------------


class _RelayHTTPServer(QuickBindHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: Tuple[str, int], relay: Relay) -> None:
        self.relay = relay
        self.bodies = _BodyBytes(HTTP_BODIES_HELD * relay.max_request_bytes)
        self.stopping = False
        self._connections: Dict[socket.socket, threading.Thread] = {}
        """Connections served, and their threads."""
        self._connections_lock = threading.Lock()
        self._connection_slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._head_deadlines: Dict[socket.socket, float] = {}
        """Connections waiting for a request's line and headers, and until when."""
        self._closing = threading.Event()
        super().__init__(address, _RelayHandler)
        threading.Thread(target=self._close_late_heads, daemon=True,
                         name="otel-zenml-relay-http-heads").start()

    def head_begins(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._head_deadlines[connection] = time.monotonic() + HEAD_SECONDS

    def head_ends(self, connection: socket.socket) -> bool:
        """False when the head came too late: the connection is being shut down."""
        with self._connections_lock:
            return self._head_deadlines.pop(connection, None) is not None

    def _close_late_heads(self) -> None:
        """Close the connections whose request line and headers are late (a blocked read
        returns at once); one thread for all of them, twice a second."""
        while not self._closing.wait(0.5):
            now = time.monotonic()
            # Under the lock: a head that ends meanwhile learns it came too late
            # (head_ends), rather than its request being served on a shut connection.
            with self._connections_lock:
                late = [sock for sock, deadline in self._head_deadlines.items()
                        if deadline < now]
                for sock in late:
                    del self._head_deadlines[sock]
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def stop_watching(self) -> None:
        """Stop the late-heads watcher (once the connections are closed)."""
        self._closing.set()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection on a thread of its own, unless MAX_CONNECTIONS are."""
        if self._connection_slots.acquire(blocking=False):
            thread = threading.Thread(target=self.process_request_thread,
                                      args=(request, client_address), daemon=True)
            with self._connections_lock:  # before it starts: close_connections waits for it
                self._connections[request] = thread
            try:
                thread.start()
            except BaseException:
                with self._connections_lock:
                    self._connections.pop(request, None)
                self._connection_slots.release()
                raise
            return
        self.relay._count(refused_connections=1)
        with contextlib.suppress(OSError):
            request.settimeout(1.0)
            request.sendall(_too_many_connections())
            # What the sender already wrote, read, so closing does not reset the connection
            # (which could lose the answer); nothing waits for more.
            request.setblocking(False)
            request.recv(MAX_HEADER_BYTES)
        self.shutdown_request(request)


    def handle_error(self, request: Any, client_address: Any) -> None:
        """A sender that went away is not the relay's failure (socketserver would print a
        traceback to stderr for each)."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            _logger.debug("An OTLP/HTTP connection from %s ended: %r", client_address[0], error)
        else:
            _logger.error("The relay failed on a connection from %s", client_address[0],
                          exc_info=True)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(request, None)
            self._connection_slots.release()

    def close_connections(self, timeout: float) -> None:
        """End kept-alive connections, letting requests in flight finish and answer.

        Shutting down the reading side wakes idle connections with an end of stream,
        while a request whose body was read can still write its answer.
        """
        self.stopping = True
        with self._connections_lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + timeout
        for _, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))


def _too_many_connections() -> bytes:
    """The whole answer to a connection past MAX_CONNECTIONS, written without a thread."""
    body = json.dumps({"code": code_pb2.UNAVAILABLE, "message": (
        f"the relay is busy: {MAX_CONNECTIONS} connections are open")}).encode()
    return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {_JSON_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {math.ceil(DEFAULT_RETRY_AFTER)}"
            "\r\nConnection: close\r\n\r\n").encode() + body


class _HeaderReader:
    """The connection's reader, as http.server's header parser sees it: past
    MAX_HEADER_BYTES in all, a line is too long (http.server answers 431)."""

    def __init__(self, rfile: Any) -> None:
        self._rfile = rfile
        self._left = MAX_HEADER_BYTES
        self.overflowed = False
        self.cut_short = False
        """The section ended with the connection, not with an empty line (the parser takes
        both for its end): what was read is not the whole request."""

    def readline(self, limit: int = -1) -> bytes:
        line: bytes = self._rfile.readline(min(limit, self._left + 1) if limit >= 0
                                           else self._left + 1)
        self.cut_short = not line or not line.endswith(b"\n")
        self._left -= len(line)
        if self._left < 0:
            self.overflowed = True
            raise http.client.LineTooLong(f"header section over {MAX_HEADER_BYTES} bytes")
        return line


class _RelayHTTPServerV6(_RelayHTTPServer):
    address_family = socket.AF_INET6


class _BodyBytes:
    """The bytes of request bodies the HTTP side holds, against :data:`HTTP_BODIES_HELD`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        """Count ``size`` more bytes held; False (nothing counted) if past the capacity."""
        with self._lock:
            if self.held + size > self.capacity:
                return False
            self.held += size
            return True

    def room_for(self, size: int) -> bool:
        return self.held + size <= self.capacity

    def give(self, size: int) -> None:
        with self._lock:
            self.held -= size

    def busy(self, relay: Relay, unread: int) -> _HTTPError:
        """The answer to a request whose body would not fit (``unread`` bytes of it left),
        counted as unavailable."""
        relay._count(unavailable=1)
        return _HTTPError(503, f"the relay is busy: {self.held} bytes of request bodies are "
                               f"held (at most {self.capacity})",
                          {"Retry-After": str(math.ceil(DEFAULT_RETRY_AFTER))}, close=True,
                          unread=unread)


class _Dropped(Exception):
    """The relay is stopping and the request was cut short: close without an answer, so
    the sender retries it (a 4xx would make it drop the data)."""


class _HTTPError(Exception):
    """An OTLP/HTTP error answer: status, a message for the sender, and extra headers."""

    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None,
                 close: bool = False, unread: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.close = close
        self.unread = unread
        """Bytes of the body not read: read and dropped after the answer."""


_GRPC_CODE_OF_STATUS = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    404: code_pb2.NOT_FOUND,
    408: code_pb2.DEADLINE_EXCEEDED,
    411: code_pb2.INVALID_ARGUMENT,
    413: code_pb2.RESOURCE_EXHAUSTED,
    415: code_pb2.INVALID_ARGUMENT,
    503: code_pb2.UNAVAILABLE,
}


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "otel-zenml-analytics-relay"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    sys_version = ""
    timeout = 30.0

    server: _RelayHTTPServer

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        _logger.debug("%s %s", self.address_string(), format % args)

    @property
    def relay(self) -> Relay:
        return self.server.relay

    _reader: Any = None
    """The connection's reader, while parse_request lends a limited one to the parser."""
    _header_reader: Optional[_HeaderReader] = None
    """The limited reader parse_request lent the parser for this request's headers."""
    _admitted: Optional[Tuple[str, int]] = None
    """What :meth:`handle_expect_100` found of the request, for :meth:`_export`."""

    def handle_one_request(self) -> None:
        # From here until its headers are parsed, a request is on HEAD_SECONDS' clock
        # (parse_request ends it; the finally, when the request never got that far).
        self.server.head_begins(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.head_ends(self.connection)

    def parse_request(self) -> bool:
        self._admitted = None  # each request is admitted afresh, whatever came before
        self._reader = self.rfile
        header_reader = self._header_reader = _HeaderReader(self._reader)
        self.rfile = header_reader  # type: ignore[assignment]
        try:
            parsed = bool(super().parse_request())
        finally:
            self.rfile = self._reader
            in_time = self.server.head_ends(self.connection)
        if header_reader.overflowed:  # answered 431 (its last line was cut by the limit)
            return False
        if not in_time or header_reader.cut_short:
            # The connection is being shut down, or ended within the headers (as stop()
            # ends it): judging the request by part of its headers would refuse it.
            self.close_connection = True
            return False
        return parsed

    def _drain(self, unread: Optional[int] = None) -> None:
        """Read and drop what the sender still writes after a refusal, before the
        connection closes: closing with bytes unread resets it, and the sender could lose
        the answer (Go's HTTP client reports its failed write instead). ``unread`` bytes
        of a body of known length, for :data:`DISCARD_SECONDS` at most; else whatever
        comes within a second, until a pause of 0.2 s."""
        seconds = DISCARD_SECONDS if unread is not None else 1.0
        deadline = time.monotonic() + seconds
        # The connection's reader, also while the header parser has a limited one
        reader = self._reader or self.rfile
        try:
            self.wfile.flush()
            while unread is None or unread > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.connection.settimeout(left if unread is not None else min(0.2, left))
                dropped = reader.read1(65536 if unread is None else min(unread, 65536))
                if not dropped:
                    return
                if unread is not None:
                    unread -= len(dropped)
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                self.connection.settimeout(self.timeout)

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """http.server's own refusals (a malformed request line, too many headers, an
        unknown method), followed, as ours are, by dropping what the sender still writes;
        none for a request line the connection cut short (as stop() cuts it)."""
        line = getattr(self, "raw_requestline", b"")
        if 0 < len(line) <= 65536 and not line.endswith(b"\n"):
            self.close_connection = True
            return
        super().send_error(code, message, explain)
        self._drain()

    def handle_expect_100(self) -> bool:
        """Refuse before the sender uploads what would be refused, or invite the body."""
        self.rfile = self._reader  # the headers are parsed
        if self._header_reader is not None and self._header_reader.cut_short:
            self.close_connection = True  # see parse_request
            return False
        if self.command == "GET":
            return bool(super().handle_expect_100())
        if self.command != "POST":
            self._send_error(_HTTPError(501, f"method {self.command[:20]!r} is not supported "
                                             "(POST exports, GET /health)", close=True),
                             protobuf=False)
            return False
        protobuf = self._wants_protobuf()
        try:
            signal_name, length = self._admit(protobuf)
        except _HTTPError as err:
            err.unread = 0  # the sender waits for an answer before it sends the body
            self._send_error(err, protobuf)
            return False
        bodies = self.server.bodies
        gzipped = self._content_encoding() == "gzip"
        if not bodies.room_for(min(length, BODY_READ_STEP)
                               + (self.relay.max_request_bytes if gzipped else 0)):
            self._send_error(bodies.busy(self.relay, unread=0), protobuf)
            return False
        self._admitted = (signal_name, length)
        return super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        # A GET's body is not read: the connection ends with the answer, or what is left
        # of the body would be read as the next request.
        bodied = bool(self.headers.defects or self.headers.get_all("Transfer-Encoding")) or any(
            value.strip() != "0" for value in self.headers.get_all("Content-Length") or ())
        path = self._path()
        if path is None:
            self._send_error(self._bad_target(), protobuf=False)
            return
        if path == HEALTH_PATH:
            body = json.dumps({"status": "ok", "stats": self.relay.stats()}).encode()
            self._send(200, body, _JSON_TYPE, close=bodied)
            return
        self._send_error(_HTTPError(404, f"no such resource: GET {self.path} (try {HEALTH_PATH}"
                                         f", or POST {LOGS_PATH} and {TRACES_PATH})",
                                    close=bodied), protobuf=False)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        protobuf = self._wants_protobuf()
        try:
            self._export(protobuf)
        except _HTTPError as err:
            self._send_error(err, protobuf)
        except _Dropped:
            self.close_connection = True
        except (ConnectionError, TimeoutError) as exc:  # gone, or not reading its answer
            self.close_connection = True
            _logger.debug("An OTLP/HTTP sender went away: %r", exc)
        except Exception as exc:  # noqa: BLE001 - a bug must still get an answer, not a reset
            _logger.exception("The relay failed on a request to %s", self.path[:200])
            self._send_error(_HTTPError(500, f"internal error of the relay: {type(exc).__name__}",
                                        close=True), protobuf)

    def _wants_protobuf(self) -> bool:
        return self._content_type() in _PROTOBUF_TYPES

    def _content_type(self) -> str:
        return str(self.headers.get("Content-Type", "")).split(";")[0].strip().lower()

    def _admit(self, protobuf: bool) -> Tuple[str, int]:
        """The request's signal and body length, once all that can be checked before its
        body is read was checked (counted as a request when the path is known). A refusal
        drops the body (its Content-Length, when that is sound), so that a sender still
        writing it reads the answer rather than a reset."""
        relay = self.relay
        path = self._path()
        if path is None:
            raise self._bad_target()
        signal_name = _PATHS.get(path)
        try:  # a refusal drops the body: its length, when the framing is sound
            length, framing = self._body_length(), None
        except _HTTPError as error:  # refused below, after what comes first
            length, framing = 0, error
        if signal_name is None:
            raise _HTTPError(404, f"no such resource: POST {path} (the relay receives "
                                  f"{LOGS_PATH} and {TRACES_PATH})", close=True, unread=length)
        relay._count(requests=1)
        if not relay.authorized(self.headers.get("Authorization")):
            raise _HTTPError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                             {"WWW-Authenticate": 'Bearer realm="otel-zenml-analytics-relay"'},
                             close=True, unread=length)
        content_type = self._content_type()
        if not protobuf and content_type != _JSON_TYPE:
            raise _HTTPError(415, f"unsupported Content-Type {content_type or '(none)'!r}: "
                                  "expected application/x-protobuf or application/json",
                             close=True, unread=length)
        encoding = self._content_encoding()
        if encoding not in ("", "identity", "gzip"):
            raise _HTTPError(415, f"unsupported Content-Encoding {encoding!r}: expected gzip or "
                                  "none", close=True, unread=length)
        if framing is not None:
            raise framing
        return signal_name, length

    def _export(self, protobuf: bool) -> None:
        relay = self.relay
        admitted, self._admitted = self._admitted, None
        signal_name, length = admitted or self._admit(protobuf)
        held = [0]  # what this request counts in the server's ``bodies``
        try:
            body = self._read_body(length, held)
            try:
                result = relay.export(signal_name, body, protobuf)
            except otlp.OTLPDecodeError as exc:
                raise _HTTPError(400, str(exc)) from None
        finally:
            self.server.bodies.give(held[0])
        response = result.response
        if response is None:
            relay._count(unavailable=1)
            raise _HTTPError(503, result.error,
                             {"Retry-After": str(max(1, math.ceil(result.retry_after)))})
        if protobuf:
            self._send(200, response.SerializeToString(), "application/x-protobuf")
        else:
            self._send(200, otlp.to_json(response), _JSON_TYPE)

    def _content_encoding(self) -> str:
        return str(self.headers.get("Content-Encoding", "")).strip().lower()

    def _path(self) -> Optional[str]:
        """The request target's path (None when it is not a URL: ``http://[x/``)."""
        try:
            return urlsplit(self.path).path.rstrip("/")
        except ValueError:
            return None

    def _bad_target(self) -> _HTTPError:
        return _HTTPError(400, f"the request target {self.path[:100]!r} is not a path",
                          close=True)

    def _too_large(self, size: object) -> _HTTPError:
        return _HTTPError(413, f"request body of {size} bytes is larger than the relay's limit "
                               f"of {self.relay.max_request_bytes} bytes", close=True)

    def _body_length(self) -> int:
        """The body's length from the request's framing, checked before anything is read."""
        if self.headers.defects:  # a header line the parser skipped, and those after it
            raise _HTTPError(400, "malformed header section", close=True)
        codings = self.headers.get_all("Transfer-Encoding")
        if codings:  # only a Content-Length frames a body here: no two readings of it
            raise _HTTPError(411, f"Transfer-Encoding {', '.join(codings)[:100]!r} is not "
                                  "accepted: send a Content-Length", close=True)
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or ()}
        if not lengths:
            raise _HTTPError(411, "a Content-Length header is required", close=True)
        if len(lengths) > 1:
            # Framing that two parsers could read differently (request smuggling): refuse.
            raise _HTTPError(400, f"conflicting Content-Length headers {sorted(lengths)}: "
                                  "expected one", close=True)
        length_text = lengths.pop()
        if not (length_text.isascii() and length_text.isdigit()):
            raise _HTTPError(400, f"Content-Length {length_text[:40]!r} is not a "
                                  "non-negative whole number", close=True)
        digits = length_text.lstrip("0") or "0"
        if len(digits) > len(str(self.relay.max_request_bytes)):  # int() refuses 4,300 digits
            raise self._too_large(f"{digits[:20]}... ({len(digits)} digits)")
        length = int(digits)
        if length > self.relay.max_request_bytes:
            raise self._too_large(length)
        return length

    def _read_body(self, length: int, held: List[int]) -> otlp.Body:
        """Read (and inflate) the body; ``held[0]``, the bytes this request counts in the
        server's ``bodies``, follows what it holds."""
        limit = self.relay.max_request_bytes
        bodies = self.server.bodies
        body = bytearray()  # one buffer, not copied after: the decoders read it as bytes
        deadline = time.monotonic() + BODY_READ_SECONDS
        try:
            while len(body) < length:
                step = min(length - len(body), BODY_READ_STEP)
                if not bodies.take(step):
                    raise bodies.busy(self.relay, unread=length - len(body))
                held[0] += step
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(min(left, self.timeout))
                piece = self.rfile.read1(step)
                bodies.give(step - len(piece))
                held[0] -= step - len(piece)
                if not piece:
                    break
                body += piece
        except (TimeoutError, socket.timeout):  # the same since Python 3.10
            waited = (f"{BODY_READ_SECONDS:g} s in all" if time.monotonic() >= deadline
                      else f"nothing for {self.timeout:g} s")
            raise _HTTPError(408, f"the body did not arrive in time: {len(body)} of "
                                  f"{length} bytes, {waited}", close=True) from None
        finally:
            self.connection.settimeout(self.timeout)
        if len(body) < length and self.server.stopping:
            raise _Dropped()
        if len(body) < length:
            raise _HTTPError(400, f"body ended after {len(body)} of {length} bytes", close=True)
        if self._content_encoding() != "gzip":
            return body  # none, or identity: _admit refused any other
        if not bodies.take(limit):  # what it may inflate to, while it does
            raise bodies.busy(self.relay, unread=0)
        held[0] += limit
        inflated = self._gunzip(body, limit)
        del body
        bodies.give(held[0] - len(inflated))
        held[0] = len(inflated)
        return inflated

    def _gunzip(self, data: otlp.Body, limit: int) -> bytes:
        members: List[bytes] = []  # one, as a rule: then it is the body, not copied
        size = 0
        while data:
            if len(members) == MAX_GZIP_MEMBERS:  # each copies the rest of the body
                raise _HTTPError(400, f"gzip body of more than {MAX_GZIP_MEMBERS} members")
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                member = inflater.decompress(data, limit + 1 - size)
            except zlib.error as exc:
                raise _HTTPError(400, f"body is not valid gzip: {exc}") from None
            size += len(member)
            if size > limit:
                raise _HTTPError(413, f"gzip body inflates past the relay's limit of {limit} "
                                      "bytes")
            if not inflater.eof:
                raise _HTTPError(400, "gzip body is truncated")
            members.append(member)
            data = inflater.unused_data  # a further gzip member, if any
        return members[0] if len(members) == 1 else b"".join(members)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: Optional[Dict[str, str]] = None, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close or self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, err: _HTTPError, protobuf: bool) -> None:
        """OTLP/HTTP errors carry a ``google.rpc.Status`` in the request's encoding."""
        if 400 <= err.status < 500 and err.status != 404:
            self.relay._count(bad_requests=1)
        code = _GRPC_CODE_OF_STATUS.get(err.status, code_pb2.UNKNOWN)
        status = status_pb2.Status(code=code, message=err.message)
        if protobuf:
            self._send(err.status, status.SerializeToString(), "application/x-protobuf",
                       err.headers, err.close)
        else:
            body = json.dumps({"code": code, "message": err.message}).encode()
            self._send(err.status, body, _JSON_TYPE, err.headers, err.close)
        if err.unread:
            self._drain(err.unread)
        elif err.close:
            self._drain()


# -- command line -------------------------------------------------------------------------


def main_relay(
    host: str = DEFAULT_HOST,
    http_port: Optional[int] = DEFAULT_HTTP_PORT,
    grpc_port: Optional[int] = DEFAULT_GRPC_PORT,
    token: Optional[str] = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    endpoint: Optional[str] = None,
    format: Optional[str] = None,
) -> int:
    """Run the relay in the foreground until SIGINT/SIGTERM (for the CLI)."""
    settings = Settings.resolve(endpoint=endpoint, format=format)
    relay = Relay(settings, host=host, http_port=http_port, grpc_port=grpc_port,
                  token=token or os.environ.get(RELAY_TOKEN_ENV) or None,
                  max_request_bytes=max_request_bytes)
    try:
        relay.start()
    except OSError as exc:
        print(f"otel-zenml-analytics relay: cannot start on {host}: {exc}", file=sys.stderr)
        return 2
    parts = []
    if relay.http_port is not None:
        parts.append(f"OTLP/HTTP on {relay.http_url} ({LOGS_PATH}, {TRACES_PATH}, {HEALTH_PATH})")
    if relay.grpc_port is not None:
        parts.append(f"OTLP/gRPC on {relay.grpc_endpoint}")
    auth = ", bearer token required" if relay._token else ""
    print(f"otel-zenml-analytics relay: {'; '.join(parts)}; delivering to "
          f"{redact_url(settings.endpoint or '')} ({settings.format} format){auth}", flush=True)
    relay.serve_forever()
    stats = relay.stats()
    print(f"otel-zenml-analytics relay: stopped; {stats['delivered']} messages delivered, "
          f"{stats['duplicates']} duplicates skipped", flush=True)
    return 0
