"""evaluate(): accuracy, routing counts, mean gate and OOD rate over several batches, counted by hand."""

from collections import Counter

import pytest
import torch

from diki_model import evaluate
from tests.synthetic import COLOUR_CLASSES, fitted_model, quadrant_domain

TEMPLATE = "a {} square."


@pytest.fixture(scope="module")
def model():
    return fitted_model()


@pytest.fixture(scope="module")
def images():
    """40 images: 16 of task 1's domain, 16 of task 0's, 8 of noise (out of distribution)."""
    xb, _ = quadrant_domain(16, 3, -1.5, seed=77)
    xa, _ = quadrant_domain(16, 4, 1.0, seed=78)
    noise = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(79)) * 6 - 3
    return torch.cat([xb, xa, noise])


@pytest.fixture(scope="module")
def reference(model, images):
    """The per-image predictions in one batch (predictions are batch-invariant)."""
    return model.predict(images, labels=COLOUR_CLASSES, template=TEMPLATE, top_k=1)


@pytest.mark.parametrize("batch_size", [10, 7, 40, 64])
def test_accuracy_is_the_hand_count_over_all_batches(model, images, reference, batch_size):
    pred = reference.label_index
    # Only the first batch of 10 is labelled wrong: 30 of 40 correct whatever the batch size.
    labels = pred.clone()
    labels[:10] = (pred[:10] + 1) % 3
    res = evaluate(model, images, labels, COLOUR_CLASSES, TEMPLATE, batch_size=batch_size)
    assert res.count == 40
    assert res.accuracy == 75.0
    # A fixed mix of all three labels: the hand count of agreements.
    mix = torch.arange(40) % 3
    hand = sum(int(p) == int(y) for p, y in zip(pred.tolist(), mix.tolist(), strict=True))
    assert 0 < hand < 40
    res = evaluate(model, images, mix, COLOUR_CLASSES, TEMPLATE, batch_size=batch_size)
    assert res.accuracy == pytest.approx(100.0 * hand / 40, abs=1e-12)


@pytest.mark.parametrize("batch_size", [10, 7])
def test_routing_gates_and_ood_are_aggregated_over_all_images(model, images, reference, batch_size):
    res = evaluate(model, images, reference.label_index, COLOUR_CLASSES, TEMPLATE, batch_size=batch_size)
    assert res.accuracy == 100.0
    routed = Counter(reference.task_index.tolist())
    assert res.routed == dict(routed)
    assert routed[1] >= 16 and routed[0] >= 1, routed  # both tasks really are in the mix
    gates = reference.gate.double()
    assert res.mean_gate == pytest.approx(float(gates.sum()) / 40, rel=1e-5)
    n_ood = int(reference.ood.sum())
    assert 8 <= n_ood < 40
    assert res.ood_rate == n_ood / 40


def test_forced_task_and_gate(model, images, reference):
    labels = reference.label_index
    off = evaluate(model, images, labels, COLOUR_CLASSES, TEMPLATE, batch_size=16, task=1, gate=0.0)
    assert off.routed == {1: 40} and off.mean_gate == 0.0 and off.ood_rate == 1.0
    full = evaluate(model, images, labels, COLOUR_CLASSES, TEMPLATE, batch_size=16, task=0, gate=1.0)
    assert full.routed == {0: 40} and full.mean_gate == 1.0 and full.ood_rate == 0.0
    forced = model.predict(images, labels=COLOUR_CLASSES, template=TEMPLATE, task=0, gate=1.0, top_k=1)
    assert full.accuracy == pytest.approx(100.0 * int((forced.label_index == labels).sum()) / 40, abs=1e-12)


def test_label_count_mismatch_and_empty_set(model, images):
    with pytest.raises(ValueError, match="40 images but 39 labels"):
        evaluate(model, images, torch.zeros(39, dtype=torch.long), COLOUR_CLASSES, TEMPLATE)
    empty = evaluate(model, images[:0], torch.zeros(0, dtype=torch.long), COLOUR_CLASSES, TEMPLATE)
    assert (empty.accuracy, empty.count, empty.routed, empty.mean_gate, empty.ood_rate) == (0.0, 0, {}, 0.0, 0.0)
