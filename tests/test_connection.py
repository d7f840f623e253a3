"""The delivery's own HTTP connection (``connection.BatchConnection``) against real
servers: the project's sink, and small socket servers that misbehave on purpose."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
import time
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
import requests

from otel_zenml_analytics import connection as connection_module
from otel_zenml_analytics.connection import BatchConnection
from otel_zenml_analytics.delivery import _LockedTally, _Tally
from otel_zenml_analytics.errors import AnalyticsAPIError
from otel_zenml_analytics.settings import Settings
from otel_zenml_analytics.sink import SinkServer

Answer = Callable[[int, bytes], bytes]
"""What a scripted server answers to the n-th request (from 0) on a connection."""

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


class ScriptedServer:
    """Reads HTTP/1.1 requests with a Content-Length body, answers as scripted, and
    records each connection's requests; ``close_after`` answers per connection."""

    def __init__(self, answer: Answer, close_after: int = 0) -> None:
        self.requests: List[Tuple[int, bytes, bytes]] = []
        self.connections = 0
        owner = self
        lock = threading.Lock()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with lock:
                    owner.connections += 1
                    number = owner.connections
                data = b""
                for index in range(close_after or 1_000_000):
                    while b"\r\n\r\n" not in data:
                        chunk = self.request.recv(65536)
                        if not chunk:
                            return
                        data += chunk
                    head, _, data = data.partition(b"\r\n\r\n")
                    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length:")))
                    while len(data) < length:
                        data += self.request.recv(65536)
                    body, data = data[:length], data[length:]
                    owner.requests.append((number, head, body))
                    reply = answer(index, body)
                    if reply:
                        self.request.sendall(reply)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers: List[ScriptedServer] = []

    def start(answer: Answer = lambda index, body: OK, close_after: int = 0) -> ScriptedServer:
        servers.append(ScriptedServer(answer, close_after))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _messages(count: int, tag: str) -> List[str]:
    return [json.dumps({"type": "track", "event": tag, "userId": "u", "messageId": f"{tag}-{n}"})
            for n in range(count)]


