"""The PNG next to ``bench/results.md``: one panel per scenario, with its target.

matplotlib with the Agg backend (no display needed). Bars of this package are blue,
the peer's and the references' grey; the dashed line is the issue's target, and the
panel title says whether it is met.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

OURS_COLOUR = "#1f77b4"
OTHER_COLOUR = "#9e9e9e"


@dataclass
class Panel:
    """One scenario: labelled bars, and the target as a value on the same axis."""

    title: str
    unit: str
    bars: List[Tuple[str, float, bool]] = field(default_factory=list)
    """(label, value, is ours)."""
    target: Optional[float] = None
    target_label: str = ""
    met: Optional[bool] = None


def render(panels: List[Panel], path: Path, subtitle: str) -> None:
    """Draw ``panels`` side by side into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        labels = [label for label, _, _ in panel.bars]
        values = [value for _, value, _ in panel.bars]
        colours = [OURS_COLOUR if ours else OTHER_COLOUR for _, _, ours in panel.bars]
        positions = range(len(values))
        bars = ax.bar(positions, values, color=colours)
        ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=8, padding=2)
        ax.set_xticks(list(positions), labels, fontsize=8, rotation=15, ha="right")
        ax.set_ylabel(panel.unit, fontsize=9)
        if panel.target is not None:
            ax.axhline(panel.target, color="#d62728", linestyle="--", linewidth=1.2,
                       label=panel.target_label)
            ax.legend(fontsize=8, loc="upper right")
        top = max([*values, panel.target or 0.0, 1e-9])
        ax.set_ylim(0, top * 1.25)
        verdict = "" if panel.met is None else (" — target met" if panel.met
                                                else " — target missed")
        ax.set_title(panel.title + verdict, fontsize=10)
    fig.suptitle(subtitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"
