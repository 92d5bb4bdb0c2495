"""The Ray Train job and the learn-a-dataset flow, on real Ray, real MLflow (sqlite) and a real S3 server.

Ray starts once for the module (2 logical CPUs) and stops at the end. Datasets are tiny (96 train
images of 32x32 PNG) and the backbone is the random ``diki-test-tiny``, so every job takes seconds
of compute; most of a job's time is Ray's own start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diki_model import collect_statistics, create_diki_model, load_bundle  # noqa: E402
from diki_model.data import Manifest, encode_png, load_split_tensors, write_dataset  # noqa: E402
from services.settings import Settings  # noqa: E402

QUADS = ["north west", "north east", "south west", "south east"]
CORNERS = ["top left", "top right", "bottom left"]


# --- helpers shared with test_registry ---------------------------------------------------------


def png_records(n: int, num_classes: int, background: float, seed: int) -> Iterator[tuple[bytes, int]]:
    """Class c = a bright square in quadrant c on a noisy background (the level sets the domain)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        label = int(rng.integers(num_classes))
        img = rng.normal(background, 20, (32, 32, 3))
        r, c = divmod(label, 2)
        img[r * 16 : r * 16 + 16, c * 16 : c * 16 + 16] += 110
        yield encode_png(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))), label


def make_dataset(
    path: str | Path,
    name: str,
    classes: list[str],
    *,
    background: float,
    seed: int,
    n_train: int = 96,
    n_test: int = 32,
    shard_rows: int = 40,
    filesystem: pafs.FileSystem | None = None,
    template: str = "a photo of a {}.",
) -> str:
    manifest = Manifest(name=name, classes=classes, template=template)
    write_dataset(
        path,
        manifest,
        png_records(n_train, len(classes), background, seed),
        png_records(n_test, len(classes), background, seed + 1000),
        filesystem=filesystem,
        shard_rows=shard_rows,
    )
    return str(path)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_settings(home: Path, **overrides: Any) -> Settings:
    base = {
        "home": str(home),
        "backbone": {"name": "diki-test-tiny"},
        "train": {"epochs": 2, "batch_size": 16, "seed": 0},
        "ray": {"num_cpus": 2},
        # The random tiny backbone learns nothing measurable; the learning check is tested with the
        # shipped backbone in test_learning.py.
        "promotion": {"require_learned": False, "require_new_task_gain": False},
    }
    return Settings.load(**deep_merge(base, overrides))


def s3_overrides(s3_server: Any, root: str) -> dict[str, Any]:
    return {
        "s3": {
            "endpoint_url": s3_server.endpoint,
            "access_key_id": s3_server.access_key,
            "secret_access_key": s3_server.secret_key,
        },
        "storage": {"root": root},
    }


def s3_filesystem(s3_server: Any) -> pafs.S3FileSystem:
    host = s3_server.endpoint.removeprefix("http://")
    return pafs.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        allow_bucket_creation=True,
    )


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from services.ray_runtime import ensure_ray, shutdown_ray

    conn = ensure_ray(make_settings(tmp_path_factory.mktemp("ray-home")))
    assert conn.embedded and conn.cluster_cpus == 2
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("datasets")
    return {
        "quads": make_dataset(root / "quads", "quads", QUADS, background=60, seed=0, shard_rows=40),
        # One shard only: two workers split it by rows.
        "corners": make_dataset(
            root / "corners", "corners", CORNERS, background=190, seed=2, shard_rows=500, template="a {} patch."
        ),
        "heldout": make_dataset(root / "held", "held", ["left", "right"], background=120, seed=4, n_train=16),
    }


# --- the tests -----------------------------------------------------------------------------------


