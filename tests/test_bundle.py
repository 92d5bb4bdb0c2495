import copy
import json
import re

import pytest
import torch

from diki_model import (
    ArtifactError,
    DikiConfig,
    Gaussian,
    PaperGate,
    __version__,
    create_diki_model,
    evaluate,
    extend_bundle,
    load_bundle,
    read_bundle_manifest,
    save_bundle,
)
from tests.synthetic import fitted_model, quadrant_domain
from tests.test_model import CLASSES_B, frozen_clip_probs


@pytest.fixture(scope="module")
def model():
    return fitted_model()


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
    other.set_task_statistics(
        task, Gaussian(torch.zeros(32, dtype=torch.float64), torch.eye(32, dtype=torch.float64)), 0.0, 1.0, 10
    )
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


def test_saved_bundle_manifest_and_file(model, tmp_path):
    model.tasks[1].dataset_fingerprint = "f1"
    try:
        manifest = save_bundle(model, tmp_path / "b")
    finally:
        model.tasks[1].dataset_fingerprint = ""
    assert manifest.tasks == [
        {"name": "quadrants", "path": "tasks/000-quadrants", "dataset_fingerprint": ""},
        {"name": "colours", "path": "tasks/001-colours", "dataset_fingerprint": "f1"},
    ]
    assert manifest.backbone == model.backbone_info.to_dict() and manifest.config == model.config.to_dict()
    assert manifest.library_version == __version__ and manifest.format_version == 1
    text = (tmp_path / "b" / "bundle.json").read_text()
    data = json.loads(text)
    assert data == {**manifest.__dict__}
    assert list(data) == sorted(data) and list(data["backbone"]) == sorted(data["backbone"])  # sorted keys
    assert text.splitlines()[1] == '  "backbone": {'  # two-space indent
    assert read_bundle_manifest(tmp_path / "b") == manifest
    extended = extend_bundle(tmp_path / "b", fitted_model_third_task(model), 2, tmp_path / "c")
    assert extended.tasks[:2] == manifest.tasks
    assert extended.tasks[2] == {"name": "shapes", "path": "tasks/002-shapes", "dataset_fingerprint": "f3"}
    for entry in extended.tasks:
        assert (tmp_path / "c" / entry["path"] / "task.json").is_file()


def fitted_model_third_task(model):
    """A copy of ``model`` with a third task "shapes" (statistics of task 0, dataset fingerprint f3)."""
    m = copy.deepcopy(model)
    t = m.add_task("shapes", ["circle", "square"])
    rec = m.tasks[0]
    m.set_task_statistics(t, rec.gaussian, rec.score_mean, rec.score_std, 7)
    m.tasks[t].dataset_fingerprint = "f3"
    return m


def test_load_bundle_builds_the_recorded_backbone_and_config(model, tmp_path):
    config = DikiConfig(gate="paper", ood_threshold=0.01, text_gate_levels=5, prompt_length=8)
    m = copy.deepcopy(model)
    m.config = config
    m.set_gate("paper")
    save_bundle(m, tmp_path / "b")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the random test backbone of seed 0, rebuilt from the bundle's reference
        loaded = load_bundle(tmp_path / "b")
    assert loaded.backbone_info.fingerprint == model.backbone_info.fingerprint
    assert loaded.config == config and loaded.gate_fn == PaperGate()
    assert [t.name for t in loaded.tasks] == ["quadrants", "colours"] and loaded.device.type == "cpu"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        override = load_bundle(tmp_path / "b", config=DikiConfig(), device="cpu")
    assert override.config == DikiConfig() and override.config.gate == "ratio"


def test_load_bundle_errors_are_clear(model, tmp_path):
    save_bundle(model, tmp_path / "b")
    with pytest.raises(ValueError, match="^load_bundle needs a model without tasks$"):
        load_bundle(tmp_path / "b", model=model)
    other = create_diki_model("diki-test-tiny", seed=1)
    with pytest.raises(ArtifactError) as err:
        load_bundle(tmp_path / "b", model=other)
    assert str(err.value) == (
        f"{tmp_path / 'b'}: bundle was built on backbone fingerprint {model.backbone_info.fingerprint[:12]}, "
        f"the model's is {other.backbone_info.fingerprint[:12]}"
    )
    manifest = json.loads((tmp_path / "b" / "bundle.json").read_text())
    manifest["tasks"][1]["name"] = "other"
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as err:
        load_bundle(tmp_path / "b", model=create_diki_model("diki-test-tiny", seed=0))
    assert str(err.value) == f"{tmp_path / 'b' / 'tasks/001-colours'}: holds task 'colours', bundle says 'other'"
    with pytest.raises(ArtifactError) as err:
        read_bundle_manifest(tmp_path / "nothing")
    assert str(err.value) == f"{tmp_path / 'nothing' / 'bundle.json'}: missing bundle manifest"
    (tmp_path / "b" / "bundle.json").write_text("{")
    with pytest.raises(ArtifactError, match=re.escape(f"{tmp_path / 'b' / 'bundle.json'}: not valid JSON (")):
        read_bundle_manifest(tmp_path / "b")
    for key in ("backbone", "config", "tasks"):
        (tmp_path / "b" / "bundle.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != key}))
        with pytest.raises(ArtifactError) as err:
            read_bundle_manifest(tmp_path / "b")
        assert str(err.value) == f"{tmp_path / 'b' / 'bundle.json'}: missing field {key!r}"
    # Unknown fields (from a newer writer) are ignored.
    (tmp_path / "b" / "bundle.json").write_text(json.dumps({**manifest, "future": 1}))
    assert read_bundle_manifest(tmp_path / "b").task_names == ["quadrants", "other"]


def test_load_bundle_loads_the_recorded_weights(tmp_path):
    from diki_model import load_backbone

    weights = load_backbone("diki-test-tiny", seed=3)
    torch.save(weights.model.state_dict(), tmp_path / "w.pt")
    m = create_diki_model("diki-test-tiny", pretrained=str(tmp_path / "w.pt"))
    t = m.add_task("a", ["x", "y"])
    m.set_task_statistics(
        t, Gaussian(torch.zeros(32, dtype=torch.float64), torch.eye(32, dtype=torch.float64)), 0.0, 1.0, 2
    )
    save_bundle(m, tmp_path / "b")
    assert read_bundle_manifest(tmp_path / "b").backbone["pretrained"] == str(tmp_path / "w.pt")
    loaded = load_bundle(tmp_path / "b")  # no model given: the backbone comes from the bundle's reference
    assert loaded.backbone_info.fingerprint == weights.info.fingerprint and loaded.num_tasks == 1
