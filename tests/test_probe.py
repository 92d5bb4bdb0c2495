"""Did a task learn? The verdict's rule with hand-computed thresholds, the linear probe, the counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diki_model import (
    Learnability,
    create_diki_model,
    frozen_features,
    learned_verdict,
    linear_probe_accuracy,
    task_counts,
    tensor_batches,
)
from tests.synthetic import quadrant_domain
from tests.test_model import CLASSES_A, two_task_model


def test_the_verdict_needs_a_gain_over_zero_shot_and_over_chance_with_hand_computed_thresholds():
    # 100 images, 4 classes: chance 0.25, its binomial s.e. sqrt(.25*.75/100) = 0.0433 -> needs >= 0.380.
    # Gain s.e. at b=0.6, z=0.3: sqrt((.24 + .21) / 100) = 0.0671 -> needs >= 0.134.
    ok = learned_verdict(Learnability(100, 4, branch_acc=0.6, zero_shot_acc=0.3))
    assert ok.ok
    assert ok.checks["needed_accuracy"] == pytest.approx(0.25 + 3 * math.sqrt(0.25 * 0.75 / 100))
    assert ok.checks["needed_gain"] == pytest.approx(2 * math.sqrt((0.6 * 0.4 + 0.3 * 0.7) / 100))
    # Above chance but not enough over zero-shot (gain 0.10 < 0.134).
    weak = learned_verdict(Learnability(100, 4, branch_acc=0.6, zero_shot_acc=0.5))
    assert not weak.ok and any("gain over zero-shot +10.0 points" in r for r in weak.reasons)
    # A big gain from a zero-shot below chance, still at chance: refused by the chance test alone.
    low = learned_verdict(Learnability(100, 4, branch_acc=0.33, zero_shot_acc=0.05))
    assert not low.ok and any("is not above chance (25.0%)" in r for r in low.reasons)
    # Huge validation sets: the fixed margin (2 points) is what binds.
    tiny_gain = learned_verdict(Learnability(1_000_000, 4, branch_acc=0.815, zero_shot_acc=0.8))
    assert not tiny_gain.ok and tiny_gain.checks["needed_gain"] == pytest.approx(0.02)
    assert learned_verdict(Learnability(1_000_000, 4, branch_acc=0.825, zero_shot_acc=0.8)).ok


def test_a_chance_level_task_almost_never_passes():
    """Simulated shuffled-label tasks: branch and zero-shot both at chance; the rule lets < 0.5% through."""
    rng = np.random.default_rng(0)
    passed = 0
    trials = 4000
    for _ in range(trials):
        k = int(rng.integers(2, 11))
        n = int(rng.integers(20, 400))
        b = rng.binomial(n, 1 / k) / n
        z = rng.binomial(n, 1 / k) / n
        passed += learned_verdict(Learnability(n, k, branch_acc=b, zero_shot_acc=z)).ok
    assert passed / trials < 0.005


def test_the_advice_tells_a_blind_backbone_from_an_undertrained_branch():
    blind = learned_verdict(Learnability(100, 4, branch_acc=0.27, zero_shot_acc=0.25, probe_acc=0.26))
    assert "the backbone cannot tell these classes apart" in blind.reasons[-1]
    undertrained = learned_verdict(Learnability(100, 4, branch_acc=0.27, zero_shot_acc=0.25, probe_acc=0.9))
    assert "a linear probe reaches 90.0%" in undertrained.reasons[-1]


def test_the_linear_probe_separates_separable_features_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 3
    y = torch.randint(0, 3, (300,), generator=g)
    x = centres[y] + torch.randn(300, 16, generator=g)
    assert linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:], 3) > 0.95
    shuffled = y[torch.randperm(300, generator=g)]
    assert linear_probe_accuracy(x[:200], shuffled[:200], x[200:], shuffled[200:], 3) < 0.55
    assert math.isnan(linear_probe_accuracy(x[:0], y[:0], x, y, 3))


def test_a_new_task_branch_is_zero_initialised_so_gate_1_counts_equal_zero_shot():
    model = create_diki_model("diki-test-tiny", seed=0)
    task = model.add_task("q", CLASSES_A, "a photo of a {}.", seed=0)
    x, y = quadrant_domain(70, 4, 1.0, seed=3)
    batches = tensor_batches(x, y, 32, shuffle=False)
    one, zero = task_counts(model, task, batches(0), gate=1.0), task_counts(model, task, batches(0), gate=0.0)
    assert one.tolist() == zero.tolist() and one[1] == 70


def test_counts_at_each_gate_match_a_hand_count():
    model = two_task_model()
    x, y = quadrant_domain(50, 4, 1.0, seed=5)
    counts = task_counts(model, 0, tensor_batches(x, y, 16, shuffle=False)(0), gate=1.0)
    assert counts[1] == 50
    # By hand: both towers at gate 1 for task 0, then argmax of the cosine logits.
    from diki_model import Route

    route = Route(task=0, gate=1.0)
    txt = model.encode_text(model.tokenize(model.tasks[0].prompts()), route)
    pred = (model.encode_image(x, route) @ txt.T).argmax(-1)
    assert counts[0] == int((pred == y).sum())
    zero = task_counts(model, 0, tensor_batches(x, y, 16, shuffle=False)(0), gate=0.0)
    frozen_txt = model.encode_text(model.tokenize(model.tasks[0].prompts()))
    frozen_pred = (model.encode_image(x) @ frozen_txt.T).argmax(-1)
    assert zero[0] == int((frozen_pred == y).sum())
    # The randomised branch moves the features the counts are computed from.
    assert (model.encode_image(x, route) - model.encode_image(x)).abs().max() > 1e-3


def test_frozen_features_are_the_untouched_backbones_normalised_features():
    model = two_task_model()
    x, y = quadrant_domain(20, 4, 1.0, seed=6)
    feats, labels = frozen_features(model, tensor_batches(x, y, 8, shuffle=False)(0))
    assert feats.shape[0] == 20 and labels.tolist() == y.tolist()
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(20))
    torch.testing.assert_close(feats, model.encode_image(x))
