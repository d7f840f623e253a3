"""The function the instrumented-call benchmark tracks (an importable module)."""


def work(x: int = 1) -> int:
    """A small piece of work: the bare call the others are compared with."""
    return x + 1
