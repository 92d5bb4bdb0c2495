import json

import pytest
import torch

from diki_model import ArtifactError, create_diki_model, evaluate, extend_bundle, load_bundle, read_bundle_manifest
from tests.synthetic import quadrant_domain
from tests.test_model import CLASSES_A, CLASSES_B, two_task_model


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


def test_evaluate_reports_accuracy_routing_and_gates(model):
    xb, yb = quadrant_domain(40, 3, -1.5, seed=77)
    res = evaluate(model, xb, yb, CLASSES_B, "a {} square.", batch_size=16)
    assert res.count == 40 and set(res.routed) == {1}
    assert 0 <= res.accuracy <= 100 and res.mean_gate > 0.5 and res.ood_rate == 0
    frozen = evaluate(model, xb, yb, CLASSES_B, "a {} square.", task=1, gate=0.0)
    zs = evaluate(create_diki_model("diki-test-tiny", seed=0), xb, yb, CLASSES_B, "a {} square.")
    assert frozen.accuracy == zs.accuracy
    assert CLASSES_A != CLASSES_B
