"""Task artifacts on disk: atomic writes, metadata, and the checks made when loading."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diki_model import (
    ArtifactError,
    DikiConfig,
    create_diki_model,
    load_task,
    read_task_metadata,
    save_bundle,
    save_task,
)
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
    assert torch.equal(got.gaussian.mean, rec.gaussian.mean.double()) and torch.equal(
        got.gaussian.cov, rec.gaussian.cov
    )
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


def test_loading_onto_another_backbone_or_layout_names_both(model, tmp_path):
    save_task(model, 0, tmp_path / "t")
    other = create_diki_model("diki-test-tiny", seed=1)
    with pytest.raises(ArtifactError) as err:
        load_task(other, tmp_path / "t")
    mine, theirs = model.backbone_info.fingerprint, other.backbone_info.fingerprint
    assert str(err.value) == (
        f"{tmp_path / 't'}: task 'quadrants' was trained on backbone 'diki-test-tiny' (fingerprint {mine[:12]}), "
        f"but the model's backbone is 'diki-test-tiny' (fingerprint {theirs[:12]})"
    )
    for config, message in (
        (DikiConfig(prompt_length=4), "adapter prompt_length is 8, the model uses 4"),
        (DikiConfig(vision_layers=(1,)), "adapter vision_layers is [0, 1, 2], the model uses [1]"),
        (DikiConfig(text_layers=(0, 2)), "adapter text_layers is [0, 1, 2], the model uses [0, 2]"),
    ):
        layout = create_diki_model("diki-test-tiny", seed=0, config=config)
        with pytest.raises(ArtifactError) as err:
            load_task(layout, tmp_path / "t")
        assert str(err.value) == f"{tmp_path / 't'}: {message}"
        assert layout.num_tasks == 0


@pytest.mark.parametrize("broken", ["shape", "missing"])
def test_a_task_whose_weights_do_not_fit_is_dropped_again(model, tmp_path, broken):
    source = copy.deepcopy(model)
    source.tasks[1].name = "shapes"
    save_task(source, 1, tmp_path / "t")
    weights = tmp_path / "t" / "adapter.safetensors"
    tensors = load_file(str(weights))
    if broken == "shape":
        tensors["adapter.vision.0.key"] = tensors["adapter.vision.0.key"][:, :10].contiguous()
        message = f"{weights}: vision layer 0 key: shape (8, 10) != (8, 64)"
    else:
        del tensors["adapter.text.2.value"]
        message = (
            f"{weights}: adapter state does not match this model's layers: missing ['text.2.value'], unexpected []"
        )
    save_file(tensors, str(weights))
    target = copy.deepcopy(model)  # two tasks already: the failed third must go, not one of them
    before = [
        (layer.keys[i].clone(), layer.values[i].clone()) for _, _, layer in target.adapter_layers() for i in range(2)
    ]
    with pytest.raises(ArtifactError) as err:
        load_task(target, tmp_path / "t")
    assert str(err.value) == message
    assert target.num_tasks == 2 and [t.name for t in target.tasks] == ["quadrants", "colours"]
    after = [(layer.keys[i], layer.values[i]) for _, _, layer in target.adapter_layers() for i in range(2)]
    assert all(layer.num_tasks == 2 for _, _, layer in target.adapter_layers())
    for (k0, v0), (k1, v1) in zip(before, after, strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    p = target.predict(probe_batch())
    q = model.predict(probe_batch())
    assert p.labels == q.labels and torch.equal(p.gate, q.gate)


def probe_batch() -> torch.Tensor:
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_missing_or_mismatched_tensors_are_clear_errors(model, tmp_path):
    save_task(model, 0, tmp_path / "t")
    weights = tmp_path / "t" / "adapter.safetensors"
    full = load_file(str(weights))
    for key in ("gaussian.mean", "gaussian.cov"):
        save_file({k: v for k, v in full.items() if k != key}, str(weights))
        with pytest.raises(ArtifactError) as err:
            load_task(create_diki_model("diki-test-tiny", seed=0), tmp_path / "t")
        assert str(err.value) == f"{weights}: missing tensor {key!r}"
    small = dict(
        full,
        **{"gaussian.mean": torch.zeros(5, dtype=torch.float64), "gaussian.cov": torch.eye(5, dtype=torch.float64)},
    )
    save_file(small, str(weights))
    fresh = create_diki_model("diki-test-tiny", seed=0)
    with pytest.raises(ArtifactError) as err:
        load_task(fresh, tmp_path / "t")
    assert str(err.value) == f"{weights}: Gaussian of dim 5, model features are 32-d"
    assert fresh.num_tasks == 0
    (tmp_path / "t" / "task.json").unlink()
    with pytest.raises(ArtifactError) as err:
        read_task_metadata(tmp_path / "t")
    assert str(err.value) == f"{tmp_path / 't' / 'task.json'}: missing task metadata"


def test_save_needs_fitted_statistics(tmp_path):
    fresh = create_diki_model("diki-test-tiny", seed=0)
    fresh.add_task("raw", ["a", "b"])
    with pytest.raises(ArtifactError) as err:
        save_task(fresh, 0, tmp_path / "t")
    assert str(err.value) == "task 'raw' has no fitted statistics; fit them before saving"
    assert not (tmp_path / "t").exists()


def test_artifact_files_are_tagged_and_readable(model, tmp_path):
    from safetensors import safe_open

    save_task(model, 1, tmp_path / "t")
    with safe_open(str(tmp_path / "t" / "adapter.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "diki-task", "name": "colours"}
    text = (tmp_path / "t" / "task.json").read_text()
    meta = json.loads(text)
    assert list(meta) == sorted(meta) and text.splitlines()[1].startswith('  "adapter": {')


def test_older_metadata_without_optional_fields_loads_with_defaults(model, tmp_path):
    save_task(model, 0, tmp_path / "t")
    meta_path = tmp_path / "t" / "task.json"
    meta = json.loads(meta_path.read_text())
    for key in ("dataset_fingerprint", "metadata", "num_samples"):
        del meta[key]
    meta_path.write_text(json.dumps(meta))
    loaded = create_diki_model("diki-test-tiny", seed=0)
    load_task(loaded, tmp_path / "t")
    rec = loaded.tasks[0]
    assert (rec.dataset_fingerprint, rec.metadata, rec.num_samples) == ("", {}, 0)


def test_gaussians_are_stored_in_float64_and_times_in_utc(model, tmp_path, monkeypatch):
    import time

    m = copy.deepcopy(model)
    g = m.tasks[0].gaussian
    m.set_task_statistics(0, type(g)(g.mean.float(), g.cov.float()), 0.0, 1.0, 3)
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        save_task(m, 0, tmp_path / "t")
        now = time.gmtime()
    finally:
        monkeypatch.undo()
        time.tzset()
    tensors = load_file(str(tmp_path / "t" / "adapter.safetensors"))
    assert tensors["gaussian.mean"].dtype == tensors["gaussian.cov"].dtype == torch.float64
    created = read_task_metadata(tmp_path / "t")["created_at"]
    stamp = time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")
    assert abs(time.mktime(stamp) - time.mktime(now)) < 120, (created, now)
