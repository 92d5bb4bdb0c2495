"""The promotion policy (``services.promotion``) and the accuracy matrix it reads, as pure functions.

Figures are hand-computed from the matrices written out here, never from the code's own formulas.
"""

from __future__ import annotations

import pytest

from services.accuracy import AccuracyMatrix, EvalColumn
from services.promotion import decide_promotion
from services.settings import PromotionSettings


def matrix(rows: list[str], acc: list[list[float]], heldout: int = 0) -> AccuracyMatrix:
    tasks = rows[1:]
    n_task_cols = len(acc[0]) - heldout
    cols = [EvalColumn(n, "task", f"/d/{n}", f"fp-{n}") for n in (tasks + ["future"] * 9)[:n_task_cols]]
    cols += [EvalColumn(f"h{i}", "heldout", f"/h/{i}", f"fp-h{i}") for i in range(heldout)]
    return AccuracyMatrix(rows=rows, columns=cols, acc=acc)


def test_promotion_refuses_forgetting_and_lost_zero_shot_ability():
    promotion = PromotionSettings(max_task_drop=0.02, min_zero_shot_retention=0.9)
    prev = matrix(["zero-shot", "alpha"], [[25.0, 50.0], [90.0, 50.0]], heldout=1)
    kept = matrix(["zero-shot", "alpha", "beta"], [[25, 30, 50], [90, 30, 50], [88.5, 95, 48]], heldout=1)
    ok = decide_promotion(prev, kept, promotion)
    assert ok.ok and ok.checks["task_drops"] == {"alpha": 1.5} and ok.checks["zero_shot_retention"] == 0.96

    forgot = matrix(["zero-shot", "alpha", "beta"], [[25, 30, 50], [90, 30, 50], [85, 95, 48]], heldout=1)
    no = decide_promotion(prev, forgot, promotion)
    assert not no.ok and any("task 'alpha': accuracy 90.0% -> 85.0% (drop 5.0 points > 2.0" in r for r in no.reasons)

    lost = matrix(["zero-shot", "alpha", "beta"], [[25, 30, 50], [90, 30, 50], [90, 95, 40]], heldout=1)
    no = decide_promotion(prev, lost, promotion)
    assert not no.ok and any("zero-shot retention on held-out data 0.800 < 0.900" in r for r in no.reasons)

    # Without a production matrix the candidate's own previous step is the reference.
    assert not decide_promotion(None, forgot, promotion).ok
    first = decide_promotion(None, matrix(["zero-shot", "alpha"], [[25.0], [90.0]]), promotion)
    assert first.ok and any("not checked" in r for r in first.reasons)
    # A JSON matrix (as stored with a version) works the same.
    assert decide_promotion(prev.to_dict(), forgot.to_dict(), promotion).ok is False


def test_a_one_task_production_is_the_reference_even_when_the_candidates_previous_row_differs():
    """Production learned alpha to 90%; the candidate's own step-1 row says 70% (another run of it).

    Against production alpha drops 90 -> 75 = 15 points: refused. Against the candidate's previous
    row it would have gained 5 points, so a policy that ignored production would pass it.
    """
    promotion = PromotionSettings(max_task_drop=0.02, min_zero_shot_retention=0.0)
    production = matrix(["zero-shot", "alpha"], [[25.0], [90.0]])
    candidate = matrix(["zero-shot", "alpha", "beta"], [[25, 30], [70, 30], [75, 95]])
    decision = decide_promotion(production, candidate, promotion)
    assert not decision.ok
    assert decision.checks["task_drops"] == {"alpha": 15.0}
    assert any("vs production" in r or "90.0% -> 75.0%" in r for r in decision.reasons)
    # The same candidate judged on its own history gains 5 points on alpha and passes.
    alone = decide_promotion(None, candidate, promotion)
    assert alone.ok and alone.checks["task_drops"] == {"alpha": -5.0}


def test_a_drop_of_exactly_the_allowed_points_passes_and_a_hair_more_does_not():
    promotion = PromotionSettings(max_task_drop=0.02, min_zero_shot_retention=0.0)
    production = matrix(["zero-shot", "alpha"], [[25.0], [90.0]])
    at_limit = matrix(["zero-shot", "alpha", "beta"], [[25, 30], [90, 30], [88.0, 95]])
    over = matrix(["zero-shot", "alpha", "beta"], [[25, 30], [90, 30], [87.9, 95]])
    assert decide_promotion(production, at_limit, promotion).ok
    assert not decide_promotion(production, over, promotion).ok


def test_zero_shot_retention_compares_the_last_row_with_the_zero_shot_row_not_with_step_one():
    """Held-out accuracy: 80 zero-shot, 60 after step 1, 60 after step 2 -> retention 60/80 = 0.75."""
    m = matrix(["zero-shot", "alpha", "beta"], [[25, 30, 80.0], [90, 30, 60.0], [88, 95, 60.0]], heldout=1)
    assert m.zero_shot_retention() == pytest.approx(0.75)
    two_sets = matrix(["zero-shot", "alpha"], [[25, 80.0, 40.0], [90, 70.0, 20.0]], heldout=2)
    assert two_sets.zero_shot_retention() == pytest.approx(45.0 / 60.0)  # means over held-out sets
    assert matrix(["zero-shot", "alpha"], [[25.0], [90.0]]).zero_shot_retention() is None
    promotion = PromotionSettings(max_task_drop=1.0, min_zero_shot_retention=0.9)
    decision = decide_promotion(None, m, promotion)
    assert not decision.ok and any("0.750 < 0.900" in r for r in decision.reasons)


def test_stream_metrics_of_the_matrix_are_the_protocols():
    """Transfer, Average and Last of a 3-task stream, hand-computed from the task columns."""
    m = matrix(
        ["zero-shot", "a", "b", "c"],
        [[10, 20, 30, 50.0], [80, 25, 35, 49.0], [78, 90, 40, 48.0], [76, 88, 70, 47.0]],
        heldout=1,
    )
    metrics = m.stream_metrics()
    # Transfer: mean over j>=1 of the mean of rows i<j in column j: b: 25; c: (35+40)/2 = 37.5 -> 31.25
    assert metrics["transfer"] == pytest.approx(31.25)
    # Last: the last row over the task columns.
    assert metrics["last"] == pytest.approx((76 + 88 + 70) / 3)
    # Average: the mean over every row (after each step) and every task column.
    assert metrics["average"] == pytest.approx((80 + 25 + 35 + 78 + 90 + 40 + 76 + 88 + 70) / 9)
    assert matrix(["zero-shot"], [[10.0]]).stream_metrics() == {"transfer": None, "average": None, "last": None}


def test_a_matrix_round_trips_through_json_and_refuses_what_is_not_one():
    m = matrix(["zero-shot", "alpha"], [[25.0, 50.0], [90.0, 45.0]], heldout=1)
    back = AccuracyMatrix.from_json(m.to_json())
    assert back.rows == m.rows and back.acc == m.acc and back.columns == m.columns
    with pytest.raises(ValueError, match="not an accuracy matrix"):
        AccuracyMatrix.from_dict({"format": "something else"})
    with pytest.raises(ValueError, match="is not 2 x 2"):
        AccuracyMatrix(rows=["zero-shot", "a"], columns=m.columns, acc=[[1.0, 2.0]])
