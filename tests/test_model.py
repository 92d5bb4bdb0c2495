import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diki_model import (
    ArtifactError,
    DikiConfig,
    Gaussian,
    PaperGate,
    Route,
    TrainConfig,
    create_diki_model,
    learn_task,
    load_task,
    save_task,
)
from diki_model.train import TaskStatistics
from tests.synthetic import fitted_model, quadrant_domain

CLASSES_A = ["north west", "north east", "south west", "south east"]
CLASSES_B = ["red", "green", "blue"]


def two_task_model(config: DikiConfig | None = None):
    model = create_diki_model("diki-test-tiny", seed=0, config=config)
    xa, ya = quadrant_domain(120, 4, 1.0, seed=0)
    xb, yb = quadrant_domain(120, 3, -1.5, seed=1)
    cfg = TrainConfig(epochs=2, batch_size=32, seed=0)
    learn_task(model, "quadrants", CLASSES_A, xa, ya, cfg=cfg, progress=False)
    learn_task(model, "colours", CLASSES_B, xb, yb, template="a {} square.", cfg=cfg, progress=False)
    # Give the adapters visible effect so gating is observable on a random backbone.
    with torch.no_grad():
        for _, _, layer in model.adapter_layers():
            for i, v in enumerate(layer.values):
                v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(10 + i)))
    model.invalidate_caches()
    return model


@pytest.fixture(scope="module")
def model():
    # The same two tasks, statistics and V as two_task_model, without the training (routing and
    # gating do not depend on it; the training tests below train their own).
    return fitted_model()


def probe_images():
    xa, _ = quadrant_domain(6, 4, 1.0, seed=50)
    xb, _ = quadrant_domain(6, 3, -1.5, seed=51)
    noise = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(52)) * 6 - 3
    return xa, xb, noise


def test_routes_each_learned_domain_to_its_task_and_gates_the_unknown_off(model):
    xa, xb, noise = probe_images()
    p = model.predict(torch.cat([xa, xb, noise]))
    assert p.task_index[:6].tolist() == [0] * 6
    assert p.task_index[6:12].tolist() == [1] * 6
    assert (p.gate[:12] > 0.5).all()
    assert (p.gate[12:] < 1e-3).all() and p.ood[12:].all() and not p.ood[:12].any()
    assert all(lbl in CLASSES_A for lbl in p.labels[:6]) and all(lbl in CLASSES_B for lbl in p.labels[6:12])


def test_predictions_are_batch_invariant(model):
    xa, xb, noise = probe_images()
    batch = torch.cat([xa, xb, noise])
    together = model.predict(batch)
    for order in (torch.arange(16).flip(0), torch.randperm(16, generator=torch.Generator().manual_seed(3))):
        shuffled = model.predict(batch[order])
        assert [together.labels[i] for i in order.tolist()] == shuffled.labels
        torch.testing.assert_close(together.gate[order], shuffled.gate, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.confidence[order], shuffled.confidence, rtol=1e-4, atol=1e-5)
    # Every image alone. Scores are float32: whitening W x - b cancels terms much larger than the
    # log-density, so an image's score moves by up to ~2e-4 nats between batch shapes (measured
    # 1.5e-4 on scores of ~130, task std 2.9); through sigmoid((S - m) / s + 3) that moves a gate g
    # by g (1 - g) * 2e-4 / 2.9 < 2e-5 relative (measured 2.1e-5), so rtol 1e-4 leaves a margin of ~5.
    alone = [model.predict(batch[i : i + 1]) for i in range(16)]
    assert [a.labels[0] for a in alone] == together.labels
    assert [int(a.task_index[0]) for a in alone] == together.task_index.tolist()
    assert [bool(a.ood[0]) for a in alone] == together.ood.tolist()
    torch.testing.assert_close(torch.cat([a.gate for a in alone]), together.gate, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.cat([a.confidence for a in alone]), together.confidence, rtol=1e-4, atol=1e-5)


def test_predictions_with_caller_labels_are_batch_invariant(model):
    """Open-vocabulary labels: each image still takes its own task and gate, alone or in any batch."""
    xa, xb, noise = probe_images()
    batch = torch.cat([xa, xb, noise])
    labels = ["cat", "dog", "square", "circle", "letter"]
    together = model.predict(batch, labels=labels, template="a photo of a {}.")
    assert set(together.labels) <= set(labels)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(7))
    shuffled = model.predict(batch[order], labels=labels, template="a photo of a {}.")
    assert [together.labels[i] for i in order.tolist()] == shuffled.labels
    torch.testing.assert_close(together.gate[order], shuffled.gate, rtol=1e-4, atol=1e-7)
    alone = [model.predict(batch[i : i + 1], labels=labels, template="a photo of a {}.") for i in range(16)]
    assert [a.labels[0] for a in alone] == together.labels
    assert [int(a.task_index[0]) for a in alone] == together.task_index.tolist()
    torch.testing.assert_close(torch.cat([a.gate for a in alone]), together.gate, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.cat([a.confidence for a in alone]), together.confidence, rtol=1e-4, atol=1e-5)