def test_two_tasks_in_a_row_become_versions_1_and_2(ray_session, datasets, tmp_path):
    from pipelines.learning import learn_dataset
    from services.registry import Registry

    settings = make_settings(tmp_path / "home")
    first = learn_dataset(settings, datasets["quads"], heldout=[datasets["heldout"]])
    assert not first.reused and first.version == 1 and first.promoted
    assert first.job is not None and first.job.tasks == ["quads"] and first.job.task_index == 0
    assert [h["epoch"] for h in first.job.history] == [1, 2]
    assert first.job.resumed_from_epoch is None and first.job.num_train_images + first.job.num_val_images == 96

    # The second task learns on two workers: one shard split by rows, statistics all-gathered.
    second = learn_dataset(settings, datasets["corners"], workers=2, heldout=[datasets["heldout"]])
    assert second.version == 2 and second.job is not None and second.job.workers == 2
    assert second.job.tasks == ["quads", "corners"] and second.job.task_index == 1 and second.base_version == 1

    registry = Registry(settings)
    versions = {v.version: v for v in registry.list_versions()}
    assert versions[1].tasks == ["quads"] and versions[2].tasks == versions[1].tasks + ["corners"]
    assert versions[2].base_version == 1
    assert versions[2].dataset_fingerprints[:1] == versions[1].dataset_fingerprints
    assert registry.find_version_by_dataset(second.job.dataset_fingerprint) == 2
    assert registry.get_alias("candidate") == 2

    # Loading production by alias gives exactly the tasks that version names, and it predicts.
    production = registry.get_alias("production")
    assert production is not None
    local = registry.download_bundle(production, tmp_path / "prod")
    model = load_bundle(local, model=create_diki_model("diki-test-tiny", seed=0))
    assert [t.name for t in model.tasks] == versions[production].tasks
    images, _ = load_split_tensors(datasets["corners"], "test", model.preprocess)
    pred = model.predict(images[:8])
    assert pred.label_index.shape == (8,) and all(lbl in QUADS + CORNERS for lbl in pred.labels)

    # The merged statistics of the two workers equal statistics over the whole split in one process.
    task_gaussian = model.tasks[1].gaussian
    all_images, _ = load_split_tensors(datasets["corners"], "train", model.preprocess)
    single = collect_statistics(model, [(all_images, torch.zeros(len(all_images)))])
    full, _, _ = single.finalize(model.config.shrinkage)
    assert model.tasks[1].num_samples == len(all_images) == 96
    torch.testing.assert_close(task_gaussian.mean, full.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(task_gaussian.cov, full.cov, atol=1e-6, rtol=0)

    # The matrix: zero-shot row + one row per step; columns: both tasks and the held-out set.
    matrix = second.matrix
    assert matrix is not None and matrix.rows == ["zero-shot", "quads", "corners"]
    assert [c.kind for c in matrix.columns] == ["task", "task", "heldout"]
    assert first.matrix is not None
    # Rows of earlier steps are reused from version 1's matrix, not recomputed differently.
    assert matrix.acc[0][0] == first.matrix.acc[0][0] and matrix.acc[1][0] == first.matrix.acc[1][0]
    assert set(second.metrics) == {"transfer", "average", "last"} and second.metrics["transfer"] is not None

    # Tracking: one run per task, with params, per-epoch metrics, the matrix and its heatmap.
    run = registry.client.get_run(versions[2].run_id)
    assert run.data.params["dataset.fingerprint"] == second.job.dataset_fingerprint
    assert run.data.params["ray.run_id"] == second.job.ray_run_id and run.data.params["scaling.workers"] == "2"
    assert run.data.tags["mlflow.source.name"] and run.data.params["backbone.fingerprint"]
    # The run spans the training job, and names the dataset it trained on.
    assert run.info.end_time - run.info.start_time >= second.job.job_seconds * 1000
    assert "corners" in {d.dataset.name for d in run.inputs.dataset_inputs}
    history = registry.client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]
    assert {"transfer", "average", "last", "zero_shot_retention"} <= set(run.data.metrics)
    files = {f.path for f in registry.client.list_artifacts(run.info.run_id, "evaluation")}
    assert files == {"evaluation/accuracy_matrix.json", "evaluation/accuracy_heatmap.png"}
    assert registry.get_matrix(2).acc == matrix.acc

    # Idempotent: the same dataset again trains nothing and names the version that holds it.
    again = learn_dataset(settings, datasets["corners"], heldout=[])
    assert again.reused and again.version == 2 and again.job is None
    assert registry.latest_version() == 2


