"""Imported only after instrumentation: wrapped by the post-import hook."""


def late_call() -> str:
    return "late"
