"""The user's analytics consent: one global, per-machine setting, as in ZenML.

It lives in ``config.json`` under the user's config directory
(``$OTEL_ZENML_ANALYTICS_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/otel-zenml-analytics``,
else ``~/.config/otel-zenml-analytics``) together with the machine's anonymous id
(a UUID created once) and the email opt-in. ``ZENML_ANALYTICS_OPT_IN`` overrides
the stored choice. The file is read once and re-read when it changes, so an
``opt-out`` from another process takes effect without a restart.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics.settings import ConfigurationError, parse_bool, warn_once

_logger = logging.getLogger(__name__)

CONFIG_FILE_NAME = "config.json"
_RECHECK_SECONDS = 1.0


@dataclass(frozen=True)
class ConsentState:
    """What the config file says."""

    analytics_opt_in: bool
    anonymous_id: str
    email: Optional[str] = None
    email_opt_in: Optional[bool] = None


def config_dir() -> Path:
    """The folder of the consent file."""
    explicit = os.environ.get(env.OTEL_ZENML_ANALYTICS_CONFIG_DIR)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "otel-zenml-analytics"


def config_path() -> Path:
    """The consent file."""
    return config_dir() / CONFIG_FILE_NAME


class _Store:
    """Caches the consent file; re-reads it at most once a second when it changed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: Optional[ConsentState] = None
        self._path: Optional[Path] = None
        self._mtime: Optional[float] = None
        self._checked = 0.0

    def get(self) -> ConsentState:
        now = time.monotonic()
        state = self._state
        if state is not None and now - self._checked < _RECHECK_SECONDS:
            return state
        path = config_path()
        with self._lock:
            self._checked = now
            mtime = _mtime(path)
            if self._state is None or path != self._path or mtime != self._mtime:
                self._state = _load_or_create(path)
                self._path, self._mtime = path, _mtime(path)
            return self._state

    def update(self, **changes: Any) -> ConsentState:
        with self._lock:
            path = config_path()
            state = replace(_load_or_create(path), **changes)
            _write(path, state)
            self._state, self._path, self._mtime = state, path, _mtime(path)
            self._checked = time.monotonic()
            return state

    def forget(self) -> None:
        """Drop the cache (tests and the CLI change the config dir)."""
        with self._lock:
            self._state = None


def _mtime(path: Path) -> Optional[float]:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _load_or_create(path: Path) -> ConsentState:
    """The stored consent; a new file (opted in, as ZenML) only when there is none.

    Consent fails closed: a file that cannot be read or parsed, or whose opt-in is
    not a JSON boolean, counts as opted out and is left untouched for the user.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = ConsentState(analytics_opt_in=True, anonymous_id=str(uuid.uuid4()))
        _write(path, state)
        return state
    except (OSError, ValueError) as exc:
        return _unreadable(path, f"cannot be read as JSON: {exc}")
    if not isinstance(raw, dict):
        return _unreadable(path, "is not a JSON object")
    opt_in = raw.get("analytics_opt_in", True)
    if not isinstance(opt_in, bool):
        return _unreadable(path, f"analytics_opt_in is {opt_in!r}, not true or false")
    email_opt_in = raw.get("email_opt_in")
    state = ConsentState(
        analytics_opt_in=opt_in,
        anonymous_id=_valid_uuid(raw.get("anonymous_id")) or str(uuid.uuid4()),
        email=raw.get("email") if isinstance(raw.get("email"), str) else None,
        email_opt_in=email_opt_in if isinstance(email_opt_in, bool) else None,
    )
    if state.anonymous_id != raw.get("anonymous_id"):
        _write(path, state)  # a missing or broken id is replaced; the user's choices are kept
    return state


def _valid_uuid(value: Any) -> Optional[str]:
    try:
        return str(uuid.UUID(str(value))) if value else None
    except ValueError:
        return None


def _unreadable(path: Path, why: str) -> ConsentState:
    warn_once(_logger, f"Analytics config {path} {why}: analytics stay off until it is "
                       "fixed (otel-zenml-analytics analytics opt-in|opt-out rewrites it).")
    return ConsentState(analytics_opt_in=False, anonymous_id=str(uuid.uuid4()))


def _write(path: Path, state: ConsentState) -> None:
    data = {
        "analytics_opt_in": state.analytics_opt_in,
        "anonymous_id": state.anonymous_id,
        "email": state.email,
        "email_opt_in": state.email_opt_in,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        # A read-only home must not break the host application: consent stays in memory.
        _logger.warning("Cannot write analytics config %s: %s", path, exc)


_store = _Store()


def _after_fork() -> None:
    # A parent's thread may have held the lock at the fork (it is held around a stat
    # of the config file): the child would wait for it for good.
    _store._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def state() -> ConsentState:
    """The stored consent, anonymous id and email choice."""
    return _store.get()


def update(**changes: Any) -> ConsentState:
    """Change and persist fields of the stored consent."""
    return _store.update(**changes)


def opted_in_email() -> Optional[str]:
    """The user's email while they are opted in to sending it, else None."""
    current = state()
    return current.email if current.email_opt_in is True and current.email else None


def forget_cache() -> None:
    """Re-read the config file on next use."""
    _store.forget()


def opt_in_override() -> Optional[bool]:
    """``ZENML_ANALYTICS_OPT_IN`` as a boolean, or None when unset.

    A malformed value counts as opted out (the safe reading) and is logged once.
    """
    raw = env.get(env.ZENML_ANALYTICS_OPT_IN)
    if raw is None or raw.strip() == "":
        return None
    try:
        return parse_bool(env.ZENML_ANALYTICS_OPT_IN, raw)
    except ConfigurationError as exc:
        warn_once(_logger, str(exc) + "; treating it as false")
        return False


def analytics_enabled() -> bool:
    """True when the user allows analytics (the env override wins over the file)."""
    override = opt_in_override()
    if override is not None:
        return override
    return state().analytics_opt_in


