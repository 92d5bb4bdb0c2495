"""The evaluation step's cache of test sets' frozen features (services.evaluation.FeatureCache).

A warm cache gives exactly the accuracies of a cold run and of an evaluation without any cache; a
corrupted entry, or one of another backbone, is ignored and rebuilt. The random ``diki-test-tiny``
backbone and 32-image test sets keep every evaluation to a fraction of a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diki_model import apply_statistics, collect_statistics, save_bundle, tensor_batches  # noqa: E402
from diki_model.data import load_split_tensors  # noqa: E402
from services.backbone import create_model  # noqa: E402
from services.evaluation import FeatureCache, build_accuracy_matrix  # noqa: E402
from tests.test_training import QUADS, make_dataset, make_settings  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("feature-cache")
    settings = make_settings(root / "home")
    task_ds = make_dataset(root / "quads", "quads", QUADS, background=60, seed=0, n_train=40, n_test=32)
    held_ds = make_dataset(root / "held", "held", ["left", "right"], background=120, seed=4, n_train=16)
    model = create_model(settings)
    task = model.add_task("quads", QUADS, seed=0)
    x, y = load_split_tensors(task_ds, "train", model.preprocess)
    apply_statistics(model, task, collect_statistics(model, tensor_batches(x, y, 16, shuffle=False)(0)))
    with torch.no_grad():  # a branch that changes features, so the gated pass matters
        for _, _, layer in model.adapter_layers():
            layer.values[task].normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    model.invalidate_caches()
    bundle = root / "bundle"
    save_bundle(model, bundle)
    return {"settings": settings, "bundle": bundle, "datasets": [task_ds], "heldout": [held_ds]}


def matrix(setup: dict, **kwargs):
    return build_accuracy_matrix(setup["settings"], setup["bundle"], setup["datasets"], setup["heldout"], **kwargs)


def entries(cache: FeatureCache) -> list[Path]:
    return sorted(Path(cache.storage.path(cache.prefix)).rglob("*.json"))


def test_a_warm_cache_gives_the_accuracies_of_a_cold_run_and_of_no_cache(setup, tmp_path, caplog):
    cache = FeatureCache.of(setup["settings"])
    cache.prefix = f"{cache.prefix}-{tmp_path.name}"  # a cache of this test's own
    uncached = matrix(setup, feature_cache=False)
    assert not entries(cache)
    cold = matrix(setup, feature_cache=cache)
    stored = entries(cache)
    assert len(stored) == 2  # the task's test set and the held-out one
    meta = json.loads(stored[0].read_text())
    assert meta["backbone_fingerprint"] == cold.backbone_fingerprint and meta["count"] == 32
    assert stored[0].with_suffix(".safetensors").is_file()
    with caplog.at_level("INFO", logger="services.evaluation"):
        warm = matrix(setup, feature_cache=cache)
    assert sum("from the feature cache" in r.message for r in caplog.records) == 2
    assert warm.acc == cold.acc == uncached.acc
    assert all(not torch.isnan(torch.tensor(row)).any() for row in warm.acc)


def test_an_entry_of_another_backbone_or_a_corrupted_one_is_ignored_and_rebuilt(setup, tmp_path, caplog):
    cache = FeatureCache.of(setup["settings"])
    cache.prefix = f"{cache.prefix}-{tmp_path.name}"
    cold = matrix(setup, feature_cache=cache)
    held_fp = cold.columns[1].fingerprint
    labels = load_split_tensors(setup["heldout"][0], "test", lambda im: torch.zeros(1))[1]
    good = cache.load(cold.backbone_fingerprint, held_fp, None, labels)
    assert good is not None

    # Another backbone's features stored under this backbone's key: the fingerprint check refuses them.
    key = cache.key(cold.backbone_fingerprint, held_fp, None)
    meta_path = Path(cache.storage.path(f"{key}.json"))
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "backbone_fingerprint": "0" * 64}))
    assert cache.load(cold.backbone_fingerprint, held_fp, None, labels) is None
    # A different backbone never reads this backbone's entries.
    assert cache.load("f" * 64, held_fp, None, labels) is None
    with caplog.at_level("WARNING", logger="services.evaluation"):
        rebuilt = matrix(setup, feature_cache=cache)
    assert any("does not match" in r.message for r in caplog.records)
    assert rebuilt.acc == cold.acc
    assert json.loads(meta_path.read_text())["backbone_fingerprint"] == cold.backbone_fingerprint
    torch.testing.assert_close(cache.load(cold.backbone_fingerprint, held_fp, None, labels), good, rtol=0, atol=0)

    # Corrupted bytes (checksum), then garbage JSON: ignored, rebuilt, same accuracies.
    data_path = meta_path.with_suffix(".safetensors")
    data_path.write_bytes(data_path.read_bytes()[:-8] + b"\x00" * 8)
    assert cache.load(cold.backbone_fingerprint, held_fp, None, labels) is None
    assert matrix(setup, feature_cache=cache).acc == cold.acc
    meta_path.write_text("{not json")
    assert cache.load(cold.backbone_fingerprint, held_fp, None, labels) is None
    assert matrix(setup, feature_cache=cache).acc == cold.acc
    assert cache.load(cold.backbone_fingerprint, held_fp, None, labels) is not None

    # Other labels or another image limit are other entries, never this one's features.
    assert cache.load(cold.backbone_fingerprint, held_fp, None, labels.flip(0) + 1) is None
    assert cache.load(cold.backbone_fingerprint, held_fp, 8, labels[:8]) is None


def test_a_fingerprint_that_is_not_a_plain_name_cannot_key_the_cache(setup):
    cache = FeatureCache.of(setup["settings"])
    with pytest.raises(ValueError, match="cannot key"):
        cache.key("../escape", "abc", None)