def _post_within(conn: BatchConnection, encoded: List[str], timeout: float) -> BaseException:
    """Post on a thread, so a post that never returns fails the test instead of hanging it."""
    raised: Dict[str, BaseException] = {}

    def run() -> None:
        try:
            conn.post(encoded, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the post never returned"
    assert "error" in raised, "the post succeeded"
    return raised["error"]


def test_batches_are_posted_on_one_kept_connection(scripted: Callable[..., ScriptedServer]
                                                   ) -> None:
    server = scripted()
    conn = BatchConnection(Settings(endpoint=server.url + "/api", write_key="wk"))
    for tag in ("a", "b", "c"):
        conn.post(_messages(3, tag), timeout=10)
    conn.close()
    assert server.connections == 1
    assert [number for number, _, _ in server.requests] == [1, 1, 1]
    head = server.requests[0][1].decode("latin-1").split("\r\n")
    assert head[0] == "POST /api/v1/batch HTTP/1.1"
    assert f"Host: {server.url[len('http://'):]}" in head
    body = json.loads(server.requests[2][2])
    assert [m["messageId"] for m in body["batch"]] == ["c-0", "c-1", "c-2"]


def test_the_sink_stores_what_is_posted_and_its_refusal_says_why(sink: SinkServer) -> None:
    conn = BatchConnection(Settings(endpoint=sink.url))
    conn.post(_messages(2, "stored"), timeout=10)
    assert sink.store.count() == 2
    sink.set_faults(1, status=429, retry_after=7)
    with pytest.raises(AnalyticsAPIError) as refused:
        conn.post(_messages(1, "refused"), timeout=10)
    assert refused.value.status == 429
    assert refused.value.retry_after == 7
    conn.post(_messages(1, "after"), timeout=10)  # the kept connection survives a refusal
    assert sink.store.count() == 3
    conn.close()


def test_a_server_that_never_answers_times_out(scripted: Callable[..., ScriptedServer]
                                                ) -> None:
    server = scripted(answer=lambda index, body: b"")
    conn = BatchConnection(Settings(endpoint=server.url))
    error = _post_within(conn, _messages(1, "slow"), timeout=0.5)
    assert isinstance(error, requests.exceptions.Timeout)
    assert str(error) == (f"the analytics destination {server.url[len('http://'):]} did not "
                          f"answer within 0.5 s")
    conn.close()


def test_a_short_deadline_after_a_long_one_is_kept(scripted: Callable[..., ScriptedServer]
                                                    ) -> None:
    # The watchdog sleeps until the first post's deadline (30 s) after it was answered;
    # the second post's deadline, earlier, must wake it.
    server = scripted(answer=lambda index, body: OK if index == 0 else b"")
    conn = BatchConnection(Settings(endpoint=server.url))
    conn.post(_messages(1, "answered"), timeout=30)
    started = time.monotonic()
    error = _post_within(conn, _messages(1, "unanswered"), timeout=0.5)
    assert isinstance(error, requests.exceptions.Timeout)
    assert time.monotonic() - started < 20
    conn.close()


def test_closing_the_connection_ends_a_post_in_flight(scripted: Callable[..., ScriptedServer]
                                                      ) -> None:
    # Delivery.shutdown closes the connection when the sender did not finish in time.
    server = scripted(answer=lambda index, body: b"")
    conn = BatchConnection(Settings(endpoint=server.url))
    closer = threading.Timer(0.5, conn.close)
    closer.start()
    started = time.monotonic()
    error = _post_within(conn, _messages(1, "cut short"), timeout=60)
    assert isinstance(error, requests.exceptions.ConnectionError)
    assert "was closed during the post" in str(error)
    assert time.monotonic() - started < 30
    assert len(server.requests) == 1
    closer.join()


def test_a_closed_connection_posts_again_within_its_deadline(
    scripted: Callable[..., ScriptedServer]
) -> None:
    answers = iter([OK])  # the first request on any connection is answered, no other
    server = scripted(answer=lambda index, body: next(answers, b""))
    conn = BatchConnection(Settings(endpoint=server.url))
    conn.post(_messages(1, "before"), timeout=10)
    conn.close()  # stops the deadline's thread: the next post needs a new one
    error = _post_within(conn, _messages(1, "after"), timeout=0.5)
    assert isinstance(error, requests.exceptions.Timeout)
    conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_posts_within_its_deadline(scripted: Callable[..., ScriptedServer]
                                                  ) -> None:
    # The child inherits the parent's socket, watchdog lock and (dead) thread: it must not
    # use them, or its post is bounded by nothing.
    answers = iter([OK, OK, b"", OK])  # the parent, the child twice (once never), the parent
    server = scripted(answer=lambda index, body: next(answers, b""))
    conn = BatchConnection(Settings(endpoint=server.url))
    conn.post(_messages(1, "parent"), timeout=10)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its second post timed out
        code = 1
        try:
            conn.post(_messages(1, "child"), timeout=10)  # its watchdog then waits
            started = time.monotonic()
            conn.post(_messages(1, "child, unanswered"), timeout=0.5)
        except requests.exceptions.Timeout:
            code = 0 if time.monotonic() - started < 5 else 3  # not the first post's 10 s
        except BaseException:  # noqa: BLE001 - any other outcome fails the test
            code = 2
        os._exit(code)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the child's post never returned")
    assert os.waitstatus_to_exitcode(status) == 0
    conn.post(_messages(1, "parent again"), timeout=10)  # the parent's connection still works
    conn.close()


def test_a_kept_connection_the_server_closed_is_replaced_at_once(
    scripted: Callable[..., ScriptedServer]
) -> None:
    # The server closes each connection after one answer, without saying so: the next
    # post finds it closed and is sent once more on a fresh connection.
    server = scripted(close_after=1)
    conn = BatchConnection(Settings(endpoint=server.url))
    conn.post(_messages(1, "first"), timeout=10)
    conn.post(_messages(1, "second"), timeout=10)
    conn.close()
    assert [number for number, _, _ in server.requests] == [1, 2]


def test_a_kept_connection_idle_for_a_while_is_checked_first(
    scripted: Callable[..., ScriptedServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection_module, "IDLE_CHECK_SECONDS", 0.0)
    monkeypatch.setattr(connection_module, "_GONE", ())  # no second try: the check must do
    server = scripted(close_after=1)
    conn = BatchConnection(Settings(endpoint=server.url))
    conn.post(_messages(1, "first"), timeout=10)
    # the server's close reaches the client before the next post's check
    threading.Event().wait(0.2)
    conn.post(_messages(1, "second"), timeout=10)
    conn.close()
    assert [number for number, _, _ in server.requests] == [1, 2]


def test_a_chunked_answer_is_read_and_the_connection_kept(
    scripted: Callable[..., ScriptedServer]
) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    server = scripted(answer=lambda index, body: chunked)
    conn = BatchConnection(Settings(endpoint=server.url))
    conn.post(_messages(1, "a"), timeout=10)
    conn.post(_messages(1, "b"), timeout=10)
    conn.close()
    assert server.connections == 1


def test_a_redirect_is_followed_through_requests(
    sink: SinkServer, scripted: Callable[..., ScriptedServer]
) -> None:
    moved = f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {sink.url}/v1/batch\r\n" \
            "Content-Length: 0\r\n\r\n"
    server = scripted(answer=lambda index, body: moved.encode())
    conn = BatchConnection(Settings(endpoint=server.url))
    conn.post(_messages(2, "moved"), timeout=10)
    conn.close()
    assert sink.store.count() == 2


def test_a_non_ascii_endpoint_is_posted_through_requests(
    scripted: Callable[..., ScriptedServer]
) -> None:
    # requests percent-encodes the path; written as is, it would not even encode.
    server = scripted()
    conn = BatchConnection(Settings(endpoint=server.url + "/\u0161ink"))
    conn.post(_messages(1, "accented"), timeout=10)
    conn.close()
    assert server.requests[0][1].split(b"\r\n")[0] == b"POST /%C5%A1ink/v1/batch HTTP/1.1"


def test_a_refused_connection_is_a_connection_error_without_the_key() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conn = BatchConnection(Settings(endpoint=f"http://127.0.0.1:{port}", write_key="wk-secret"))
    error = _post_within(conn, _messages(1, "nowhere"), timeout=5)
    assert isinstance(error, requests.exceptions.ConnectionError)
    assert str(error).startswith(f"posting to the analytics destination 127.0.0.1:{port} failed")
    assert "wk-secret" not in str(error)


@pytest.mark.parametrize("kind", [_Tally, _LockedTally])
def test_a_tally_bumped_by_racing_threads_is_exact(kind: type) -> None:
    tally = kind()
    start = threading.Barrier(4)

    def bump() -> None:
        start.wait()
        for _ in range(20_000):
            tally.add(1)
        tally.add(3)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tally.value() == 4 * 20_003
    assert tally.value() == 4 * 20_003  # reading does not count
    tally.add(0)
    assert tally.value() == 4 * 20_003
