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
from typing import Any, Callable, Dict, Iterator, Optional

from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

from otel_zenml_analytics.instrumentation.targets import Target
from otel_zenml_analytics.models import AnalyticsTrackedModelMixin

_logger = logging.getLogger(__name__)

Wrapper = Callable[[Callable[..., Any], Any, Any, Any], Any]


class _Call:
    """The analytics side of one call; every step is guarded."""

    def __init__(self, target: Target, instance: Any, args: Any, kwargs: Any,
                 wrapped: Callable[..., Any]) -> None:
        self.target = target
        self.metadata: Dict[str, Any] = {}
        self.model_metadata: Optional[Dict[str, Any]] = None
        try:
            self.metadata.update(target.metadata)
            if target.arguments:
                self.metadata.update(_argument_values(wrapped, target, args, kwargs))
            first = instance if isinstance(instance, AnalyticsTrackedModelMixin) else None
            for obj in (first, *args, *kwargs.values()):
                if isinstance(obj, AnalyticsTrackedModelMixin):
                    self.model_metadata = obj.get_analytics_metadata()
                    break
        except Exception as exc:  # noqa: BLE001 - analytics never break the call
            _logger.debug("Reading analytics metadata for %s failed: %r", target.spec, exc)

    def finish(self, error: Optional[BaseException], result: Any = None) -> None:
        from otel_zenml_analytics import track

        try:
            if isinstance(result, AnalyticsTrackedModelMixin):
                self.model_metadata = result.get_analytics_metadata()
            metadata = dict(self.metadata)
            if self.model_metadata:
                metadata.update(self.model_metadata)
            metadata["event_success"] = error is None
            if error is not None:
                metadata["event_error_type"] = type(error).__name__
            track(self.target.event, metadata)
        except Exception as exc:  # noqa: BLE001 - analytics never break the call
            _logger.debug("Tracking %s failed: %r", self.target.spec, exc)


def _argument_values(wrapped: Callable[..., Any], target: Target, args: Any,
                     kwargs: Any) -> Dict[str, Any]:
    bound = inspect.signature(wrapped).bind_partial(*args, **kwargs)
    return {name: bound.arguments[name] for name in target.arguments if name in bound.arguments}


@contextlib.contextmanager
def _span(tracer: trace.Tracer, target: Target) -> Iterator[None]:
    if not target.span:
        yield
        return
    with tracer.start_as_current_span(target.span_name, record_exception=True,
                                      set_status_on_exception=True) as span:
        if span.is_recording():
            span.set_attribute("code.function.name", target.span_name)
        yield


def make_wrapper(target: Target, tracer: trace.Tracer) -> Wrapper:
    """The wrapt wrapper ``(wrapped, instance, args, kwargs)`` for ``target``."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        if not is_instrumentation_enabled():
            return wrapped(*args, **kwargs)
        if inspect.iscoroutinefunction(wrapped):
            return _call_async(wrapped, instance, args, kwargs)
        with _span(tracer, target):
            call = _Call(target, instance, args, kwargs, wrapped)
            try:
                result = wrapped(*args, **kwargs)
            except BaseException as error:
                call.finish(error)
                raise
            call.finish(None, result)
            return result

    async def _call_async(wrapped: Callable[..., Any], instance: Any, args: Any,
                          kwargs: Any) -> Any:
        with _span(tracer, target):
            call = _Call(target, instance, args, kwargs, wrapped)
            try:
                result = await wrapped(*args, **kwargs)
            except BaseException as error:
                call.finish(error)
                raise
            call.finish(None, result)
            return result

    return wrapper