def test_batch_routing_option_depends_on_the_batch():
    m = fitted_model(DikiConfig(routing="batch"))
    xa, xb, _ = probe_images()
    mixed = m.predict(torch.cat([xa, xb[:2]]))
    assert mixed.task_index.tolist() == [0] * 8  # majority vote puts colour images on task 0 too
    alone = m.predict(xb[:2])
    assert alone.task_index.tolist() == [1, 1]


def test_label_spaces_caller_labels_and_forced_task(model):
    xa, xb, _ = probe_images()
    p = model.predict(xb, labels=["cat", "dog"], template="a photo of a {}.")
    assert set(p.labels) <= {"cat", "dog"} and all(len(t) == 2 for t in p.top_k)
    forced = model.predict(xa, task="colours")
    assert all(lbl in CLASSES_B for lbl in forced.labels) and forced.task_index.tolist() == [1] * 6
    upper = model.predict(xa, task=0, gate=1.0)
    assert torch.allclose(upper.gate, torch.ones(6))
    with pytest.raises(KeyError, match="unknown task"):
        model.predict(xa, task="nope")


def test_without_adapters_the_model_is_zero_shot_clip():
    m = create_diki_model("diki-test-tiny", seed=0)
    xa, _, _ = probe_images()
    labels = ["one", "two", "three"]
    p = m.predict(xa, labels=labels)
    clip = m.clip
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.encode_image(xa), dim=-1)
        txt = torch.nn.functional.normalize(
            clip.encode_text(m.tokenize([f"a photo of a {c}." for c in labels])), dim=-1
        )
        want = (clip.logit_scale.exp() * img @ txt.T).softmax(-1)
    torch.testing.assert_close(p.confidence, want.max(-1).values, rtol=1e-5, atol=1e-6)
    assert p.task_index.tolist() == [-1] * 6 and p.ood.all()
    with pytest.raises(ValueError, match="pass `labels`"):
        m.predict(xa)


def test_gate_zero_prediction_equals_zero_shot_for_task_labels(model):
    xa, _, _ = probe_images()
    gated_off = model.predict(xa, task=0, gate=0.0)
    zs = create_diki_model("diki-test-tiny", seed=0).predict(xa, labels=CLASSES_A)
    torch.testing.assert_close(gated_off.confidence, zs.confidence, rtol=1e-5, atol=1e-6)


def test_text_gate_interpolates_between_cached_levels(model):
    prompts = model.tasks[0].prompts()
    task = torch.tensor([0, 0, 0])
    feats = model.text_features(prompts, task, torch.tensor([0.0, 0.35, 1.0], dtype=torch.float64))
    lo, hi = model._text_level(tuple(prompts), 0, 3), model._text_level(tuple(prompts), 0, 4)
    want = torch.nn.functional.normalize(0.5 * lo + 0.5 * hi, dim=-1)
    torch.testing.assert_close(feats[1], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats[2], model._text_level(tuple(prompts), 0, 10))


