import json

import pytest
import torch

from diki_model import (
    ArtifactError,
    Gaussian,
    create_diki_model,
    evaluate,
    extend_bundle,
    load_bundle,
    read_bundle_manifest,
)
from tests.synthetic import quadrant_domain
from tests.test_model import CLASSES_B, frozen_clip_probs, two_task_model


@pytest.fixture(scope="module")
def model():
    return two_task_model()


def test_bundle_chain_names_exactly_its_tasks(model, tmp_path):
    v1 = extend_bundle(None, model, 0, tmp_path / "v1")
    v2 = extend_bundle(tmp_path / "v1", model, 1, tmp_path / "v2")
    assert v1.task_names == ["quadrants"] and v2.task_names == ["quadrants", "colours"]
    assert read_bundle_manifest(tmp_path / "v2").tasks[0]["path"] == "tasks/000-quadrants"
    base = create_diki_model("diki-test-tiny", seed=0)
    loaded1 = load_bundle(tmp_path / "v1", model=base)
    assert [t.name for t in loaded1.tasks] == ["quadrants"]
    loaded2 = load_bundle(tmp_path / "v2", model=create_diki_model("diki-test-tiny", seed=0))
    xa, _ = quadrant_domain(8, 4, 1.0, seed=40)
    torch.testing.assert_close(loaded2.predict(xa).confidence, model.predict(xa).confidence)
    with pytest.raises(ArtifactError, match="already holds"):
        extend_bundle(tmp_path / "v2", model, 1, tmp_path / "v3")
    assert not (tmp_path / "v3").exists(), "a failed bundle write leaves nothing behind"


def test_bundle_rejects_escaping_paths(model, tmp_path):
    extend_bundle(None, model, 0, tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "bundle.json").read_text())
    manifest["tasks"][0]["path"] = "../../etc"
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="escapes"):
        load_bundle(tmp_path / "b", model=create_diki_model("diki-test-tiny", seed=0))


def test_extending_a_bundle_built_on_another_backbone_is_refused(model, tmp_path):
    extend_bundle(None, model, 0, tmp_path / "v1")
    other = create_diki_model("diki-test-tiny", seed=1)  # same config, other weights
    task = other.add_task("shapes", ["circle", "square"])
    other.set_task_statistics(task, Gaussian(torch.zeros(32, dtype=torch.float64), torch.eye(32, dtype=torch.float64)), 0.0, 1.0, 10)
    with pytest.raises(ArtifactError, match="base bundle was built on another backbone"):
        extend_bundle(tmp_path / "v1", other, task, tmp_path / "v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"], "a refused bundle leaves nothing behind"
    # The same task on top of nothing is fine: only mixing backbones is refused.
    assert extend_bundle(None, other, task, tmp_path / "v2").task_names == ["shapes"]


def test_evaluate_reports_accuracy_routing_and_gates(model):
    xb, yb = quadrant_domain(40, 3, -1.5, seed=77)
    res = evaluate(model, xb, yb, CLASSES_B, "a {} square.", batch_size=16)
    p = model.predict(xb, labels=CLASSES_B, template="a {} square.")  # one batch: the hand count
    assert res.count == 40 and res.routed == {1: 40} and p.task_index.tolist() == [1] * 40
    assert res.accuracy == 100.0 * int((p.label_index == yb).sum()) / 40
    assert res.mean_gate == pytest.approx(float(p.gate.double().mean()), rel=1e-5) and res.mean_gate > 0.5
    assert res.ood_rate == 0
    frozen = evaluate(model, xb, yb, CLASSES_B, "a {} square.", task=1, gate=0.0)
    zs = evaluate(create_diki_model("diki-test-tiny", seed=0), xb, yb, CLASSES_B, "a {} square.")
    assert frozen.accuracy == zs.accuracy
    # The zero-shot accuracy itself, from the untouched CLIP without predict or evaluate.
    probs = frozen_clip_probs(model, xb, [f"a {c} square." for c in CLASSES_B])
    assert zs.accuracy == 100.0 * int((probs.argmax(-1) == yb).sum()) / 40
