"""Continual-learning metrics of the MTIL protocol (ZSCL / DIKI) and their heatmap.

acc[t, i] is the accuracy (in %) on dataset i after training step t (t = 0 .. N-1 after learning
task t+1). Rows may include an extra leading row for the zero-shot model; the metrics below
follow the protocol exactly and use only the N rows after each training step:

- Transfer = mean over i >= 2 of mean_{t < i} acc[t, i]: zero-shot ability on not-yet-learned
  datasets (1-based i; with 0-based indices: columns 1..N-1, rows 0..i-1).
- Average = mean over i of mean over all t of acc[t, i].
- Last = mean over i of acc[N-1, i].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class StreamMetrics:
    transfer: float
    average: float
    last: float

    def as_dict(self) -> dict[str, float]:
        return {"transfer": self.transfer, "average": self.average, "last": self.last}


def _check_square(acc: np.ndarray) -> np.ndarray:
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square N x N (steps x datasets), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("accuracy matrix contains non-finite values")
    return a


def transfer(acc: np.ndarray | Sequence[Sequence[float]]) -> float:
    a = _check_square(np.asarray(acc))
    n = a.shape[0]
    if n < 2:
        return float("nan")
    return float(np.mean([a[:i, i].mean() for i in range(1, n)]))


def average(acc: np.ndarray | Sequence[Sequence[float]]) -> float:
    a = _check_square(np.asarray(acc))
    return float(a.mean(axis=0).mean())


def last(acc: np.ndarray | Sequence[Sequence[float]]) -> float:
    a = _check_square(np.asarray(acc))
    return float(a[-1].mean())


def stream_metrics(acc: np.ndarray | Sequence[Sequence[float]]) -> StreamMetrics:
    """Transfer / Average / Last of an N x N accuracy matrix (rows: steps, columns: datasets)."""
    return StreamMetrics(transfer(acc), average(acc), last(acc))


def plot_heatmap(
    acc: np.ndarray | Sequence[Sequence[float]],
    dataset_names: Sequence[str],
    path: str | Path,
    title: str = "accuracy after each step (%)",
    row_names: Sequence[str] | None = None,
) -> Path:
    """Write a heatmap PNG of an accuracy matrix (rows: steps, columns: datasets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != len(dataset_names):
        raise ValueError(f"matrix shape {a.shape} does not match {len(dataset_names)} dataset names")
    rows = list(row_names) if row_names is not None else [f"after {n}" for n in dataset_names[: a.shape[0]]]
    fig_w = 1.6 + 0.75 * a.shape[1]
    fig_h = 1.4 + 0.5 * a.shape[0]
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    im = ax.imshow(a, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(a.shape[1]), labels=list(dataset_names), rotation=40, ha="right")
    ax.set_yticks(range(a.shape[0]), labels=rows)
    for r in range(a.shape[0]):
        for c in range(a.shape[1]):
            ax.text(
                c, r, f"{a[r, c]:.1f}", ha="center", va="center", fontsize=8, color="white" if a[r, c] < 60 else "black"
            )
    ax.set_xlabel("evaluated on")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
