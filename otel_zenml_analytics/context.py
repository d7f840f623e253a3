"""The analytics context of ZenML.

This module is based on the 'analytics-python' package created by Segment, as
ZenML's is; here the messages become OpenTelemetry signals.

``AnalyticsContext`` reads the user's consent and machine id when entered,
tracks only when the user opted in (the opt-in and opt-out events are always
sent), adds facts about the system to every tracked event, and never raises:
its ``__exit__`` swallows any exception of the block, as ZenML's does.
"""

from __future__ import annotations

import functools
import logging
import platform
from types import TracebackType
from typing import Any, Dict, Optional, Type
from uuid import UUID

from otel_zenml_analytics import client as _client
from otel_zenml_analytics import consent
from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics.attributes import PackedFacts
from otel_zenml_analytics.enums import CONSENT_EVENTS
from otel_zenml_analytics.settings import is_true
from otel_zenml_analytics.version import __version__

_logger = logging.getLogger(__name__)


SYSTEM_FACTS: Dict[str, Any] = {
    "os": platform.system(),
    "os_version": platform.release(),
    "python_version": platform.python_version(),
    "version": __version__,
}
"""Facts every tracked event carries (seed 000: the version and OS information)."""


@functools.lru_cache(maxsize=8)
def _identity_facts(anonymous_id: str, user_id: str, in_server: bool) -> PackedFacts:
    """The system facts plus the ids, built and JSON-encoded once per machine id (keyed
    by the ids' text, whose hash Python keeps, where a ``UUID`` hashes in Python code)."""
    return PackedFacts({**SYSTEM_FACTS, "client_id": anonymous_id, "user_id": user_id,
                        "in_server": in_server})


_uuid = functools.lru_cache(maxsize=8)(UUID)
"""The machine id is read on every call: parse each distinct one once."""


class AnalyticsContext:
    """Client class for ZenML Analytics v2."""

    def __init__(self) -> None:
        """Initialization; consent and ids are read on ``__enter__``."""
        self.analytics_opt_in: bool = False
        self.user_id: Optional[UUID] = None
        self.anonymous_id: Optional[UUID] = None
        self.email: Optional[str] = None
        self.email_opt_in: bool = False

    def __enter__(self) -> AnalyticsContext:
        """Read the consent file and the machine's anonymous id."""
        try:
            state = consent.state()
            self.anonymous_id = _uuid(state.anonymous_id)
            self.user_id = self.anonymous_id
            self.email_opt_in = bool(state.email_opt_in)
            self.email = state.email if self.email_opt_in else None
            self.analytics_opt_in = consent.analytics_enabled()
        except Exception as exc:  # noqa: BLE001 - analytics never break the caller
            _logger.debug("Analytics context could not read consent: %r", exc)
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_val: Optional[BaseException],
        exc_tb: Optional[TracebackType],
    ) -> bool:
        """Swallow any exception of the block: analytics never raise into the caller."""
        if exc_val is not None:
            _logger.debug("Sending telemetry data failed: %r", exc_val)
        return True

    @property
    def in_server(self) -> bool:
        """Flag to check whether the code is running in a ZenML server.

        Returns:
            True if running in a server, False otherwise.
        """
        return is_true(env.get(env.ZENML_SERVER))

    def _allowed(self, event: Any = None) -> bool:
        if self.user_id is None:
            return False
        return self.analytics_opt_in or (event is not None and event in CONSENT_EVENTS)

    def identify(self, traits: Optional[Dict[str, Any]] = None) -> bool:
        """Identify the user through segment.

        Args:
            traits: Traits of the user.

        Returns:
            True if tracking information was sent, False otherwise.
        """
        if not self._allowed():
            return False
        success, _ = _client.default_client.identify(self.user_id, traits,  # type: ignore[arg-type]
                                                     anonymous_id=self.anonymous_id)
        return success

    def alias(self, user_id: UUID, previous_id: UUID) -> bool:
        """Alias user IDs.

        Args:
            user_id: The user ID.
            previous_id: Previous ID for the alias.

        Returns:
            True if alias information was sent, False otherwise.
        """
        if not self._allowed():
            return False
        success, _ = _client.default_client.alias(user_id, previous_id,
                                                  anonymous_id=self.anonymous_id)
        return success

    def group(self, group_id: UUID, traits: Optional[Dict[str, Any]] = None) -> bool:
        """Group the user.

        Args:
            group_id: Group ID.
            traits: Traits of the group.

        Returns:
            True if tracking information was sent, False otherwise.
        """
        if not self._allowed():
            return False
        traits = dict(traits or {})
        traits.setdefault("group_id", str(group_id))
        success, _ = _client.default_client.group(self.user_id, group_id,  # type: ignore[arg-type]
                                                  traits, anonymous_id=self.anonymous_id)
        return success

    def track(self, event: Any, properties: Optional[Dict[str, Any]] = None) -> bool:
        """Track an event.

        Args:
            event: Event to track (an ``AnalyticsEvent``, ``LegacyAnalyticsEvent`` or string).
            properties: Event properties; their keys win over the system facts added.
                With the email opt-in, the delivery adds ``email`` to the message it
                sends (never to the OTel signals, so traces and logs do not carry it).

        Returns:
            True if tracking information was sent, False otherwise.
        """
        return self._track(event, properties)

    def _track(self, event: Any, properties: Optional[Dict[str, Any]],
               consent_just_read: bool = False) -> bool:
        """:meth:`track`; ``consent_just_read``: the context was entered for this call
        alone (the module's ``track()``), so the client need not read the consent again
        (inside a longer block, it may have changed since ``__enter__``)."""
        if not self._allowed(event):
            return False
        facts = _identity_facts(_client.id_text(self.anonymous_id),
                                _client.id_text(self.user_id), self.in_server)
        merged = dict(facts.values)
        if properties:
            merged.update(properties)
        # The client's track() without its copy of the properties (merged is ours).
        success, _ = _client.default_client._track(
            self.user_id, event, merged, self.anonymous_id,
            email_opt_in=self.email_opt_in and bool(self.email), facts=facts, private=True,
            consent_read=consent_just_read)
        return success


