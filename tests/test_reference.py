"""The reference density and the likelihood-ratio gate that uses it."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from diki_model import ArtifactError, DikiConfig, GaussianAccumulator, create_diki_model, load_bundle, save_bundle
from diki_model.bundle import extend_bundle, read_bundle_manifest
from diki_model.calibration import LikelihoodRatioGate
from diki_model.reference import (
    ReferenceDensity,
    fit_reference,
    load_reference,
    save_reference,
    shipped_reference,
)
from tests.synthetic import fitted_model, quadrant_domain


def features(n: int, dim: int, centre: float, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * spread + centre


@pytest.fixture(scope="module")
def model():
    return fitted_model()


@pytest.fixture(scope="module")
def reference(model):
    """A reference of a third distribution (background 0), fitted on the model's frozen features."""
    x, _ = quadrant_domain(160, 4, 0.0, seed=7)
    return fit_reference(model.backbone_info, [(model.encode_image(x), "plain")])


def test_log_prob_is_the_count_weighted_mixture_of_component_gaussians():
    info = {"name": "t", "fingerprint": "f" * 64, "embed_dim": 3}
    a, b = features(40, 3, 0.0, 1.0, 0), features(120, 3, 4.0, 0.5, 1)
    ref = ReferenceDensity.empty(info, shrinkage="paper").update(a, "a").update(b, ["b"] * len(b))
    x = features(10, 3, 2.0, 2.0, 2)
    # Independent reference: torch.distributions with numpy-style unbiased covariance + 1e-7 I.
    expected = []
    for comp, weight in ((a, 40 / 160), (b, 120 / 160)):
        cov = torch.from_numpy(__import__("numpy").cov(comp.numpy(), rowvar=False)) + 1e-7 * torch.eye(3)
        expected.append(MultivariateNormal(comp.mean(0), cov).log_prob(x) + math.log(weight))
    torch.testing.assert_close(ref.log_prob(x), torch.logsumexp(torch.stack(expected), 0), rtol=0, atol=1e-5)


def test_references_merge_exactly_and_refuse_another_backbone():
    info = {"name": "t", "fingerprint": "a" * 64, "embed_dim": 4}
    a, b = features(30, 4, 0.0, 1.0, 0), features(50, 4, 1.0, 1.0, 1)
    whole = ReferenceDensity.empty(info).update(torch.cat([a, b]), "all")
    parts = ReferenceDensity.empty(info).update(a, "all").merge(ReferenceDensity.empty(info).update(b, "all"))
    x = features(8, 4, 0.5, 1.0, 3)
    torch.testing.assert_close(parts.log_prob(x), whole.log_prob(x), rtol=0, atol=1e-9)
    other = ReferenceDensity.empty({**info, "fingerprint": "b" * 64}).update(a, "all")
    with pytest.raises(ValueError, match="different backbones"):
        parts.merge(other)


def test_reference_round_trips_and_refuses_a_backbone_mismatch(model, reference, tmp_path):
    save_reference(reference, tmp_path / "ref")
    back = load_reference(tmp_path / "ref", model.backbone_info)
    x = model.encode_image(quadrant_domain(6, 4, 1.0, seed=9)[0])
    torch.testing.assert_close(back.log_prob(x), reference.log_prob(x), rtol=0, atol=0)
    assert back.summary()["components"] == {"plain": 160}
    other = create_diki_model("diki-test-tiny", seed=5)
    with pytest.raises(ArtifactError, match="reference density was fitted on backbone"):
        load_reference(tmp_path / "ref", other.backbone_info)
    with pytest.raises(ValueError, match="fingerprint"):
        other.set_reference(back)
    # A damaged artifact is refused with the file named.
    (tmp_path / "ref" / "reference.safetensors").unlink()
    with pytest.raises(ArtifactError, match="reference.safetensors: missing"):
        load_reference(tmp_path / "ref", model.backbone_info)


def test_a_failed_reference_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(ArtifactError, match="empty reference"):
        save_reference(ReferenceDensity.empty({"fingerprint": "x"}), tmp_path / "ref")
    assert list(tmp_path.iterdir()) == []


