"""The README quotes the latest figures of ``make bench`` and ``make reliability``.

Both commands write their file (``bench/results.md``, ``bench/reliability.md``) and put
the same figures into the README between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``, so the README cannot go on showing numbers a newer run replaced;
``tests/test_readme.py`` checks that the two agree.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def block(name: str, results: str) -> str:
    """What the README shows of a results file: its body below the title (for the bench,
    with the chart's path made relative to the README), or its table (reliability)."""
    lines = results.strip().splitlines()
    if name == "reliability":
        return "\n".join(line for line in lines if line.startswith("|"))
    body = lines[1:] if lines and lines[0].startswith("# ") else lines
    return "\n".join(body).strip().replace("](results.png)", "](bench/results.png)")


def quoted(name: str, readme: Path = README) -> str:
    """The block currently between the markers ``name`` in the README."""
    text = readme.read_text(encoding="utf-8")
    start, end = _markers(name)
    return text[text.index(start) + len(start):text.index(end)].strip()


def splice(name: str, results: str, readme: Path = README) -> None:
    """Replace the README's block ``name`` with the figures of ``results``."""
    text = readme.read_text(encoding="utf-8")
    start, end = _markers(name)
    head, rest = text[:text.index(start) + len(start)], text[text.index(end):]
    readme.write_text(f"{head}\n{block(name, results)}\n{rest}", encoding="utf-8")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"
