"""The promotion policy: may a newly registered version replace production? Pure logic, no MLflow.

The learning step asks :func:`decide_promotion` after registering a version, records the decision
with the version, and then moves the aliases (``Registry.apply_promotion``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.accuracy import AccuracyMatrix
from services.settings import PromotionSettings

__all__ = ["PromotionDecision", "decide_promotion"]


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
    checks = {"task_drops": drops, "max_task_drop_points": allowed, "zero_shot_retention": retention}
    return PromotionDecision(ok=not failed, reasons=reasons, checks=checks)
