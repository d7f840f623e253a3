"""Track functions without changing code: ``track_decorator`` semantics by configuration.

Name the functions to track
---------------------------

.. code-block:: bash

    export OTEL_ZENML_ANALYTICS_ENDPOINT=http://127.0.0.1:8800
    export OTEL_ZENML_ANALYTICS_TRACKED="shop.orders:place=Order placed;\
    shop.stacks:Stack.register=REGISTERED_STACK"
    OTEL_LOGS_EXPORTER=zenml_analytics opentelemetry-instrument python app.py

Each call of a target gets a span named ``pkg.mod.Class.method`` and, when it ends,
the analytics event (``event_success``, ``event_error_type`` on failure, metadata from
the first ``AnalyticsTrackedModelMixin`` argument or the returned one). The long form
with per-target options is a TOML file named by ``OTEL_ZENML_ANALYTICS_CONFIG`` (see
:mod:`otel_zenml_analytics.instrumentation.targets`). ``otel-zenml-analytics check``
validates the configuration.

Instrument in code
------------------

.. code-block:: python

    from otel_zenml_analytics.instrumentation import ZenMLAnalyticsInstrumentor

    ZenMLAnalyticsInstrumentor().instrument(
        targets="shop.orders:place=Order placed",
        tracer_provider=tracer_provider,      # optional: the global one by default
        logger_provider=logger_provider,      # optional
    )
    ...
    ZenMLAnalyticsInstrumentor().uninstrument()   # restores every original exactly

Delivery
--------

When the tracer provider is the SDK's and a destination is configured, the
instrumentor attaches a ``SegmentSpanProcessor`` to it, so the events are delivered
even without ``OTEL_LOGS_EXPORTER=zenml_analytics``; with both on, each event is
delivered once. Pass ``attach_span_processor=False`` to leave the provider alone.

Modules not imported yet are wrapped when they are imported. The one case that
cannot work: a reference taken with ``from x import f`` *before* instrumenting keeps
pointing at the original function. Targets must live in importable modules (not in
the script run as ``__main__``).

Where the span ends
-------------------

The caller's thread starts each call's span, makes it current and records the
exception that ended the call; the span's end (with the call's end time), its
analytics event and its ``code.function.name`` attribute are handed to the package's
background thread, so the span reaches the exporters after the call returned (a flush
records what is pending first), and span processors' ``on_end`` runs on that thread
(on the caller's when that thread is behind, or on the thread of a flush).
``OTEL_ZENML_ANALYTICS_SPAN_END=caller`` (or ``instrument(span_end="caller")``) ends
each span on the caller's thread instead, as ``start_as_current_span`` does.

Suppress instrumentation
------------------------

Calls made inside ``opentelemetry.instrumentation.utils.suppress_instrumentation()``
run the original function without span or event.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Collection, List, Optional, Sequence, Tuple, Union

import wrapt
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider

from otel_zenml_analytics import environment_variables as env
from otel_zenml_analytics import signals
from otel_zenml_analytics.instrumentation.package import _instruments
from otel_zenml_analytics.instrumentation.targets import Target, load_targets, parse_tracked
from otel_zenml_analytics.instrumentation.wrapper import make_wrapper
from otel_zenml_analytics.processor import SegmentSpanProcessor
from otel_zenml_analytics.settings import ConfigurationError, Settings, parse_span_end
from otel_zenml_analytics.version import __version__

__all__ = ["ZenMLAnalyticsInstrumentor", "Target"]

_logger = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class _Patched:
    """One wrapped attribute and what to restore."""

    parent: Any
    attribute: str
    original: Any
    """The raw value from the parent's ``__dict__``, or ``_MISSING`` when inherited."""
    wrapper: Any


class ZenMLAnalyticsInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """An instrumentor that tracks configured functions as ZenML analytics events."""

    def __init__(self) -> None:
        # BaseInstrumentor is a singleton: __init__ runs on every construction, and
        # must not forget what an earlier instrument() patched.
        if not hasattr(self, "_patched"):
            self._lock = threading.Lock()
            self._patched: List[_Patched] = []
            self._generation = 0
            self._processor: Optional[SegmentSpanProcessor] = None

    def instrumentation_dependencies(self) -> Collection[str]:
        """No library requirement: the targets come from configuration."""
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        explicit = kwargs.get("targets")
        targets, problems = _targets_from(explicit)
        if problems:
            if explicit is not None:
                raise ConfigurationError("; ".join(problems))
            # Each problem costs its own entry only, as a missing module does.
            _logger.error("otel-zenml-analytics: not tracked: %s (the %d well-formed "
                          "target(s) are)", "; ".join(problems), len(targets))
        if not targets:
            return
        end_on_caller = _span_end(kwargs.get("span_end")) == "caller"
        tracer_provider = kwargs.get("tracer_provider")
        logger_provider = kwargs.get("logger_provider")
        if tracer_provider is not None or logger_provider is not None:
            signals.use_providers(tracer_provider, logger_provider)
        tracer = trace.get_tracer(__name__, __version__, tracer_provider=tracer_provider)
        if kwargs.get("attach_span_processor", True):
            self._attach_processor(tracer_provider or trace.get_tracer_provider())
        with self._lock:
            self._generation += 1
            generation = self._generation
        for target in targets:
            self._when_imported(target, tracer, generation, end_on_caller)

    def _uninstrument(self, **kwargs: Any) -> None:
        with self._lock:
            self._generation += 1
            patched, self._patched = self._patched, []
        for item in reversed(patched):
            if item.original is _MISSING:
                if vars(item.parent).get(item.attribute) is item.wrapper:
                    delattr(item.parent, item.attribute)
            else:
                setattr(item.parent, item.attribute, item.original)
        if self._processor is not None:
            self._processor.shutdown()
            self._processor = None

    def _attach_processor(self, provider: Any) -> None:
        if not isinstance(provider, SDKTracerProvider):
            return
        try:
            settings = Settings.resolve()
        except ConfigurationError as exc:
            _logger.error("otel-zenml-analytics span processor not attached: %s", exc)
            return
        if settings.endpoint is None:
            return
        self._processor = SegmentSpanProcessor(settings=settings)
        provider.add_span_processor(self._processor)

    def _when_imported(self, target: Target, tracer: trace.Tracer, generation: int,
                       end_on_caller: bool) -> None:
        # Only the top-level package is looked for: finding a submodule imports its
        # packages, which would run the host's code at start-up, before the host set
        # up what that code may need.
        package = target.module.partition(".")[0]
        try:
            found = importlib.util.find_spec(package) is not None
        except Exception:  # noqa: BLE001 - a broken finder must not stop the other targets
            found = False
        if not found:
            _not_found(target, package)
            return

        def patch(module: Any) -> None:
            if generation == self._generation:
                self._patch(module, target, tracer, end_on_caller)

        wrapt.register_post_import_hook(patch, target.module)
        # Each submodule on the way is looked for once the host imported its package.
        parts = target.module.split(".")
        for depth in range(1, len(parts)):
            wrapt.register_post_import_hook(
                self._look_for(".".join(parts[:depth + 1]), target, generation),
                ".".join(parts[:depth]))

    def _look_for(self, name: str, target: Target, generation: int
                  ) -> Callable[[Any], None]:
        """A post-import hook of ``name``'s package that warns when ``name`` is not in it
        (its package imported, finding it imports nothing more)."""

        def look(package: Any) -> None:
            if name in sys.modules:
                return
            try:
                missing = importlib.util.find_spec(name) is None
            except Exception:  # noqa: BLE001 - cannot tell (and never break the host's import)
                missing = False
            if missing and generation == self._generation:
                _not_found(target, name)

        return look

    def _patch(self, module: Any, target: Target, tracer: trace.Tracer,
               end_on_caller: bool) -> None:
        *path, attribute = target.qualname.split(".")
        parent = module
        try:
            for name in path:
                parent = getattr(parent, name)
            getattr(parent, attribute)
        except AttributeError:
            _logger.warning("otel-zenml-analytics: cannot track %s: %r has no attribute %r.",
                            target.spec, target.module, target.qualname)
            return
        original = vars(parent).get(attribute, _MISSING) if hasattr(parent, "__dict__") else (
            _MISSING)
        try:
            wrapper = make_wrapper(target, tracer, end_on_caller)
            wrapt.wrap_function_wrapper(parent, attribute, wrapper)
        except Exception as exc:  # noqa: BLE001 - never break the host's import or start-up
            _logger.warning("otel-zenml-analytics: cannot track %s: %s: %s", target.spec,
                            type(exc).__name__, exc)
            return
        with self._lock:
            self._patched.append(_Patched(parent, attribute, original,
                                          vars(parent).get(attribute)))


def _not_found(target: Target, module: str) -> None:
    _logger.warning("otel-zenml-analytics: cannot track %s: module %r not found.",
                    target.spec, module)


def _targets_from(explicit: Union[None, str, Sequence[Target]]
                  ) -> Tuple[List[Target], List[str]]:
    """The well-formed targets, and one problem per malformed entry."""
    if explicit is None:
        return load_targets()
    if isinstance(explicit, str):
        return parse_tracked(explicit)
    return list(explicit), []


def _span_end(explicit: Optional[str]) -> str:
    """Where the tracked calls' spans end: ``instrument(span_end=...)`` (a mistake raises),
    else ``OTEL_ZENML_ANALYTICS_SPAN_END`` (a mistake is logged), else ``background``."""
    if explicit is not None:
        return parse_span_end("span_end", explicit)
    raw = env.get(env.OTEL_ZENML_ANALYTICS_SPAN_END)
    if raw is None or not raw.strip():
        return "background"
    try:
        return parse_span_end(env.OTEL_ZENML_ANALYTICS_SPAN_END, raw)
    except ConfigurationError as exc:
        _logger.error("otel-zenml-analytics: %s; the spans of tracked calls end in the "
                      "background", exc)
        return "background"
