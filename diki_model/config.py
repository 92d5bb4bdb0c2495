"""Configuration of the DIKI method: where the residual branch goes and how it is gated."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from diki_model.calibration import GATE_NAMES
from diki_model.stats import SHRINKAGE_METHODS


@dataclass
class DikiConfig:
    # Residual key/value tokens per task and layer (the paper's l).
    prompt_length: int = 8
    # Blocks that get the residual branch; None = the first `default_layer_count` of the tower,
    # as the authors did (8 of 12 for ViT-B/16).
    vision_layers: tuple[int, ...] | None = None
    text_layers: tuple[int, ...] | None = None
    default_layer_count: int = 8
    # "residual" (DIKI) or "prefix" (prompts joined to the frozen keys in one softmax; a baseline).
    branch: str = "residual"
    # Gate calibration. "ratio": the likelihood ratio against the model's reference density, open
    # above the quantile of the task's own held-out ratios (the standardised gate when the model has
    # no reference). "standardized" holds across feature sizes; "paper" is sigmoid(S/512 - 1).
    gate: str = "ratio"
    gate_params: dict[str, float] = field(default_factory=dict)
    # Covariance estimator of the task Gaussians; "paper" = plain covariance + 1e-7 I.
    shrinkage: str = "ledoit_wolf"
    # Every k-th training image is held out to measure the task's own score distribution.
    holdout_every: int = 5
    # "sample": task and gate per image (batch-invariant). "batch": the authors' shortcut, one
    # task per batch by majority vote and the text gate = batch mean of the image gates.
    routing: str = "sample"
    # The text tower gets a per-sample gate through class-prompt features cached at this many
    # evenly spaced gate levels in [0, 1], linearly interpolated in between.
    text_gate_levels: int = 11
    # Below this gate an image is answered from the frozen pass alone and flagged out of
    # distribution: its gated pass would change nothing measurable.
    ood_threshold: float = 1e-3

    def __post_init__(self) -> None:
        if self.prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {self.prompt_length}")
        if self.gate not in GATE_NAMES:
            raise ValueError(f"unknown gate {self.gate!r}; choose one of {GATE_NAMES}")
        if self.shrinkage not in SHRINKAGE_METHODS:
            raise ValueError(f"unknown shrinkage {self.shrinkage!r}; choose one of {SHRINKAGE_METHODS}")
        if self.branch not in ("residual", "prefix"):
            raise ValueError(f"branch must be 'residual' or 'prefix', got {self.branch!r}")
        if self.routing not in ("sample", "batch"):
            raise ValueError(f"routing must be 'sample' or 'batch', got {self.routing!r}")
        if self.text_gate_levels < 2:
            raise ValueError("text_gate_levels must be >= 2 (levels 0 and 1 at least)")
        if self.holdout_every < 2:
            raise ValueError("holdout_every must be >= 2")
        for name in ("vision_layers", "text_layers"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(int(i) for i in value))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("vision_layers", "text_layers"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DikiConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