def frozen_clip_probs(model, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Class probabilities of the untouched CLIP, computed here without ``predict``."""
    with torch.no_grad():
        img = F.normalize(model.clip.encode_image(images), dim=-1)
        txt = F.normalize(model.clip.encode_text(model.tokenize(prompts)), dim=-1)
        return (model.clip.logit_scale.exp() * img @ txt.T).softmax(-1)


def gated_clip_probs(model, images: torch.Tensor, prompts: list[str], task: int, gate: float) -> torch.Tensor:
    """Class probabilities with both towers routed to ``task`` at ``gate``, without ``predict``."""
    route = Route(task=task, gate=gate)
    with torch.no_grad(), model.routing(vision=route, text=route):
        img = F.normalize(model.clip.encode_image(images), dim=-1)
        txt = F.normalize(model.clip.encode_text(model.tokenize(prompts)), dim=-1)
    return (model.clip.logit_scale.exp() * img @ txt.T).softmax(-1)


def test_an_image_flagged_out_of_distribution_gets_the_zero_shot_prediction_exactly():
    # Every image gets gate 0.5: far from 0, but below the OOD threshold 0.6, so every image is
    # flagged and must be answered by the frozen model in both towers (no text gate either).
    m = fitted_model(DikiConfig(gate="constant", gate_params={"value": 0.5}, ood_threshold=0.6))
    xa, xb, noise = probe_images()
    batch = torch.cat([xa, xb, noise])
    p = m.predict(batch, top_k=3)
    assert p.ood.all() and torch.equal(p.gate, torch.full((16,), 0.5))
    assert set(p.task_index.tolist()) == {0, 1}
    for t in (0, 1):
        rows = (p.task_index == t).nonzero().flatten()
        want = frozen_clip_probs(m, batch[rows], m.tasks[t].prompts())
        assert p.label_index[rows].tolist() == want.argmax(-1).tolist()
        torch.testing.assert_close(p.confidence[rows], want.max(-1).values, rtol=1e-6, atol=1e-7)
        for r, w in zip(rows.tolist(), want, strict=True):
            top = w.topk(3)
            assert [name for name, _ in p.top_k[r]] == [m.tasks[t].classes[int(j)] for j in top.indices]
            np.testing.assert_allclose([prob for _, prob in p.top_k[r]], top.values.numpy(), rtol=1e-6, atol=1e-7)
    # Caller labels: the same frozen answer.
    labels = ["cat", "dog", "bird"]
    q = m.predict(batch, labels=labels)
    want = frozen_clip_probs(m, batch, [f"a photo of a {c}." for c in labels])
    assert q.ood.all() and q.labels == [labels[int(i)] for i in want.argmax(-1)]
    torch.testing.assert_close(q.confidence, want.max(-1).values, rtol=1e-6, atol=1e-7)


def test_an_image_in_distribution_gets_its_task_at_its_gate_in_both_towers():
    # The counterpart: below the gate 0.5, the threshold 0.4 keeps every image active.
    m = fitted_model(DikiConfig(gate="constant", gate_params={"value": 0.5}, ood_threshold=0.4))
    xa, xb, noise = probe_images()
    batch = torch.cat([xa, xb, noise])
    p = m.predict(batch)
    assert not p.ood.any()
    for t in (0, 1):
        rows = (p.task_index == t).nonzero().flatten()
        want = gated_clip_probs(m, batch[rows], m.tasks[t].prompts(), t, 0.5)
        assert p.label_index[rows].tolist() == want.argmax(-1).tolist()
        torch.testing.assert_close(p.confidence[rows], want.max(-1).values, rtol=1e-5, atol=1e-6)
        # The gated answer is measurably not the frozen one, so the OOD test above can see a leak.
        frozen = frozen_clip_probs(m, batch[rows], m.tasks[t].prompts())
        assert (want - frozen).abs().max() > 1e-2


def test_artifact_round_trip_gives_identical_predictions(model, tmp_path):
    for t in range(model.num_tasks):
        save_task(model, t, tmp_path / f"task{t}")
    meta = json.loads((tmp_path / "task1" / "task.json").read_text())
    assert meta["classes"] == CLASSES_B and meta["template"] == "a {} square."
    assert meta["backbone"]["fingerprint"] == model.backbone_info.fingerprint
    assert meta["num_samples"] == 120 and meta["feature_dim"] == 32
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.pkl"))
    fresh = create_diki_model("diki-test-tiny", seed=0)
    for t in range(model.num_tasks):
        assert load_task(fresh, tmp_path / f"task{t}") == t
    xa, xb, noise = probe_images()
    batch = torch.cat([xa, xb, noise])
    a, b = model.predict(batch), fresh.predict(batch)
    assert a.labels == b.labels
    torch.testing.assert_close(a.gate, b.gate)
    torch.testing.assert_close(a.confidence, b.confidence)


def test_artifact_refuses_another_backbone(model, tmp_path):
    save_task(model, 0, tmp_path / "t")
    other = create_diki_model("diki-test-tiny", seed=1)  # same config, other weights
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_task(other, tmp_path / "t")
    assert other.num_tasks == 0
    layout = create_diki_model("diki-test-tiny", seed=0, config=DikiConfig(prompt_length=4))
    with pytest.raises(ArtifactError, match="prompt_length"):
        load_task(layout, tmp_path / "t")


def test_artifact_errors_are_clear(model, tmp_path):
    with pytest.raises(ArtifactError, match="missing task metadata"):
        load_task(model, tmp_path / "nothing")
    save_task(model, 0, tmp_path / "t")
    (tmp_path / "t" / "adapter.safetensors").unlink()
    fresh = create_diki_model("diki-test-tiny", seed=0)
    with pytest.raises(ArtifactError, match="missing adapter weights"):
        load_task(fresh, tmp_path / "t")


def test_task_statistics_merge_across_workers_equals_one_pass(model):
    x, _ = quadrant_domain(100, 4, 1.0, seed=9)
    feats = model.encode_image(x)
    one = TaskStatistics(32, holdout_every=5)
    one.update(feats)
    a, b = TaskStatistics(32, 5), TaskStatistics(32, 5)
    a.update(feats[:50])
    b.update(feats[50:])
    merged = TaskStatistics.from_state_dict(a.state_dict()).merge(TaskStatistics.from_state_dict(b.state_dict()))
    g1, m1, s1 = one.finalize()
    g2, m2, s2 = merged.finalize()
    torch.testing.assert_close(g1.cov, g2.cov)
    assert m1 == pytest.approx(m2) and s1 == pytest.approx(s2)


def test_task_statistics_fit_all_images_and_score_only_the_held_out_ones():
    from scipy.stats import multivariate_normal
    from sklearn.covariance import ledoit_wolf

    # float32-representable features (held-out features are kept in float32), streamed in batches
    # whose boundaries do not fall on the hold-out period.
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(53, 6, generator=g) + torch.tensor([3.0, 0, 0, 0, 0, 0]), dim=1).double()
    stats = TaskStatistics(6, holdout_every=5)
    for part in (x[:7], x[7:20], x[20:]):
        stats.update(part)
    held = (np.arange(53) % 5) == 4  # every 5th image in arrival order: 4, 9, ..., 49
    assert stats.count == 53 and held.sum() == 10
    xs, ridge = x.numpy(), 1e-7 * np.eye(6)
    fit = xs[~held]
    for shrinkage, estimate in (
        ("ledoit_wolf", lambda a: ledoit_wolf(a)[0]),
        ("paper", lambda a: np.cov(a, rowvar=False)),
    ):
        gaussian, mean, std = stats.finalize(shrinkage)
        # The task Gaussian covers all 53 images ...
        np.testing.assert_allclose(gaussian.mean.numpy(), xs.mean(axis=0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(gaussian.cov.numpy(), estimate(xs) + ridge, rtol=1e-8, atol=1e-13)
        # ... the score statistics are those of the 10 held-out images under the Gaussian of the other 43.
        scores = multivariate_normal(fit.mean(axis=0), estimate(fit) + ridge).logpdf(xs[held])
        assert mean == pytest.approx(scores.mean(), rel=1e-9)
        assert std == pytest.approx(scores.std(ddof=1), rel=1e-7)
    short = TaskStatistics(6, holdout_every=5)
    short.update(x[:9])  # one held-out image: no std
    with pytest.raises(ValueError, match=r"too few images to fit task statistics: 9 \(need at least 10\)"):
        short.finalize()


def test_training_is_deterministic_under_a_seed():
    x, y = quadrant_domain(64, 4, 1.0, seed=2)
    outs = []
    for _ in range(2):
        m = create_diki_model("diki-test-tiny", seed=0)
        _, res = learn_task(m, "q", CLASSES_A, x, y, cfg=TrainConfig(epochs=2, batch_size=16, seed=3), progress=False)
        outs.append((m.adapter_state_dict(0), [e.train_loss for e in res.history]))
    assert outs[0][1] == outs[1][1]
    for k, v in outs[0][0].items():
        assert torch.equal(v, outs[1][0][k])
    assert any(torch.count_nonzero(v) for k, v in outs[0][0].items() if k.endswith("value")), "training moved V"


def test_train_config_refuses_unknown_optimizers_and_non_positive_values():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        TrainConfig(optimizer="adam")
    for bad in ({"lr": 0.0}, {"epochs": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="must be positive"):
            TrainConfig(**bad)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 5.0), ("adamw", 0.05)])
def test_training_steps_with_the_configured_optimizer(optimizer, lr, monkeypatch):
    kind = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    steps = {"sgd": 0, "adamw": 0}
    for name, cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        original = cls.step

        def counted(self, *args, _name=name, _original=original, **kwargs):
            steps[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", counted)
    model = create_diki_model("diki-test-tiny", seed=0)
    xa, ya = quadrant_domain(64, 4, 1.0, seed=0)
    cfg = TrainConfig(optimizer=optimizer, lr=lr, epochs=2, batch_size=32, seed=0, select_best=False)
    task, result = learn_task(model, "quadrants", CLASSES_A, xa, ya, cfg=cfg, progress=False)
    other = "sgd" if optimizer == "adamw" else "adamw"
    # 58 training images (6 held out for validation): 2 batches per epoch, 2 epochs.
    assert steps[optimizer] == 4 and steps[other] == 0, steps
    assert issubclass(kind, torch.optim.Optimizer) and len(result.history) == 2
    values = [v for name, v in model.adapter_state_dict(task).items() if "value" in name]
    assert values and any(v.abs().sum() > 0 for v in values), "V starts at zero and must have moved"


def test_adapter_lr_is_the_shipped_backbones_measured_rate():
    from diki_model import adapter_lr
    from diki_model.backbone import CHECKPOINT_DIR, DEFAULT_ADAPTER_LR

    recorded = json.loads((CHECKPOINT_DIR / "diki-small" / "adapter_training.json").read_text())
    assert adapter_lr("diki-small") == recorded["lr"] > DEFAULT_ADAPTER_LR
    # Other weights for the same config, or any other backbone: the authors' rate.
    assert adapter_lr("diki-small", "/weights/other.safetensors") == DEFAULT_ADAPTER_LR == 5.0
    assert adapter_lr("ViT-B-16", "openai") == DEFAULT_ADAPTER_LR
    assert adapter_lr("diki-test-tiny") == DEFAULT_ADAPTER_LR


def test_adapter_lr_is_read_next_to_local_weights_and_pretraining_drops_a_stale_one(tmp_path):
    from diki_model import adapter_lr
    from diki_model.backbone import ADAPTER_TRAINING_FILE, DEFAULT_ADAPTER_LR

    folder = tmp_path / "ckpt"
    folder.mkdir()
    assert adapter_lr(f"local-dir:{folder}") == DEFAULT_ADAPTER_LR
    (folder / ADAPTER_TRAINING_FILE).write_text(json.dumps({"lr": 12.5}))
    assert adapter_lr(f"local-dir:{folder}") == 12.5
    assert adapter_lr("diki-small", str(folder)) == 12.5  # a pretrained folder is a local-dir


# --- gates, forced tasks, label spaces, caches and errors ------------------------------------------


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def probe_batch() -> torch.Tensor:
    return torch.cat(probe_images())


def test_routing_picks_the_best_score_and_the_standardized_gate(model):
    p = model.predict(probe_batch())
    assert p.task_index.tolist() == p.task_scores.argmax(dim=1).tolist()
    stats = model.score_stats().tolist()
    for t, s, g in zip(p.task_index.tolist(), p.task_scores.max(dim=1).values.tolist(), p.gate.tolist(), strict=True):
        mean, std = stats[t]
        assert g == pytest.approx(sigmoid((s - mean) / std + 3.0), rel=1e-6, abs=1e-12)
    assert p.task_scores.dtype == torch.float64 and p.task_scores.shape == (16, 2)


def test_set_gate_switches_the_calibration_and_records_it(model):
    m = copy.deepcopy(model)
    m.set_gate("paper", scale=256.0)
    assert m.gate_fn == PaperGate(scale=256.0)
    assert (m.config.gate, m.config.gate_params) == ("paper", {"scale": 256.0})
    p = m.predict(probe_batch())
    want = [sigmoid(s / 256.0 - 1.0) for s in p.task_scores.max(dim=1).values.tolist()]
    assert p.gate.tolist() == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_gates_are_clamped_and_the_threshold_itself_is_in_distribution(model):
    m = copy.deepcopy(model)
    x = probe_batch()[:6]
    m.set_gate("constant", value=1.5)
    for p in (m.predict(x), m.predict(x, task=1)):
        assert torch.equal(p.gate, torch.ones(6)) and not p.ood.any()
    m.set_gate("constant", value=-0.5)
    for p in (m.predict(x), m.predict(x, task=0)):
        assert torch.equal(p.gate, torch.zeros(6)) and p.ood.all()
    threshold = m.config.ood_threshold
    m.set_gate("constant", value=threshold)
    assert not m.predict(x).ood.any()
    m.set_gate("constant", value=threshold * 0.99)
    assert m.predict(x).ood.all()


def test_a_forced_task_gets_its_own_calibrated_gate_and_label_space(model):
    xa = probe_images()[0]
    forced = model.predict(xa, task="colours")
    mean, std = model.score_stats()[1].tolist()
    want = [sigmoid((s - mean) / std + 3.0) for s in forced.task_scores[:, 1].tolist()]
    assert forced.gate.tolist() == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert forced.task_index.tolist() == [1] * 6 and all(lbl in CLASSES_B for lbl in forced.labels)
    routed = model.predict(xa)
    by_name = model.predict(xa, task="quadrants")
    torch.testing.assert_close(by_name.gate, routed.gate)
    assert by_name.labels == routed.labels
    # One task per image: each image in its own task's label space, gate 1 unless given.
    per_image = model.predict(xa, task=torch.tensor([1, 0, 1, 0, 0, 1]))
    assert per_image.task_index.tolist() == [1, 0, 1, 0, 0, 1] and per_image.task_scores is None
    assert torch.equal(per_image.gate, torch.ones(6)) and not per_image.ood.any()
    for t, label, top in zip(per_image.task_index.tolist(), per_image.labels, per_image.top_k, strict=True):
        classes = model.tasks[t].classes
        assert label in classes and len(top) == len(classes) and {name for name, _ in top} == set(classes)
    half = model.predict(xa, task=torch.tensor([1, 0, 1, 0, 0, 1]), gate=0.25)
    assert torch.equal(half.gate, torch.full((6,), 0.25))
    override = model.predict(xa, gate=0.7)
    assert (
        torch.equal(override.gate, torch.full((6,), 0.7)) and override.task_index.tolist() == routed.task_index.tolist()
    )


def test_predict_refuses_bad_tasks(model):
    xa = probe_images()[0]
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 1, 2, 0, 0, 0]), torch.tensor([0, -1, 0, 0, 0, 0])):
        with pytest.raises(ValueError, match=r"^per-image tasks must be 6 indices in \[0, 2\)$"):
            model.predict(xa, task=bad)
    for bad in (2, -1):
        with pytest.raises(IndexError, match=f"^task {bad} out of range: the model holds 2 tasks$"):
            model.predict(xa, task=bad)
    with pytest.raises(KeyError) as err:
        model.predict(xa, task="nope")
    assert err.value.args[0] == "unknown task 'nope'; known tasks: ['quadrants', 'colours']"


def test_a_model_without_tasks_ignores_a_gate_and_answers_zero_shot():
    m = create_diki_model("diki-test-tiny", seed=0)
    x = probe_images()[0]
    p = m.predict(x, labels=["one", "two"], gate=0.5)
    assert torch.equal(p.gate, torch.zeros(6)) and p.ood.all() and p.task_index.tolist() == [-1] * 6
    want = frozen_clip_probs(m, x, ["a photo of a one.", "a photo of a two."])
    torch.testing.assert_close(p.confidence, want.max(-1).values, rtol=1e-6, atol=1e-7)


def test_top_k_lists_only_the_images_own_classes_in_probability_order(model):
    p = model.predict(probe_batch(), top_k=10)
    for b in range(16):
        classes = model.tasks[int(p.task_index[b])].classes
        probs = [prob for _, prob in p.top_k[b]]
        assert len(p.top_k[b]) == len(classes) and probs == sorted(probs, reverse=True)
        assert p.top_k[b][0] == (p.labels[b], pytest.approx(float(p.confidence[b])))
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert p.labels[b] == classes[int(p.label_index[b])]
    two = model.predict(probe_batch(), top_k=2)
    assert all(len(t) == 2 for t in two.top_k)


@pytest.mark.parametrize("tasks", [2, 1])
def test_batch_routing_uses_the_mean_gate_for_the_text_tower(tasks):
    m = fitted_model(DikiConfig(routing="batch"))
    if tasks == 1:  # the same first task alone
        one = create_diki_model("diki-test-tiny", seed=0, config=DikiConfig(routing="batch"))
        t = one.add_task("quadrants", CLASSES_A)
        rec = m.tasks[0]
        one.set_task_statistics(t, rec.gaussian, rec.score_mean, rec.score_std, rec.num_samples)
        one.load_adapter_state_dict(t, m.adapter_state_dict(0))
        m = one
    xa = probe_images()[0]
    p = m.predict(xa)
    assert p.task_index.tolist() == [0] * 6
    mean_gate = float(p.gate.double().mean())
    route_text = Route(task=0, gate=mean_gate)
    with torch.no_grad():
        img = torch.stack([
            F.normalize(gated_image(m, xa[i : i + 1], 0, float(p.gate[i])), dim=-1)[0] for i in range(6)
        ])  # fmt: skip
        with m.routing(text=route_text):
            txt = F.normalize(m.clip.encode_text(m.tokenize(m.tasks[0].prompts())), dim=-1)
    want = (m.clip.logit_scale.exp() * img @ txt.T).softmax(-1)
    torch.testing.assert_close(p.confidence, want.max(-1).values, rtol=1e-5, atol=1e-6)


def gated_image(m, x, task: int, gate: float) -> torch.Tensor:
    with m.routing(vision=Route(task=task, gate=gate)):
        return m.clip.encode_image(x)


def test_adding_tasks_and_its_errors():
    m = create_diki_model("diki-test-tiny", seed=0)
    assert m.add_task("a", ["x", "y"]) == 0 and m.add_task("b", ["x", "y"], "{} here") == 1
    assert (m.tasks[1].template, m.tasks[1].classes, m.num_tasks) == ("{} here", ["x", "y"], 2)
    assert m.task_index("b") == 1 and m.tasks[1].prompts() == ["x here", "y here"]
    with pytest.raises(ValueError, match=r"^a task named 'a' is already in the model$"):
        m.add_task("a", ["x", "y"])
    with pytest.raises(ValueError, match=r"^task 'c' needs at least 2 classes, got 1$"):
        m.add_task("c", ["x"])
    for template in ("no braces", "{} and {}"):
        with pytest.raises(ValueError, match=re.escape(f"template must contain exactly one '{{}}', got {template!r}")):
            m.add_task("c", ["x", "y"], template)
    assert m.num_tasks == 2 and all(layer.num_tasks == 2 for _, _, layer in m.adapter_layers())
    # Keys are drawn from the seed and the task's index: reproducible, and different per task.
    again = create_diki_model("diki-test-tiny", seed=0)
    again.add_task("a", ["x", "y"])
    again.add_task("b", ["x", "y"], seed=None)
    other = create_diki_model("diki-test-tiny", seed=0)
    other.add_task("a", ["x", "y"], seed=1)
    for key, value in m.adapter_state_dict(0).items():
        assert torch.equal(again.adapter_state_dict(0)[key], value)
        assert torch.equal(again.adapter_state_dict(1)[key], m.adapter_state_dict(1)[key])
        if key.endswith("key"):
            assert not torch.equal(m.adapter_state_dict(1)[key], value)
            assert not torch.equal(other.adapter_state_dict(0)[key], value)


def test_statistics_and_adapter_state_are_checked(model):
    m = create_diki_model("diki-test-tiny", seed=0)
    m.add_task("a", ["x", "y"])
    m.add_task("b", ["x", "y"])
    rec = model.tasks[0]
    with pytest.raises(ValueError, match=r"^Gaussian of dim 5 does not match feature dim 32$"):
        m.set_task_statistics(
            0, Gaussian(torch.zeros(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64)), 0.0, 1.0, 1
        )
    m.set_task_statistics(0, rec.gaussian, 1.5, 2.5, 9)
    assert (m.tasks[0].score_mean, m.tasks[0].score_std, m.tasks[0].num_samples) == (1.5, 2.5, 9)
    assert m.tasks[0].gaussian is rec.gaussian
    with pytest.raises(RuntimeError, match=r"^tasks without fitted statistics cannot be routed: \['b'\]$"):
        m.predict(probe_images()[0])
    with pytest.raises(RuntimeError, match="^no task statistics fitted$"):
        create_diki_model("diki-test-tiny", seed=0).task_gate(torch.zeros(1, 32), 0)
    state = model.adapter_state_dict(1)
    with pytest.raises(ValueError) as err:
        m.load_adapter_state_dict(
            0, {k: v for k, v in state.items() if k != "text.0.key"} | {"extra": state["text.0.key"]}
        )
    assert (
        str(err.value)
        == "adapter state does not match this model's layers: missing ['text.0.key'], unexpected ['extra']"
    )
    with pytest.raises(ValueError, match=r"^vision layer 1 value: shape \(8, 3\) != \(8, 64\)$"):
        m.load_adapter_state_dict(0, state | {"vision.1.value": torch.zeros(8, 3)})
    m.load_adapter_state_dict(1, state)
    for key, value in m.adapter_state_dict(1).items():
        assert torch.equal(value, state[key])
        assert value.device.type == "cpu" and value.dtype == torch.float32


def test_changing_a_tasks_parameters_drops_only_its_cached_text_features(model):
    m = copy.deepcopy(model)
    m.invalidate_caches()
    m.predict(probe_batch())
    tasks_cached = {key[1] for key in m._text_cache}
    assert {-1, 0, 1} <= tasks_cached
    m.invalidate_caches(1)
    assert {key[1] for key in m._text_cache} == tasks_cached - {1}
    # New parameters for task 0 are seen at once: its levels are encoded again.
    prompts = tuple(m.tasks[0].prompts())
    m.load_adapter_state_dict(0, model.adapter_state_dict(1))
    assert all(key[1] != 0 for key in m._text_cache)
    with torch.no_grad(), m.routing(text=Route(task=0, gate=1.0)):
        want = F.normalize(m.clip.encode_text(m.tokenize(list(prompts))), dim=-1)
    torch.testing.assert_close(m._text_level(prompts, 0, 10), want)
    m.invalidate_caches()
    assert len(m._text_cache) == 0


def test_text_cache_evicts_the_least_recently_used_level(model):
    m = copy.deepcopy(model)
    m.invalidate_caches()
    m._text_cache_size = 2
    prompts = tuple(m.tasks[0].prompts())
    first = m._text_level(prompts, 0, 3)
    m._text_level(prompts, 0, 4)
    assert m._text_level(prompts, 0, 3) is first  # a hit, now the most recent
    m._text_level(prompts, 0, 5)  # evicts level 4, not level 3
    assert list(m._text_cache) == [(prompts, 0, 3), (prompts, 0, 5)]
    assert m._text_level(prompts, 1, 0) is m._text_level(prompts, 0, 0)  # level 0 is shared by all tasks


def test_text_gate_outside_0_1_is_clamped(model):
    prompts = model.tasks[1].prompts()
    task = torch.tensor([1, 1])
    low = model.text_features(prompts, task, torch.tensor([-0.2, 0.0], dtype=torch.float64))
    high = model.text_features(prompts, task, torch.tensor([1.3, 1.0], dtype=torch.float64))
    torch.testing.assert_close(low[0], low[1])
    torch.testing.assert_close(high[0], high[1])
    torch.testing.assert_close(high[1], model._text_level(tuple(prompts), 1, 10))


def test_routing_context_restores_the_previous_routes(model):
    m = copy.deepcopy(model)
    routes = m._routing.routes
    outer = Route(task=0, gate=1.0)
    with m.routing(vision=outer):
        assert routes == {"vision": outer, "text": None}
        with pytest.raises(RuntimeError, match="inside"), m.routing(text=Route(task=1)):
            assert routes["vision"] is None and routes["text"].task == 1
            raise RuntimeError("inside")
        assert routes == {"vision": outer, "text": None}
    assert routes == {"vision": None, "text": None}


def test_features_are_unit_norm_float32(model):
    from diki_model.model import l2_features

    x = probe_batch()
    feats = l2_features(model, x)
    assert feats.dtype == torch.float32 and feats.shape == (16, 32)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(16))
    torch.testing.assert_close(feats, model.encode_image(x))
    txt = model.encode_text(model.tokenize(["a", "b"]))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    assert model.feature_dim == 32 and model.device.type == "cpu"
    assert float(model.logit_scale) == pytest.approx(math.exp(float(model.clip.logit_scale)))


def test_score_statistics_are_float64_and_exact(model):
    stats = model.score_stats()
    assert stats.dtype == torch.float64
    assert stats.tolist() == [[t.score_mean, t.score_std] for t in model.tasks]


def test_a_model_without_tasks_routes_nowhere():
    m = create_diki_model("diki-test-tiny", seed=0)
    task, gate, scores = m.route(torch.zeros(4, 32))
    assert task.tolist() == [-1] * 4 and task.dtype == torch.long
    assert gate.tolist() == [0.0] * 4 and scores.shape == (4, 0)
    p = m.predict(probe_images()[0], labels=["a", "b"])
    assert p.task_scores.shape == (6, 0)


def test_one_task_model_gates_each_image_on_its_own():
    m = create_diki_model("diki-test-tiny", seed=0)
    full = fitted_model()
    t = m.add_task("quadrants", CLASSES_A)
    rec = full.tasks[0]
    m.set_task_statistics(t, rec.gaussian, rec.score_mean, rec.score_std, rec.num_samples)
    m.load_adapter_state_dict(t, full.adapter_state_dict(0))
    x = probe_images()[0]
    together = m.predict(x)
    assert len(set(together.gate.tolist())) > 1  # different gates in one batch
    for i in range(6):
        alone = m.predict(x[i : i + 1])
        assert alone.labels[0] == together.labels[i]
        assert float(alone.confidence[0]) == pytest.approx(float(together.confidence[i]), rel=1e-4)


def test_more_images_than_feature_dimensions(model):
    x = torch.cat([probe_batch()] * 3)  # 48 images, 32-d features
    p = model.predict(x)
    assert len(p.labels) == 48 and len(p.top_k) == 48
    assert p.labels[:16] == p.labels[16:32] == p.labels[32:]


def test_adapter_layers_follow_each_towers_own_layer_choice():
    m = create_diki_model("diki-test-tiny", seed=0, config=DikiConfig(vision_layers=(1,), text_layers=(0, 2)))
    layers = [(tower, i, layer) for tower, i, layer in m.adapter_layers()]
    assert [(tower, i) for tower, i, _ in layers] == [("vision", 1), ("text", 0), ("text", 2)]
    assert layers[0][2] is m.clip.visual.transformer.resblocks[1].attn
    assert layers[1][2] is m.clip.transformer.resblocks[0].attn and layers[1][2].tower == "text"
    m.add_task("a", ["x", "y"])
    assert sorted(m.adapter_state_dict(0)) == [
        "text.0.key", "text.0.value", "text.2.key", "text.2.value", "vision.1.key", "vision.1.value",
    ]  # fmt: skip
    prefix = create_diki_model("diki-test-tiny", seed=0, config=DikiConfig(branch="prefix"))
    assert {layer.mode for _, _, layer in prefix.adapter_layers()} == {"prefix"}
    assert {layer.mode for _, _, layer in m.adapter_layers()} == {"residual"}


def test_factory_defaults_weights_and_preprocessing(tmp_path):
    from PIL import Image

    from diki_model import load_backbone

    default = create_diki_model()
    assert default.backbone_info.name == "diki-small" and default.feature_dim == 128
    weights = load_backbone("diki-test-tiny", seed=1)
    torch.save(weights.model.state_dict(), tmp_path / "w.pt")
    m = create_diki_model("diki-test-tiny", pretrained=str(tmp_path / "w.pt"))
    assert m.backbone_info.fingerprint == weights.info.fingerprint
    img = m.preprocess(Image.new("RGB", (50, 40), (10, 20, 30)))
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32


def test_load_adapter_state_names_missing_or_unexpected_keys_alone(model):
    m = copy.deepcopy(model)
    state = model.adapter_state_dict(0)
    with pytest.raises(ValueError) as err:
        m.load_adapter_state_dict(1, {k: v for k, v in state.items() if k != "vision.0.value"})
    assert (
        str(err.value) == "adapter state does not match this model's layers: missing ['vision.0.value'], unexpected []"
    )
    with pytest.raises(ValueError) as err:
        m.load_adapter_state_dict(1, state | {"x": state["vision.0.value"]})
    assert str(err.value) == "adapter state does not match this model's layers: missing [], unexpected ['x']"
    m.invalidate_caches()
    m.predict(probe_batch())
    m.load_adapter_state_dict(1, state)
    cached = {key[1] for key in m._text_cache}
    assert 1 not in cached and {-1, 0} <= cached  # only task 1's text features are dropped


def test_text_gate_between_the_two_highest_levels(model):
    prompts = model.tasks[0].prompts()
    feats = model.text_features(prompts, torch.tensor([0]), torch.tensor([0.95], dtype=torch.float64))
    lo, hi = model._text_level(tuple(prompts), 0, 9), model._text_level(tuple(prompts), 0, 10)
    torch.testing.assert_close(feats[0], F.normalize(0.5 * lo + 0.5 * hi, dim=-1), rtol=1e-5, atol=1e-6)
