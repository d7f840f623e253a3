"""The relay fed random and malformed input over real HTTP and gRPC (hypothesis).

One relay runs as a subprocess (the ``otel-zenml-analytics relay`` command) in front of a
real sink, for the whole module. Every example must get an answer: 200 (a valid, possibly
partially rejected, request) or a 4xx whose message says what is wrong; never a 5xx, a
dropped connection or a traceback, and ``/health`` answers after each. At the end the
relay's RSS must be under a bound and its stderr must hold no traceback.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import grpc
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics import otlp
from otel_zenml_analytics import relay as relay_module
from otel_zenml_analytics.relay import HTTP_BODIES_HELD, MAX_DECODE_QUEUE, Relay
from otel_zenml_analytics.settings import Settings
from otel_zenml_analytics.sink import SinkServer

from .conftest import clean_env, wait_until
from .test_relay import (
    JSON,
    PROTOBUF,
    answer_of,
    cli_relay,
    http_url_of,
    otlp_json,
    record,
    status_of,
)

MAX_REQUEST_BYTES = 1024 * 1024
RSS_BOUND_MB = 300
"""The relay's resident memory after the whole run (it starts at about 80 MB)."""
RSS_GROWTH_BOUND_MB = 100

FUZZ = settings(max_examples=int(os.environ.get("RELAY_FUZZ_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture],
                derandomize=os.environ.get("CI") == "true")
"""Derandomized on CI so a failure there replays; random locally, to keep exploring."""

PATHS = ("/v1/logs", "/v1/traces")
SERVICES = {"/v1/logs": "opentelemetry.proto.collector.logs.v1.LogsService",
            "/v1/traces": "opentelemetry.proto.collector.trace.v1.TraceService"}


class RunningRelay:
    """The relay subprocess: its URLs, its memory and its stderr."""

    def __init__(self, process: subprocess.Popen[str], http_url: str, grpc_endpoint: str,
                 stderr: Path) -> None:
        self.process = process
        self.http_url = http_url
        self.grpc_endpoint = grpc_endpoint
        self.stderr = stderr
        self.start_rss_mb = self.rss_mb()
        self.examples = 0

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory now, or with ``field="VmHWM"`` its peak so far."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        raise AssertionError(f"no {field}")

    def stats(self) -> Dict[str, int]:
        stats: Dict[str, int] = requests.get(self.http_url + "/health", timeout=30).json()["stats"]
        return stats

    def assert_alive(self) -> None:
        assert self.process.poll() is None, self.stderr.read_text()[-3000:]
        health = requests.get(self.http_url + "/health", timeout=30)
        assert health.status_code == 200 and health.json()["status"] == "ok"


@contextlib.contextmanager
def relay_process(folder: Path) -> Iterator[RunningRelay]:
    """The relay command, taking requests of up to :data:`MAX_REQUEST_BYTES`, in front of
    a sink."""
    sink = SinkServer(port=0, db_path=str(folder / "sink.db")).start()
    env = clean_env(folder / "config", OTEL_ZENML_ANALYTICS_ENDPOINT=sink.url)
    stderr_path = folder / "relay.stderr"
    args = ["relay", "--http-port", "0", "--grpc-port", "0",
            "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    try:
        with open(stderr_path, "w") as stderr, cli_relay(args, env, stderr) as (process, banner):
            assert "OTLP/HTTP on " in banner, stderr_path.read_text()
            http_url = http_url_of(banner)
            grpc_endpoint = banner.split("OTLP/gRPC on ")[1].split(";")[0].strip()
            yield RunningRelay(process, http_url, grpc_endpoint, stderr_path)
    finally:
        sink.stop()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRelay]:
    with relay_process(tmp_path_factory.mktemp("fuzz")) as running:
        yield running
        running.assert_alive()
        rss = running.rss_mb()
        print(f"\nrelay fuzz: {running.examples} requests, RSS {running.start_rss_mb:.0f} MB "
              f"at start, {rss:.0f} MB after")
        assert rss < RSS_BOUND_MB and rss - running.start_rss_mb < RSS_GROWTH_BOUND_MB, (
            running.start_rss_mb, rss)
        running.process.send_signal(signal.SIGTERM)
        running.process.communicate(timeout=60)
        assert running.process.returncode == 0
        errors = running.stderr.read_text()
        assert "Traceback" not in errors and "Exception" not in errors, errors[-5000:]


def check_answer(relay: RunningRelay, answer: requests.Response) -> None:
    """200, or a 4xx with a specific message; then the relay is still healthy."""
    relay.examples += 1
    assert answer.status_code < 500, (answer.status_code, answer.content[:500])
    if answer.status_code != 200:
        assert 400 <= answer.status_code < 500
        message = status_of(answer).message
        assert len(message) > 10 and message[0].islower(), message
        assert "Traceback" not in message
    relay.assert_alive()


def post(relay: RunningRelay, path: str, body: bytes, headers: Dict[str, str]) -> None:
    answer = requests.post(relay.http_url + path, data=body, headers=headers, timeout=60)
    check_answer(relay, answer)


# -- protobuf -------------------------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=4096), path=st.sampled_from(PATHS))
def test_random_bytes_as_protobuf(relay: RunningRelay, body: bytes, path: str) -> None:
    post(relay, path, body, PROTOBUF)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


wire_fields = st.recursive(
    st.one_of(
        st.builds(lambda n, v: _field(n, 0, _varint(v)), st.integers(1, 20),
                  st.integers(0, 2**64 - 1)),
        st.builds(lambda n, b: _field(n, 1, b), st.integers(1, 20), st.binary(min_size=8,
                                                                              max_size=8)),
        st.builds(lambda n, b: _field(n, 5, b), st.integers(1, 20), st.binary(min_size=4,
                                                                              max_size=4)),
        st.builds(lambda n, b: _field(n, 2, _varint(len(b)) + b), st.integers(1, 20),
                  st.binary(max_size=64)),
    ),
    lambda inner: st.builds(
        lambda n, parts: _field(n, 2, _varint(len(b"".join(parts))) + b"".join(parts)),
        st.integers(1, 20), st.lists(inner, max_size=6)),
    max_leaves=40,
)


@FUZZ
@given(fields=st.lists(wire_fields, max_size=8), path=st.sampled_from(PATHS))
def test_well_formed_protobuf_with_wrong_field_types(
    relay: RunningRelay, fields: List[bytes], path: str
) -> None:
    """Valid protobuf wire format, every field number and wire type at every level."""
    post(relay, path, b"".join(fields), PROTOBUF)


any_values = st.one_of(
    st.builds(lambda v: AnyValue(string_value=v), st.text(max_size=50)),
    st.builds(lambda v: AnyValue(int_value=v), st.integers(-2**63, 2**63 - 1)),
    st.builds(lambda v: AnyValue(double_value=v), st.floats()),
    st.builds(lambda v: AnyValue(bool_value=v), st.booleans()),
    st.builds(lambda v: AnyValue(bytes_value=v), st.binary(max_size=20)),
    st.builds(lambda v: AnyValue(array_value=ArrayValue(values=[
        AnyValue(string_value=item) for item in v])), st.lists(st.text(max_size=8), max_size=3)),
    st.builds(lambda v: AnyValue(kvlist_value=KeyValueList(values=[
        KeyValue(key=k, value=AnyValue(int_value=n)) for k, n in v.items()])),
        st.dictionaries(st.text(max_size=8), st.integers(-5, 5), max_size=3)),
    st.just(AnyValue()),
)
ANALYTICS_KEYS = [keys.TYPE, keys.MESSAGE_ID, keys.EVENT, keys.USER_ID, keys.ANONYMOUS_ID,
                  keys.GROUP_ID, keys.PREVIOUS_ID, keys.PROPERTIES_PREFIX + "x",
                  keys.JSON_KEYS, "event.name"]


@st.composite
def analytics_records(draw: st.DrawFn) -> LogRecord:
    """Log records that claim to be analytics events, with any value type for any key."""
    attributes = [KeyValue(key=key, value=draw(any_values))
                  for key in draw(st.lists(st.sampled_from(ANALYTICS_KEYS), max_size=10))]
    return LogRecord(
        event_name=draw(st.sampled_from(["zenml.analytics.track", "zenml.analytics.x", ""])),
        time_unix_nano=draw(st.integers(0, 2**64 - 1)),
        trace_id=draw(st.binary(max_size=17)), span_id=draw(st.binary(max_size=9)),
        attributes=attributes)


@FUZZ
@given(records=st.lists(analytics_records(), max_size=20), copies=st.integers(1, 2000))
def test_analytics_records_of_wrong_types_and_huge_repeated_fields(
    relay: RunningRelay, records: List[LogRecord], copies: int
) -> None:
    request = ExportLogsServiceRequest()
    scope = request.resource_logs.add().scope_logs.add()
    for _ in range(copies if len(records) <= 1 else 1):
        scope.log_records.extend(records)
    post(relay, "/v1/logs", request.SerializeToString(), PROTOBUF)


def _comparable(extracted: otlp.Extracted, times: bool = False) -> str:
    """What an extraction found, as text (NaN equals NaN there). Without ``times`` the
    timestamps are left out: that of a record without a time is the extraction's."""
    messages = [m if times else {k: v for k, v in m.items() if k != "timestamp"}
                for m in extracted.messages]
    return repr((messages, extracted.analytics_items, extracted.rejected, extracted.errors))


@FUZZ
@given(records=st.lists(analytics_records(), max_size=20), copies=st.integers(1, 3))
def test_the_encoded_view_extracts_what_the_decoded_request_does(
    records: List[LogRecord], copies: int
) -> None:
    """The relay reads protobuf bodies through ``otlp_view`` (attributes left encoded and
    remembered by their bytes): the same messages, rejections and reasons as reading the
    decoded request, the first time and again from memory."""
    request = ExportLogsServiceRequest()
    scope = request.resource_logs.add().scope_logs.add()
    for _ in range(copies):
        scope.log_records.extend(records)
    body = request.SerializeToString()
    expected = _comparable(otlp.extract(otlp.LOGS, request))
    for _ in range(2):
        assert _comparable(otlp.extract(otlp.LOGS, otlp.decode_protobuf(otlp.LOGS, body))) \
            == expected


def test_the_encoded_view_of_real_traces_and_logs() -> None:
    """Span events and log records of real SDK calls, arrays and nested values among their
    attributes: the view extracts what the decoded request does."""
    recorded = record(3, extra={"ids": [1, 2], "flag": False})
    for kind, request in ((otlp.TRACES, recorded.traces_request()),
                          (otlp.LOGS, recorded.logs_request())):
        view = otlp.decode_protobuf(kind, request.SerializeToString())
        found = otlp.extract(kind, view)
        assert len(found.messages) == 3 and not found.errors
        assert _comparable(found, times=True) == _comparable(otlp.extract(kind, request),
                                                             times=True)


@pytest.mark.parametrize("depth", [10, 99, 101, 1000, 3000])
def test_deeply_nested_protobuf(relay: RunningRelay, depth: int) -> None:
    """AnyValue in kvlist in AnyValue ...: protobuf's own nesting limit answers 400."""
    value = AnyValue(string_value="leaf").SerializeToString()
    for _ in range(depth):
        pair = _field(1, 2, _varint(1) + b"k") + _field(2, 2, _varint(len(value)) + value)
        kvlist = _field(1, 2, _varint(len(pair)) + pair)
        value = _field(6, 2, _varint(len(kvlist)) + kvlist)
    attribute = _field(1, 2, _varint(len(keys.TYPE)) + keys.TYPE.encode()) + _field(
        2, 2, _varint(len(value)) + value)
    log = LogRecord(event_name="zenml.analytics.track").SerializeToString() + _field(
        6, 2, _varint(len(attribute)) + attribute)
    scope = _field(2, 2, _varint(len(log)) + log)
    resource = _field(2, 2, _varint(len(scope)) + scope)
    body = _field(1, 2, _varint(len(resource)) + resource)
    post(relay, "/v1/logs", body, PROTOBUF)


# -- JSON -------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
              st.integers(min_value=10**30, max_value=10**300), st.text(max_size=30)),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=30,
)


