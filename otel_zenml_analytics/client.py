"""The analytics client of ZenML, as OTel signals.

``Client`` builds Segment messages, as ZenML's client does, and hands them to the
OpenTelemetry SDK (a span event and a log record, see :mod:`.signals`) instead
of a private queue; the ``SegmentSpanProcessor``/``SegmentLogExporter`` deliver
them. Each method returns ``(success, original message)``: success is True when
the SDK recorded the message (or, with ``send=False``, without emitting it).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple
from uuid import UUID

from otel_zenml_analytics import consent, redaction, signals
from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics.attributes import PackedFacts
from otel_zenml_analytics.enums import CONSENT_EVENTS, AnalyticsEvent, LegacyAnalyticsEvent
from otel_zenml_analytics.message_ids import new_message_id
from otel_zenml_analytics.settings import ConfigurationError, env_flag, is_true

_logger = logging.getLogger(__name__)

Message = Dict[str, Any]
Result = Tuple[bool, Message]


def strict_events() -> bool:
    """``OTEL_ZENML_ANALYTICS_STRICT_EVENTS``: accept only enum members in ``track``."""
    if env.get(env.OTEL_ZENML_ANALYTICS_STRICT_EVENTS) is None:  # the common case, unparsed
        return False
    try:
        return bool(env_flag(env.OTEL_ZENML_ANALYTICS_STRICT_EVENTS))
    except ConfigurationError as exc:
        _logger.warning("%s; treating it as false", exc)
        return False


def event_value(event: Any) -> Optional[str]:
    """The event name to send, or None (logged) when ``event`` is not acceptable."""
    if isinstance(event, (AnalyticsEvent, LegacyAnalyticsEvent)):
        return str(event.value)
    if strict_events():
        _logger.warning(
            "Analytics event %r rejected: %s=true accepts only AnalyticsEvent or "
            "LegacyAnalyticsEvent members.", event, env.OTEL_ZENML_ANALYTICS_STRICT_EVENTS)
        return None
    if isinstance(event, str) and event.strip():
        return event
    _logger.warning("Analytics event %r rejected: expected an AnalyticsEvent or a non-empty "
                    "string.", event)
    return None


class Client:
    """The client class for ZenML analytics."""

    def __init__(self, send: bool = True, timeout: int = 15) -> None:
        """Initialization of the client.

        Args:
            send: Flag to determine whether to send the messages (to the OTel SDK).
            timeout: Kept for the seed's signature; delivery timeouts are a setting of
                the components (``OTEL_ZENML_ANALYTICS_TIMEOUT``).
        """
        self.send = send
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Client(send={self.send}, timeout={self.timeout})"

    def identify(self, user_id: UUID, traits: Optional[Dict[Any, Any]],
                 anonymous_id: Optional[UUID] = None) -> Result:
        """Method to identify a user with given traits.

        Args:
            user_id: The user ID.
            traits: The traits for the identification process.
            anonymous_id: The machine's anonymous ID (an addition to the seed API).

        Returns:
            Tuple (success flag, the original message).
        """
        msg = _message("identify", user_id, anonymous_id, traits=dict(traits or {}))
        return self._enqueue(msg)

    def track(self, user_id: UUID, event: Any, properties: Optional[Dict[Any, Any]],
              anonymous_id: Optional[UUID] = None, *, email_opt_in: bool = False) -> Result:
        """Method to track events.

        Args:
            user_id: The user ID.
            event: The type of the event (an ``AnalyticsEvent`` or, unless strict, a string).
            properties: Dict of additional properties for the event.
            anonymous_id: The machine's anonymous ID (an addition to the seed API).
            email_opt_in: The user had opted in to sending their email (an addition
                to the seed API): the delivery adds it to the message it sends, so it
                never becomes a span or log attribute.

        Returns:
            Tuple (success flag, the original message).
        """
        return self._track(user_id, event, dict(properties or {}), anonymous_id, email_opt_in)

    def _track(self, user_id: Any, event: Any, properties: Dict[Any, Any],
               anonymous_id: Any = None, email_opt_in: bool = False,
               facts: Optional[PackedFacts] = None, private: bool = False,
               consent_read: bool = False) -> Result:
        """:meth:`track` with ``properties`` handed over (the message keeps that dict).

        ``AnalyticsContext`` passes the facts it added to them (``facts``, which travel
        packed), drops the message (``private``, see ``signals.emit``) and, for a call
        of its own, tells that it has just read the consent (``consent_read``).
        """
        name = event_value(event)
        msg = _message("track", user_id, anonymous_id, with_id=not private,
                       event=name if name is not None else event, properties=properties)
        if name is None:
            return False, msg
        return self._enqueue(msg, consent_event=consent_read or event in CONSENT_EVENTS,
                             email_opt_in=email_opt_in, facts=facts, private=private)

    def alias(self, user_id: UUID, previous_id: UUID,
              anonymous_id: Optional[UUID] = None) -> Result:
        """Method to alias user IDs.

        Args:
            user_id: The user ID.
            previous_id: Previous ID for the alias.
            anonymous_id: The machine's anonymous ID (an addition to the seed API).

        Returns:
            Tuple (success flag, the original message).
        """
        msg = _message("alias", user_id, anonymous_id, previousId=str(previous_id))
        return self._enqueue(msg)

    def group(self, user_id: UUID, group_id: UUID, traits: Optional[Dict[Any, Any]],
              anonymous_id: Optional[UUID] = None) -> Result:
        """Method to group users.

        Args:
            user_id: The user ID.
            group_id: The group ID.
            traits: Traits to assign to the group.
            anonymous_id: The machine's anonymous ID (an addition to the seed API).

        Returns:
            Tuple (success flag, the original message).
        """
        msg = _message("group", user_id, anonymous_id, groupId=str(group_id),
                       traits=dict(traits or {}))
        return self._enqueue(msg)

    def _enqueue(self, msg: Message, consent_event: bool = False, email_opt_in: bool = False,
                 facts: Optional[PackedFacts] = None, private: bool = False) -> Result:
        """Hand a message to the OTel SDK; never raises. ``consent_event``: sent whatever
        the consent; ``private``: the caller drops the message (see ``signals.emit``)."""
        if not self.send:
            return True, msg
        try:
            if not consent_event and not consent.analytics_enabled():
                return False, msg
            redactor = redaction.from_environment()
            if redactor:
                msg = redactor.message(msg)
            return signals.emit(msg, email_opt_in, facts, private), msg
        except Exception as exc:  # noqa: BLE001 - analytics never break the caller
            _logger.debug("Emitting analytics message failed: %r", exc)
            return False, msg


_last_id: Tuple[Any, str] = (None, "")
"""The last UUID formatted, and its text: every message carries the machine's id, as the
same ``UUID`` object (``AnalyticsContext`` parses it once), so it is formatted once."""


def id_text(value: Any) -> str:
    """``str(value)``; the machine's id is recognised by identity and not formatted again."""
    global _last_id
    if type(value) is not UUID:
        return str(value)
    last, text = _last_id
    if value is not last:
        text = str(value)
        _last_id = (value, text)
    return text


def _message(message_type: str, user_id: Any, anonymous_id: Any, with_id: bool = True,
             **fields: Any) -> Message:
    """A message; without ``with_id``, its id is made with its attributes (see
    ``signals.to_attributes``): on the background thread, for a message nobody else
    holds and whose attributes are built there."""
    msg: Message = {"type": message_type, "messageId": new_message_id()} if with_id else {
        "type": message_type}
    if user_id is not None:
        msg["userId"] = id_text(user_id)
    if anonymous_id is not None:
        msg["anonymousId"] = id_text(anonymous_id)
    msg.update(fields)
    if is_true(env.get(env.ZENML_DEBUG)):
        msg["debug"] = True
    return msg


default_client = Client()
"""The client the module-level functions and ``AnalyticsContext`` use."""
