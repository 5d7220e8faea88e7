"""What every example writes: plain-text and Markdown tables, CSV files, PNG figures, and the run's
provenance."""

from __future__ import annotations

import contextlib
import csv
import platform
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """`rows` under `columns`, left-aligned in columns as wide as their widest cell."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = [columns, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [columns, ["---"] * len(columns), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)


@contextlib.contextmanager
def figure_file(path: Path, rows: int, columns: int, size: tuple[float, float]) -> Iterator[np.ndarray]:
    """A `rows` x `columns` grid of matplotlib axes (always 2-D, even for one row or column) on a
    figure of `size` inches, saved to `path` as a PNG when the block finishes without an error.
    The figure is closed either way, so a long run does not pile up open figures."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; chosen before pyplot loads
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
    try:
        yield axes
        figure.tight_layout()
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)


def commit() -> str:
    """The checkout's commit (with -dirty when it has changes), or "unknown" outside git."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return "unknown"
    return described.stdout.strip() or "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads ({platform.machine()})"


def provenance(device: torch.device) -> dict[str, str]:
    """The settings lines every example's Markdown starts with: commit, versions, device."""
    return {
        "commit": commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device_name(device),
    }
