"""The demo's tables read whole at 80 columns and when piped (rich then renders at 80): no name is cut."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from pipelines.demo import DEMO_HELDOUT, DEMO_TASKS, DemoState, ProbeSet, ProbeStats, matrix_table, render
from services.accuracy import AccuracyMatrix, EvalColumn


def printed(renderable: object, width: int | None) -> str:
    # A StringIO is not a terminal: the same path as `make demo | tee log` (width None: rich's default).
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def demo_state() -> tuple[DemoState, list[ProbeSet]]:
    probes = [ProbeSet(n, "task", [], []) for n in DEMO_TASKS] + [ProbeSet(n, "heldout", [], []) for n in DEMO_HELDOUT]
    state = DemoState(tasks=list(DEMO_TASKS), version=4)
    for i, name in enumerate(DEMO_TASKS):
        state.phase[name] = f"served (v{i + 1})"
        state.probes[name] = ProbeStats(sent=216, routed_right=180, correct=162, gates=[0.904] * 8, ood=0)
    for name in DEMO_HELDOUT:
        state.probes[name] = ProbeStats(sent=216, gates=[0.624] * 8, ood=162)
    return state, probes


def matrix() -> AccuracyMatrix:
    columns = [EvalColumn(n, "task", f"/data/{n}", "0" * 64, 100) for n in DEMO_TASKS]
    columns += [EvalColumn(n, "heldout", f"/data/{n}", "1" * 64, 100) for n in DEMO_HELDOUT]
    rows = ["zero-shot", *DEMO_TASKS]
    return AccuracyMatrix(rows=rows, columns=columns, acc=[[81.7] * len(columns) for _ in rows])


@pytest.mark.parametrize("width", [80, None])
def test_the_live_table_keeps_every_domain_and_state_whole(width: int | None) -> None:
    state, probes = demo_state()
    text = printed(render(state, probes), width)
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for name in (*DEMO_TASKS, *DEMO_HELDOUT):
        assert f" {name} " in text, (name, text)
    assert "served (v4)" in text and "distribution" in text and "itself" in text


@pytest.mark.parametrize("width", [80, None])
def test_the_accuracy_matrix_keeps_every_row_and_column_name(width: int | None) -> None:
    text = printed(matrix_table(matrix(), 4), width)
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    lines = text.splitlines()
    for name in ("zero-shot", *DEMO_TASKS):
        assert any(line.lstrip().startswith(name + " ") for line in lines), (name, text)
    # Column headers wrap after their hyphens, never lose letters.
    header = "".join(line for line in lines[:6])
    for piece in ("fashion-", "inverted", "clothing-", "colour", "(held-out)", "optdigits", "textures"):
        assert piece in header, (piece, text)
