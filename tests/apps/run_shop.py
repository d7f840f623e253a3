"""The application run under ``opentelemetry-instrument`` by the tests; no analytics code."""

import asyncio
import importlib
import sys

from sample_app import shop

print("place_order", shop.place_order("book", quantity=2))
print("decorated", shop.decorated(1), shop.decorated.__name__)
stacks = shop.Stacks()
print("register", stacks.register(shop.StackModel("prod")).name)
print("upgrade", stacks.upgrade("dev").flavor)
print("count", shop.Stacks.count())
print("validate", shop.Stacks.validate("x"))
print("deep", shop.Stacks.Inner().deep())
print("fetch", asyncio.run(shop.fetch(4)))
try:
    shop.fail_checkout("card declined")
except ValueError as exc:
    print("caught", type(exc).__name__, exc)

late = importlib.import_module("sample_app.late")
print("late", late.late_call())

if "--uninstrument" in sys.argv:
    from otel_zenml_analytics.instrumentation import ZenMLAnalyticsInstrumentor

    ZenMLAnalyticsInstrumentor().uninstrument()
    print("restored", shop.place_order.__module__, type(vars(shop.Stacks)["count"]).__name__,
          type(shop.place_order).__name__)
    shop.place_order("untracked")
