"""Analytics calls become OTel signals: a span event and a log record, one message id.

:func:`emit` is the only place that touches the OTel API for an analytics call.
When a span is recording, the caller's thread builds the attributes and adds the
span event to it (the span may end as soon as the call returns), unless the span's
owner hands its end to the background thread too (:class:`SpanEndingLater`: the
instrumentation's span of a tracked call), which then adds the event, in order,
before it ends the span. The log record
(``event_name`` = ``zenml.analytics.<type>``, the caller's trace context) and,
when no span is recording, the short span ``analytics <event>`` that holds the
event are recorded by a background thread with the call's own timestamp and
context, so the caller pays for building the signal and little else; with no span
recording, or a span that ends later, that thread also builds the attributes of a
message nobody else holds whose values cannot change.

Nothing recorded that way can be lost to a flush: ``force_flush`` and
``shutdown`` of the SDK's ``TracerProvider`` and ``LoggerProvider`` first record
what is pending (they are wrapped once, with wrapt, when the thread starts), and
so does an exit hook that runs before the SDK's own. When the thread falls
behind by ``PENDING_LIMIT`` calls, callers record their signals themselves
rather than dropping them or growing memory. When no SDK is configured, nothing
would be recorded, so :func:`emit` returns before building anything.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import platform
import threading
import time
from itertools import chain
from typing import Any, Callable, Deque, Dict, Optional, Tuple, Union

import wrapt
from opentelemetry import _logs, trace
from opentelemetry import context as otel_context
from opentelemetry._logs import SeverityNumber

from otel_zenml_analytics import attributes as keys
from otel_zenml_analytics.encoding import dumps
from otel_zenml_analytics.inbox import WakeUp
from otel_zenml_analytics.message_ids import new_message_id
from otel_zenml_analytics.version import __version__

_logger = logging.getLogger(__name__)

LIBRARY_NAME = "otel-zenml-analytics"
INSTRUMENTATION_NAME = "otel_zenml_analytics"

SOURCE_JSON = dumps({
    "library": {"name": LIBRARY_NAME, "version": __version__},
    "os": {"name": platform.system(), "version": platform.release()},
})
"""This process's ``context.library`` and ``context.os``, encoded once."""

PENDING_LIMIT = 1_000
"""Calls waiting for the background thread; beyond it callers record their own."""
EXIT_FLUSH_SECONDS = 10.0
"""How long an exit hook (this module's, the delivery's) waits at most."""

Message = Dict[str, Any]

_EVENT_NAMES = {t: keys.EVENT_NAME_PREFIX + t for t in keys.MESSAGE_TYPES}

_NO_TRACING = (trace.NoOpTracerProvider, trace.ProxyTracerProvider)


