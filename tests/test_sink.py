"""Tests for the local analytics sink, through real HTTP against a running SinkServer."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import logging
import re
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # keep the file runnable alone, without an installed package
    sys.path.insert(0, str(_ROOT))

from otel_zenml_analytics import events as events_mod  # noqa: E402
from otel_zenml_analytics.events import (  # noqa: E402
    EventSourceError,
    fetch_events,
    format_table,
    main_events,
)
from otel_zenml_analytics.sink import (  # noqa: E402
    MAX_BODY_BYTES,
    EventStore,
    SinkServer,
    main_sink,
)

from .conftest import wait_until  # noqa: E402

WRITE_KEY = "wk_test_5ecret_Key_123"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


# --------------------------------------------------------------------------- helpers


def seg_track(
    event: str = "Pipeline run",
    message_id: Optional[str] = None,
    user_id: Optional[str] = "user-1",
    anonymous_id: Optional[str] = None,
    success: Optional[bool] = True,
    error_type: Optional[str] = None,
    **extra: Any,
) -> Dict[str, Any]:
    properties: Dict[str, Any] = {"step_count": 3}
    if success is not None:
        properties["event_success"] = success
    if error_type is not None:
        properties["event_error_type"] = error_type
    msg: Dict[str, Any] = {
        "type": "track",
        "messageId": message_id or str(uuid.uuid4()),
        "timestamp": "2024-05-01T12:00:00.000Z",
        "event": event,
        "properties": properties,
        "context": {
            "library": {"name": "otel-zenml-analytics", "version": "0.1.0"},
            "os": {"name": "Linux"},
            "trace_id": TRACE_ID,
            "span_id": SPAN_ID,
        },
        "integrations": {},
    }
    if user_id is not None:
        msg["userId"] = user_id
    if anonymous_id is not None:
        msg["anonymousId"] = anonymous_id
    msg.update(extra)
    return msg


def seg_body(*messages: Any) -> Dict[str, Any]:
    return {"batch": list(messages), "sentAt": "2024-05-01T12:00:01.000Z"}


def basic(key: str) -> Dict[str, str]:
    token = base64.b64encode(f"{key}:".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def post_json(
    url: str, payload: Any, headers: Optional[Dict[str, str]] = None, gz: bool = False
) -> requests.Response:
    data = json.dumps(payload).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if gz:
        data = gzip.compress(data)
        hdrs["Content-Encoding"] = "gzip"
    return requests.post(url, data=data, headers=hdrs, timeout=10)


def post_raw(url: str, data: bytes, headers: Optional[Dict[str, str]] = None) -> requests.Response:
    return requests.post(url, data=data, headers=headers or {}, timeout=10)


def get_events(sink: SinkServer, **params: Any) -> List[Dict[str, Any]]:
    resp = requests.get(f"{sink.url}/v1/events", params=params, timeout=10)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["count"] == len(body["events"])
    return list(body["events"])


def error_of(resp: requests.Response) -> str:
    assert resp.headers["Content-Type"] == "application/json"
    return str(resp.json()["error"])


@pytest.fixture()
def sink() -> Iterator[SinkServer]:
    with SinkServer(port=0) as server:
        yield server


@pytest.fixture()
def keyed_sink() -> Iterator[SinkServer]:
    with SinkServer(port=0, write_key=WRITE_KEY) as server:
        yield server


# --------------------------------------------------------------------------- basics


def test_health_unknown_path_and_wrong_method(sink: SinkServer) -> None:
    assert sink.port > 0
    assert sink.url == f"http://127.0.0.1:{sink.port}"
    resp = requests.get(f"{sink.url}/health", timeout=10)
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}

    resp = requests.get(f"{sink.url}/nope", timeout=10)
    assert resp.status_code == 404
    assert "not found" in error_of(resp)

    resp = requests.get(f"{sink.url}/v1/batch", timeout=10)
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "POST"
    assert "not allowed" in error_of(resp)

    resp = requests.post(f"{sink.url}/v1/events", data=b"{}", timeout=10)
    assert resp.status_code == 405
    resp = requests.delete(f"{sink.url}/batch", timeout=10)
    assert resp.status_code == 405


def test_segment_batch_is_stored_and_normalised(sink: SinkServer) -> None:
    track = seg_track(success=False, error_type="RuntimeError")
    identify = {
        "type": "identify",
        "messageId": "id-identify-1",
        "timestamp": "2024-05-01T12:00:02.000Z",
        "anonymousId": "anon-1",
        "traits": {"email": "a@example.com"},
        "context": {},
    }
    resp = post_json(f"{sink.url}/v1/batch", seg_body(track, identify))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True, "stored": 2, "duplicates": 0}

    stored = get_events(sink)
    assert [e["messageId"] for e in stored] == ["id-identify-1", track["messageId"]]
    ident, trk = stored
    assert trk["type"] == "track"
    assert trk["event"] == "Pipeline run"
    assert trk["userId"] == "user-1"
    assert trk["anonymousId"] is None
    assert trk["format"] == "segment"
    assert trk["success"] is False
    assert trk["errorType"] == "RuntimeError"
    assert trk["traceId"] == TRACE_ID
    assert trk["timestamp"] == "2024-05-01T12:00:00.000Z"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", trk["receivedAt"])
    assert trk["message"] == track  # the canonical message is the camelCase message as sent
    assert trk["seq"] < ident["seq"]
    assert ident["type"] == "identify"
    assert ident["event"] is None
    assert ident["success"] is None
    assert ident["traceId"] is None
    assert ident["anonymousId"] == "anon-1"
    assert sink.store.count() == 2


def test_zenml_batch_is_normalised_to_camel_case(sink: SinkServer) -> None:
    messages = [
        {
            "type": "track",
            "message_id": "zen-1",
            "timestamp": "2024-05-01T12:00:00+00:00",
            "user_id": "u-zen",
            "anonymous_id": "anon-zen",
            "event": "Model deployed",
            "properties": {"event_success": True},
            "context": {"trace_id": TRACE_ID},
            "debug": False,
        },
        {
            "type": "group",
            "user_id": "u-zen",
            "group_id": "org-1",
            "traits": {"plan": "pro"},
            "timestamp": "2024-05-01T12:00:01+00:00",
        },
        {"type": "alias", "user_id": "u-new", "previous_id": "u-zen"},
    ]
    resp = post_json(f"{sink.url}/batch", messages)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True, "stored": 3, "duplicates": 0}

    alias, group, track = get_events(sink)
    assert track["format"] == "zenml"
    assert track["message"] == {
        "type": "track",
        "messageId": "zen-1",
        "timestamp": "2024-05-01T12:00:00+00:00",
        "userId": "u-zen",
        "anonymousId": "anon-zen",
        "event": "Model deployed",
        "properties": {"event_success": True},
        "context": {"trace_id": TRACE_ID},
        "debug": False,
    }
    assert track["success"] is True
    assert track["traceId"] == TRACE_ID
    assert group["message"]["groupId"] == "org-1"
    assert "group_id" not in group["message"]
    # a missing message_id gets a generated UUID4
    assert uuid.UUID(group["messageId"]).version == 4
    assert group["message"]["messageId"] == group["messageId"]
    assert alias["message"]["previousId"] == "u-zen"
    assert alias["userId"] == "u-new"


def test_gzip_bodies_on_both_paths(sink: SinkServer) -> None:
    resp = post_json(f"{sink.url}/v1/batch", seg_body(seg_track(event="gz seg")), gz=True)
    assert resp.status_code == 200, resp.text
    zen = [{"type": "track", "message_id": "gz-zen", "user_id": "u", "event": "gz zen"}]
    resp = post_json(f"{sink.url}/batch", zen, gz=True)
    assert resp.status_code == 200, resp.text
    assert {e["event"] for e in get_events(sink)} == {"gz seg", "gz zen"}
    stats = sink.stats()
    assert stats["accepted_requests"] == 2
    assert stats["bytes_received"] > 0


def test_chunked_upload(sink: SinkServer) -> None:
    data = json.dumps(seg_body(seg_track(event="chunked"))).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 50):
            yield data[i : i + 50]

    resp = requests.post(f"{sink.url}/v1/batch", data=chunks(), timeout=10)
    assert resp.status_code == 200, resp.text
    assert get_events(sink)[0]["event"] == "chunked"


def test_empty_batches_are_fine(sink: SinkServer) -> None:
    resp = post_json(f"{sink.url}/v1/batch", {"batch": []})
    assert resp.status_code == 200
    assert resp.json() == {"success": True, "stored": 0, "duplicates": 0}
    resp = post_json(f"{sink.url}/batch", [])
    assert resp.status_code == 200
    assert sink.store.count() == 0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("path", "payload", "expected"),
    [
        ("/v1/batch", [seg_track()], "segment format expects a JSON object with a 'batch' array"),
        ("/v1/batch", {"messages": []}, "segment format expects a JSON object with a 'batch'"),
        ("/batch", {"batch": []}, "zenml format expects a JSON array of messages"),
        ("/v1/batch", seg_body(seg_track(), "oops"), "message 1: expected a JSON object"),
        ("/batch", [42], "message 0: expected a JSON object, got number"),
        ("/v1/batch", seg_body(seg_track(type="foo")), "message 0: unknown type 'foo'"),
        ("/v1/batch", seg_body({"messageId": "x", "userId": "u"}), "message 0: missing 'type'"),
        (
            "/v1/batch",
            seg_body(seg_track(), seg_track(), seg_track(), seg_track(messageId=None)),
            "message 3: missing 'messageId'",
        ),
        (
            "/v1/batch",
            seg_body(seg_track(), seg_track(user_id=None)),
            "message 1: needs userId or anonymousId",
        ),
        (
            "/batch",
            [{"type": "track", "event": "e", "properties": {}}],
            "message 0: needs user_id or anonymous_id",
        ),
        ("/v1/batch", seg_body(seg_track(event="")), "message 0: 'event' must be a non-empty"),
        ("/v1/batch", seg_body(seg_track(properties=[1])), "'properties' must be an object"),
        ("/v1/batch", seg_body(seg_track(userId=7)), "message 0: 'userId' must be a string"),
        (
            "/batch",
            [{"type": "group", "message_id": "g", "user_id": "u"}],
            "message 0: missing 'group_id' (required for group)",
        ),
        (
            "/v1/batch",
            seg_body({"type": "alias", "messageId": "a", "userId": "u"}),
            "message 0: missing 'previousId' (required for alias)",
        ),
    ],
)
def test_invalid_batches_get_a_specific_400(
    sink: SinkServer, path: str, payload: Any, expected: str
) -> None:
    resp = post_json(f"{sink.url}{path}", payload)
    assert resp.status_code == 400
    assert expected in error_of(resp)
    assert sink.store.count() == 0


def test_json_that_only_the_standard_library_reads_is_stored(sink: SinkServer) -> None:
    """orjson reads the sink's bodies first; what it refuses but ``json`` accepts is still
    stored: an integer beyond 64 bits with its value, a lone surrogate escape (valid JSON,
    not valid Unicode) as U+FFFD, as Segment's server reads it."""
    message = seg_track()
    message["properties"].update(big=2**70, odd="\ud800")
    body = json.dumps(seg_body(message)).encode()
    resp = post_raw(f"{sink.url}/v1/batch", body, {"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    [event] = get_events(sink)
    assert event["message"]["properties"]["big"] == 2**70
    assert event["message"]["properties"]["odd"] == "\ufffd"


def test_invalid_json_gives_parser_message_and_position(sink: SinkServer) -> None:
    resp = post_raw(f"{sink.url}/v1/batch", b'{"batch": [}')
    assert resp.status_code == 400
    message = error_of(resp)
    assert message.startswith("invalid JSON: ")
    assert "line 1 column 12 (char 11)" in message

    resp = post_raw(f"{sink.url}/batch", b"[NaN]")
    assert resp.status_code == 400
    assert "invalid JSON" in error_of(resp)

    resp = post_raw(f"{sink.url}/batch", b"\xff\xfe[]")
    assert resp.status_code == 400
    assert "UTF-8" in error_of(resp)

    resp = post_raw(f"{sink.url}/batch", b"[" * 100_000)
    assert resp.status_code == 400
    assert "invalid JSON" in error_of(resp)


def test_invalid_gzip(sink: SinkServer) -> None:
    resp = post_raw(
        f"{sink.url}/v1/batch", b"definitely not gzip", headers={"Content-Encoding": "gzip"}
    )
    assert resp.status_code == 400
    assert error_of(resp).startswith("invalid gzip body")

    truncated = gzip.compress(json.dumps(seg_body(seg_track())).encode())[:-12]
    resp = post_raw(f"{sink.url}/v1/batch", truncated, headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 400
    assert "invalid gzip body" in error_of(resp)

    resp = post_raw(f"{sink.url}/batch", b"[]", headers={"Content-Encoding": "br"})
    assert resp.status_code == 415
    assert "Content-Encoding" in error_of(resp)


def test_rejection_is_all_or_nothing(sink: SinkServer) -> None:
    good = [seg_track(event=f"ok {i}") for i in range(5)]
    resp = post_json(f"{sink.url}/v1/batch", seg_body(*good, {"type": "track"}))
    assert resp.status_code == 400
    assert "message 5:" in error_of(resp)
    assert sink.store.count() == 0
    stats = sink.stats()
    assert stats["rejected_requests"] == 1
    assert stats["received_messages"] == 0
    assert stats["stored_messages"] == 0


# --------------------------------------------------------------------------- size limits


def test_oversized_plain_body_is_413(sink: SinkServer) -> None:
    big = seg_track(properties={"blob": "x" * (MAX_BODY_BYTES + 10)})
    data = json.dumps(seg_body(big)).encode()
    resp = post_raw(f"{sink.url}/v1/batch", data)
    assert resp.status_code == 413
    message = error_of(resp)
    assert str(len(data)) in message
    assert str(MAX_BODY_BYTES) in message
    assert sink.store.count() == 0


def test_gzip_bomb_is_413(sink: SinkServer) -> None:
    bomb = gzip.compress(b"0" * 50_000_000, compresslevel=9)
    assert len(bomb) < 1_000_000
    resp = post_raw(f"{sink.url}/batch", bomb, headers={"Content-Encoding": "gzip"})
    assert resp.status_code == 413
    assert str(MAX_BODY_BYTES) in error_of(resp)
    # the connection-level state is fine: a following request works
    resp = post_json(f"{sink.url}/batch", [])
    assert resp.status_code == 200


def test_huge_content_length_is_rejected_before_reading(sink: SinkServer) -> None:
    with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as conn:
        conn.sendall(
            b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20000000\r\n\r\n"
        )
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert "20000000" in error
    assert "10000000" in error


def test_expect_100_continue_with_huge_length_is_refused(sink: SinkServer) -> None:
    with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as conn:
        conn.sendall(
            b"POST /batch HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 99999999\r\n\r\n"
        )
        received = conn.recv(65536)
    assert received.startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in received
    assert sink.stats()["rejected_requests"] == 1


def test_keep_alive_session_survives_rejections(keyed_sink: SinkServer) -> None:
    with requests.Session() as session:
        url = keyed_sink.url
        assert session.post(f"{url}/v1/batch", json={"batch": []}).status_code == 401
        assert session.post(f"{url}/batch", data=b"x" * 600_000).status_code == 413
        assert session.post(f"{url}/batch", data=b"[1]").status_code == 400
        assert session.post(f"{url}/nowhere", data=b"abc").status_code == 404
        assert session.put(f"{url}/batch", data=b"[]").status_code == 405
        resp = session.post(f"{url}/batch", json=[{"type": "identify", "user_id": "u"}])
        assert resp.status_code == 200
        assert resp.json()["stored"] == 1


# --------------------------------------------------------------------------- write key


def test_write_key_required_on_segment_path(
    keyed_sink: SinkServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="otel_zenml_analytics.sink")
    url = f"{keyed_sink.url}/v1/batch"
    body = seg_body(seg_track())

    missing = post_json(url, body)
    wrong = post_json(url, body, headers=basic("wrong-key"))
    garbage = post_json(url, body, headers={"Authorization": "Basic !!notbase64!!"})
    bearer = post_json(url, body, headers={"Authorization": f"Bearer {WRITE_KEY}"})
    for resp in (missing, wrong, garbage, bearer):
        assert resp.status_code == 401
        assert resp.json() == {"error": "invalid or missing write key"}
        assert WRITE_KEY not in resp.text
        assert WRITE_KEY not in str(resp.headers)
    assert keyed_sink.store.count() == 0

    ok = post_json(url, body, headers=basic(WRITE_KEY))
    assert ok.status_code == 200, ok.text
    assert WRITE_KEY not in ok.text
    # the zenml path has no auth
    zen = post_json(f"{keyed_sink.url}/batch", [{"type": "identify", "user_id": "u"}])
    assert zen.status_code == 200

    assert keyed_sink.store.count() == 2
    stats = keyed_sink.stats()
    assert stats["rejected_requests"] == 4
    assert stats["accepted_requests"] == 2
    assert WRITE_KEY not in json.dumps(stats)
    assert WRITE_KEY not in repr(keyed_sink)
    assert "<set>" in repr(keyed_sink)
    assert caplog.records, "the sink logs requests at DEBUG"
    assert WRITE_KEY not in caplog.text


def test_requests_are_not_printed_to_stderr(
    sink: SinkServer, capfd: pytest.CaptureFixture[str]
) -> None:
    requests.get(f"{sink.url}/health", timeout=10)
    post_json(f"{sink.url}/batch", [])
    captured = capfd.readouterr()
    assert "GET /health" not in captured.err
    assert "POST /batch" not in captured.err


# --------------------------------------------------------------------------- duplicates


def test_duplicates_stored_once_and_counted(sink: SinkServer) -> None:
    first = seg_track(message_id="dup-1", event="first")
    resp = post_json(f"{sink.url}/v1/batch", seg_body(first, first, seg_track(message_id="m-2")))
    assert resp.json() == {"success": True, "stored": 2, "duplicates": 1}

    again = seg_track(message_id="dup-1", event="changed")
    resp = post_json(f"{sink.url}/v1/batch", seg_body(again))
    assert resp.json() == {"success": True, "stored": 0, "duplicates": 1}
    zen_dup = {"type": "track", "message_id": "dup-1", "user_id": "u", "event": "zen dup"}
    resp = post_json(f"{sink.url}/batch", [zen_dup])
    assert resp.json() == {"success": True, "stored": 0, "duplicates": 1}

    stored = get_events(sink)
    assert len(stored) == 2
    dup = next(e for e in stored if e["messageId"] == "dup-1")
    assert dup["event"] == "first"  # the first copy wins

    stats = requests.get(f"{sink.url}/v1/stats", timeout=10).json()
    assert stats == sink.stats()
    assert stats["requests"] == 3
    assert stats["accepted_requests"] == 3
    assert stats["rejected_requests"] == 0
    assert stats["received_messages"] == 5
    assert stats["stored_messages"] == 2
    assert stats["duplicate_messages"] == 3
    assert stats["bytes_received"] > 0


def test_concurrent_posts(sink: SinkServer) -> None:
    errors: List[str] = []

    def worker(n: int) -> None:
        with requests.Session() as session:
            for i in range(5):
                body = seg_body(seg_track(message_id=f"c-{n}-{i}"), seg_track(message_id="shared"))
                resp = session.post(f"{sink.url}/v1/batch", json=body, timeout=10)
                if resp.status_code != 200:
                    errors.append(resp.text)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sink.store.count() == 8 * 5 + 1
    stats = sink.stats()
    assert stats["stored_messages"] == 41
    assert stats["duplicate_messages"] == 39


# --------------------------------------------------------------------------- faults


def test_fail_first_then_success() -> None:
    with SinkServer(port=0, fail_first=2) as sink:
        body = seg_body(seg_track(message_id="retry-me"))
        for _ in range(2):
            resp = post_json(f"{sink.url}/v1/batch", body)
            assert resp.status_code == 503
            assert "error" in resp.json()
            assert "Retry-After" not in resp.headers
        assert sink.store.count() == 0
        resp = post_json(f"{sink.url}/v1/batch", body)
        assert resp.status_code == 200
        assert sink.store.count() == 1
        stats = sink.stats()
        assert stats["requests"] == 3
        assert stats["faulted_requests"] == 2
        assert stats["accepted_requests"] == 1


def test_set_faults_with_retry_after_on_both_paths(sink: SinkServer) -> None:
    sink.set_faults(2, status=503, retry_after=1.5)
    resp = post_json(f"{sink.url}/v1/batch", seg_body(seg_track()))
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "1.5"
    resp = post_json(f"{sink.url}/batch", [{"type": "identify", "user_id": "u"}])
    assert resp.status_code == 503
    resp = post_json(f"{sink.url}/batch", [{"type": "identify", "user_id": "u"}])
    assert resp.status_code == 200
    assert sink.store.count() == 1

    with pytest.raises(ValueError):
        sink.set_faults(-1)
    with pytest.raises(ValueError):
        sink.set_faults(1, status=200)


def test_faults_endpoint(sink: SinkServer) -> None:
    resp = post_json(f"{sink.url}/_sink/faults", {"fail_next": 1, "status": 429, "retry_after": 2})
    assert resp.status_code == 200
    assert resp.json() == {"success": True, "fail_next": 1, "status": 429, "retry_after": 2.0}
    resp = post_json(f"{sink.url}/v1/batch", seg_body(seg_track()))
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "2"
    resp = post_json(f"{sink.url}/v1/batch", seg_body(seg_track()))
    assert resp.status_code == 200

    for bad in ({"fail_next": -1}, {"fail_next": 1, "status": 200}, {"nope": 1}, [1]):
        resp = post_json(f"{sink.url}/_sink/faults", bad)
        assert resp.status_code == 400, bad
        assert error_of(resp)
    resp = post_json(f"{sink.url}/v1/batch", seg_body(seg_track()))
    assert resp.status_code == 200


def _refused(port: int) -> bool:
    """Whether a TCP connection to the port is refused (nothing listens there)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_slow_fault_stores_then_answers_after_the_delay(sink: SinkServer) -> None:
    sink.set_faults(1, mode="slow", delay=3)
    body = seg_body(seg_track(message_id="slow-1"))
    with pytest.raises(requests.Timeout):
        requests.post(f"{sink.url}/v1/batch", json=body, timeout=0.5)
    wait_until(lambda: sink.store.count() == 1, "the event stored before the late answer")
    resp = post_json(f"{sink.url}/v1/batch", body)  # the client's retry: a copy
    assert resp.status_code == 200 and resp.json()["duplicates"] == 1
    assert sink.store.count() == 1
    stats = sink.stats()
    assert (stats["slow_requests"], stats["faulted_requests"]) == (1, 1)
    assert (stats["accepted_requests"], stats["duplicate_messages"]) == (2, 1)


def test_slow_answer_arrives_for_a_patient_client(sink: SinkServer) -> None:
    sink.set_faults(1, mode="slow", delay=0.3)
    resp = post_json(f"{sink.url}/v1/batch", seg_body(seg_track()))
    assert resp.status_code == 200 and resp.json()["stored"] == 1


@pytest.mark.parametrize("mode", ["reset", "reset_mid"])
def test_reset_faults_store_then_abort_the_connection(sink: SinkServer, mode: str) -> None:
    sink.set_faults(1, mode=mode)
    body = seg_body(seg_track(message_id=f"{mode}-1"), seg_track(message_id=f"{mode}-2"))
    with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        requests.post(f"{sink.url}/v1/batch", json=body, timeout=10)
    assert sink.store.count() == 2
    resp = post_json(f"{sink.url}/v1/batch", body)
    assert resp.status_code == 200 and resp.json()["duplicates"] == 2
    stats = sink.stats()
    assert (stats["reset_requests"], stats["faulted_requests"]) == (1, 1)
    assert stats["duplicate_messages"] == 2 and sink.store.count() == 2


def test_reset_mid_writes_part_of_the_answer(sink: SinkServer) -> None:
    sink.set_faults(1, mode="reset_mid")
    request = json.dumps(seg_body(seg_track())).encode()
    with socket.create_connection(("127.0.0.1", sink.port), timeout=10) as conn:
        conn.sendall(b"POST /v1/batch HTTP/1.1\r\nHost: sink\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(request)).encode() + b"\r\n\r\n" + request)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(4096):
                received += chunk
    # Either the partial answer came before the reset, or the reset discarded it.
    if received:
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert 0 < len(body) < length
    assert sink.store.count() == 1


def test_refuse_closes_the_port_and_drops_kept_alive_connections(sink: SinkServer) -> None:
    session = requests.Session()
    assert session.get(f"{sink.url}/health", timeout=10).status_code == 200
    sink.set_faults(mode="refuse")
    assert _refused(sink.port)
    with pytest.raises(requests.ConnectionError):
        session.post(f"{sink.url}/v1/batch", json=seg_body(seg_track()), timeout=10)
    sink.set_faults(0)  # open again, on the same port
    assert session.get(f"{sink.url}/health", timeout=10).status_code == 200
    assert post_json(f"{sink.url}/v1/batch", seg_body(seg_track())).status_code == 200
    stats = sink.stats()
    assert stats["refusals"] == 1 and stats["requests"] == 1
    session.close()


def test_refuse_for_a_while_over_http_with_the_foreground_server() -> None:
    sink = SinkServer(port=0)
    server = threading.Thread(target=sink.serve_forever, daemon=True)  # as the CLI serves
    server.start()
    try:
        wait_until(lambda: not _refused(sink.port), "the sink to accept connections")
        resp = post_json(f"{sink.url}/_sink/faults", {"mode": "refuse", "duration": 1.0})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"success": True, "mode": "refuse", "duration": 1.0}
        assert _refused(sink.port)
        wait_until(lambda: not _refused(sink.port), "the sink to accept connections")
        assert requests.get(f"{sink.url}/health", timeout=10).status_code == 200
        assert sink.stats()["refusals"] == 1
    finally:
        sink.stop()
        server.join(10)
    assert not server.is_alive()


def test_faults_endpoint_new_modes_and_their_errors(sink: SinkServer) -> None:
    resp = post_json(f"{sink.url}/_sink/faults", {"fail_next": 1, "mode": "slow", "delay": 0.2})
    assert resp.status_code == 200
    assert resp.json() == {"success": True, "fail_next": 1, "status": 503, "retry_after": None,
                           "mode": "slow", "delay": 0.2}
    assert post_json(f"{sink.url}/v1/batch", seg_body(seg_track())).status_code == 200
    assert sink.stats()["slow_requests"] == 1
    for bad, words in (({"mode": "refuse"}, "duration"), ({"mode": "nope"}, "mode"),
                       ({"fail_next": 1, "mode": "slow"}, "delay"),
                       ({"mode": "reset", "delay": -1}, "delay"),
                       ({"mode": "refuse", "duration": "soon"}, "duration")):
        resp = post_json(f"{sink.url}/_sink/faults", bad)
        assert resp.status_code == 400, bad
        assert words in error_of(resp)
    assert not _refused(sink.port)
    with pytest.raises(ValueError, match="mode"):
        sink.set_faults(1, mode="explode")


def test_stop_while_refusing_or_answering_slowly(tmp_path: Path) -> None:
    refusing = SinkServer(port=0, db_path=str(tmp_path / "a.db")).start()
    refusing.set_faults(mode="refuse", duration=60)
    refusing.stop()  # cancels the reopening; returns without waiting for it
    assert _refused(refusing.port)

    slow = SinkServer(port=0, db_path=str(tmp_path / "b.db")).start()
    slow.set_faults(1, mode="slow", delay=600)
    def client() -> None:
        with contextlib.suppress(requests.RequestException):  # stopped under it: either way
            requests.post(f"{slow.url}/v1/batch", json=seg_body(seg_track()), timeout=60)

    thread = threading.Thread(target=client)
    thread.start()
    wait_until(lambda: slow.stats()["slow_requests"] == 1, "one slow request")
    slow.stop()  # cuts the delay short
    thread.join(60)
    assert not thread.is_alive()


# --------------------------------------------------------------------------- reading events


def _populate(sink: SinkServer) -> None:
    batch = [
        seg_track(event="Pipeline run", user_id="alice", message_id="e1"),
        seg_track(event="Stack registered", user_id="bob", message_id="e2", success=None),
        seg_track(
            event="Pipeline run",
            user_id=None,
            anonymous_id="anon-xyz-1234567890",
            message_id="e3",
            success=False,
            error_type="ValueError",
        ),
        {"type": "identify", "messageId": "e4", "userId": "alice", "traits": {"a": 1}},
        {"type": "page", "messageId": "e5", "userId": "bob", "name": "Dashboard"},
    ]
    resp = post_json(f"{sink.url}/v1/batch", seg_body(*batch))
    assert resp.status_code == 200, resp.text


def test_events_endpoint_filters_and_ordering(sink: SinkServer) -> None:
    _populate(sink)
    everything = get_events(sink)
    assert [e["messageId"] for e in everything] == ["e5", "e4", "e3", "e2", "e1"]
    seqs = [e["seq"] for e in everything]
    assert seqs == sorted(seqs, reverse=True)

    assert [e["messageId"] for e in get_events(sink, event="Pipeline run")] == ["e3", "e1"]
    assert [e["messageId"] for e in get_events(sink, type="identify")] == ["e4"]
    assert [e["messageId"] for e in get_events(sink, user="alice")] == ["e4", "e1"]
    assert [e["messageId"] for e in get_events(sink, user="anon-xyz-1234567890")] == ["e3"]
    assert [e["messageId"] for e in get_events(sink, limit=2)] == ["e5", "e4"]
    after = everything[2]["seq"]  # e3
    assert [e["messageId"] for e in get_events(sink, after=after)] == ["e5", "e4"]
    assert [e["messageId"] for e in get_events(sink, after=after, order="asc")] == ["e4", "e5"]
    assert get_events(sink, event="Pipeline run", user="bob") == []

    for bad in ({"limit": "0"}, {"limit": "abc"}, {"after": "-1"}, {"order": "up"}):
        resp = requests.get(f"{sink.url}/v1/events", params=bad, timeout=10)
        assert resp.status_code == 400
        assert error_of(resp)


def test_fetch_events_from_db_and_url(sink: SinkServer) -> None:
    _populate(sink)
    from_url = fetch_events(url=sink.url)
    from_db = fetch_events(db=sink.db_path)
    assert from_url == from_db
    assert [e["messageId"] for e in from_db] == ["e5", "e4", "e3", "e2", "e1"]
    assert fetch_events(db=sink.db_path, event="Pipeline run", user="alice")[0]["messageId"] == "e1"
    assert [e["messageId"] for e in fetch_events(url=sink.url, type="track", limit=2)] == [
        "e3",
        "e2",
    ]
    e3_seq = from_db[2]["seq"]
    assert [e["messageId"] for e in fetch_events(db=sink.db_path, after_seq=e3_seq)] == [
        "e5",
        "e4",
    ]
    with pytest.raises(ValueError):
        fetch_events()
    with pytest.raises(ValueError):
        fetch_events(db=sink.db_path, url=sink.url)


def test_fetch_events_from_db_after_the_sink_stopped(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with SinkServer(port=0, db_path=str(db)) as sink:
        _populate(sink)
    assert db.exists()  # an explicit db_path is kept
    assert len(fetch_events(db=str(db))) == 5
    store = EventStore(str(db))
    try:
        assert store.count() == 5
        assert store.add([seg_track(message_id="e1")], "segment") == (0, 1)
    finally:
        store.close()


def test_temporary_db_is_removed_on_stop() -> None:
    sink = SinkServer(port=0).start()
    db = Path(sink.db_path)
    assert db.exists()
    sink.stop()
    sink.stop()  # idempotent
    assert not db.exists()


def test_fetch_events_errors(tmp_path: Path) -> None:
    with pytest.raises(EventSourceError, match="not found"):
        fetch_events(db=str(tmp_path / "missing.db"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    with pytest.raises(EventSourceError, match="cannot reach"):
        fetch_events(url=f"http://127.0.0.1:{free_port}")
    not_a_db = tmp_path / "junk.db"
    not_a_db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(EventSourceError, match="cannot read"):
        fetch_events(db=str(not_a_db))


def test_format_table(sink: SinkServer) -> None:
    _populate(sink)
    table = format_table(fetch_events(url=sink.url))
    lines = table.splitlines()
    header = ["time", "type", "event", "success", "error", "type", "user", "trace", "id"]
    assert lines[0].split() == header
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + 5
    assert "Pipeline run" in table
    assert "Stack registered" in table
    assert "Dashboard" in table
    assert "ValueError" in table
    assert TRACE_ID in table
    assert "anon-xyz…" in table
    identify_row = next(line for line in lines if " identify " in line)
    assert identify_row.split()[1:3] == ["identify", "identify"]
    assert format_table([]) == "(no events)"


def test_main_events_table_and_json(sink: SinkServer, capsys: pytest.CaptureFixture[str]) -> None:
    _populate(sink)
    assert main_events(db=None, url=sink.url, as_json=False, follow=False) == 0
    out = capsys.readouterr().out
    assert "Pipeline run" in out and "Stack registered" in out

    assert main_events(db=sink.db_path, url=None, as_json=True, follow=False, user="bob") == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [e["messageId"] for e in parsed] == ["e5", "e2"]


def test_main_events_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_events(db=str(tmp_path / "missing.db"), url=None, as_json=False, follow=False) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "missing.db" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    url = f"http://127.0.0.1:{free_port}"
    assert main_events(db=None, url=url, as_json=True, follow=False) == 2
    assert "cannot reach" in capsys.readouterr().err
    assert main_events(db=None, url=None, as_json=False, follow=False) == 2
    assert "exactly one" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["db", "url"])
def test_main_events_follow(
    sink: SinkServer,
    source: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    post_json(f"{sink.url}/v1/batch", seg_body(seg_track(event="old", message_id="f0")))
    polls = {"n": 0}

    def fake_sleep(_seconds: float) -> None:
        # Between polls, new events arrive at the (real) sink; stop after a few polls.
        polls["n"] += 1
        if polls["n"] == 1:
            msgs = [seg_track(event=f"new {i}", message_id=f"f{i}") for i in (1, 2)]
            post_json(f"{sink.url}/v1/batch", seg_body(*msgs))
        elif polls["n"] == 2:
            post_json(f"{sink.url}/v1/batch", seg_body(seg_track(event="new 3", message_id="f3")))
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(events_mod, "_sleep", fake_sleep)
    db = sink.db_path if source == "db" else None
    url = sink.url if source == "url" else None
    assert main_events(db=db, url=url, as_json=True, follow=True) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["old", "new 1", "new 2", "new 3"]

    polls["n"] = 3  # stop at the first poll
    assert main_events(db=db, url=url, as_json=False, follow=True) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("time")
    assert out.index("old") < out.index("new 1") < out.index("new 3")


# --------------------------------------------------------------------------- lifecycle


def test_context_manager_and_repr(tmp_path: Path) -> None:
    with SinkServer(port=0, db_path=str(tmp_path / "s.db")) as sink:
        assert requests.get(f"{sink.url}/health", timeout=10).status_code == 200
        assert "SinkServer(" in repr(sink)
        assert "write_key=None" in repr(sink)
        port = sink.port
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_the_sink_command_stops_cleanly_on_a_signal_even_started_in_the_background(
    signum: str,
) -> None:
    """A shell starts a background command with SIGINT ignored; ``kill`` sends SIGTERM.
    Either way the sink stops, answers 0 and removes its temporary database."""
    import signal
    import subprocess

    process = subprocess.Popen(
        [sys.executable, "-m", "otel_zenml_analytics.cli", "sink", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on (\S+) \(db: (.+)\)", line)
        assert match, line + process.stderr.read() if process.stderr else line
        assert requests.get(match.group(1) + "/v1/stats", timeout=10).status_code == 200
        database = Path(match.group(2))
        assert database.exists()
        process.send_signal(getattr(signal, signum))
        assert process.wait(timeout=10) == 0
        assert not database.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_main_sink_reports_bind_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with SinkServer(port=0) as sink:
        assert main_sink("127.0.0.1", sink.port, None, None) == 2
    assert "cannot start" in capsys.readouterr().err
