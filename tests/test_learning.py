"""The one learning step: `diki train` and the watcher's flow run the same stages, under the same lock.

Real Prefect (the session's test harness), Ray, MLflow on SQLite and the session's SeaweedFS, the
tiny random backbone trained for one epoch. The validation pass is checked on its own, without
services: one decode per image, and the fingerprint from the same pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from services.settings import Settings
from tests.test_pipeline import BUCKET, drop, local_dataset, s3fs, start_prefect_harness, write_config
from tests.test_training import CORNERS, QUADS, make_dataset

REPO = Path(__file__).resolve().parent.parent
SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(scope="session")
def prefect_api(request: pytest.FixtureRequest) -> str:
    return start_prefect_harness(request)


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3fs(s3_server).create_dir(BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory):
    from services.ray_runtime import ensure_ray, shutdown_ray

    ensure_ray(Settings.load(home=str(tmp_path_factory.mktemp("ray-home")), ray={"num_cpus": 2}))
    yield
    shutdown_ray()


# --- one validation pass ---------------------------------------------------------------------------


def test_validating_a_drop_decodes_each_image_once_and_fingerprints_it_in_the_same_pass(tmp_path, monkeypatch):
    """Counted at the one image decoder that validation calls; the pass's fingerprint is the dataset's."""
    import diki_model.data.validation as validation
    from diki_model.data import dataset_fingerprint
    from services.training import inspect_dataset

    root = make_dataset(tmp_path / "quads", "quads", QUADS, background=60, seed=0, n_train=40, shard_rows=15)
    decoded: list[int] = []
    real = validation.decode_rgb

    def counted(data: bytes, **kw: Any):
        decoded.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(validation, "decode_rgb", counted)
    settings = Settings.load(home=str(tmp_path / "home"), backbone={"name": "diki-test-tiny"})
    check = inspect_dataset(settings, str(root))

    assert check.ok and check.dataset is not None
    total = check.report.num_train + check.report.num_test
    assert check.report.num_train == 40 and total > 40
    assert len(decoded) == total == check.report.images_decoded  # every image once, none twice
    monkeypatch.setattr(validation, "decode_rgb", real)
    assert check.dataset.fingerprint == dataset_fingerprint(str(root))  # no decode needed to re-hash


def test_an_invalid_drop_has_no_fingerprint_and_lists_every_problem(tmp_path):
    from services.training import inspect_dataset

    root = make_dataset(tmp_path / "few", "few", QUADS, background=60, seed=0, n_train=8)
    settings = Settings.load(home=str(tmp_path / "home"), backbone={"name": "diki-test-tiny"})
    check = inspect_dataset(settings, str(root))
    assert not check.ok and check.dataset is None
    assert any("too few to learn a task" in p for p in check.problems)
    assert "cannot be trained on" in check.summary(str(root))


# --- the same step from both front doors ----------------------------------------------------------


def _train_cli(config: Path, dataset: Path, *extra: str) -> subprocess.Popen[str]:
    """`diki train` in a process of its own (its own embedded Ray), as a user runs it beside the watcher."""
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "train", str(dataset), "--config", str(config), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_holder(
    settings: Settings, purpose: str, proc: subprocess.Popen[str] | None = None, timeout_s: float = 300
) -> None:
    from services.lock import LearningLock
    from services.storage import open_storage

    lock = LearningLock(open_storage(settings), settings)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        holder = lock.holder()
        if holder is not None and holder.purpose == purpose:
            return
        if proc is not None and proc.poll() is not None:
            assert proc.stdout is not None
            raise AssertionError(f"diki train exited {proc.returncode} before taking the lock:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"nobody took the lock for {purpose!r}")


def test_diki_train_and_the_watcher_learn_one_after_the_other_and_never_register_siblings(
    prefect_api, bucket, ray_session, tmp_path
):
    """Both front doors at once, both ways round: each waits for the other, and each extends the newest version."""
    from pipelines.watcher import watch_incoming
    from services.registry import Registry

    config = write_config(tmp_path, bucket)
    settings = Settings.load(config)
    src = tmp_path / "src"
    corners = local_dataset(src, "corners", CORNERS, seed=2, background=190)
    drop(settings, local_dataset(src, "quads", QUADS, seed=0), "quads")

    # 1. `diki train` takes the lock first: the watcher's pass finds it busy and leaves the drop waiting.
    trainer = _train_cli(config, corners)
    _wait_for_holder(settings, "learning corners", trainer)
    busy = watch_incoming(config=str(config))
    assert [r["status"] for r in busy["results"]] == ["busy"], busy
    out, _ = trainer.communicate(timeout=600)
    assert trainer.returncode == 0, out
    assert "-> version 1" in out

    # 2. The watcher takes the lock first: `diki train --wait` waits for it, then extends its version.
    third = local_dataset(src, "shapes", SHAPES, seed=5)
    passes: list[dict[str, Any]] = []
    watcher = threading.Thread(target=lambda: passes.append(watch_incoming(config=str(config))))
    watcher.start()
    _wait_for_holder(settings, "learning quads")
    waiting = _train_cli(config, third, "--wait", "600")
    watcher.join(timeout=600)
    out, _ = waiting.communicate(timeout=600)
    assert waiting.returncode == 0, out
    assert [(r["name"], r["status"], r["version"]) for r in passes[0]["results"]] == [("quads", "served", 2)]

    versions = {v.version: v for v in Registry(settings).list_versions()}
    assert sorted(versions) == [1, 2, 3]
    # A chain, never siblings: each version is its base plus one task.
    assert versions[1].tasks == ["corners"] and versions[1].base_version is None
    assert versions[2].tasks == ["corners", "quads"] and versions[2].base_version == 1
    assert versions[3].tasks == ["corners", "quads", "shapes"] and versions[3].base_version == 2
    assert Registry(settings).get_alias("production") == 3


def _record_of(settings: Settings) -> dict[str, Any]:
    """What the registry holds for version 1, without what differs per run (ids, times, locations)."""
    from services.registry import Registry

    registry = Registry(settings)
    [version] = registry.list_versions()
    run = registry.client.get_run(version.run_id)
    per_run = {"ray.run_id", "ray.job_id", "ray.checkpoint", "dataset.uri", "code_version"}
    return {
        "version": version.version,
        "tasks": version.tasks,
        "aliases": version.aliases,
        "fingerprints": version.dataset_fingerprints,
        "tags": {k: v for k, v in version.tags.items() if k not in ("ray_run_id", "datasets")},
        "params": {k: v for k, v in run.data.params.items() if k not in per_run},
        "run_tags": sorted(k for k in run.data.tags if k.startswith("diki.")),
        "metrics": sorted(run.data.metrics),
        "status": run.info.status,
    }


def test_the_same_dataset_gives_the_same_registry_records_from_diki_train_and_from_the_watcher(
    prefect_api, bucket, ray_session, tmp_path
):
    from pipelines.learning import learn_dataset
    from pipelines.watcher import watch_incoming

    src = local_dataset(tmp_path / "src", "quads", QUADS, seed=0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    by_cli = Settings.load(write_config(tmp_path / "a", bucket))
    outcome = learn_dataset(by_cli, str(src))
    assert outcome.version == 1 and outcome.promoted

    config = write_config(tmp_path / "b", bucket)
    by_watcher = Settings.load(config)
    drop(by_watcher, src, "quads")
    [result] = watch_incoming(config=str(config))["results"]
    assert result["status"] == "served"

    cli_record, watcher_record = _record_of(by_cli), _record_of(by_watcher)
    assert cli_record["params"]["dataset.name"] == "quads" and cli_record["tags"]["promotion"] == "passed"
    assert cli_record == watcher_record


# --- a task must earn its place ---------------------------------------------------------------------


def _faces(root: Path, name: str, shuffled: bool) -> Path:
    """The offline `faces` domain (2 classes), as built for the benchmark; optionally with shuffled labels."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diki_model.datasets import build_domain

    built = Path(build_domain("faces", root / "built", 0, train_size=480, test_size=60))
    out = root / name
    shutil.copytree(built, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["name"] = name
    (out / "manifest.json").write_text(json.dumps(manifest))
    if shuffled:
        rng = np.random.default_rng(7)
        for split in ("train", "test"):
            for shard in sorted((out / split).glob("*.parquet")):
                table = pq.read_table(shard)
                labels = rng.permutation(np.asarray(table.column("label")))
                pq.write_table(table.set_column(1, "label", pa.array(labels, pa.int64())), shard)
    return out


def test_a_task_that_learned_nothing_is_refused_and_a_learnable_one_is_served(
    prefect_api, bucket, ray_session, tmp_path
):
    """The shipped backbone, the learning check on (the default): shuffled labels end `not_learned`."""
    from pipelines.state import Stage, StateStore
    from pipelines.watcher import watch_incoming
    from services.registry import Registry
    from services.storage import open_storage
    from tests.test_pipeline import datasets_json

    config = write_config(
        tmp_path,
        bucket,
        backbone={"name": "diki-small"},
        train={"epochs": 2, "batch_size": 64, "seed": 0},
        promotion={"require_learned": True, "require_new_task_gain": True},
    )
    settings = Settings.load(config)
    drop(settings, _faces(tmp_path / "src", "noise", shuffled=True), "noise")

    [result] = watch_incoming(config=str(config))["results"]

    assert result["status"] == "not_learned", result
    registry = Registry(settings)
    assert registry.list_versions() == [] and registry.get_alias("production") is None
    record = StateStore(open_storage(settings), settings).get("noise")
    assert record is not None and record.stage == Stage.NOT_LEARNED and record.version is None
    checks = record.learned["checks"]
    # The report's figures: the branch is no better than chance, and neither is a linear probe.
    assert checks["val_images"] >= 40 and checks["num_classes"] == 2
    assert checks["branch_acc"] < checks["needed_accuracy"]
    assert checks["probe_acc"] is not None and checks["probe_acc"] < 0.75
    row = datasets_json(config)["noise"]
    assert row["state"] == "not_learned" and "zero-shot" in row["detail"] and "linear probe" in row["detail"]

    drop(settings, _faces(tmp_path / "src", "faces", shuffled=False), "faces")
    [result] = watch_incoming(config=str(config))["results"]
    assert result["status"] == "served", result
    record = StateStore(open_storage(settings), settings).get("faces")
    assert record.learned["ok"] and record.learned["checks"]["branch_acc"] > record.learned["checks"]["zero_shot_acc"]
    assert [v.tasks for v in registry.list_versions()] == [["faces"]]
    assert any(r.startswith("new task 'faces'") for r in record.decision["reasons"])


def test_diki_train_refuses_a_task_that_learned_nothing(ray_session, tmp_path):
    from pipelines.learning import TaskNotLearnedError, learn_dataset
    from services.registry import Registry

    settings = Settings.load(
        home=str(tmp_path / "home"),
        backbone={"name": "diki-small"},
        train={"epochs": 2, "batch_size": 64, "seed": 0},
        ray={"num_cpus": 2},
    )
    with pytest.raises(TaskNotLearnedError, match="is not above chance"):
        learn_dataset(settings, str(_faces(tmp_path / "src", "noise", shuffled=True)), heldout=[])
    registry = Registry(settings)
    assert registry.list_versions() == []
    assert registry.client.search_runs([registry.experiment_id]) == []


# --- the reference density ------------------------------------------------------------------------


def _bundle_reference(settings: Settings, version: int, tmp: Path) -> dict[str, Any] | None:
    from diki_model import read_bundle_manifest
    from services.registry import Registry

    return read_bundle_manifest(Registry(settings).download_bundle(version, tmp / f"v{version}")).reference


def test_a_reference_drop_is_fitted_once_and_used_by_the_next_bundle(ray_session, tmp_path):
    """`reference/` in storage: fitted when it appears, kept as an artifact, carried by every later bundle;
    a changed reference is fitted again. Before any, bundles carry the shipped backbone's own reference."""
    from pipelines.learning import learn_dataset
    from services.storage import open_storage

    settings = Settings.load(
        home=str(tmp_path / "home"),
        train={"epochs": 1, "batch_size": 32, "seed": 0},
        promotion={"require_learned": False, "require_new_task_gain": False, "min_zero_shot_retention": 0.0},
        ray={"num_cpus": 2},
    )
    storage = open_storage(settings)
    outcome = learn_dataset(settings, make_dataset(tmp_path / "quads", "quads", QUADS, background=60, seed=0),
                            heldout=[])  # fmt: skip
    assert outcome.version == 1
    assert _bundle_reference(settings, 1, tmp_path)["components"] == {"mnist": 600, "fashion-mnist": 600, "shapes": 600}

    make_dataset(storage.path("reference"), "traffic", SHAPES, background=200, seed=5, n_train=60, n_test=12)
    outcome = learn_dataset(settings, make_dataset(tmp_path / "corners", "corners", CORNERS, background=30, seed=1),
                            heldout=[])  # fmt: skip
    ref = _bundle_reference(settings, outcome.version, tmp_path)
    assert ref is not None
    # One component per class of the reference dataset, fitted on all of its images (train 60 + test 12).
    assert set(ref["components"]) == {f"reference/{c}" for c in SHAPES} and ref["images"] == 72
    fitted = storage.list_dir("artifacts/references")
    assert len(fitted) == 1

    # The next bundle reuses the kept fit; a changed reference dataset is fitted again.
    learn_dataset(settings, make_dataset(tmp_path / "more", "more", SHAPES, background=120, seed=2), heldout=[])
    assert storage.list_dir("artifacts/references") == fitted
    shutil.rmtree(storage.path("reference"))
    make_dataset(storage.path("reference"), "traffic", SHAPES, background=90, seed=6, n_train=30, n_test=6)
    outcome = learn_dataset(settings, make_dataset(tmp_path / "last", "last", QUADS, background=10, seed=3),
                            heldout=[])  # fmt: skip
    assert len(storage.list_dir("artifacts/references")) == 2
    assert _bundle_reference(settings, outcome.version, tmp_path)["images"] == 36


def test_an_invalid_reference_drop_stops_learning_with_a_clear_error_and_registers_nothing(ray_session, tmp_path):
    from pipelines.learning import learn_dataset
    from services.reference import ReferenceDatasetError
    from services.registry import Registry
    from services.storage import open_storage

    settings = Settings.load(
        home=str(tmp_path / "home"),
        train={"epochs": 1, "batch_size": 32, "seed": 0},
        promotion={"require_learned": False, "require_new_task_gain": False},
        ray={"num_cpus": 2},
    )
    storage = open_storage(settings)
    root = Path(make_dataset(storage.path("reference"), "traffic", SHAPES, background=200, seed=5, n_train=30))
    shard = sorted((root / "train").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(ReferenceDatasetError, match=r"reference dataset .*reference is not valid: .*train/"):
        learn_dataset(settings, make_dataset(tmp_path / "quads", "quads", QUADS, background=60, seed=0), heldout=[])
    assert Registry(settings).list_versions() == []
    assert storage.list_dir("artifacts/references") == []
