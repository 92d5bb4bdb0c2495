"""The promotion policy: may a newly registered version replace production? Pure logic, no MLflow.

The learning step asks :func:`decide_promotion` after registering a version, records the decision
with the version, and then moves the aliases (``Registry.apply_promotion``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diki_model import Learnability, learned_verdict
from services.accuracy import AccuracyMatrix
from services.settings import PromotionSettings

__all__ = ["PromotionDecision", "decide_learned", "decide_promotion"]


@dataclass
class PromotionDecision:
    """The promotion decision: ``ok`` and why (reasons are kept even when it passes)."""

    ok: bool
    reasons: list[str]
    checks: dict[str, Any] = field(default_factory=dict)


def decide_promotion(
    prev_matrix: AccuracyMatrix | dict[str, Any] | None,
    new_matrix: AccuracyMatrix | dict[str, Any],
    promotion: PromotionSettings,
) -> PromotionDecision:
    """Decide whether a candidate may replace production.

    - Backward: no task the production model knew (``prev_matrix``'s learned tasks; without one,
      the candidate's own previous step) may lose more than ``promotion.max_task_drop`` of accuracy
      (absolute, as a fraction: 0.02 = 2 points).
    - Forward: on the held-out datasets the candidate must keep at least
      ``promotion.min_zero_shot_retention`` of the frozen backbone's zero-shot accuracy (mean over
      held-out datasets). Without held-out datasets this is not checked, and the reasons say so.
    - Its own: with ``promotion.require_new_task_gain`` the task the candidate added must beat
      zero-shot on its own test split (the last row against the zero-shot row, its column).
    """
    new = new_matrix if isinstance(new_matrix, AccuracyMatrix) else AccuracyMatrix.from_dict(new_matrix)
    prev = prev_matrix if isinstance(prev_matrix, AccuracyMatrix | None) else AccuracyMatrix.from_dict(prev_matrix)
    reasons: list[str] = []
    failed = False
    allowed = promotion.max_task_drop * 100.0
    drops: dict[str, float] = {}
    last = new.acc[-1]
    if prev is not None and len(prev.rows) > 1:
        reference = [(prev.columns[c], prev.acc[-1][c]) for c in prev.task_columns()]
        against = "production"
    elif len(new.rows) > 2:
        reference = [(new.columns[c], new.acc[-2][c]) for c in new.task_columns()[: len(new.rows) - 2]]
        against = "the previous step"
    else:
        reference, against = [], ""
    for col, before in reference:
        j = new.column(col.kind, col.fingerprint)
        if j is None:
            failed = True
            reasons.append(f"task {col.name!r} of {against} is missing from the candidate's evaluation")
            continue
        drop = before - last[j]
        drops[col.name] = drop
        if drop > allowed + 1e-9:
            failed = True
            reasons.append(
                f"task {col.name!r}: accuracy {before:.1f}% -> {last[j]:.1f}% "
                f"(drop {drop:.1f} points > {allowed:.1f} allowed)"
            )
    if reference and not any(r.startswith("task ") for r in reasons):
        worst = max(drops.values()) if drops else 0.0
        reasons.append(f"earlier tasks kept: largest drop {worst:.1f} points vs {against} (<= {allowed:.1f} allowed)")
    new_gain = None
    task_cols = new.task_columns()
    if len(new.rows) >= 2 and len(task_cols) >= len(new.rows) - 1:
        j = task_cols[len(new.rows) - 2]
        name, zero_shot, now = new.columns[j].name, new.acc[0][j], last[j]
        new_gain = now - zero_shot
        if promotion.require_new_task_gain and new_gain <= 1e-9:
            failed = True
            reasons.append(
                f"new task {name!r}: test accuracy {now:.1f}% does not beat its zero-shot accuracy {zero_shot:.1f}%"
            )
        else:
            reasons.append(f"new task {name!r}: test accuracy {zero_shot:.1f}% zero-shot -> {now:.1f}%")
    retention = new.zero_shot_retention()
    if retention is None:
        reasons.append("zero-shot retention not checked: no held-out dataset was evaluated")
    elif retention + 1e-9 < promotion.min_zero_shot_retention:
        failed = True
        reasons.append(
            f"zero-shot retention on held-out data {retention:.3f} < {promotion.min_zero_shot_retention:.3f} required"
        )
    else:
        reasons.append(
            f"zero-shot retention on held-out data {retention:.3f} >= {promotion.min_zero_shot_retention:.3f}"
        )
    checks = {
        "task_drops": drops,
        "max_task_drop_points": allowed,
        "zero_shot_retention": retention,
        "new_task_gain_points": new_gain,
    }
    return PromotionDecision(ok=not failed, reasons=reasons, checks=checks)


def decide_learned(
    learnability: Learnability | dict[str, Any] | None, promotion: PromotionSettings
) -> PromotionDecision:
    """Did the task learn enough to join a bundle? (``diki_model.learned_verdict`` with the settings' thresholds.)

    Without a measurement (no validation split) the task is let through, and the reasons say so.
    """
    if not promotion.require_learned:
        return PromotionDecision(True, ["learning check off (promotion.require_learned: false)"])
    if learnability is None:
        return PromotionDecision(True, ["learning not checked: the job measured no validation split"])
    m = learnability if isinstance(learnability, Learnability) else Learnability.from_dict(learnability)
    verdict = learned_verdict(
        m,
        min_gain=promotion.min_learned_gain,
        z_gain=promotion.learned_z_gain,
        z_chance=promotion.learned_z_chance,
    )
    return PromotionDecision(verdict.ok, verdict.reasons, {**verdict.checks, **m.to_dict()})
