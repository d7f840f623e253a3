"""Utility functions and classes for ZenML analytics."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from types import TracebackType
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Type, TypeVar, cast

# The package's __init__ never imports this module, so it is whole by the time we do.
from otel_zenml_analytics import _track_properties, consent
from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics.encoding import AnalyticsEncoder
from otel_zenml_analytics.enums import AnalyticsEvent
from otel_zenml_analytics.errors import AnalyticsAPIError
from otel_zenml_analytics.models import AnalyticsTrackedModelMixin
from otel_zenml_analytics.settings import warn_once

_logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "AnalyticsAPIError",
    "AnalyticsEncoder",
    "analytics_disabler",
    "email_opt_int",
    "track_decorator",
    "track_handler",
]


class analytics_disabler:
    """Context manager which disables ZenML analytics."""

    def __init__(self) -> None:
        """Initialization of the context manager."""
        self.original_value: Optional[str] = None

    def __enter__(self) -> None:
        """Disable the analytics (``ZENML_ANALYTICS_OPT_IN=False``)."""
        self.original_value = os.environ.get(env.ZENML_ANALYTICS_OPT_IN)
        os.environ[env.ZENML_ANALYTICS_OPT_IN] = str(False)

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc_value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        """Restore the previous value, or remove the variable."""
        if self.original_value is not None:
            os.environ[env.ZENML_ANALYTICS_OPT_IN] = self.original_value
        else:
            os.environ.pop(env.ZENML_ANALYTICS_OPT_IN, None)


def email_opt_int(opted_in: bool, email: Optional[str], source: str) -> None:
    """Track the event of the users response to the email prompt, identify them.

    Args:
        opted_in: Did the user decide to opt-in
        email: The email the user optionally provided
        source: Location when the user replied ["zenml go", "zenml server"]
    """
    from otel_zenml_analytics import identify, track

    try:
        if opted_in and email:
            consent.update(email=email, email_opt_in=True)
            identify(metadata={"email": email, "source": source})
        else:
            consent.update(email_opt_in=False)
        track(AnalyticsEvent.OPT_IN_OUT_EMAIL, {"opted_in": opted_in, "source": source})
    except Exception as exc:  # noqa: BLE001 - analytics never break the caller
        _logger.debug("Email opt-in tracking failed: %r", exc)


class track_handler:
    """Context handler to enable tracking the success status of an event."""

    def __init__(self, event: Any, metadata: Optional[Dict[str, Any]] = None) -> None:
        """Initialization of the context manager.

        Args:
            event: The type of the analytics event.
            metadata: The metadata of the event.
        """
        self.event = event
        self.metadata: Dict[str, Any] = metadata or {}

    def __enter__(self) -> track_handler:
        """Enter the context."""
        return self

    def __exit__(
        self,
        type_: Optional[Type[BaseException]],
        value: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        """Track the event with ``event_success`` (and ``event_error_type`` on failure).

        The exception, if any, is not swallowed.
        """
        try:
            metadata = dict(self.metadata)
            metadata["event_success"] = type_ is None
            if type_ is not None:
                metadata["event_error_type"] = type_.__name__
            _track_properties(self.event, metadata)
        except Exception as exc:  # noqa: BLE001 - analytics never break the caller
            _logger.debug("Analytics tracking failed: %r", exc)


def model_metadata(objects: Iterable[Any]) -> Optional[Dict[str, Any]]:
    """The analytics metadata of the first ``AnalyticsTrackedModelMixin`` among
    ``objects``, or None (also when reading it fails: analytics never break the call)."""
    try:
        for obj in objects:
            if isinstance(obj, AnalyticsTrackedModelMixin):
                metadata = obj.get_analytics_metadata()
                if isinstance(metadata, Mapping):
                    return dict(metadata)
                warn_once(_logger, f"{type(obj).__qualname__}.get_analytics_metadata() "
                                   f"returned {type(metadata).__name__}, not a dict: its "
                                   "events are tracked without it")
                return None
    except Exception as exc:  # noqa: BLE001
        _logger.debug("Reading analytics metadata failed: %r", exc)
    return None


def _replace_with_returned(handler: track_handler, result: Any) -> None:
    """A returned model's metadata takes precedence over an argument's."""
    returned = model_metadata((result,))
    if returned is not None:
        handler.metadata = returned


def track_decorator(event: Any) -> Callable[[F], F]:
    """Decorator to track event.

    If the decorated function takes in a AnalyticsTrackedModelMixin object as
    an argument or returns one, it will be called to track the event. The return
    value takes precedence over the argument when determining which object is
    called to track the event. ``async def`` functions are tracked when the
    awaited call finishes.

    Args:
        event: Event string to stamp with.

    Returns:
        A decorator that applies the analytics tracking to a function.
    """

    def inner_decorator(func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_inner(*args: Any, **kwargs: Any) -> Any:
                with track_handler(event, model_metadata((*args, *kwargs.values()))) as handler:
                    result = await func(*args, **kwargs)
                    _replace_with_returned(handler, result)
                    return result

            return cast(F, async_inner)

        @functools.wraps(func)
        def inner_func(*args: Any, **kwargs: Any) -> Any:
            with track_handler(event, model_metadata((*args, *kwargs.values()))) as handler:
                result = func(*args, **kwargs)
                _replace_with_returned(handler, result)
                return result

        return cast(F, inner_func)

    return inner_decorator