def test_ratio_gate_opens_at_the_quantile_of_the_tasks_held_out_ratios(model, reference):
    m = fitted_model(DikiConfig(gate="ratio", gate_params={"quantile": 0.1}))
    m.set_reference(reference)
    assert m.uses_reference
    x = torch.cat([quadrant_domain(8, 4, 1.0, seed=11)[0], quadrant_domain(8, 3, -1.5, seed=12)[0]])
    frozen = m.encode_image(x)
    task, gate, scores = m.route(frozen)
    # By hand: the threshold is the 10% quantile of (held-out score - log p_ref(held-out feature)).
    for t in range(m.num_tasks):
        rec = m.tasks[t]
        ratios = rec.holdout_scores - reference.log_prob(rec.holdout_features)
        threshold = torch.quantile(ratios, 0.1)
        rows = task == t
        ratio = scores[rows, t] - reference.log_prob(frozen[rows])
        assert torch.equal(gate[rows], (ratio >= threshold).double())
    # Most images of the learned domains pass their own task's threshold.
    assert gate.mean() >= 0.75


def test_the_reference_changes_gates_never_routing(model, reference):
    x = torch.cat([quadrant_domain(8, 4, 1.0, seed=13)[0], quadrant_domain(8, 4, 0.0, seed=14)[0]])
    frozen = model.encode_image(x)
    plain = fitted_model(DikiConfig(gate="ratio"))
    task_without, gate_without, _ = plain.route(frozen)  # no reference: the standardised gate
    expected_standardized = fitted_model(DikiConfig(gate="standardized")).route(frozen)[1]
    torch.testing.assert_close(gate_without, expected_standardized)
    plain.set_reference(reference)
    task_with, gate_with, _ = plain.route(frozen)
    assert torch.equal(task_with, task_without)
    assert not torch.equal(gate_with, gate_without)


def test_images_the_reference_covers_are_kept_off_a_broad_task_that_also_covers_them():
    """The failure the ratio gate exists for: a broad task Gaussian whose centre holds a narrow
    protected domain scores that domain above the task's own images, so the standardised gate opens
    on it; the likelihood ratio against a reference of that domain keeps it frozen."""
    m = create_diki_model("diki-test-tiny", seed=0, config=DikiConfig(gate="ratio"))
    d = m.feature_dim
    task_feats = features(400, d, 0.0, 1.0, 50)
    protected = features(400, d, 0.0, 0.1, 51)
    task = m.add_task("broad", ["a", "b"])
    held = task_feats[::5]
    fit = GaussianAccumulator(d).update(task_feats[[i for i in range(400) if i % 5]]).finalize()
    whole = GaussianAccumulator(d).update(task_feats).finalize()
    held_scores = fit.log_prob(held)
    m.set_task_statistics(task, whole, float(held_scores.mean()), float(held_scores.std()), 400, held, held_scores)
    m.set_reference(fit_reference(m.backbone_info, [(protected, "protected")]))
    probe_protected = features(100, d, 0.0, 0.1, 52).float()
    probe_task = features(100, d, 0.0, 1.0, 53).float()
    assert m.route(probe_protected)[1].mean() == 0.0  # the ratio keeps the protected domain frozen
    assert m.route(probe_task)[1].mean() >= 0.9  # and the task's own images still get their branch
    m.set_gate("standardized")
    assert m.route(probe_protected)[1].mean() > 0.99  # the standardised gate lets it take the branch


def test_ratio_gate_predictions_are_batch_invariant(model, reference):
    m = fitted_model(DikiConfig(gate="ratio"))
    m.set_reference(reference)
    x = torch.cat([quadrant_domain(5, 4, 1.0, seed=40)[0], quadrant_domain(5, 4, 0.0, seed=41)[0]])
    batch = m.predict(x, top_k=1)
    for i in range(len(x)):
        alone = m.predict(x[i : i + 1], top_k=1)
        assert alone.labels[0] == batch.labels[i]
        assert float(alone.gate[0]) == float(batch.gate[i])


