"""Test helpers (no tests): a private CA and a server certificate made with the ``openssl``
command, and the project's sink served over HTTPS by wrapping its listening socket."""

from __future__ import annotations

import contextlib
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

from otel_zenml_analytics.sink import SinkServer

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certificates:
    """``ca``: the CA bundle to trust; ``cert``/``key``: the server's, for 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> Certificates:
    """A CA and a server certificate signed by it (valid for 127.0.0.1 and localhost)."""
    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=folder, check=True, capture_output=True,
                       timeout=60)

    run("req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=otel-zenml-analytics test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *_EC, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def serve_tls(sink: SinkServer, certificates: Certificates) -> str:
    """Make a not yet started sink answer HTTPS only; returns its ``https://`` URL.

    The handshake happens on the request's own thread (not in ``accept``), so a client
    that refuses the certificate cannot stall the server.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificates.cert), str(certificates.key))
    httpd = sink._httpd
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True,
                                       do_handshake_on_connect=False)
    return f"https://127.0.0.1:{sink.port}"


@contextlib.contextmanager
def tls_sink(db_path: Path, certificates: Certificates,
               write_key: Optional[str] = None) -> Iterator[Tuple[SinkServer, str]]:
    """A sink answering HTTPS with ``certificates``, running inside the block: it and its
    ``https://`` URL."""
    sink = SinkServer(port=0, db_path=str(db_path), write_key=write_key)
    url = serve_tls(sink, certificates)
    with sink:
        yield sink, url