class _Providers:
    """The tracer and logger analytics calls use: the global ones unless overridden."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tracer_provider: Optional[trace.TracerProvider] = None
        self._tracing: Tuple[Optional[trace.TracerProvider], bool] = (None, False)
        self.tracer: trace.Tracer = trace.get_tracer(INSTRUMENTATION_NAME, __version__)
        self.logger: _logs.Logger = _logs.get_logger(INSTRUMENTATION_NAME, __version__)
        self.log_enabled = _enabled_check(self.logger)

    def use(
        self,
        tracer_provider: Optional[trace.TracerProvider] = None,
        logger_provider: Optional[_logs.LoggerProvider] = None,
    ) -> None:
        with self._lock:
            self._tracer_provider = tracer_provider
            self.tracer = trace.get_tracer(
                INSTRUMENTATION_NAME, __version__, tracer_provider=tracer_provider
            )
            self.logger = _logs.get_logger(
                INSTRUMENTATION_NAME, __version__, logger_provider=logger_provider
            )
            self.log_enabled = _enabled_check(self.logger)

    def tracing(self) -> bool:
        """True when spans would be recorded by an SDK (sampling aside).

        The answer is kept for the provider last asked about: the no-op and proxy
        providers are ABCs, and ``isinstance`` against an ABC costs a microsecond.
        """
        provider = self._tracer_provider or trace.get_tracer_provider()
        checked, answer = self._tracing
        if provider is not checked:
            answer = not isinstance(provider, _NO_TRACING)
            self._tracing = (provider, answer)
        return answer


def _enabled_check(logger: _logs.Logger) -> Callable[[str], bool]:
    """``Logger.enabled`` where the API has it (1.37+); older APIs: not a no-op logger."""
    enabled = getattr(logger, "enabled", None)
    if enabled is not None:
        return lambda name: bool(enabled(event_name=name))
    return lambda name: not isinstance(getattr(logger, "_logger", logger), _logs.NoOpLogger)


_providers = _Providers()


def use_providers(
    tracer_provider: Optional[trace.TracerProvider] = None,
    logger_provider: Optional[_logs.LoggerProvider] = None,
) -> None:
    """Send analytics signals through these providers instead of the global ones.

    ``None`` for either means the global provider. Instrumentors and tests use this.
    Signals still pending for the previous providers are recorded first.
    """
    flush()
    _providers.use(tracer_provider, logger_provider)


def event_name(message: Message) -> str:
    """The span event name: the event for track ("Pipeline run"), else the type."""
    if message["type"] == "track":
        return str(message["event"])
    return str(message["type"])


def to_attributes(message: Message, email_opt_in: bool = False,
                  facts: Optional[keys.PackedFacts] = None) -> Dict[str, Any]:
    """The ``zenml.analytics.*`` attributes of a message built by the client; ``facts``,
    when the properties hold them unchanged, travel packed (see ``FACTS``). A message
    the client built without an id (one nobody else holds) gets its id here."""
    message_type = message["type"]
    attrs: Dict[str, Any] = {
        keys.SOURCE: SOURCE_JSON,
        keys.TYPE: message_type,
        keys.MESSAGE_ID: message.get("messageId") or new_message_id(),
    }
    for field, key in _ID_FIELDS:
        value = message.get(field)
        if value is not None:
            attrs[key] = value
    if message.get("debug"):
        attrs[keys.DEBUG] = True
    if message_type == "track":
        if email_opt_in:
            attrs[keys.EMAIL_OPT_IN] = True
        keys.encode_payload(keys.PROPERTIES_PREFIX, message.get("properties"), attrs, facts)
    else:
        keys.encode_payload(keys.TRAITS_PREFIX, message.get("traits"), attrs)
    return attrs


_ID_FIELDS = (
    ("userId", keys.USER_ID),
    ("anonymousId", keys.ANONYMOUS_ID),
    ("event", keys.EVENT),
    ("groupId", keys.GROUP_ID),
    ("previousId", keys.PREVIOUS_ID),
)


def emit(message: Message, email_opt_in: bool = False,
         facts: Optional[keys.PackedFacts] = None, private: bool = False) -> bool:
    """Record ``message`` as a span event and a log record.

    Returns True when an SDK will record at least one of the two signals (a
    sampler may still drop the span of its own). The client calls it inside its
    guard, so an SDK failure never reaches the caller. ``private``: nobody else
    holds ``message`` (``AnalyticsContext`` drops it); when no span is recording, or
    the span ends later (:class:`SpanEndingLater`), and no value of its payload can
    change, its attributes are built on the background thread too, from the same
    message.
    """
    providers = _providers
    name = event_name(message)
    log_event_name = _EVENT_NAMES[message["type"]]
    context = otel_context.get_current()
    span = trace.get_current_span(context)
    span_on = span.is_recording()
    own_span = not span_on and providers.tracing()
    # With a span to hold the event the call is recorded either way, so whether a log
    # record is wanted too is asked by the background thread, not the caller.
    if not (span_on or own_span or providers.log_enabled(log_event_name)):
        return False
    now = time.time_ns()
    # A span whose end is handed to the background thread (``SpanEndingLater``) gets its
    # event there, before it ends; any other span may end as soon as we return.
    ending = _ending_later(context, span) if span_on else None
    attrs: Optional[Dict[str, Any]] = None
    if (span_on and ending is None) or not (private and _unchanging(message)):
        attrs = to_attributes(message, email_opt_in, facts)
    if span_on and ending is None:
        own_span = not _held(span, name, attrs, now)
    deferred: _Deferred = (message, email_opt_in, facts)
    queued = _emitter.submit((providers.tracer, providers.logger, providers.log_enabled, name,
                              log_event_name, deferred if attrs is None else attrs, now,
                              context, own_span, None if ending is None else span))
    if queued and ending is not None:
        ending.event_queued = True
    return True


_ENDS_LATER = otel_context.create_key("otel-zenml-analytics-span-ends-later")


def _ending_later(context: otel_context.Context, span: trace.Span
                  ) -> Optional[SpanEndingLater]:
    """The ``SpanEndingLater`` of ``span`` (the current one), if it has one."""
    ending = context.get(_ENDS_LATER)
    return ending if isinstance(ending, SpanEndingLater) and ending.span is span else None


class SpanEndingLater:
    """A span its owner ends on the background thread, once the call it covers returned.

    Make :meth:`make_context` current while the call runs: an analytics event inside the
    span is then added by the background thread (with its attributes built there), and
    :meth:`end` hands the span's end to that thread after it. The caller pays neither
    for the event's attributes nor for the span's end (the span processors' ``on_end``
    runs on that thread; on the caller's when that thread is behind and no event waits
    there, or on the thread of a flush that runs what is pending). The end time is the
    moment :meth:`end` is called.
    """

    __slots__ = ("span", "event_queued")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.event_queued = False
        """Set when an event for the span waits on the thread: its end must then wait
        too, even when the thread is behind (one job more per such span at most)."""

    def make_context(self) -> otel_context.Context:
        """The current context with the span in it, marked as ending later. (Not kept
        here: the context holds this object, and a cycle would leave every span to the
        garbage collector.)"""
        return otel_context.set_value(_ENDS_LATER, self, trace.set_span_in_context(self.span))

    def end(self, attributes: Optional[Dict[str, Any]] = None) -> None:
        """End the span on the background thread, after the events handed over before,
        with ``attributes`` set first. Never raises."""
        span = self.span
        try:
            if not span.is_recording():
                span.end()
                return
            job: _HandOff = (_end, (span, attributes, time.time_ns()))
            if self.event_queued:
                _emitter.submit(job, behind_ok=True)
            else:
                hand_off(*job)
        except Exception as exc:  # noqa: BLE001 - analytics never break the host
            _logger.debug("Ending a span failed: %r", exc)


def _end(job: Tuple[trace.Span, Optional[Dict[str, Any]], int]) -> None:
    span, attributes, end_time = job
    try:
        if attributes:
            span.set_attributes(attributes)
    finally:
        span.end(end_time=end_time)


_UNCHANGING = frozenset((str, bool, int, float, type(None)))


def _unchanging(message: Message) -> bool:
    """True when no key or value of the message's payload can change after the call
    (the rest of a message the client built is text)."""
    payload = message.get("properties" if message["type"] == "track" else "traits")
    return not payload or _UNCHANGING.issuperset(map(type, chain(payload, payload.values())))


def _held(span: trace.Span, name: str, attrs: Optional[Dict[str, Any]], now: int) -> bool:
    """Add the event to ``span``; False when the span cannot hold it: ended, or at its
    event limit (128 by default), where the SDK would drop the span's oldest event to
    keep ours. The event then goes on a short span of its own."""
    if not span.is_recording() or _full(span):
        return False
    span.add_event(name, attrs, timestamp=now)
    return True


def _full(span: trace.Span) -> bool:
    """True when ``span`` holds as many events as its limits allow (an SDK span: its
    private ``_events`` and ``_limits``, read without copying the events as the public
    ``events`` does on every read; other spans are never taken for full)."""
    events = getattr(span, "_events", None)
    max_events = getattr(getattr(span, "_limits", None), "max_events", None)
    if events is None or not isinstance(max_events, int):
        return False
    return bool(getattr(events, "dropped", 0)) or len(events) >= max_events


_Deferred = Tuple[Message, bool, Optional[keys.PackedFacts]]
"""What :func:`to_attributes` takes, for attributes built on the background thread."""

_Job = Tuple[trace.Tracer, _logs.Logger, Callable[[str], bool], str, str,
             Union[Dict[str, Any], _Deferred], int, otel_context.Context, bool,
             Optional[trace.Span]]


def _record(job: _Job) -> None:
    """Record the deferred part of one call: its event on the span that ends later, or
    its own span if it needs one; its log record."""
    tracer, logger, log_enabled, name, log_event_name, attrs, now, parent, own_span, \
        holder = job
    try:
        if isinstance(attrs, tuple):
            attrs = to_attributes(*attrs)
        if holder is not None:
            # Ended already: the event of another thread that holds the call's context,
            # queued after the end.
            own_span = not _held(holder, name, attrs, now)
        span: Optional[trace.Span] = None
        context = parent
        if own_span:
            span = tracer.start_span(f"analytics {name}", context=parent, start_time=now)
            if span.is_recording():
                span.add_event(name, attrs, timestamp=now)
                context = trace.set_span_in_context(span, parent)
        if log_enabled(log_event_name):
            logger.emit(
                timestamp=now,
                context=context,
                severity_number=SeverityNumber.INFO,
                body=name,
                attributes=attrs,
                event_name=log_event_name,
            )
        if span is not None:
            span.end(end_time=now)
    except Exception as exc:  # noqa: BLE001 - analytics never break the host
        _logger.debug("Recording an analytics signal failed: %r", exc)


_HandOff = Tuple[Callable[[Any], object], Any]
"""Work handed to the background thread by :func:`hand_off`: a function and its argument."""

_Work = Union[_Job, _HandOff]
"""What the background thread runs: a call's deferred signals, or handed-over work."""


