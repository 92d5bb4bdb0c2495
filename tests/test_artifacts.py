"""Task artifacts on disk: atomic writes, metadata, and the checks made when loading."""

import json

import pytest
import torch

from diki_model import ArtifactError, create_diki_model, load_task, read_task_metadata, save_bundle, save_task
from tests.synthetic import fitted_model


@pytest.fixture(scope="module")
def model():
    return fitted_model()


class NotJSON:
    """Task metadata that json.dumps cannot write: the write fails after the weights are on disk."""


def test_a_failed_write_leaves_no_folder_behind(model, tmp_path):
    model.tasks[0].metadata = {"bad": NotJSON()}
    try:
        with pytest.raises(TypeError, match="not JSON serializable"):
            save_task(model, 0, tmp_path / "task")
        assert list(tmp_path.iterdir()) == [], "neither the target nor its temporary folder may remain"
    finally:
        model.tasks[0].metadata = {}


def test_a_failed_overwrite_keeps_the_previous_artifact_and_no_temporary_folder(model, tmp_path):
    save_task(model, 0, tmp_path / "task")
    before = {p.name: p.read_bytes() for p in (tmp_path / "task").iterdir()}
    model.tasks[0].metadata = {"bad": NotJSON()}
    try:
        with pytest.raises(TypeError):
            save_task(model, 0, tmp_path / "task")
    finally:
        model.tasks[0].metadata = {}
    assert [p.name for p in tmp_path.iterdir()] == ["task"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "task").iterdir()} == before
    assert load_task(create_diki_model("diki-test-tiny", seed=0), tmp_path / "task") == 0


def test_a_failed_bundle_write_leaves_nothing_behind(model, tmp_path):
    fresh = create_diki_model("diki-test-tiny", seed=0)
    fresh.add_task("unfitted", ["a", "b"])
    with pytest.raises(ArtifactError, match="no fitted statistics"):
        save_bundle(fresh, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []
    # A successful write replaces the target and leaves only it.
    save_bundle(model, tmp_path / "bundle")
    save_bundle(model, tmp_path / "bundle")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert sorted(p.name for p in (tmp_path / "bundle" / "tasks").iterdir()) == ["000-quadrants", "001-colours"]


def test_task_metadata_records_the_task_backbone_and_layout(model, tmp_path):
    model.tasks[1].dataset_fingerprint = "abc123"
    model.tasks[1].metadata = {"source": "unit test"}
    try:
        save_task(model, 1, tmp_path / "t")
    finally:
        model.tasks[1].dataset_fingerprint, model.tasks[1].metadata = "", {}
    meta = read_task_metadata(tmp_path / "t")
    rec = model.tasks[1]
    assert meta["artifact_version"] == 1
    assert (meta["name"], meta["classes"], meta["template"]) == ("colours", ["red", "green", "blue"], "a {} square.")
    assert meta["backbone"] == model.backbone_info.to_dict()
    assert meta["feature_dim"] == 32 and meta["num_samples"] == 120
    assert (meta["score_mean"], meta["score_std"]) == (rec.score_mean, rec.score_std)
    assert meta["shrinkage"] == "ledoit_wolf" and meta["dataset_fingerprint"] == "abc123"
    assert meta["adapter"] == {"prompt_length": 8, "vision_layers": [0, 1, 2], "text_layers": [0, 1, 2]}
    assert meta["metadata"] == {"source": "unit test"}
    from diki_model import __version__

    assert meta["library_version"] == __version__
    assert len(meta["created_at"]) == 20 and meta["created_at"][10] == "T" and meta["created_at"].endswith("Z")
    loaded = create_diki_model("diki-test-tiny", seed=0)
    load_task(loaded, tmp_path / "t")
    got = loaded.tasks[0]
    assert (got.dataset_fingerprint, got.metadata, got.num_samples) == ("abc123", {"source": "unit test"}, 120)
    assert (got.score_mean, got.score_std) == (rec.score_mean, rec.score_std)
    assert torch.equal(got.gaussian.mean, rec.gaussian.mean.double()) and torch.equal(got.gaussian.cov, rec.gaussian.cov)
    for key, value in model.adapter_state_dict(1).items():
        assert torch.equal(loaded.adapter_state_dict(0)[key], value), key


def test_unreadable_metadata_is_a_clear_error(model, tmp_path):
    save_task(model, 0, tmp_path / "t")
    meta_path = tmp_path / "t" / "task.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text("{")
    with pytest.raises(ArtifactError, match="task.json: not valid JSON"):
        read_task_metadata(tmp_path / "t")
    for key in ("name", "classes", "template", "backbone", "adapter", "score_mean", "score_std"):
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != key}))
        with pytest.raises(ArtifactError, match=f"task.json: missing field '{key}'"):
            read_task_metadata(tmp_path / "t")