@FUZZ
@given(document=json_values, path=st.sampled_from(PATHS))
def test_random_json(relay: RunningRelay, document: Any, path: str) -> None:
    post(relay, path, json.dumps(document).encode(), JSON)


def _paths(node: Any, at: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    found = [at]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*at, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*at, index))
    return found


_TEMPLATES = {}


def _template(path: str) -> Dict[str, Any]:
    if path not in _TEMPLATES:
        recorded = record(1)
        request = recorded.logs_request() if path == "/v1/logs" else recorded.traces_request()
        _TEMPLATES[path] = otlp_json(request)
    return _TEMPLATES[path]


@FUZZ
@given(data=st.data(), path=st.sampled_from(PATHS))
def test_valid_otlp_json_with_a_wrong_value_at_any_level(
    relay: RunningRelay, data: st.DataObject, path: str
) -> None:
    document = copy.deepcopy(_template(path))
    where = data.draw(st.sampled_from(_paths(document)[1:]))
    node = document
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = data.draw(json_values)
    post(relay, path, json.dumps(document).encode(), JSON)


@pytest.mark.parametrize("depth", [50, 200, 990, 5000, 100_000])
@pytest.mark.parametrize("shape", ["list", "object", "otlp"])
def test_deeply_nested_json(relay: RunningRelay, depth: int, shape: str) -> None:
    if shape == "list":
        body = "[" * depth + "]" * depth
    elif shape == "object":
        body = '{"a":' * depth + "1" + "}" * depth
    else:  # nested kvlist values inside a real attribute
        inner = '{"stringValue":"x"}'
        for _ in range(depth // 2):
            inner = '{"kvlistValue":{"values":[{"key":"k","value":' + inner + "}]}}"
        body = ('{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"attributes":'
                '[{"key":"zenml.analytics.type","value":' + inner + "}]}]}]}]}")
    post(relay, "/v1/logs", body.encode(), JSON)


@pytest.mark.parametrize("body", [
    b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"timeUnixNano":1e400}]}]}]}',
    b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"timeUnixNano":"1' + b"9" * 5000 + b'"}]}]}]}',
    b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"timeUnixNano":-1}]}]}]}',
    b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"severityNumber":NaN}]}]}]}',
    b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"droppedAttributesCount":' + b"9" * 5000
    + b"}]}]}]}",
    b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"attributes":[{"key":"zenml.analytics.'
    b'type","value":{"intValue":"99999999999999999999999"}}]}]}]}]}',
    b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"traceId":"' + b"ab" * 5000 + b'"}]}]}]}',
    b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"body":{"bytesValue":"***"}}]}]}]}',
    b"\xef\xbb\xbf{}",
    "{\"a\": \"\udcff\"}".encode("utf-8", "surrogatepass"),
])
def test_huge_numbers_and_odd_encodings(relay: RunningRelay, body: bytes) -> None:
    post(relay, "/v1/logs", body, JSON)