def hand_off(function: Callable[[Any], object], argument: Any) -> None:
    """Run ``function(argument)`` on the background thread, in order with the calls'
    signals; on this thread when the background thread is behind, or when this is the
    background thread (a call's own short span ends there). A flush of the SDK (or
    :func:`flush`) runs what is pending first. Never raises."""
    job: _HandOff = (function, argument)
    if _emitter.running_here():
        _run_job(job)
    else:
        _emitter.submit(job)


def _run_job(job: _Work) -> None:
    if len(job) == 2:
        function, argument = job
        try:
            function(argument)
        except Exception as exc:  # noqa: BLE001 - analytics never break the host
            _logger.debug("Handing analytics work over failed: %r", exc)
    else:
        _record(job)


class _Emitter:
    """The background thread that records the deferred part of analytics calls."""

    def __init__(self) -> None:
        self._jobs: Deque[_Work] = collections.deque()
        self._wake_up = WakeUp(sleeping=True)
        self._busy = threading.Lock()
        """Held while a job is being recorded, so :meth:`flush` can wait for it."""
        self._thread: Optional[threading.Thread] = None
        self.thread_id: Optional[int] = None
        """The thread's ident while it runs (set by the thread itself; None before and
        after)."""
        self._start_lock = threading.Lock()
        self.recorded_by_callers = 0
        """Jobs run on the caller's thread because the thread had fallen behind (a
        call's signals, and the hand-off of the span that holds its event)."""

    def submit(self, job: _Work, behind_ok: bool = False) -> bool:
        """Queue ``job`` (True), or run it on this thread when the thread is behind
        (unless ``behind_ok``) or cannot run (False)."""
        jobs = self._jobs
        if (self._thread is None or len(jobs) >= PENDING_LIMIT) and not (
                self._running() if behind_ok else self._accepting()):
            self.recorded_by_callers += 1
            _run_job(job)
            return False
        jobs.append(job)
        if self._wake_up.sleeping:
            self._wake_up.notify()
        return True

    def _accepting(self) -> bool:
        """The thread runs (started, or replaced if it died) and is not behind."""
        return self._running() and len(self._jobs) < PENDING_LIMIT

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Run everything pending, on this thread, after the job in progress; within
        ``timeout`` seconds when given. True when nothing was left pending."""
        if self.running_here():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._busy.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return False
        try:
            while deadline is None or time.monotonic() < deadline:
                try:
                    job = self._jobs.popleft()
                except IndexError:
                    return True
                _run_job(job)
            return not self._jobs
        finally:
            self._busy.release()

    def pending(self) -> int:
        return len(self._jobs)

    def running_here(self) -> bool:
        """True on this emitter's thread (by the ident it set when it started)."""
        return threading.get_ident() == self.thread_id

    def _running(self) -> bool:
        """True when the thread runs, after starting it if needed."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            return True
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                return True
            thread = threading.Thread(target=self._run, name="otel-zenml-analytics-signals",
                                      daemon=True)
            try:
                thread.start()
            except RuntimeError:  # interpreter shutting down: callers record their own
                return False
            self._thread = thread
            _flush_before_sdk_shutdown()
            return True

    def _run(self) -> None:
        # The ident is this thread's from its first job to its end: a thread that took
        # it over after its end must not pass for the signals thread.
        self.thread_id = threading.get_ident()
        jobs, busy = self._jobs, self._busy
        try:
            while True:
                with busy:
                    try:
                        job: Optional[_Work] = jobs.popleft()
                    except IndexError:
                        job = None
                    if job is not None:
                        _run_job(job)
                        continue
                self._wake_up.sleep(jobs)
        finally:
            self.thread_id = None

    def _after_fork(self) -> None:
        self.__init__()  # type: ignore[misc]


_emitter = _Emitter()


def flush(timeout: Optional[float] = None) -> bool:
    """Record every analytics signal still pending (and run what was handed over)
    before returning, within ``timeout`` seconds when given (once the process exits,
    within what is left of the exit's bound); True when nothing is left pending.
    Never raises."""
    if _exit_deadline is not None:
        left = max(0.0, _exit_deadline - time.monotonic())
        timeout = left if timeout is None else min(timeout, left)
    try:
        return _emitter.flush(timeout)
    except Exception as exc:  # noqa: BLE001 - analytics never break the host
        _logger.debug("Recording pending analytics signals failed: %r", exc)
        return False


_exit_deadline: Optional[float] = None
"""Set by the first exit hook that flushes: the waits at exit (this module's hook, the
delivery's, the SDK providers' shutdown) share one ``EXIT_FLUSH_SECONDS``, so a job
stuck on the thread holds the exit once, not once per hook."""


def flush_at_exit() -> bool:
    """:func:`flush` within what is left of the exit's bound (starting it if needed)."""
    global _exit_deadline
    if _exit_deadline is None:
        _exit_deadline = time.monotonic() + EXIT_FLUSH_SECONDS
    return flush()


def pending() -> int:
    """Analytics calls whose deferred signals are not recorded yet."""
    return _emitter.pending()


_hooks_installed = False


def _flush_first(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...],
                 kwargs: Dict[str, Any]) -> Any:
    # Within force_flush's ``timeout_millis`` (the SDK's default, 30 s, for a shutdown
    # too), so that a job stuck in a host's exporter cannot hold the caller forever.
    timeout_millis = kwargs.get("timeout_millis", args[0] if args else None)
    flush(timeout_millis / 1000.0 if isinstance(timeout_millis, (int, float)) else 30.0)
    return wrapped(*args, **kwargs)


