"""What the span processor and the log exporter share: settings and a delivery."""

from __future__ import annotations

from typing import Optional

from otel_zenml_analytics import delivery as _delivery
from otel_zenml_analytics import redaction
from otel_zenml_analytics.settings import Settings


class DeliveringComponent:
    """Resolves settings (arguments over env vars) and holds a shared delivery."""

    def __init__(
        self,
        endpoint: Optional[str] = None,
        format: Optional[str] = None,
        write_key: Optional[str] = None,
        gzip: Optional[bool] = None,
        timeout: Optional[float] = None,
        max_queue_size: Optional[int] = None,
        batch_size: Optional[int] = None,
        flush_interval: Optional[float] = None,
        max_retries: Optional[int] = None,
        spool: Optional[str] = None,
        settings: Optional[Settings] = None,
    ) -> None:
        self.settings = settings or Settings.resolve(
            endpoint=endpoint,
            format=format,
            write_key=write_key,
            gzip=gzip,
            timeout=timeout,
            max_queue_size=max_queue_size,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_retries=max_retries,
            spool=spool,
        )
        redaction.from_environment()  # a malformed OTEL_ZENML_ANALYTICS_REDACT fails here
        self._delivery = _delivery.acquire(self.settings)
        # A delivery shared with an earlier component keeps that one's settings (a
        # warning says so); show the settings that really apply.
        self.settings = self._delivery.settings
        self._shut_down = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"

    @property
    def delivery(self) -> _delivery.Delivery:
        """The delivery this component feeds (shared with others of the same destination)."""
        return self._delivery

    def _flush(self, timeout_millis: float) -> bool:
        return self._delivery.force_flush(timeout_millis / 1000.0)

    def _shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        _delivery.release(self._delivery)
