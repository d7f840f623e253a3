"""The API error of the seed (``zenml.analytics.utils.AnalyticsAPIError``), defined once."""

from __future__ import annotations

from typing import Optional


class AnalyticsAPIError(Exception):
    """Custom exception class for API-related errors."""

    def __init__(self, status: int, message: str, retry_after: Optional[float] = None) -> None:
        self.status = status
        self.message = message
        self.retry_after = retry_after
        """Seconds the server asked to wait (``Retry-After``), when it said."""
        super().__init__(status, message)

    def __str__(self) -> str:
        return f"[ZenML Analytics] {self.status}: {self.message}"
