"""Gate calibrations: map a sample's winning task log-density to a gate w in [0, 1].

The gate multiplies the residual branch in every prompted layer of both towers, so it decides
how much of a task's learned knowledge an image receives. Images from a learned distribution
should get w ~ 1, images from anywhere else w ~ 0 (they then see the untouched pre-trained model).

- ``StandardizedGate`` (default): w = sigmoid((S - m_k) / s_k + offset), where m_k, s_k are the
  mean and std of task k's own log-densities on held-out training images. Independent of the
  feature dimension and of the overall scale of the scores, so it holds across backbones.
- ``PaperGate``: the authors' constant mapping w = sigmoid(S / 512 - 1). Tied to the scale of
  512-d ViT-B/16 features; kept for paper comparisons.
- ``LikelihoodRatioGate``: scores each image by its log-likelihood ratio, task vs a reference
  density of the images the model must not disturb (``diki_model.reference``), and opens at the
  ``quantile`` of the task's own held-out ratios: w = 1 above it, 0 below (``width`` > 0 gives a
  steep sigmoid instead, ``width`` held-out standard deviations wide). Needs a reference; a model
  without one uses the standardised gate.
- ``ConstantGate``: w = value for every sample (1.0 = "IKI without calibration").

Each calibration reads per-task statistics (T, 2) that the model computes for it: [mean, std] of
held-out log-densities for the standardised gate, [threshold, std] of held-out log-likelihood
ratios for the ratio gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

GATE_NAMES = ("standardized", "ratio", "paper", "constant")


class GateCalibration(Protocol):
    name: str

    def __call__(self, best_score: torch.Tensor, task_index: torch.Tensor, score_stats: torch.Tensor) -> torch.Tensor:
        """best_score (B,) float64, task_index (B,) long, score_stats (T, 2) [mean, std] -> gate (B,)."""
        ...


@dataclass(frozen=True)
class StandardizedGate:
    offset: float = 3.0
    min_std: float = 1e-3
    name: str = "standardized"

    def __call__(self, best_score: torch.Tensor, task_index: torch.Tensor, score_stats: torch.Tensor) -> torch.Tensor:
        mean = score_stats[task_index, 0]
        std = score_stats[task_index, 1].clamp_min(self.min_std)
        return torch.sigmoid((best_score - mean) / std + self.offset)


@dataclass(frozen=True)
class LikelihoodRatioGate:
    quantile: float = 0.05
    width: float = 0.0
    min_std: float = 1e-3
    name: str = "ratio"

    def __post_init__(self) -> None:
        if not 0.0 <= self.quantile < 1.0:
            raise ValueError(f"ratio gate quantile must be in [0, 1), got {self.quantile}")
        if self.width < 0:
            raise ValueError(f"ratio gate width must be >= 0, got {self.width}")

    def __call__(self, best_score: torch.Tensor, task_index: torch.Tensor, score_stats: torch.Tensor) -> torch.Tensor:
        threshold = score_stats[task_index, 0]
        if self.width == 0:
            return (best_score >= threshold).to(torch.float64)
        std = score_stats[task_index, 1].clamp_min(self.min_std)
        return torch.sigmoid((best_score - threshold) / (self.width * std))


@dataclass(frozen=True)
class PaperGate:
    scale: float = 512.0
    shift: float = 1.0
    name: str = "paper"

    def __call__(self, best_score: torch.Tensor, task_index: torch.Tensor, score_stats: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(best_score / self.scale - self.shift)


@dataclass(frozen=True)
class ConstantGate:
    value: float = 1.0
    name: str = "constant"

    def __call__(self, best_score: torch.Tensor, task_index: torch.Tensor, score_stats: torch.Tensor) -> torch.Tensor:
        return torch.full_like(best_score, self.value)


def make_gate(name: str, **kwargs: float) -> GateCalibration:
    """Build a calibration by name (one of ``GATE_NAMES``)."""
    if name == "standardized":
        return StandardizedGate(**kwargs)
    if name == "ratio":
        return LikelihoodRatioGate(**kwargs)
    if name == "paper":
        return PaperGate(**kwargs)
    if name == "constant":
        return ConstantGate(**kwargs)
    raise ValueError(f"unknown gate calibration {name!r}; choose one of {GATE_NAMES}")