# -- headers and encodings ----------------------------------------------------------------


def _header_value(longest: int) -> st.SearchStrategy[str]:
    """Printable ASCII that a client sends as a header: empty, or not starting with a space
    (``requests`` refuses leading whitespace before anything reaches the relay)."""
    return st.from_regex(rf"([!-~][ -~]{{0,{longest - 1}}})?", fullmatch=True)


@FUZZ
@given(content_type=st.one_of(st.none(), st.sampled_from([
           "application/json", "application/x-protobuf", "application/protobuf", "text/plain",
           "application/json; charset=utf-16", "application/x-protobuf; proto=x", "", "*/*",
           "multipart/form-data; boundary=x"]), _header_value(40)),
       encoding=st.one_of(st.none(), st.sampled_from(
           ["gzip", "GZIP", "identity", "deflate", "br", "zstd", "gzip, gzip", "x-gzip", ""]),
           _header_value(20)),
       body=st.binary(max_size=512), compress=st.booleans())
def test_any_content_type_and_encoding(
    relay: RunningRelay, content_type: Optional[str], encoding: Optional[str], body: bytes,
    compress: bool,
) -> None:
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    post(relay, "/v1/logs", gzip.compress(body) if compress else body, headers)


@FUZZ
@given(cut=st.integers(0, 10_000), garbage=st.binary(max_size=30), path=st.sampled_from(PATHS))
def test_truncated_or_trailing_garbage_gzip(
    relay: RunningRelay, cut: int, garbage: bytes, path: str
) -> None:
    recorded = record(2)
    request = recorded.logs_request() if path == "/v1/logs" else recorded.traces_request()
    packed = gzip.compress(request.SerializeToString())
    body = packed[:cut % (len(packed) + 1)] + garbage
    post(relay, path, body, {**PROTOBUF, "Content-Encoding": "gzip"})