def test_a_worker_killed_mid_run_resumes_from_its_checkpoint_and_registers_once(ray_session, s3_server, tmp_path):
    """Dataset and checkpoints on the S3 server; one worker process dies at epoch 2 and the job resumes.

    The crash is injected on purpose (``os._exit`` in the worker when a marker file exists), because a
    real worker crash cannot be produced on demand; the marker is removed first so it happens once.
    """
    from pipelines.learning import learn_dataset
    from services.registry import Registry

    fs = s3_filesystem(s3_server)
    for bucket in ("train-data", "train-store"):
        fs.create_dir(bucket)
    uri = "s3://train-data/incoming/quads"
    make_dataset("train-data/incoming/quads", "quads", QUADS, background=60, seed=0, filesystem=fs)
    settings = make_settings(tmp_path / "home", **s3_overrides(s3_server, "s3://train-store/storage"))
    marker = tmp_path / "crash-once"
    marker.touch()

    def crash_once(epoch: int, rank: int, marker: str = str(marker)) -> None:
        import os

        if epoch == 2 and rank == 0 and os.path.exists(marker):
            os.remove(marker)
            os._exit(1)

    outcome = learn_dataset(settings, uri, epochs=3, heldout=[], epoch_hook=crash_once, max_failures=2)
    job = outcome.job
    assert not marker.exists(), "the injected crash did not happen"
    assert job is not None and job.resumed_from_epoch in (1, 2)
    assert [h["epoch"] for h in job.history] == [1, 2, 3]
    assert job.checkpoint_path.startswith("s3://train-store/storage/artifacts/ray-train/")
    checkpoints = fs.get_file_info(pafs.FileSelector(f"train-store/storage/artifacts/ray-train/{job.ray_run_id}"))
    assert any(i.base_name.startswith("checkpoint_") for i in checkpoints)

    registry = Registry(settings)
    assert [v.version for v in registry.list_versions()] == [1]
    assert registry.find_version_by_dataset(job.dataset_fingerprint) == 1
    local = registry.download_bundle(1, tmp_path / "v1")
    model = load_bundle(local, model=create_diki_model("diki-test-tiny", seed=0))
    images, labels = load_split_tensors("train-data/incoming/quads", "test", model.preprocess, fs)
    pred = model.predict(images)
    assert pred.label_index.shape == labels.shape and set(pred.labels) <= set(QUADS)


def _write_shard(path: Path, images: list[bytes], labels: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())})
    pq.write_table(table, path)