def _stay_first_at_exit(wrapped: Callable[..., Any], instance: Any, args: Tuple[Any, ...],
                        kwargs: Dict[str, Any]) -> Any:
    # A provider registers its exit hook (its shutdown) when it is made: ours is moved
    # after it, so that it still runs first and starts the exit's one bound. Not once
    # exit has begun (the main thread is no longer alive then): the hooks that run are
    # those registered before, and ours, moved past them, would never run.
    result = wrapped(*args, **kwargs)
    if threading.main_thread().is_alive():
        atexit.unregister(flush_at_exit)
        atexit.register(flush_at_exit)
    return result


def _flush_before_sdk_shutdown() -> None:
    """Make the SDK providers' flush and shutdown record pending signals first.

    Installed when the thread first starts, so this exit hook runs before the exit
    hooks of providers created earlier (exit hooks run last-in, first-out), and moved
    after the hook of any provider created later. Once per process: a forked child
    inherits both.
    """
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(flush_at_exit)
    for module, provider in (("opentelemetry.sdk.trace", "TracerProvider"),
                             ("opentelemetry.sdk._logs", "LoggerProvider")):
        for method, wrapper in (("force_flush", _flush_first), ("shutdown", _flush_first),
                                ("__init__", _stay_first_at_exit)):
            try:
                wrapt.wrap_function_wrapper(module, f"{provider}.{method}", wrapper)
            except (ImportError, AttributeError) as exc:
                _logger.debug("Cannot wrap %s.%s.%s: %r", module, provider, method, exc)


def _after_fork() -> None:
    # The parent records what it had pending; the child starts empty, not exiting.
    global _exit_deadline
    _exit_deadline = None
    _emitter._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