def test_bundles_carry_their_reference_and_extending_keeps_it(model, reference, tmp_path):
    m = fitted_model(DikiConfig(gate="ratio"))
    m.set_reference(reference)
    save_bundle(m, tmp_path / "b1")
    manifest = read_bundle_manifest(tmp_path / "b1")
    assert manifest.reference["components"] == {"plain": 160}
    back = load_bundle(tmp_path / "b1", create_diki_model("diki-test-tiny", seed=0, config=DikiConfig(gate="ratio")))
    assert back.uses_reference
    x = torch.cat([quadrant_domain(6, 4, 1.0, seed=42)[0], quadrant_domain(6, 4, 0.0, seed=43)[0]])
    a, b = m.predict(x), back.predict(x)
    assert a.labels == b.labels and torch.equal(a.gate, b.gate)
    # Held-out features travel with each task, so a reference fitted later can still calibrate it.
    torch.testing.assert_close(back.tasks[0].holdout_features, m.tasks[0].holdout_features)
    from diki_model import apply_statistics, collect_statistics, tensor_batches

    x3, y3 = quadrant_domain(60, 2, 2.0, seed=45)
    extra = m.add_task("extra", ["left", "right"])
    apply_statistics(m, extra, collect_statistics(m, tensor_batches(x3, y3, 64, shuffle=False)(0)))
    extend_bundle(tmp_path / "b1", m, extra, tmp_path / "b2")
    assert read_bundle_manifest(tmp_path / "b2").reference["images"] == 160
    assert load_bundle(tmp_path / "b2", create_diki_model("diki-test-tiny", seed=0)).uses_reference
    # A bundle without a reference detaches whatever reference the loading model had.
    m.set_reference(None)
    save_bundle(m, tmp_path / "b0")
    holder = create_diki_model("diki-test-tiny", seed=0)
    holder.set_reference(reference)
    assert load_bundle(tmp_path / "b0", holder).reference is None


def test_a_disabled_task_is_never_routed_to(model):
    m = fitted_model()
    x = quadrant_domain(8, 3, -1.5, seed=44)[0]
    frozen = m.encode_image(x)
    assert (m.route(frozen)[0] == 1).all()
    m.tasks[1].enabled = False
    task, gate, _ = m.route(frozen)
    assert (task == 0).all()
    m.tasks[0].enabled = False
    assert (m.route(frozen)[1] == 0).all()


def test_ratio_gate_formula_and_its_bounds():
    stats = torch.tensor([[1.0, 2.0], [-3.0, 1.0]], dtype=torch.float64)
    idx = torch.tensor([0, 0, 1, 1])
    x = torch.tensor([0.5, 1.0, -3.5, 10.0], dtype=torch.float64)
    assert LikelihoodRatioGate()(x, idx, stats).tolist() == [0.0, 1.0, 0.0, 1.0]
    steep = LikelihoodRatioGate(width=0.5)(x, idx, stats)
    expected = [
        1 / (1 + math.exp(-(v - stats[i, 0].item()) / (0.5 * stats[i, 1].item()))) for v, i in zip(x, idx, strict=True)
    ]
    torch.testing.assert_close(steep, torch.tensor(expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="quantile"):
        LikelihoodRatioGate(quantile=1.0)
    with pytest.raises(ValueError, match="width"):
        LikelihoodRatioGate(width=-1.0)


def test_the_shipped_backbone_comes_with_its_reference_and_a_random_one_without():
    shipped = create_diki_model("diki-small")
    ref = shipped.reference
    assert ref is not None and ref.fingerprint == shipped.backbone_info.fingerprint
    assert set(ref.components) == {"mnist", "fashion-mnist", "shapes"}
    assert all(acc.count == 600 for acc in ref.components.values())
    assert shipped_reference(create_diki_model("diki-test-tiny", seed=0).backbone_info) is None
    assert create_diki_model("diki-small", reference=None).reference is None
    # Statistics are plain sufficient statistics, mergeable with a new shard of the same backbone.
    assert isinstance(ref.components["mnist"], GaussianAccumulator)
