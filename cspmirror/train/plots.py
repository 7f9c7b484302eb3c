"""PNG figures for people to look at: training curves (the paper's Fig. 5) and ablation bars.

Uses matplotlib's object API with the Agg canvas, so no global backend or pyplot state is touched.
matplotlib is optional (the ``plot`` extra): without it, training and ablations write no PNG and say so
once (:func:`note_no_matplotlib`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

NO_MATPLOTLIB = ("matplotlib is not installed, so no PNG plots are written "
                 "(install the plot extra: pip install 'cspmirror[plot]')")
_noted = False


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (the plots need it; it is the optional ``plot`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def note_no_matplotlib() -> None:
    """Print :data:`NO_MATPLOTLIB`, once per process."""
    global _noted
    if not _noted:
        _noted = True
        print(NO_MATPLOTLIB)


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_history(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Training and validation accuracy (left) and loss (right) per epoch, as in the paper's Fig. 5."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = _figure(10, 4, ncols=2)
    epochs = [r["epoch"] for r in rows]
    for ax, key, label in ((ax_acc, "acc", "accuracy (%)"), (ax_loss, "loss", "loss")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", label=f"training {label.split()[0]}")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "s-", label=f"validation {label.split()[0]}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_acc.set_title("accuracy over epochs")
    ax_loss.set_title("loss over epochs")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_bars(labels: Sequence[str], values: Sequence[float], path: str | os.PathLike, xlabel: str,
              title: str = "") -> Path:
    """Horizontal bars, one per label, annotated with their value."""
    fig, (ax,) = _figure(8, 1.2 + 0.45 * len(labels))
    positions = list(range(len(labels)))[::-1]
    bars = ax.barh(positions, values, color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", padding=3)
    ax.set_yticks(positions, labels)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max([*values, 1e-9]) * 1.15)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=110)
    return Path(path)
