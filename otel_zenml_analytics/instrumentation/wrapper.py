"""The ``wrapt`` wrapper that gives a configured function ``track_decorator`` semantics.

Each call gets a span named after the target (unless ``span = false``) and, when
the call ends, one analytics event inside it: the target's static metadata, the
configured argument values, the metadata of the first
``AnalyticsTrackedModelMixin`` argument (replaced by a returned one),
``event_success`` and, on failure, ``event_error_type``. The exception is
re-raised unchanged (and recorded on the span); analytics failures never change
what the call returns or raises.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from types import TracebackType
from typing import Any, Callable, ContextManager, Dict, Mapping, Optional, Tuple, Type, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Status, StatusCode

from otel_zenml_analytics import signals
from otel_zenml_analytics.instrumentation.targets import Target
from otel_zenml_analytics.utils import model_metadata, track_handler

_logger = logging.getLogger(__name__)

Wrapper = Callable[[Callable[..., Any], Any, Any, Any], Any]


def _base_metadata(target: Target, wrapped: Callable[..., Any], args: Any,
                   kwargs: Any) -> Mapping[str, Any]:
    """The target's static metadata and the configured argument values (guarded); the
    target's own dict when there are no arguments to read (it is only ever copied)."""
    if not target.arguments:
        return target.metadata
    metadata = dict(target.metadata)
    try:
        metadata.update(_argument_values(wrapped, target, args, kwargs))
    except Exception as exc:  # noqa: BLE001 - analytics never break the call
        _logger.debug("Reading analytics arguments for %s failed: %r", target.spec, exc)
    return metadata


def _handler(target: Target, wrapped: Callable[..., Any], instance: Any, args: Any,
             kwargs: Any) -> Tuple[track_handler, Mapping[str, Any]]:
    """A ``track_handler`` with the call's metadata, and the part a returned model keeps
    (``track_handler`` copies the metadata it is given before adding to it)."""
    base = _base_metadata(target, wrapped, args, kwargs)
    model = model_metadata((instance, *args, *kwargs.values()))
    metadata = {**base, **model} if model else cast(Dict[str, Any], base)
    return track_handler(target.event, metadata), base


def _use_returned(handler: track_handler, base: Mapping[str, Any], result: Any) -> None:
    """A returned model's metadata replaces the argument's, as in ``track_decorator``."""
    returned = model_metadata((result,))
    if returned is not None:
        handler.metadata = {**base, **returned}


def _argument_values(wrapped: Callable[..., Any], target: Target, args: Any,
                     kwargs: Any) -> Dict[str, Any]:
    bound = inspect.signature(wrapped).bind_partial(*args, **kwargs)
    return {name: bound.arguments[name] for name in target.arguments if name in bound.arguments}


class _Span:
    """The call's span, current while the call runs, ended on the signals thread.

    The span's end, the analytics event it holds and its ``code.function.name``
    attribute are handed to the signals thread (``signals.SpanEndingLater``): the
    caller pays for starting the span and building the message, not for recording
    them. (A sampler sees the span's name, the same text as the attribute.)
    """

    __slots__ = ("_ending", "_token", "_attributes")

    def __init__(self, tracer: trace.Tracer, name: str, attributes: Dict[str, Any]) -> None:
        self._ending = signals.SpanEndingLater(tracer.start_span(name))
        self._attributes = attributes
        self._token = otel_context.attach(self._ending.make_context())

    def __enter__(self) -> trace.Span:
        return self._ending.span

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], traceback: Optional[TracebackType]) -> None:
        otel_context.detach(self._token)
        self._ending.end(self._attributes)


def _record_failure(span: Optional[trace.Span], exc: Exception) -> None:
    """Record the exception that ended the call on its span, as the SDK's ``use_span``
    records it (an event and the status), but as it leaves the call: on the caller's
    thread, with the traceback as it is then, and before the analytics event that says
    the call failed. Never raises (the call's own exception must stay the one raised)."""
    if span is None or not span.is_recording():
        return
    try:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    except Exception as failure:  # noqa: BLE001
        _logger.debug("Recording %s on its span failed: %r", type(exc).__name__, failure)


def make_wrapper(target: Target, tracer: trace.Tracer, end_on_caller: bool = False) -> Wrapper:
    """The wrapt wrapper ``(wrapped, instance, args, kwargs)`` for ``target``;
    ``end_on_caller``: each call's span ends on the caller's thread, with its event added
    there (``OTEL_ZENML_ANALYTICS_SPAN_END=caller``), not on the signals thread."""
    known: Tuple[Any, bool] = (None, False)
    name = target.span_name
    attributes = {"code.function.name": name}

    def span() -> ContextManager[Any]:
        """The call's span, or no span for ``span = false``."""
        if not target.span:
            return contextlib.nullcontext()
        if end_on_caller:
            # The exception is recorded by the wrapper, as in the background case.
            return tracer.start_as_current_span(name, record_exception=False,
                                                set_status_on_exception=False,
                                                attributes=attributes)
        return _Span(tracer, name, attributes)

    def is_coroutine_function(wrapped: Callable[..., Any]) -> bool:
        # A target is one function (or its bound methods): inspect's check, which
        # unwraps and reads code flags, runs when the function changes, not per call.
        nonlocal known
        function = getattr(wrapped, "__func__", wrapped)
        last, answer = known
        if function is not last:
            answer = inspect.iscoroutinefunction(wrapped)
            known = (function, answer)
        return answer

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        if is_coroutine_function(wrapped):
            return _call_async(wrapped, instance, args, kwargs)
        with span() as current:
            handler, base = _handler(target, wrapped, instance, args, kwargs)
            with handler:
                try:
                    result = wrapped(*args, **kwargs)
                except Exception as exc:
                    _record_failure(current, exc)
                    raise
                _use_returned(handler, base, result)
                return result

    async def _call_async(wrapped: Callable[..., Any], instance: Any, args: Any,
                          kwargs: Any) -> Any:
        with span() as current:
            handler, base = _handler(target, wrapped, instance, args, kwargs)
            with handler:
                try:
                    result = await wrapped(*args, **kwargs)
                except Exception as exc:
                    _record_failure(current, exc)
                    raise
                _use_returned(handler, base, result)
                return result

    return wrapper
