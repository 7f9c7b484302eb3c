"""Per-epoch metrics: one row per epoch, written as CSV (accuracies in %, time in seconds)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "time")


def write_csv(rows: Sequence[dict], path: str | os.PathLike, columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` (dicts) to ``path`` with a header, replacing the file atomically."""
    path = Path(path)
    columns = list(columns or (rows[0].keys() if rows else COLUMNS))
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def read_csv(path: str | os.PathLike) -> list[dict[str, float | str]]:
    """Rows of a CSV written by :func:`write_csv`; numeric cells become floats (``epoch`` an int)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: _number(k, v) for k, v in row.items()})
    return rows


def _number(key: str, text: str) -> float | int | str:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if key == "epoch" else value


def markdown_table(rows: Sequence[dict], columns: Sequence[str], floatfmt: str = ".2f") -> str:
    """A GitHub-markdown table of ``rows`` restricted to ``columns``."""
    def cell(v: object) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
