"""The two wire formats: Segment's HTTP Tracking API and ZenML's analytics server.

Messages are encoded once (:func:`encode_fitted`), which is also where Segment's
per-message size limit is enforced, on the wire form itself; :func:`build_request`
joins encoded messages into one request body. :func:`new_session` reads from the
environment once what ``requests`` would read again on every request.
:func:`post_encoded` posts it and raises :class:`AnalyticsAPIError` for any
answer but 200, as ZenML's ``request.post`` does. Retrying is the delivery's job.
"""

from __future__ import annotations

import base64
import gzip as _gzip
import os
import ssl
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

import requests

from otel_zenml_analytics.encoding import dumps
from otel_zenml_analytics.errors import AnalyticsAPIError
from otel_zenml_analytics.mapping import (
    MAX_MESSAGE_BYTES,
    fit_size,
    iso_timestamp,
    to_snake_case,
    utf8_size,
)
from otel_zenml_analytics.settings import Settings
from otel_zenml_analytics.version import __version__

USER_AGENT = f"otel-zenml-analytics/{__version__}"
_MAX_ERROR_TEXT = 500


def encode_message(settings: Settings, message: Mapping[str, Any]) -> str:
    """One message as JSON in the destination's wire form, as given (``request.post``
    posts what it is handed, as ZenML's does; the delivery uses :func:`encode_fitted`)."""
    return _wire_json(settings, message)


def encode_fitted(settings: Settings, message: Mapping[str, Any]) -> Tuple[str, bool]:
    """One message as JSON in the destination's wire form, and whether its largest
    values had to be truncated to fit Segment's per-message limit (:func:`fit_size`).

    A message that fits, nearly every one, is encoded exactly once.
    """
    text = _wire_json(settings, message)
    if utf8_size(text) <= MAX_MESSAGE_BYTES:
        return text, False
    fitted = fit_size(dict(message), measure=lambda m: utf8_size(_wire_json(settings, m)))
    return _wire_json(settings, fitted), "truncated" in fitted.get("context", {})


def _wire_json(settings: Settings, message: Mapping[str, Any]) -> str:
    if settings.format == "zenml":
        return dumps(to_snake_case(dict(message)))
    return dumps(message)


def new_session(settings: Settings) -> requests.Session:
    """A session for the destination, with the environment read once.

    A default session looks up proxy variables, ``.netrc`` and CA bundle variables on
    every request, a large share of a request's CPU. Here the proxies for the endpoint
    and the CA bundle (``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` while verification is
    on and no CA bundle of ours is set) are read when the session is made. ``.netrc``
    is not read: its credentials would replace the write key's ``Authorization``.
    """
    session = requests.Session()
    session.trust_env = False
    if settings.endpoint:
        session.proxies.update(requests.utils.get_environ_proxies(settings.endpoint))
    session.verify = ca_verify(settings)
    return session


def ca_verify(settings: Settings) -> Union[bool, str]:
    """``verify=`` for ``requests``: ``False``, our CA bundle, else ``REQUESTS_CA_BUNDLE``
    or ``CURL_CA_BUNDLE`` while verification is on, else ``True`` (the bundle
    ``requests`` ships)."""
    if settings.verify is not True:
        return settings.verify
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True


def build_request(settings: Settings, encoded: Sequence[str]) -> Tuple[str, bytes, Dict[str, str]]:
    """URL, body and headers of one batch request made of encoded messages."""
    if settings.endpoint is None:
        raise ValueError("no analytics endpoint configured")
    headers = {
        "accept": "application/json",
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    joined = ",".join(encoded)
    if settings.format == "zenml":
        url = f"{settings.endpoint}/batch"
        text = f"[{joined}]"
        headers["Source-Context"] = "python"
    else:
        url = f"{settings.endpoint}/v1/batch"
        text = f'{{"batch":[{joined}],"sentAt":"{iso_timestamp(None)}"}}'
        if settings.write_key:
            token = base64.b64encode(f"{settings.write_key}:".encode()).decode("ascii")
            headers["authorization"] = f"Basic {token}"
    body = text.encode("utf-8")
    if settings.gzip:
        body = _gzip.compress(body, compresslevel=6)
        headers["content-encoding"] = "gzip"
    return url, body, headers


def post_encoded(
    settings: Settings,
    encoded: Sequence[str],
    session: Optional[requests.Session] = None,
    timeout: Optional[float] = None,
) -> requests.Response:
    """Post one batch; return the response on 200, raise ``AnalyticsAPIError`` otherwise.

    Network failures raise ``requests.RequestException`` unchanged, except a TLS failure,
    which becomes an ``SSLError`` saying which host failed verification and what to set.
    Certificates are verified as ``settings.verify`` says (on by default).
    """
    url, body, headers = build_request(settings, encoded)
    verify = settings.verify
    if verify is True and session is not None and not session.trust_env \
            and url[:7].lower() != "http://":
        # The REQUESTS_CA_BUNDLE that new_session read. Not for a plain-http URL: nothing to
        # verify there, and a bundle's path costs requests a stat() per request (should the
        # server redirect to https, requests' own CA bundle verifies that request).
        verify = session.verify if session.verify is not None else True
    try:
        response = (session or requests).post(
            url, data=body, headers=headers, verify=verify,
            timeout=settings.timeout if timeout is None else timeout,
        )
    except requests.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(tls_problem(url, exc)) from None
    if response.status_code != 200:
        raise refusal(response.status_code, response.reason, _text(response), response.headers)
    return response


def post_messages(
    settings: Settings,
    messages: Sequence[Mapping[str, Any]],
    session: Optional[requests.Session] = None,
    timeout: Optional[float] = None,
) -> requests.Response:
    """Encode and post canonical messages in one request."""
    return post_encoded(settings, [encode_message(settings, m) for m in messages], session, timeout)


def tls_problem(url: str, exc: BaseException) -> str:
    """What went wrong with TLS, in one line: the host, the SSL library's reason, the fix."""
    reason = _ssl_reason(exc) or str(exc)
    host = urlsplit(url).netloc.rpartition("@")[2]
    return (f"TLS with the analytics destination {host} failed: {reason}. To trust a private "
            f"CA set OTEL_ZENML_ANALYTICS_CA_BUNDLE=PATH; OTEL_ZENML_ANALYTICS_INSECURE=true "
            f"turns verification off")


def _ssl_reason(exc: BaseException) -> Optional[str]:
    """The innermost ``ssl.SSLError`` under requests' and urllib3's wrappers."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    found: Optional[str] = None
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLError):
            found = getattr(item, "verify_message", None) or item.reason or str(item)
            if isinstance(item, ssl.SSLCertVerificationError):
                return f"certificate verify failed: {found}"
        todo.extend([item.__cause__, item.__context__, getattr(item, "reason", None),
                     *item.args])
    return found


def refusal(status: int, reason: Optional[str], text: str,
            headers: Optional[Mapping[str, str]]) -> AnalyticsAPIError:
    """The error for an answer other than 200: the server's own words, shortened, and its
    ``Retry-After``; never the request (which holds the key)."""
    return AnalyticsAPIError(status, (text.strip() or reason or "")[:_MAX_ERROR_TEXT],
                             retry_after_seconds(headers))


def _text(response: requests.Response) -> str:
    try:
        return response.text
    except Exception:  # noqa: BLE001 - undecodable answers still make a message
        return ""


def retry_after_seconds(headers: Optional[Mapping[str, str]]) -> Optional[float]:
    """``Retry-After`` in seconds (numbers only; HTTP dates count as absent)."""
    raw = headers.get("Retry-After") if headers else None
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None
