"""The 'request' module: one batch post to the analytics server.

This module is based on the 'analytics-python' package created by Segment, as
ZenML's is. The destination comes from the same settings as the components
(``OTEL_ZENML_ANALYTICS_ENDPOINT``, ``OTEL_ZENML_ANALYTICS_FORMAT``, ...).
"""

from __future__ import annotations

import json
from typing import Any, List

import requests

from otel_zenml_analytics.destinations import post_messages
from otel_zenml_analytics.errors import AnalyticsAPIError
from otel_zenml_analytics.settings import Settings

_SNAKE_TO_CAMEL = {
    "message_id": "messageId",
    "user_id": "userId",
    "anonymous_id": "anonymousId",
    "group_id": "groupId",
    "previous_id": "previousId",
}


def post(batch: List[Any], timeout: int = 15) -> requests.Response:
    """Post a batch of messages to the ZenML analytics server.

    Args:
        batch: The messages to send (dicts, or JSON strings of them; camelCase or snake_case).
        timeout: Timeout in seconds.

    Returns:
        The response.

    Raises:
        AnalyticsAPIError: If the post request has failed.
    """
    settings = Settings.resolve(timeout=float(timeout))
    if settings.endpoint is None:
        raise AnalyticsAPIError(0, "no analytics endpoint configured: set "
                                   "OTEL_ZENML_ANALYTICS_ENDPOINT")
    messages = []
    for item in batch:
        message = json.loads(item) if isinstance(item, (str, bytes)) else dict(item)
        messages.append({_SNAKE_TO_CAMEL.get(k, k): v for k, v in message.items()})
    return post_messages(settings, messages, timeout=float(timeout))