@pytest.mark.parametrize(
    "problem, expected",
    [
        pytest.param("unreadable shard", r"train/part-00001\.parquet: unreadable Parquet file", id="unreadable-shard"),
        pytest.param(
            "label out of range",
            r"train/part-00000\.parquet row 3: label 7 out of range \[0, 4\)",
            id="label-out-of-range",
        ),
        pytest.param("class names missing", r"manifest\.json: field 'classes' is missing", id="class-names-missing"),
        pytest.param("too few images", r"8 training images, too few", id="too-few-images"),
        pytest.param(
            "image does not decode",
            r"train/part-00000\.parquet row 5: not a PNG or JPEG image",
            id="image-does-not-decode",
        ),
        pytest.param("no test split", r"no test split", id="no-test-split"),
    ],
)
def test_bad_datasets_fail_before_any_compute_and_register_nothing(problem, expected, shared_home, tmp_path):
    from pipelines.learning import learn_dataset
    from services.registry import Registry
    from services.training import TrainingInputError

    ds = tmp_path / "bad"
    good = list(png_records(40, 4, 60, seed=9))
    make_dataset(ds, "bad", QUADS, background=60, seed=9, n_train=40, shard_rows=20)
    images, labels = [g[0] for g in good[:20]], [g[1] for g in good[:20]]
    if problem == "unreadable shard":
        (ds / "train" / "part-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    elif problem == "label out of range":
        labels[3] = 7
        _write_shard(ds / "train" / "part-00000.parquet", images, labels)
    elif problem == "class names missing":
        (ds / "manifest.json").write_text(json.dumps({"name": "bad", "template": "a photo of a {}."}))
    elif problem == "too few images":
        shutil.rmtree(ds)
        make_dataset(ds, "bad", QUADS, background=60, seed=9, n_train=8)
    elif problem == "image does not decode":
        images[5] = b"definitely not an image"
        _write_shard(ds / "train" / "part-00000.parquet", images, labels)
    elif problem == "no test split":
        shutil.rmtree(ds / "test")
    # One tracking store for all cases (creating one costs seconds); names and storage are per case.
    name = "bad-" + problem.replace(" ", "-")
    settings = make_settings(
        shared_home,
        mlflow={"registry_model_name": name, "experiment_name": name},
        storage={"root": str(tmp_path / "s")},
    )
    with pytest.raises(TrainingInputError, match=expected):
        learn_dataset(settings, str(ds), heldout=[])
    registry = Registry(settings)
    assert registry.list_versions() == []
    # Before any compute: no Ray Train run was started, no MLflow run was created.
    assert not (tmp_path / "s" / "artifacts" / "ray-train").exists()
    assert registry.client.search_runs([registry.experiment_id]) == []


def test_checkpoint_round_trip_keeps_every_field(tmp_path):
    """The checkpoint format is safetensors + JSON and restores optimizer state with momentum."""
    from diki_model import TrainConfig, TrainState, collect_statistics, tensor_batches, train_task
    from services.training import read_checkpoint, write_checkpoint

    model = create_diki_model("diki-test-tiny", seed=0)
    task = model.add_task("t", QUADS)
    x = torch.randn(24, 3, 32, 32)
    y = torch.randint(0, 4, (24,))
    stats = collect_statistics(model, tensor_batches(x, y, 8, shuffle=False)(0))
    seen: list[TrainState] = []
    cfg = TrainConfig(epochs=2, batch_size=8, momentum=0.9, lr=0.5)
    val = tensor_batches(x[:8], y[:8], 8, shuffle=False)
    train_task(
        model,
        task,
        tensor_batches(x, y, 8),
        3,
        cfg,
        lambda: val(0),
        on_epoch_end=lambda r, s: seen.append(s),
        progress=False,
    )
    state = seen[-1]
    write_checkpoint(tmp_path / "ck", state, stats, {"task_name": "t"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["state.json", "state.safetensors"]
    back, stats_back, meta = read_checkpoint(tmp_path / "ck")
    assert meta == {"task_name": "t"} and back.epoch == 2 and back.best_epoch == state.best_epoch
    assert [h.epoch for h in back.history] == [1, 2]
    for k, v in state.adapter.items():
        torch.testing.assert_close(back.adapter[k], v)
    assert back.best_adapter is not None
    momentum = [e["momentum_buffer"] for e in back.optimizer["state"].values()]
    assert momentum and all(torch.is_tensor(m) for m in momentum)
    assert back.scheduler == state.scheduler
    assert stats_back.count == stats.count
    torch.testing.assert_close(stats_back.fit.outer, stats.fit.outer)
    # Resuming from the restored state continues the schedule where it stopped.
    cfg3 = TrainConfig(epochs=3, batch_size=8, momentum=0.9, lr=0.5)
    res = train_task(model, task, tensor_batches(x, y, 8), 3, cfg3, start_state=back, progress=False)
    assert [h.epoch for h in res.history] == [1, 2, 3]


@pytest.mark.slow
def test_the_same_job_runs_on_a_ray_head_started_apart(ray_session, datasets, tmp_path):
    """A Ray head started with ``ray start --head`` (as in production); the job connects through its address."""
    from services.ray_runtime import ensure_ray, shutdown_ray
    from services.training import run_training_job
    from tests.conftest import free_ports

    shutdown_ray()  # leave the module's in-process Ray
    port = free_ports(1)[0]
    temp_dir = Path("/tmp") / f"dk-ray-{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = (tmp_path / "ray-head.log").open("wb")
    # Its own process group, so exactly the processes this test started can be stopped at the end.
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        settings = make_settings(tmp_path / "home", ray={"address": f"127.0.0.1:{port}"})
        conn = _connect_when_up(ensure_ray, settings, head)
        assert not conn.embedded and conn.address == f"127.0.0.1:{port}" and conn.cluster_cpus == 2
        job = run_training_job(settings, datasets["quads"], epochs=1)
        assert job.tasks == ["quads"] and (job.bundle_dir / "bundle.json").exists()
        model = load_bundle(job.bundle_dir, model=create_diki_model("diki-test-tiny", seed=0))
        assert [t.name for t in model.tasks] == ["quads"]
    finally:
        shutdown_ray()
        _stop_group(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _connect_when_up(ensure_ray: Any, settings: Settings, head: subprocess.Popen[bytes], timeout_s: float = 90) -> Any:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        try:
            return ensure_ray(settings)
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def test_a_job_trains_at_the_backbones_measured_rate_unless_a_rate_is_set(tmp_path: Path) -> None:
    from diki_model import adapter_lr
    from services.training import train_config

    shipped = train_config(make_settings(tmp_path, backbone={"name": "diki-small"}))
    assert shipped.lr == adapter_lr("diki-small") == 50.0
    assert train_config(make_settings(tmp_path)).lr == 5.0  # a random test backbone: the authors' rate
    explicit = train_config(make_settings(tmp_path, backbone={"name": "diki-small"}, train={"lr": 2.0}), epochs=3)
    assert (explicit.lr, explicit.epochs, explicit.batch_size) == (2.0, 3, 16)


@pytest.mark.parametrize("world, rank", [(1, 0), (5, 3)])  # whole shards per worker; every world-th row
def test_a_worker_streams_the_same_part_it_would_cache(tmp_path: Path, world: int, rank: int) -> None:
    """Without room for a cache, a worker streams its Parquet part: the same training and validation
    records as the cached path, exactly ``steps`` full batches per epoch, reshuffled per epoch."""
    import pyarrow.fs as pafs

    from services.training.worker import WorkerData

    root = make_dataset(tmp_path / "q", "q", QUADS, background=60, seed=0, n_train=150, shard_rows=40)

    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)

    def worker(cache_bytes: int) -> WorkerData:
        w = WorkerData(pafs.LocalFileSystem(), root, rank, world, preprocess, 0.1, 3, cache_bytes)
        w.scan(None)
        return w

    streamed, cached = worker(0), worker(1 << 30)
    assert streamed.cache is None and cached.cache is not None
    assert (streamed.num_train, streamed.num_val) == (cached.num_train, cached.num_val)

    def rows(batches) -> list[bytes]:
        return sorted(
            bytes(x.numpy().tobytes()) + bytes([int(y)]) for xb, yb in batches for x, y in zip(xb, yb, strict=True)
        )

    assert rows(streamed.val_batches()) == rows(cached.val_batches())
    assert len(rows(streamed.val_batches())) == streamed.num_val
    steps, batch = 3, 8
    epochs = [list(streamed.train_batches(batch, steps)(epoch)) for epoch in range(2)]
    for batches in epochs:
        assert len(batches) == steps and all(len(y) == batch for _, y in batches)
    train_rows = set(rows(cached.train_batches(cached.num_train, 1)(0)))
    assert set(rows(epochs[0])) <= train_rows and set(rows(epochs[1])) <= train_rows
    assert rows(epochs[0]) != rows(epochs[1])  # a new shuffle each epoch
