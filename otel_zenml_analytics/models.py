"""Helper models for ZenML analytics."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List


class AnalyticsTrackedModelMixin:
    """Mixin for models that are tracked through analytics events.

    Classes that have information tracked in analytics events can inherit from
    this mixin and list attribute names in ``ANALYTICS_FIELDS``. ``track_decorator``
    detects arguments and return values that inherit from it and includes those
    attributes as tracking metadata.

    It is a plain class so pydantic stays optional; on a pydantic model, list
    both bases and annotate the field as pydantic requires::

        class Stack(AnalyticsTrackedModelMixin, BaseModel):
            ANALYTICS_FIELDS: ClassVar[List[str]] = ["flavor"]
    """

    ANALYTICS_FIELDS: ClassVar[List[str]] = []

    def get_analytics_metadata(self) -> Dict[str, Any]:
        """Get the analytics metadata for the model.

        Returns:
            Dict of analytics metadata.
        """
        return {name: getattr(self, name, None) for name in self.ANALYTICS_FIELDS}
