"""The gate calibrations against hand-computed values (sigmoid values from math.exp, not torch)."""

import math

import pytest
import torch

from diki_model import ConstantGate, PaperGate, StandardizedGate, make_gate


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def scores(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_hand_sigmoid_values():
    # The reference points used below, so a wrong helper cannot hide a wrong gate.
    assert sigmoid(0.0) == 0.5
    assert sigmoid(1.0) == pytest.approx(0.7310585786300049, rel=1e-15)
    assert sigmoid(-1.0) == pytest.approx(0.2689414213699951, rel=1e-15)
    assert sigmoid(2.0) == pytest.approx(0.8807970779778823, rel=1e-15)


def test_paper_gate_is_sigmoid_of_score_over_512_minus_one():
    gate = PaperGate()
    best = scores(512.0, 0.0, 1536.0, -512.0, 1024.0)
    task = torch.tensor([0, 1, 0, 1, 0])
    got = gate(best, task, torch.zeros(2, 2, dtype=torch.float64))
    # S / 512 - 1 = 0, -1, 2, -2, 1
    want = [0.5, 0.2689414213699951, 0.8807970779778823, 0.11920292202211755, 0.7310585786300049]
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert got.tolist() == pytest.approx(want, rel=1e-12)


def test_paper_gate_ignores_the_task_statistics():
    best, task = scores(256.0, 768.0), torch.tensor([1, 0])
    a = PaperGate()(best, task, torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
    b = PaperGate()(best, task, torch.tensor([[500.0, 9.0], [-3.0, 0.1]], dtype=torch.float64))
    assert torch.equal(a, b)
    assert a.tolist() == pytest.approx([sigmoid(-0.5), sigmoid(0.5)], rel=1e-12)


def test_paper_gate_scale_and_shift_are_parameters():
    gate = PaperGate(scale=100.0, shift=-0.5)
    got = gate(scores(50.0, -150.0, 0.0), torch.zeros(3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.float64))
    # 50/100 + 0.5 = 1, -150/100 + 0.5 = -1, 0 + 0.5
    assert got.tolist() == pytest.approx([sigmoid(1.0), sigmoid(-1.0), sigmoid(0.5)], rel=1e-12)
    assert PaperGate().scale == 512.0 and PaperGate().shift == 1.0 and PaperGate().name == "paper"


def test_standardized_gate_uses_each_samples_own_task_statistics():
    stats = torch.tensor([[100.0, 4.0], [-20.0, 0.5]], dtype=torch.float64)  # [mean, std] per task
    best = scores(96.0, -21.0, 100.0, -21.5, 104.0)
    task = torch.tensor([0, 1, 0, 1, 0])
    got = StandardizedGate()(best, task, stats)
    # (S - m_k) / s_k + 3 = -1 + 3, -2 + 3, 0 + 3, -3 + 3, 1 + 3
    want = [sigmoid(2.0), sigmoid(1.0), sigmoid(3.0), 0.5, sigmoid(4.0)]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    # The same scores routed to the other tasks get the other statistics.
    swapped = StandardizedGate()(best, 1 - task, stats)
    assert swapped.tolist() == pytest.approx([sigmoid(v) for v in (235.0, -27.25, 243.0, -27.375, 251.0)], rel=1e-12)


def test_standardized_gate_offset_and_minimum_std():
    stats = torch.tensor([[10.0, 0.0], [10.0, 0.2]], dtype=torch.float64)
    best, task = scores(10.001, 9.999, 10.2), torch.tensor([0, 0, 1])
    # std 0 is floored at min_std = 1e-3: z = +-1 + offset; std 0.2 is above it: z = 1 + offset.
    got = StandardizedGate(offset=0.0)(best, task, stats)
    assert got.tolist() == pytest.approx([sigmoid(1.0), sigmoid(-1.0), sigmoid(1.0)], rel=1e-9)
    got = StandardizedGate(offset=-1.0, min_std=0.5)(best, task, stats)
    # Both stds are below min_std = 0.5 now: z = (S - 10) / 0.5 - 1.
    assert got.tolist() == pytest.approx([sigmoid(0.002 - 1), sigmoid(-0.002 - 1), sigmoid(0.4 - 1)], rel=1e-9)
    default = StandardizedGate()
    assert (default.offset, default.min_std, default.name) == (3.0, 1e-3, "standardized")


def test_constant_gate_is_the_value_for_every_sample():
    best = scores(-1e6, 0.0, 3.0, 1e6)
    got = ConstantGate(0.25)(best, torch.tensor([0, 1, 2, 3]), torch.zeros(4, 2, dtype=torch.float64))
    assert got.dtype == torch.float64 and got.tolist() == [0.25] * 4
    assert ConstantGate()(best, torch.zeros(4, dtype=torch.long), torch.zeros(1, 2)).tolist() == [1.0] * 4
    assert ConstantGate().name == "constant"


def test_make_gate_builds_each_calibration_with_its_parameters():
    stats = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    task = torch.zeros(1, dtype=torch.long)
    paper = make_gate("paper", scale=256.0)
    assert isinstance(paper, PaperGate) and paper.scale == 256.0
    assert paper(scores(256.0), task, stats).tolist() == [0.5]
    standardized = make_gate("standardized", offset=0.0)
    assert isinstance(standardized, StandardizedGate) and standardized.offset == 0.0
    assert standardized(scores(1.0), task, stats).tolist() == pytest.approx([sigmoid(1.0)], rel=1e-12)
    constant = make_gate("constant", value=0.3)
    assert isinstance(constant, ConstantGate) and constant(scores(5.0), task, stats).tolist() == [0.3]
    assert make_gate("standardized") == StandardizedGate() and make_gate("paper") == PaperGate()
    assert make_gate("constant") == ConstantGate()
    with pytest.raises(
        ValueError,
        match=r"unknown gate calibration 'nope'; choose one of \('standardized', 'ratio', 'paper', 'constant'\)",
    ):
        make_gate("nope")
