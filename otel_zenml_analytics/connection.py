"""One kept-alive connection to the analytics destination, for the delivery's posts.

Why the delivery does not post through ``requests``: the sender thread spends a post
mostly waiting, and every system call that gives up the GIL costs it a wait to win the
GIL back from the threads busy recording signals (up to a switch interval, 5 ms, each
time, under load). ``requests`` makes nine such calls per post (``strace``): urllib3's
check of the pooled connection, two settings of the socket's timeout, the headers and
the body in two sends, and the answer, each send and read behind a ``poll``.
:class:`BatchConnection` makes two or three: one send of the headers with the body, and
one read of the answer (two when it arrives in parts), on a blocking socket whose
deadline a watchdog thread keeps. With three threads busy in Python, a post of 600
messages to the sink took 75 to 79 ms through ``requests`` and 37 to 42 ms this way
(``python -m bench.profile posts 100``: medians of 100 posts, three rounds alternating).

It speaks the plain HTTP/1.1 a batch post needs and leaves the rest to ``requests``:
with a proxy for the endpoint (from the environment, read once), credentials in its URL
or a non-ASCII character in it, every post goes through a ``requests`` session, and an
answer that redirects is posted again through one, which follows it. TLS verification,
the errors raised and the server's refusals are those of
:func:`destinations.post_encoded`; the timeout bounds the whole of a direct post
(connect, send and answer), where ``requests`` bounds each wait. After a fork, the child
starts afresh (the delivery also makes a new connection).

Usage::

    connection = BatchConnection(settings)
    connection.post(encoded_messages, timeout=15.0)  # AnalyticsAPIError unless 200
    connection.close()
"""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import socket
import ssl
import threading
import time
from typing import Dict, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import requests

from otel_zenml_analytics.destinations import (
    build_request,
    ca_verify,
    new_session,
    post_encoded,
    refusal,
    tls_problem,
)
from otel_zenml_analytics.settings import Settings

IDLE_CHECK_SECONDS = 1.0
"""A connection idle this long is checked before use (the server may have closed it):
one more system call, which a post right after the last one does without."""
_GONE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
         ConnectionAbortedError)
"""How a kept-alive connection the server closed in the meantime fails."""


