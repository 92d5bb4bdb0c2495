"""Did a task learn anything? Its branch against zero-shot and against a linear probe, on its validation split.

Three accuracies on the same held-out images, each a different question:

- **with its branch** (the task's residual K/V at gate 1): what DIKI learned;
- **zero-shot** (gate 0, the frozen backbone with the task's prompts): what the model knew before;
- **linear probe** (a multinomial logistic regression on the frozen image features, fitted on the
  training part): what the frozen features allow. A branch far below the probe can learn more
  (epochs, learning rate); a probe near chance says the backbone cannot see the task (more data
  will not help; another backbone may).

:func:`learned_verdict` turns the first two into a decision a chance-level task cannot pass: the
branch must beat chance by ``z_chance`` binomial standard errors and zero-shot by ``min_gain`` and by
``z_gain`` standard errors of the difference. With the defaults (3 and 2) a task whose labels carry
no signal passes with a probability of about one in a thousand (the chance test alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from diki_model.adapters import Route
from diki_model.model import DikiCLIP

__all__ = [
    "LearnedVerdict",
    "Learnability",
    "frozen_features",
    "learned_verdict",
    "linear_probe_accuracy",
    "task_counts",
]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def task_counts(model: DikiCLIP, task: int, batches: Batches, *, gate: float) -> torch.Tensor:
    """``[correct, total]`` (float64) of task ``task``'s classification at a fixed ``gate`` on both towers.

    ``gate=1`` is the task's branch (the true task, as in training); ``gate=0`` the frozen backbone.
    """
    tokens = model.tokenize(model.tasks[task].prompts())
    route = Route(task=task, gate=float(gate))
    counts = torch.zeros(2, dtype=torch.float64)
    txt = model.encode_text(tokens, route)
    for images, labels in batches:
        img = model.encode_image(images.to(model.device), route)
        pred = (img @ txt.T).argmax(dim=-1).cpu()
        counts[0] += (pred == labels).sum()
        counts[1] += labels.numel()
    return counts


@torch.no_grad()
def frozen_features(model: DikiCLIP, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised frozen image features ``(N, D)`` float32 and labels ``(N,)`` int64 of every batch."""
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for images, y in batches:
        feats.append(model.encode_image(images.to(model.device)).cpu())
        labels.append(y.to(torch.int64).cpu())
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float = 1e-3,
    steps: int = 200,
) -> float:
    """Validation accuracy (0-1) of a multinomial logistic regression fitted on ``train_x`` by L-BFGS.

    Features are standardised with the training part's mean and deviation; ``weight_decay`` is an L2
    penalty on the weights (mean loss + wd/2 * ||W||^2), fixed rather than tuned, since the probe is a
    reference figure, not a model that is served.
    """
    if len(train_y) == 0 or len(val_y) == 0:
        return float("nan")
    train_x, val_x = train_x.double(), val_x.double()
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(1e-6)
    xt, xv = (train_x - mean) / std, (val_x - mean) / std
    w = torch.zeros(xt.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, train_y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xv @ w + b).argmax(-1) == val_y).double().mean())


@dataclass
class Learnability:
    """The three validation accuracies of one task (fractions 0-1) and what they were measured on."""

    val_images: int
    num_classes: int
    branch_acc: float  # with the task's branch, gate 1
    zero_shot_acc: float  # the frozen backbone, gate 0
    probe_acc: float | None = None  # a linear probe of the frozen features (None: not measured)

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Learnability:
        return cls(**{k: data[k] for k in ("val_images", "num_classes", "branch_acc", "zero_shot_acc")},
                   probe_acc=data.get("probe_acc"))  # fmt: skip


@dataclass
class LearnedVerdict:
    ok: bool
    reasons: list[str]
    checks: dict[str, float] = field(default_factory=dict)


def learned_verdict(
    m: Learnability, *, min_gain: float = 0.02, z_gain: float = 2.0, z_chance: float = 3.0
) -> LearnedVerdict:
    """Whether the branch learned the task (see the module docstring for the rule and its defaults)."""
    n = max(m.val_images, 1)
    b, z, c = m.branch_acc, m.zero_shot_acc, m.chance
    se_gain = math.sqrt((b * (1 - b) + z * (1 - z)) / n)
    se_chance = math.sqrt(c * (1 - c) / n)
    need_gain = max(min_gain, z_gain * se_gain)
    need_acc = c + z_chance * se_chance
    checks = {"gain": b - z, "needed_gain": need_gain, "needed_accuracy": need_acc, "chance": c}
    reasons = [
        f"validation ({m.val_images} images, {m.num_classes} classes): {100 * b:.1f}% with its branch, "
        f"{100 * z:.1f}% zero-shot" + (f", {100 * m.probe_acc:.1f}% for a linear probe of the frozen features"
                                       if m.probe_acc is not None and not math.isnan(m.probe_acc) else "")
    ]  # fmt: skip
    ok = True
    if b < need_acc:
        ok = False
        reasons.append(
            f"accuracy {100 * b:.1f}% is not above chance ({100 * c:.1f}%): it needs >= {100 * need_acc:.1f}% "
            f"on {m.val_images} validation images"
        )
    if b - z < need_gain:
        ok = False
        reasons.append(
            f"gain over zero-shot {100 * (b - z):+.1f} points < {100 * need_gain:.1f} needed on {m.val_images} images"
        )
    if not ok:
        reasons.append(_advice(m))
    return LearnedVerdict(ok, reasons, checks)


def _advice(m: Learnability) -> str:
    if m.probe_acc is None or math.isnan(m.probe_acc):
        return "more validation images would make the check more sensitive"
    c = m.chance
    if m.probe_acc < c + 3 * math.sqrt(c * (1 - c) / max(m.val_images, 1)):
        return (
            "a linear probe of the frozen features is at chance too: the backbone cannot tell these classes "
            "apart (check the labels; another backbone may see the task; more data of the same kind will not help)"
        )
    return (
        f"a linear probe reaches {100 * m.probe_acc:.1f}%: the features allow more than the branch learned "
        "(try more epochs, another learning rate, or more images)"
    )
