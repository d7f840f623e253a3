"""Every kind of target the instrumentor must handle."""

from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, List

from otel_zenml_analytics.models import AnalyticsTrackedModelMixin


class StackModel(AnalyticsTrackedModelMixin):
    ANALYTICS_FIELDS: ClassVar[List[str]] = ["name", "flavor"]

    def __init__(self, name: str, flavor: str = "local") -> None:
        self.name = name
        self.flavor = flavor


def place_order(item: str, quantity: int = 1) -> str:
    return f"{quantity} x {item}"


def logged(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def inner(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return inner


@logged
def decorated(x: int) -> int:
    return x + 1


def fail_checkout(reason: str) -> None:
    raise ValueError(reason)


async def fetch(x: int) -> int:
    return x * 10


class Stacks:
    def register(self, stack: StackModel) -> StackModel:
        return stack

    def upgrade(self, name: str) -> StackModel:
        return StackModel(name, flavor="upgraded")

    @classmethod
    def count(cls) -> int:
        return 3

    @staticmethod
    def validate(name: str) -> bool:
        return bool(name)

    class Inner:
        def deep(self) -> str:
            return "deep"