class BatchConnection:
    """Posts batches to one destination over one kept-alive connection. Not thread-safe:
    one thread posts at a time (the delivery's sender, or its worker with a spool)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: Optional[requests.Session] = None
        self._sock: Optional[socket.socket] = None
        self._last_used = 0.0
        self._tls: Optional[ssl.SSLContext] = None
        self._watchdog = _Watchdog()
        self._pid = os.getpid()
        parts = urlsplit(settings.endpoint or "")
        self._host = parts.hostname or ""
        self._https = parts.scheme.lower() == "https"
        self._port = parts.port or (443 if self._https else 80)
        self._netloc = parts.netloc
        self._direct = bool(self._host) and "@" not in parts.netloc and \
            (settings.endpoint or "").isascii() and not self._proxied(settings.endpoint or "")

    def __repr__(self) -> str:
        return f"BatchConnection({self.settings!r})"

    def post(self, encoded: Sequence[str], timeout: float) -> None:
        """Post one batch; return on 200, raise ``AnalyticsAPIError`` for any other answer
        and a ``requests.RequestException`` for a network or TLS failure."""
        if self._pid != os.getpid():
            self._leave_to_parent()
        if not self._direct:
            post_encoded(self.settings, encoded, self._requests_session(), timeout)
            return
        url, body, headers = build_request(self.settings, encoded)
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"POST {path} HTTP/1.1", f"Host: {self._netloc}",
                f"Content-Length: {len(body)}"]
        head.extend(f"{name}: {value}" for name, value in headers.items())
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        status, reason, text, answer = self._exchange(request, timeout)
        if status == 200:
            return
        if 300 <= status < 400:  # requests follows redirects; let it
            post_encoded(self.settings, encoded, self._requests_session(), timeout)
            return
        raise refusal(status, reason, text, answer)

    def close(self) -> None:
        """Close the connection, and end a post in flight on it (a later post opens a new
        one). Any thread may call it."""
        self._watchdog.stop()
        sock = self._sock
        if sock is not None:  # a post between its connect and its arming: wake it too
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        self._drop()
        if self._session is not None:
            self._session.close()
            self._session = None

    def _exchange(self, request: bytes, timeout: float
                  ) -> Tuple[int, str, str, Dict[str, str]]:
        """Send the request and read the answer within ``timeout`` seconds in all, on a
        fresh connection once more when a kept one turns out closed by the server before
        it answered."""
        generation = self._watchdog.generation
        reused = self._sock is not None and not self._stale()
        deadline = time.monotonic() + timeout
        try:
            try:
                return self._send_and_read(request, deadline, generation)
            except _GONE:
                if not reused or self._watchdog.fired:
                    raise
                self._drop()
                return self._send_and_read(request, deadline, generation)
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            if isinstance(exc, _Closed) or self._watchdog.stopped_it or \
                    generation != self._watchdog.generation:
                raise requests.exceptions.ConnectionError(
                    f"the connection to the analytics destination {self._netloc} was "
                    f"closed during the post") from None
            if self._watchdog.fired or isinstance(exc, TimeoutError):
                raise requests.exceptions.Timeout(
                    f"the analytics destination {self._netloc} did not answer within "
                    f"{timeout:g} s") from None
            if isinstance(exc, ssl.SSLError):
                problem = tls_problem(self.settings.endpoint or "", exc)
                raise requests.exceptions.SSLError(problem) from None
            raise requests.exceptions.ConnectionError(
                f"posting to the analytics destination {self._netloc} failed: "
                f"{type(exc).__name__}: {exc}") from None
        finally:
            if self._watchdog.disarm():
                self._drop()  # shut down, however the exchange ended

    def _send_and_read(self, request: bytes, deadline: float, generation: int
                       ) -> Tuple[int, str, str, Dict[str, str]]:
        sock = self._connected(deadline)
        if self._watchdog.arm(sock, deadline, generation):
            if sock.gettimeout() is not None:  # setting it is a system call too: once
                sock.settimeout(None)  # blocking: one system call per send or read, no poll
        else:
            sock.settimeout(_left(deadline))
        sock.sendall(request)
        answer = http.client.HTTPResponse(sock, method="POST")
        try:
            answer.begin()
            data = answer.read()
        finally:
            answer.close()
        if answer.will_close:
            self._drop()
        self._last_used = time.monotonic()
        retry_after = answer.getheader("Retry-After")
        return (answer.status, answer.reason, data.decode("utf-8", "replace"),
                {"Retry-After": retry_after} if retry_after is not None else {})

    def _connected(self, deadline: float) -> socket.socket:
        sock = self._sock
        if sock is None:
            sock = socket.create_connection((self._host, self._port), _left(deadline))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._https:
                sock.settimeout(_left(deadline))
                sock = self._tls_context().wrap_socket(sock, server_hostname=self._host)
            self._sock = sock
        return sock

    def _stale(self) -> bool:
        """Whether the kept connection, idle for a while, was closed by the server (it is
        then readable: end of stream, or an answer nobody asked for)."""
        sock = self._sock
        if sock is None or time.monotonic() - self._last_used < IDLE_CHECK_SECONDS:
            return False
        try:
            if hasattr(select, "poll"):  # select.select fails for descriptors past 1023
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                readable = bool(poller.poll(0))
            else:
                readable = bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            readable = True
        if readable:
            self._drop()
            return True
        return False

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            verify = ca_verify(self.settings)
            if verify is False:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            elif verify is not True and os.path.isdir(verify):
                context = ssl.create_default_context(capath=verify)
            else:
                bundle = requests.utils.DEFAULT_CA_BUNDLE_PATH if verify is True else verify
                context = ssl.create_default_context(cafile=bundle)
            self._tls = context
        return self._tls

    def _leave_to_parent(self) -> None:
        """In a forked child: the socket, the session's and the watchdog (its lock and
        its thread) are the parent's; start afresh, closing only this process's copies."""
        self._pid = os.getpid()
        self._sock = self._session = None
        self._watchdog = _Watchdog()

    def _requests_session(self) -> requests.Session:
        if self._session is None:
            self._session = new_session(self.settings)
        return self._session

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    @staticmethod
    def _proxied(endpoint: str) -> bool:
        return bool(requests.utils.get_environ_proxies(endpoint)) if endpoint else False


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


class _Closed(OSError):
    """The connection was closed (:meth:`BatchConnection.close`) while a post used it."""


class _Watchdog:
    """Shuts a blocking socket down when its exchange outlives its deadline.

    A socket with a timeout polls before every send and read, and each poll gives up the
    GIL; a blocking one does not, and this thread bounds it instead. It wakes when armed
    while idle or with a deadline earlier than the one it waits for, and at the deadlines
    it waits for; not for each exchange: back-to-back posts arm it without waking it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._sock: Optional[socket.socket] = None
        self._until: Optional[float] = None
        self._waits_until: Optional[float] = None
        """The deadline the thread sleeps until; None while idle or awake."""
        self._idle = False
        self.generation = 0
        """Bumped by :meth:`stop`: a thread of an older generation ends, and an exchange
        that began before may not arm it."""
        self._thread: Optional[threading.Thread] = None
        self.fired = False
        """Whether it shut the socket of the current (or last) exchange down."""
        self.stopped_it = False
        """Whether that was :meth:`stop`, not the deadline."""

    def arm(self, sock: socket.socket, deadline: float, generation: int) -> bool:
        """Watch ``sock`` until :meth:`disarm` or ``deadline``; False when no thread can
        watch (at interpreter exit), and the socket must keep its own timeout. Raises
        :class:`_Closed` when stopped since ``generation``."""
        with self._cond:
            if generation != self.generation:
                raise _Closed("the connection was closed")
            self.fired = self.stopped_it = False
            thread = self._thread
            if (thread is None or not thread.is_alive()) and not self._start():
                return False
            self._sock, self._until = sock, deadline
            if self._idle or (self._waits_until is not None and deadline < self._waits_until):
                self._cond.notify()
            return True

    def disarm(self) -> bool:
        """Stop watching; whether the socket was shut down."""
        with self._cond:
            self._sock = self._until = None
            return self.fired

    def stop(self) -> None:
        """End the thread, and the exchange it watches, if any (a later exchange starts
        a new thread)."""
        with self._cond:
            self.generation += 1
            self._thread = None
            if self._shut_down():
                self.stopped_it = True
            self._idle, self._waits_until = False, None
            self._cond.notify_all()

    def _start(self) -> bool:
        thread = threading.Thread(target=self._watch, args=(self.generation,),
                                  name="otel-zenml-analytics-deadline", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return False
        self._thread = thread
        return True

    def _watch(self, generation: int) -> None:
        """The thread: it touches the shared state only while its generation is current
        (a stopped one may wake after its successor started)."""
        with self._cond:
            while generation == self.generation:
                until = self._until
                if until is None:
                    self._idle = True
                    self._cond.wait()
                    if generation == self.generation:
                        self._idle = False
                elif until > time.monotonic():
                    self._waits_until = until
                    self._cond.wait(until - time.monotonic())
                    if generation == self.generation:
                        self._waits_until = None
                else:
                    self._shut_down()

    def _shut_down(self) -> bool:
        """Under the lock: shut the watched socket down (its blocked send or read then
        fails), with the plain socket's ``shutdown``, also under TLS; whether one was."""
        sock, self._sock, self._until = self._sock, None, None
        if sock is None:
            return False
        self.fired = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        return True