def test_gzip_bombs(relay: RunningRelay) -> None:
    bomb = gzip.compress(b"\0" * (64 * MAX_REQUEST_BYTES))  # 64 MiB of zeros, 64 KiB packed
    for body in (bomb, bomb + bomb, gzip.compress(bomb)):
        answer = requests.post(relay.http_url + "/v1/logs", data=body, timeout=60,
                               headers={**PROTOBUF, "Content-Encoding": "gzip"})
        check_answer(relay, answer)
        assert answer.status_code in (400, 413)


def _raw(relay: RunningRelay, head: str, body: bytes = b"", half_close: bool = True) -> bytes:
    """Send bytes as they are; return the whole answer."""
    host, port = relay.http_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode("latin-1") + body)
        chunks = []
        if half_close:
            with contextlib.suppress(OSError):  # the relay may have closed already
                sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks)


def _head(*lines: str, request: str = "POST /v1/logs") -> str:
    """A request's line and header section: ``request`` HTTP/1.1, then ``lines``."""
    return "".join(f"{line}\r\n" for line in (f"{request} HTTP/1.1", *lines)) + "\r\n"


_JSON = "Content-Type: application/json"
_EXPECT = "Expect: 100-continue"


@pytest.mark.parametrize(("head", "body", "status"), [
    (_head(_JSON), b"{}", 411),
    (_head(_JSON, "Content-Length: -5"), b"{}", 400),
    (_head(_JSON, "Content-Length: ten"), b"{}", 400),
    (_head(_JSON, "Content-Length: 100"), b"{}", 400),
    (_head(_JSON, "Content-Length: 99999999999999999999"), b"{}", 413),
    (_head(_JSON, "Transfer-Encoding: chunked"), b"2\r\n{}\r\n0\r\n\r\n", 411),
    (_head(_JSON, "Content-Length: 2", "Content-Length: 3"), b"{}", 400),
    (_head(_JSON, "Content-Length: 2", _EXPECT), b"{}", 200),
    (_head(_JSON, "Content-Length: 99999999", _EXPECT), b"", 413),
    (_head(_JSON, "Content-Length: \xb2", _EXPECT), b"", 400),
    (_head(_JSON, f"Content-Length: {'0' * 5000}2"), b"{}", 200),
    (_head(_JSON, f"Content-Length: {'9' * 5000}"), b"{}", 413),
    (_head(_JSON, f"Content-Length: {'9' * 5000}", _EXPECT), b"", 413),
    (_head("Content-Type: text/plain", "Content-Length: 2", _EXPECT), b"", 415),
    (_head(_JSON, "Content-Length: 2", _EXPECT, request="POST /v1/what"), b"", 404),
    (_head(_JSON, "Content-Length: 2", "Content-Encoding: br", _EXPECT), b"", 415),
    # framings two parsers could read differently: refused, the connection closed
    (_head(_JSON, "Content-Length: 4", "Transfer-Encoding: identity",
           "Transfer-Encoding: chunked"), b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n", 411),
    (_head(_JSON, "Content-Length: 2", "Transfer-Encoding: gzip"), b"{}", 411),
    (_head(_JSON, "Content-Length: 2", "Bad Header Line", "Transfer-Encoding: chunked"),
     b"{}", 400),
    (_head("Content-Length: 0", "Content-Length: 30", request="GET /health"),
     b"GET /smuggled HTTP/1.1\r\n\r\n", 200),
    (_head(_JSON, "Content-Length: 2", request="POST http://[x/v1/logs"), b"{}", 400),
    (_head(request="GET http://[x/health"), b"", 400),
    (_head("Content-Length: 2", _EXPECT, request="PUT /v1/logs"), b"", 501),
    (_head(_JSON, "Content-Length: 2", *(f"X-Filler-{i}: {'x' * 30_000}" for i in range(3))),
     b"{}", 431),
    (_head(_JSON, "Content-Length: 2", "Content-Length: 99999999", _EXPECT), b"", 400),
])
def test_malformed_framing(relay: RunningRelay, head: str, body: bytes, status: int) -> None:
    raw = _raw(relay, head, body)
    if "Expect" in head and status != 200:  # refused before the body is sent
        assert not raw.startswith(b"HTTP/1.1 100 "), raw[:200]
    answer = raw.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # one answer: nothing smuggled after it
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    assert status_line.startswith(f"HTTP/1.1 {status} "), answer[:500]
    if status not in (200, 431):  # 431 is http.server's own page
        document = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert len(document["message"]) > 10, document
    relay.examples += 1
    relay.assert_alive()


# -- gRPC -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(relay: RunningRelay) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(relay.grpc_endpoint) as opened:
        yield opened


@FUZZ
@given(body=st.one_of(st.binary(max_size=2048), st.lists(wire_fields, max_size=8).map(
    b"".join)), path=st.sampled_from(PATHS))
def test_grpc_random_and_malformed_protobuf(
    relay: RunningRelay, channel: grpc.Channel, body: bytes, path: str
) -> None:
    export = channel.unary_unary(f"/{SERVICES[path]}/Export")
    try:
        export(body, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert "not a valid protobuf" in (exc.details() or "")
    relay.examples += 1
    relay.assert_alive()


def test_grpc_oversized_message(relay: RunningRelay, channel: grpc.Channel) -> None:
    export = channel.unary_unary(f"/{SERVICES['/v1/logs']}/Export")
    with pytest.raises(grpc.RpcError) as refused:
        export(b"\x0a" + _varint(2 * MAX_REQUEST_BYTES) + b"\0" * (2 * MAX_REQUEST_BYTES),
               timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    relay.assert_alive()


def empty_records_body(malformed: bool = False) -> bytes:
    """A logs request of about :data:`MAX_REQUEST_BYTES` made of empty log records (two bytes
    each): slow to decode, and about 65 times its size decoded. ``malformed``: the last
    record's length overruns the body."""
    records = b"\x12\x00" * ((MAX_REQUEST_BYTES - 16) // 2)
    if malformed:
        records = records[:-4] + b"\x12\x05\x0a"
    scope_logs = b"\x12" + _varint(len(records)) + records
    return b"\x0a" + _varint(len(scope_logs)) + scope_logs


def post_at_once(url: str, bodies: List[bytes]) -> List[requests.Response]:
    with futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: requests.post(
            url + "/v1/logs", data=body, headers=PROTOBUF, timeout=120), bodies))


@pytest.mark.parametrize("malformed", [False, True], ids=["valid", "last-record-cut-short"])
def test_requests_of_tiny_records_take_turns_in_memory(tmp_path: Path, malformed: bool) -> None:
    """Decoded, a body of empty log records takes about 65 times its size (the checking
    parse; the view takes 45 times after it). Bodies posted at once are decoded one after
    the other on one thread: the relay's peak grew by 69 MB for one 1 MiB body, 73 MB for
    six at once, where decoding them side by side took 314 to 334 MB, and taking turns on
    their own threads 121 MB (glibc keeps freed memory in each thread's arena). A body
    refused after most of it was parsed frees that memory at once (its error used to hold
    it until the garbage collector ran: +2.7 GB for ten 4 MiB bodies)."""
    body = empty_records_body(malformed)
    one_request_mb = 65 * len(body) / 2**20
    with relay_process(tmp_path) as running:
        running.assert_alive()
        peak_before = running.rss_mb("VmHWM")
        answers = post_at_once(running.http_url, [body] * 6)
        assert [answer.status_code for answer in answers] == [400 if malformed else 200] * 6
        growth = running.rss_mb("VmHWM") - peak_before
        assert growth < 1.5 * one_request_mb, (growth, one_request_mb)


@contextlib.contextmanager
def decoding_a_slow_body(tmp_path: Path, max_decode_wait: float
                         ) -> Iterator[Tuple[Relay, futures.Future[requests.Response]]]:
    """An in-process relay, and the answer to come of a body it is decoding (~0.9 s here)."""
    slow = empty_records_body() * 2  # concatenated requests are one request
    with SinkServer(port=0, db_path=str(tmp_path / "sink.db")) as sink, \
            Relay(Settings.resolve(endpoint=sink.url), http_port=0, grpc_port=None,
                  max_decode_wait=max_decode_wait) as server, \
            futures.ThreadPoolExecutor(1) as pool:
        decoding = pool.submit(requests.post, server.http_url + "/v1/logs", data=slow,
                               headers=PROTOBUF, timeout=120)
        while server.stats()["requests"] < 1:
            time.sleep(0.01)
        time.sleep(0.05)  # its body read, it is being decoded
        yield server, decoding


def test_a_relay_busy_decoding_asks_the_next_requests_to_retry(tmp_path: Path) -> None:
    """Once the oldest request waiting for the decoding thread has waited max_decode_wait,
    new ones get 503 with Retry-After rather than queue behind it."""
    with decoding_a_slow_body(tmp_path, max_decode_wait=0.2) as (server, decoding), \
            futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(requests.post, server.http_url + "/v1/logs", data=b"",
                              headers=PROTOBUF, timeout=120)
        while server.stats()["requests"] < 2:
            time.sleep(0.01)
        time.sleep(0.3)  # waiting for 0.3 s by now
        busy = requests.post(server.http_url + "/v1/logs", data=b"", headers=PROTOBUF,
                             timeout=60)
        assert busy.status_code == 503, busy.content
        assert busy.headers["Retry-After"] == "2"
        assert "the relay is busy decoding: 1 waiting, the oldest for 0." \
            in status_of(busy).message
        assert decoding.result().status_code == waiting.result().status_code == 200
        after = requests.post(server.http_url + "/v1/logs", data=b"", headers=PROTOBUF,
                              timeout=60)
        assert after.status_code == 200


def test_at_most_max_decode_queue_requests_wait_to_be_decoded(tmp_path: Path) -> None:
    with decoding_a_slow_body(tmp_path, max_decode_wait=60) as (server, decoding):
        answers = post_at_once(server.http_url, [b""] * (MAX_DECODE_QUEUE + 4))
        codes = [answer.status_code for answer in answers]
        assert sorted(codes) == [200] * MAX_DECODE_QUEUE + [503] * 4, codes
        assert decoding.result().status_code == 200


@contextlib.contextmanager
def in_process_relay(folder: Path, **options: Any) -> Iterator[Tuple[Relay, str, int]]:
    """An OTLP/HTTP relay in this process in front of a sink, and its host and port."""
    with SinkServer(port=0, db_path=str(folder / "sink.db")) as sink, \
            Relay(Settings.resolve(endpoint=sink.url), http_port=0, grpc_port=None,
                  **options) as server:
        host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
        yield server, host, int(port)


def test_request_bodies_held_are_bounded(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection has a thread that reads its body before the decoding queue can
    refuse it. A body counts what was read of it, and the step being read, until its
    answer (slow senders hold little), and a gzip body what it may inflate to while it
    inflates: past HTTP_BODIES_HELD bodies of the largest size, a request is asked to
    retry."""
    limit, step = 64 * 1024, 16 * 1024
    monkeypatch.setattr(relay_module, "BODY_READ_STEP", step)
    head = (f"POST /v1/logs HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n"
            f"Content-Length: {limit}\r\n").encode()
    small = record(1, event="Small").logs_request().SerializeToString()
    assert len(small) < step
    capacity = HTTP_BODIES_HELD * limit
    with in_process_relay(tmp_path, max_request_bytes=limit) as (server, host, port):
        bodies = server._http.bodies  # type: ignore[union-attr]
        url = server.http_url + "/v1/logs"
        senders = [socket.create_connection((host, port), timeout=60)
                   for _ in range(HTTP_BODIES_HELD)]
        try:
            for sender in senders:  # bodies of the largest size, sent slowly
                sender.sendall(head + b"\r\n" + b"\x00" * 100)
            wait_until(lambda: bodies.held == HTTP_BODIES_HELD * (100 + step),
                       "the senders' first pieces held")
            assert requests.post(url, data=small, headers=PROTOBUF, timeout=60).status_code \
                == 200
            for sender in senders:  # all but the last 100 bytes
                sender.sendall(b"\x00" * (limit - 200))
            wait_until(lambda: bodies.held == capacity, "the bodies bound reached")
            busy = requests.post(url, data=small, headers=PROTOBUF, timeout=60)
            assert busy.status_code == 503, busy.content
            assert busy.headers["Retry-After"] == "2"
            assert status_of(busy).message == (
                f"the relay is busy: {capacity} bytes of request bodies are held "
                f"(at most {capacity})")
            expecting = _raw_answer(host, port, head + b"Expect: 100-continue\r\n\r\n")
            assert expecting.startswith(b"HTTP/1.1 503 "), expecting[:200]
            elsewhere = _raw_answer(host, port, head.replace(b"/v1/logs", b"/v1/what")
                                    + b"Expect: 100-continue\r\n\r\n")
            assert b"HTTP/1.1 404 " in elsewhere, elsewhere[:200]  # not told it is busy
            senders[0].sendall(b"\x00" * 100)  # its body complete (and not OTLP)
            assert answer_of(senders[0]).startswith(b"HTTP/1.1 400 ")
            wait_until(lambda: bodies.held == capacity - limit, "one body given back")
            # One largest body's worth free: a small body fits, a small gzip body may not.
            assert requests.post(url, data=small, headers=PROTOBUF, timeout=60).status_code \
                == 200
            inflatable = requests.post(url, data=gzip.compress(small), timeout=60,
                                       headers={**PROTOBUF, "Content-Encoding": "gzip"})
            assert inflatable.status_code == 503, inflatable.content
            for sender in senders[1:]:  # the senders give up: their bodies end short
                assert answer_of(sender).startswith(b"HTTP/1.1 400 ")
        finally:
            for sender in senders:
                sender.close()
        assert bodies.held == 0
        answers = post_at_once(server.http_url, [small] * HTTP_BODIES_HELD)
        assert [answer.status_code for answer in answers] == [200] * HTTP_BODIES_HELD
        assert server.stats()["unavailable"] == 3
        assert server.stats()["messages"] == 2 + HTTP_BODIES_HELD


def test_a_body_that_does_not_arrive_in_time_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender that trickles its body cannot hold its share of the bodies for ever."""
    monkeypatch.setattr(relay_module, "BODY_READ_SECONDS", 0.5)
    with in_process_relay(tmp_path) as (server, host, port):
        with socket.create_connection((host, port), timeout=60) as sender:
            sender.sendall(b"POST /v1/logs HTTP/1.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{")
            answer = answer_of(sender, done=False)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"the body did not arrive in time: 1 of 1000 bytes, 0.5 s in all" in answer
        assert server._http.bodies.held == 0  # type: ignore[union-attr]


def test_connections_past_the_limit_are_answered_busy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection has a thread: past MAX_CONNECTIONS, new ones get 503 and close."""
    monkeypatch.setattr(relay_module, "MAX_CONNECTIONS", 4)
    with in_process_relay(tmp_path) as (server, host, port):
        idle = [socket.create_connection((host, port), timeout=60) for _ in range(4)]
        try:
            wait_until(lambda: len(server._http._connections) == 4,  # type: ignore[union-attr]
                       "four connections served")
            with socket.create_connection((host, port), timeout=60) as late:
                late.sendall(b"GET /health HTTP/1.1\r\n\r\n")
                try:
                    refused = answer_of(late, done=False)
                except ConnectionResetError:  # the request arrived after the relay closed
                    refused = b"reset"
            assert refused == b"reset" or (
                refused.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 2" in refused
                and b"connections are open" in refused), refused
            assert len(server._http._connections) == 4  # type: ignore[union-attr]
            assert server.stats()["refused_connections"] == 1
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: requests.get(server.http_url + "/health", timeout=10).ok,
                   "a connection served again")


def test_a_request_head_sent_slowly_or_an_idle_connection_is_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read may wait 30 s: a sender writing a byte every few seconds would hold its
    connection (and its thread, and a place among MAX_CONNECTIONS) for ever."""
    monkeypatch.setattr(relay_module, "HEAD_SECONDS", 1.0)
    with in_process_relay(tmp_path) as (server, host, port):
        with socket.create_connection((host, port), timeout=20) as slow:
            slow.sendall(b"POST /v1/logs HTTP/1.1\r\n")
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(50):  # 10 s of a byte every 0.2 s, unless it is closed
                    slow.sendall(b"X")
                    time.sleep(0.2)
        with socket.create_connection((host, port), timeout=20) as oversized:
            # past the header limit (431), what follows is read for a second at most
            oversized.sendall(b"POST /v1/logs HTTP/1.1\r\nX-Long: " + b"x" * 70_000 + b"\r\n")
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(40):  # 4 s of a byte every 0.1 s, unless it is cut
                    oversized.sendall(b"X")
                    time.sleep(0.1)
        with socket.create_connection((host, port), timeout=20) as idle:
            idle.sendall(b"GET /health HTTP/1.1\r\n\r\n")
            answer = answer_of(idle, done=False)  # the answer, then the end: not 20 s
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert requests.get(server.http_url + "/health", timeout=10).ok


def test_a_header_section_too_large_is_answered_while_its_body_comes(tmp_path: Path) -> None:
    """The 431 reaches a sender that goes on writing its body (it would otherwise see a
    reset, and send again a request that can never succeed)."""
    with in_process_relay(tmp_path) as (server, host, port), \
            socket.create_connection((host, port), timeout=30) as sender:
        sender.sendall(b"POST /v1/logs HTTP/1.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100000\r\nX-Long: " + b"x" * 70_000 + b"\r\n\r\n")
        for _ in range(10):
            sender.sendall(b"\x00" * 10_000)
            time.sleep(0.05)
        assert answer_of(sender).startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(("head", "status"), [
    (_head(_JSON, f"Content-Length: {16 * 1024 * 1024}"), 413),  # over the limit
    (_head(_JSON, f"Content-Length: {16 * 1024 * 1024}", request="PATCH /v1/logs"), 501),
    (_head(_JSON, *(f"X-{i}: {i}" for i in range(120)), f"Content-Length: {16 * 1024 * 1024}"),
     431),  # more headers than http.server takes
])
def test_refused_unread_a_sender_still_writing_reads_the_answer(
        tmp_path: Path, head: str, status: int) -> None:
    with in_process_relay(tmp_path, max_request_bytes=64 * 1024) as (server, host, port), \
            socket.create_connection((host, port), timeout=30) as sender:
        sender.sendall(head.encode() + bytes(16 * 1024 * 1024))  # past the socket buffers
        assert answer_of(sender).startswith(f"HTTP/1.1 {status} ".encode())


def test_stopping_does_not_judge_a_request_by_half_its_headers(tmp_path: Path) -> None:
    """stop() ends a connection's reading side, which the header parser would take for the
    end of the headers: a request whose headers were not all in gets no answer (its sender
    sends it again), not a 4xx that would make it drop the data."""
    with in_process_relay(tmp_path, token="s3cret") as (server, host, port), \
            socket.create_connection((host, port), timeout=30) as sender:
        sender.sendall(b"POST /v1/logs HTTP/1.1\r\nContent-Type: application/json\r\n")
        wait_until(lambda: len(server._http._connections) == 1,  # type: ignore[union-attr]
                   "the connection served")
        server.stop()
        assert answer_of(sender, done=False) == b""
    with in_process_relay(tmp_path) as (server, host, port), \
            socket.create_connection((host, port), timeout=30) as sender:
        sender.sendall(b"POST /v1/lo")  # nor by half its request line
        wait_until(lambda: len(server._http._connections) == 1,  # type: ignore[union-attr]
                   "the connection served")
        server.stop()
        assert answer_of(sender, done=False) == b""


def _raw_answer(host: str, port: int, request: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(request)
        return answer_of(sock)


EXIT_WITHOUT_STOP = """
import sys
from otel_zenml_analytics.relay import Relay
from otel_zenml_analytics.settings import Settings

relay = Relay(Settings.resolve(endpoint=sys.argv[1]), http_port=0, grpc_port=None).start()
print(relay.http_url, flush=True)
sys.stdin.readline()
print("leaving without stop()", flush=True)
"""


def test_an_exit_without_stop_decodes_no_more_than_the_body_under_way(tmp_path: Path) -> None:
    """At exit the interpreter joins the decoding thread, which would first decode every
    body queued (seconds each, here): those still waiting are cancelled instead."""
    slow = empty_records_body() * 2  # concatenated requests are one request (~0.9 s here)
    queued = 5
    with SinkServer(port=0, db_path=str(tmp_path / "sink.db")) as sink, \
            subprocess.Popen([sys.executable, "-c", EXIT_WITHOUT_STOP, sink.url],
                             env=clean_env(tmp_path / "config"), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True) as process, \
            futures.ThreadPoolExecutor(queued) as pool:
        assert process.stdin is not None and process.stdout is not None
        url = process.stdout.readline().strip()

        def post() -> Any:
            try:
                return requests.post(url + "/v1/logs", data=slow, headers=PROTOBUF,
                                     timeout=120).status_code
            except requests.ConnectionError:
                return "no answer"

        answers = [pool.submit(post) for _ in range(queued)]
        wait_until(lambda: requests.get(url + "/health", timeout=30).json()["stats"]["requests"]
                   == queued, "the slow bodies queued")
        time.sleep(0.2)  # the last body read and queued
        process.stdin.write("\n")
        process.stdin.flush()
        assert process.wait(timeout=120) == 0
        codes = [answer.result() for answer in answers]
    assert codes.count(200) <= 2 and codes.count(503) >= queued - 2, codes


def test_a_grpc_request_whose_deadline_passed_is_not_decoded(tmp_path: Path) -> None:
    """Its sender sends it again; decoding it would only delay the requests behind it."""
    with relay_process(tmp_path) as running, \
            grpc.insecure_channel(running.grpc_endpoint) as channel:
        export = channel.unary_unary(f"/{SERVICES['/v1/logs']}/Export")
        with futures.ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(requests.post, running.http_url + "/v1/logs", data=body,
                                headers=PROTOBUF, timeout=120)
                    for body in [empty_records_body()] * 2]
            deadline = time.monotonic() + 30
            while running.stats()["requests"] < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as late:
                export(record(1, event="Given up").logs_request().SerializeToString(),
                       timeout=0.05)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert [answer.result().status_code for answer in slow] == [200, 200]
        after = record(1, event="After the deadline").logs_request().SerializeToString()
        assert requests.post(running.http_url + "/v1/logs", data=after, headers=PROTOBUF,
                             timeout=60).status_code == 200
        assert running.stats()["messages"] == 1  # the request behind it was decoded, not it


def test_a_valid_request_still_delivers_after_the_fuzzing(relay: RunningRelay) -> None:
    """The relay is not just alive but working (runs last in this module)."""
    body = record(1, event="After the fuzz").logs_request().SerializeToString()
    answer = requests.post(relay.http_url + "/v1/logs", data=body, headers=PROTOBUF,
                           timeout=60)
    assert answer.status_code == 200
    deadline = time.monotonic() + 60
    stats: Dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = requests.get(relay.http_url + "/health", timeout=30).json()["stats"]
        if stats["delivered"] >= 1:
            break
        time.sleep(0.1)
    assert stats["delivered"] >= 1, stats


