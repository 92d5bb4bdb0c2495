"""The accuracy matrix of the MTIL protocol: plain data, kept as JSON with each version.

Row ``t`` is the model after learning its first ``t`` tasks (row 0 is the frozen backbone,
zero-shot); column ``i`` is the test split of a dataset: first every learned task's dataset in
learning order, then the held-out datasets (never trained on) that measure how much zero-shot
ability the model keeps. Accuracies are in percent.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diki_model import plot_heatmap
from diki_model import stream_metrics as _stream_metrics

__all__ = ["MATRIX_FORMAT", "ZERO_SHOT_ROW", "AccuracyMatrix", "EvalColumn"]

MATRIX_FORMAT = "diki-accuracy-matrix"
MATRIX_VERSION = 1
ZERO_SHOT_ROW = "zero-shot"


# --- the matrix --------------------------------------------------------------------------------


@dataclass
class EvalColumn:
    """One evaluated dataset: a learned task's or a held-out one's test split."""

    name: str
    kind: str  # "task" or "heldout"
    uri: str
    fingerprint: str
    count: int = 0  # test images evaluated

    def key(self) -> tuple[str, str]:
        return self.kind, self.fingerprint


@dataclass
class AccuracyMatrix:
    """Accuracies in % (rows: zero-shot then after each learned task; columns: datasets)."""

    rows: list[str]
    columns: list[EvalColumn]
    acc: list[list[float]]
    backbone_fingerprint: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.acc) != len(self.rows) or any(len(r) != len(self.columns) for r in self.acc):
            raise ValueError(f"accuracy matrix is not {len(self.rows)} x {len(self.columns)}")

    # -- views --
    @property
    def task_names(self) -> list[str]:
        return self.rows[1:]

    def task_columns(self) -> list[int]:
        return [i for i, c in enumerate(self.columns) if c.kind == "task"]

    def heldout_columns(self) -> list[int]:
        return [i for i, c in enumerate(self.columns) if c.kind == "heldout"]

    def column(self, kind: str, fingerprint: str) -> int | None:
        for i, c in enumerate(self.columns):
            if c.key() == (kind, fingerprint):
                return i
        return None

    def task_matrix(self) -> np.ndarray:
        """The N x N protocol matrix: rows after each step, columns the learned tasks' datasets."""
        cols = self.task_columns()
        return np.asarray([[self.acc[r][c] for c in cols] for r in range(1, len(self.rows))], dtype=np.float64)

    def stream_metrics(self) -> dict[str, float | None]:
        """Transfer / Average / Last (``None`` where undefined, e.g. Transfer after one task)."""
        if len(self.rows) < 2:
            return {"transfer": None, "average": None, "last": None}
        values = _stream_metrics(self.task_matrix()).as_dict()
        return {k: (None if math.isnan(v) else float(v)) for k, v in values.items()}

    def zero_shot_retention(self) -> float | None:
        """Mean held-out accuracy of the last row over that of the zero-shot row (None without held-out sets)."""
        cols = self.heldout_columns()
        if not cols or len(self.rows) < 2:
            return None
        base = float(np.mean([self.acc[0][c] for c in cols]))
        now = float(np.mean([self.acc[-1][c] for c in cols]))
        return 1.0 if base <= 0 else now / base

    def heatmap(self, path: str | Path) -> Path:
        names = [c.name if c.kind == "task" else f"{c.name} (held-out)" for c in self.columns]
        rows = [ZERO_SHOT_ROW] + [f"after {n}" for n in self.task_names]
        return plot_heatmap(np.asarray(self.acc), names, path, row_names=rows)

    # -- JSON --
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MATRIX_FORMAT,
            "format_version": MATRIX_VERSION,
            "rows": self.rows,
            "columns": [asdict(c) for c in self.columns],
            "acc": self.acc,
            "backbone_fingerprint": self.backbone_fingerprint,
            "metrics": self.stream_metrics(),
            "zero_shot_retention": self.zero_shot_retention(),
            "meta": self.meta,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "accuracy matrix") -> AccuracyMatrix:
        if data.get("format") != MATRIX_FORMAT:
            raise ValueError(f"{where}: not an accuracy matrix (format {data.get('format')!r})")
        try:
            return cls(
                rows=list(data["rows"]),
                columns=[EvalColumn(**c) for c in data["columns"]],
                acc=[[float(x) for x in row] for row in data["acc"]],
                backbone_fingerprint=str(data.get("backbone_fingerprint", "")),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: malformed accuracy matrix ({exc})") from exc

    @classmethod
    def from_json(cls, text: str, where: str = "accuracy matrix") -> AccuracyMatrix:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, where)
