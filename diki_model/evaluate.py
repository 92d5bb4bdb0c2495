"""Evaluation: accuracy of a model on a labelled set, in the set's own label space (MTIL)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diki_model.model import DikiCLIP


@dataclass
class EvalResult:
    accuracy: float  # in %
    count: int
    routed: dict[int, int]  # task index (-1 = none) -> number of images routed there
    mean_gate: float
    ood_rate: float


@torch.no_grad()
def evaluate(
    model: DikiCLIP,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    template: str,
    batch_size: int = 256,
    task: int | None = None,
    gate: float | None = None,
    frozen_features: torch.Tensor | None = None,
) -> EvalResult:
    """Top-1 accuracy with the set's own class names; routing as in production unless forced.

    ``task``/``gate`` force the adapter and gate (``task=i, gate=1`` is the true-task upper
    bound; ``gate=0`` the frozen zero-shot model). ``frozen_features`` (N, D), the images' frozen
    features computed once (they never change for a backbone), skips the frozen pass: only the
    gated pass runs.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if frozen_features is not None and frozen_features.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {frozen_features.shape[0]} frozen feature rows")
    correct, routed, gates, ood = 0, {}, [], 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size]
        f = None if frozen_features is None else frozen_features[start : start + batch_size]
        p = model.predict(x, labels=list(classes), template=template, task=task, gate=gate, top_k=1, frozen_features=f)
        correct += int((p.label_index == y).sum())
        for t in p.task_index.tolist():
            routed[t] = routed.get(t, 0) + 1
        gates.append(p.gate)
        ood += int(p.ood.sum())
    n = int(images.shape[0])
    g = torch.cat(gates) if gates else torch.zeros(0)
    return EvalResult(
        accuracy=100.0 * correct / max(n, 1),
        count=n,
        routed=routed,
        mean_gate=float(g.mean()) if g.numel() else 0.0,
        ood_rate=ood / max(n, 1),
    )
