"""The learning flow end to end on real Prefect, Ray, MLflow, Ray Serve and a real S3 server (SeaweedFS).

Prefect runs on ``prefect_test_harness`` (one temporary API for the session), Ray once for the module
(2 logical CPUs), MLflow on SQLite in each test's home, storage in a bucket of the session's
SeaweedFS. Datasets are tiny (96 train / 32 test PNGs of 32x32) and the backbone is the random
``diki-test-tiny``, trained for one epoch.

Helpers here are shared with ``test_watcher.py``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

# Prefect reads these when it is first imported; a temp PREFECT_HOME keeps the user's profile out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="diki-test-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], True)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from services.settings import Settings  # noqa: E402
from tests.conftest import S3Server, free_ports  # noqa: E402
from tests.test_training import QUADS, make_dataset, png_records  # noqa: E402

BUCKET = "pipeline-tests"
SHAPES = ["circle", "square", "triangle"]

# --- shared helpers -------------------------------------------------------------------------------

_HARNESS: dict[str, Any] = {}


def start_prefect_harness(request: pytest.FixtureRequest) -> str:
    """One ``prefect_test_harness`` for the whole session (it costs ~12 s), whichever module asks first."""
    if "url" not in _HARNESS:
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        harness = prefect_test_harness(server_startup_timeout=120)
        harness.__enter__()
        _HARNESS["url"] = PREFECT_API_URL.value()
        request.addfinalizer(lambda: harness.__exit__(None, None, None))
    return _HARNESS["url"]


@pytest.fixture(scope="session")
def prefect_api(request: pytest.FixtureRequest) -> str:
    return start_prefect_harness(request)


def s3fs(server: S3Server) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=server.endpoint.removeprefix("http://"),
        scheme="http",
        access_key=server.access_key,
        secret_key=server.secret_key,
        allow_bucket_creation=True,
    )


def write_config(tmp_path: Path, server: S3Server | None, bucket: str = BUCKET, **overrides: Any) -> Path:
    """A settings YAML for one test: its own home and storage root, the tiny backbone, one epoch."""
    data: dict[str, Any] = {
        "home": str(tmp_path / "home"),
        "backbone": {"name": "diki-test-tiny"},
        "train": {"epochs": 1, "batch_size": 16, "seed": 0},
        "ray": {"num_cpus": 2},
        "pipeline": {"poll_interval_s": 1},
        # Never the default 8000: another Serve on this machine must not be told to reload.
        "serve": {"host": "127.0.0.1", "port": free_ports(1)[0]},
        # Promotion and the learning check are tested in test_promotion and test_learning; the tiny
        # random model learns nothing measurable and must not be refused here.
        "promotion": {
            "max_task_drop": 1.0,
            "min_zero_shot_retention": 0.0,
            "require_learned": False,
            "require_new_task_gain": False,
        },
    }
    if server is not None:
        data["storage"] = {"root": f"s3://{bucket}/t-{uuid.uuid4().hex[:10]}"}
        data["s3"] = {
            "endpoint_url": server.endpoint,
            "access_key_id": server.access_key,
            "secret_access_key": server.secret_key,
        }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "diki.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def local_dataset(root: Path, name: str, classes: list[str], seed: int, background: float = 60, **kw: Any) -> Path:
    make_dataset(root / name, name, classes, background=background, seed=seed, **kw)
    return root / name


def drop(settings: Settings, src: Path, name: str) -> None:
    """What a producer does: every file of the dataset, then the marker (``Storage.copy_tree``)."""
    from services.storage import open_storage

    open_storage(settings).copy_tree(src, f"{settings.storage.incoming_prefix}/{name}")


def cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result


def datasets_json(config: Path) -> dict[str, dict[str, Any]]:
    result = cli("datasets", "--json", "--config", str(config))
    assert result.exit_code == 0, result.output
    # Ray Serve replicas log to this process's stdout too: decode the JSON document where it starts.
    start = result.output.index("[\n") if "[\n" in result.output else result.output.index("[]")
    rows, _ = json.JSONDecoder().raw_decode(result.output[start:])
    return {row["name"]: row for row in rows}


def mlflow_runs(settings: Settings) -> list[Any]:
    from services.registry import Registry

    registry = Registry(settings)
    return registry.client.search_runs([registry.experiment_id])


def artifacts(key: str, flow_run_id: str | None) -> list[Any]:
    """The artifacts with ``key`` that one flow run created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    assert flow_run_id, "the state record names the learning flow run"
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )


def rewrite_shard(folder: Path, split: str, shard: str, edit: Any) -> None:
    """Rewrite one Parquet shard of a local dataset after ``edit(images, labels)`` changed its rows."""
    path = folder / split / shard
    table = pq.read_table(path)
    images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    edit(images, labels)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())}), path)


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> S3Server:
    s3fs(s3_server).create_dir(BUCKET)
    return s3_server


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from services.ray_runtime import ensure_ray, shutdown_ray

    ensure_ray(Settings.load(home=str(tmp_path_factory.mktemp("ray-home")), ray={"num_cpus": 2}))
    yield
    shutdown_ray()


# --- a bad dataset is quarantined with a report ---------------------------------------------------


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("truncated image", ["train/part-00000.parquet", "| 5 |", "truncated or corrupt"]),
        ("label out of range", ["train/part-00000.parquet", "| 3 |", "label 7 out of range [0, 4)"]),
        ("missing manifest field", ["manifest.json", "field 'classes' is missing"]),
    ],
)
def test_a_corrupt_drop_is_quarantined_with_a_report_and_nothing_is_registered(
    problem, expected, prefect_api, bucket, tmp_path
):
    from pipelines.state import Stage, StateStore
    from pipelines.watcher import watch_incoming
    from services.registry import Registry
    from services.storage import open_storage

    config = write_config(tmp_path, bucket)
    settings = Settings.load(config)
    src = local_dataset(tmp_path / "src", "bad", QUADS, seed=3, shard_rows=40)
    if problem == "truncated image":
        rewrite_shard(src, "train", "part-00000.parquet", lambda im, lb: im.__setitem__(5, im[5][: len(im[5]) // 2]))
    elif problem == "label out of range":
        rewrite_shard(src, "train", "part-00000.parquet", lambda im, lb: lb.__setitem__(3, 7))
    else:
        manifest = json.loads((src / "manifest.json").read_text())
        del manifest["classes"]
        (src / "manifest.json").write_text(json.dumps(manifest))
    drop(settings, src, "bad")

    outcome = watch_incoming(config=str(config))

    assert [r["status"] for r in outcome["results"]] == ["quarantined"]
    storage = open_storage(settings)
    assert not storage.exists("incoming/bad"), "the bad drop must leave incoming/"
    assert storage.is_file("quarantine/bad/_SUCCESS") and storage.is_file("quarantine/bad/manifest.json")
    report = storage.read_bytes("quarantine/bad/_ERROR.md").decode()
    for text in expected:
        assert text in report, f"{text!r} not in the report:\n{report}"
    assert "diki push PATH --name bad" in report
    record = StateStore(storage, settings).get("bad")
    assert record is not None and record.stage == Stage.QUARANTINED and record.version is None
    # Nothing was trained, tracked or registered.
    assert Registry(settings).list_versions() == [] and mlflow_runs(settings) == []
    assert not storage.exists("artifacts/ray-train")
    row = datasets_json(config)["bad"]
    assert row["state"] == "quarantined" and "quarantine/bad/_ERROR.md" in row["detail"]
    assert expected[-1].split(" [")[0] in row["detail"]
    [artifact] = artifacts("quarantine-bad", record.flow_run_id)
    assert expected[-1] in artifact.data


# --- drop -> learned -> registered -> served, through the CLI ---------------------------------------


def image_folder(root: Path, classes: list[str], seed: int, n_train: int = 96, n_test: int = 30) -> Path:
    """An ImageFolder tree: train/<class>/*.png and test/<class>/*.png (the quadrant images of test_training)."""
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
        for i, (png, label) in enumerate(png_records(n, len(classes), background=60, seed=seed + offset)):
            folder = root / split / classes[label].replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.png").write_bytes(png)
    return root


def test_a_drop_is_learned_registered_and_served_and_a_fixed_redrop_works(prefect_api, bucket, ray_session, tmp_path):
    """A bad drop is quarantined; the same name re-dropped fixed (an ImageFolder tree) is learned and served."""
    from ray import serve

    from pipelines.state import Stage, StateStore
    from services.evaluation import HELDOUT_PREFIX
    from services.registry import Registry
    from services.serving.app import build_app
    from services.serving.client import ServingClient
    from services.storage import open_storage

    config = write_config(tmp_path, bucket)
    settings = Settings.load(config)
    storage = open_storage(settings)
    # A held-out set in storage: evaluation adds its zero-shot column to the matrix.
    held = local_dataset(tmp_path / "src", "held", ["left", "right"], seed=4, background=120, n_train=16)
    storage.copy_tree(held, f"{HELDOUT_PREFIX}/held")

    # The Serve app follows the registry's production alias; the flow tells it to reload.
    serve.start(http_options={"host": "127.0.0.1", "port": settings.serve.port})
    serve.run(
        build_app(
            {
                "settings": {"home": str(settings.home)},
                "backbone": "diki-test-tiny",
                "seed": 0,
                "poll_interval_s": 3600,
                "num_cpus": 0.5,
                "max_batch_size": 4,
            }
        ),
        name="diki-pipeline-test",
        route_prefix="/",
        blocking=False,
    )
    try:
        url = f"http://127.0.0.1:{settings.serve.port}"
        with ServingClient(url) as client:
            assert client.wait_ready(120)["bundle_version"] is None  # zero-shot: nothing registered yet

        # 1. A bad drop (a label out of range) is quarantined.
        bad = local_dataset(tmp_path / "src", "shapes", SHAPES, seed=5, shard_rows=40)
        rewrite_shard(bad, "train", "part-00000.parquet", lambda im, lb: lb.__setitem__(2, 9))
        result = cli("push", str(bad), "--name", "shapes", "--config", str(config))
        assert result.exit_code == 0, result.output
        assert "incoming/shapes/" in result.output and "diki datasets" in result.output
        assert datasets_json(config)["shapes"]["state"] == "waiting"
        result = cli("watch", "--once", "--config", str(config))
        assert result.exit_code == 1 and "shapes: quarantined" in result.output, result.output
        assert "label 9 out of range [0, 3)" in storage.read_bytes("quarantine/shapes/_ERROR.md").decode()
        assert Registry(settings).list_versions() == []

        # 2. Fixed, as an ImageFolder tree, dropped again under the same name: learned and served.
        tree = image_folder(tmp_path / "tree", SHAPES, seed=5)
        result = cli("push", str(tree), "--name", "shapes", "--config", str(config))
        assert result.exit_code == 0 and "ImageFolder tree, converted" in result.output, result.output
        result = cli("watch", "--once", "--config", str(config))
        assert result.exit_code == 0, result.output
        assert "shapes: learned as task 0, version 1 is now production" in result.output

        registry = Registry(settings)
        [version] = registry.list_versions()
        assert version.version == 1 and version.tasks == ["shapes"] and version.tags["dataset_name"] == "shapes"
        assert registry.get_alias("production") == 1 and registry.get_alias("candidate") == 1
        record = StateStore(storage, settings).get("shapes")
        assert record is not None and record.stage == Stage.DONE and record.version == 1
        assert [h["stage"] for h in record.history][-3:] == ["decided", "applied", "done"]
        assert record.reload is not None and record.reload["status"] == "reloaded", record.reload
        # The data left incoming/ for its immutable location, which the version records; the old
        # quarantine of this name is gone.
        assert not storage.exists("incoming/shapes") and not storage.exists("quarantine/shapes")
        assert record.dataset_uri and version.datasets == [record.dataset_uri]
        assert storage.is_file(f"{record.location}/_SUCCESS")
        # The matrix has the task and the held-out column; the MLflow run carries the dataset.
        matrix = registry.get_matrix(1)
        assert matrix is not None and [c.kind for c in matrix.columns] == ["task", "heldout"]
        run = registry.client.get_run(version.run_id)
        assert run.data.params["dataset.name"] == "shapes" and run.info.status == "FINISHED"

        # Served: the reload made the endpoint switch at once (its own poll is an hour away).
        with ServingClient(url) as client:
            ready = client.ready()
            assert ready["bundle_version"] == 1 and ready["tasks"] == ["shapes"]
            png = next(png_records(1, 3, background=60, seed=77))[0]
            answer = client.classify(png, task="shapes")
            assert answer["bundle_version"] == 1 and answer["label"] in SHAPES

        row = datasets_json(config)["shapes"]
        assert row["state"] == "served" and row["detail"] == "served as task 0 in bundle version 1 (production)"
        # The flow run carries the outcome and the accuracy matrix.
        [artifact] = artifacts("learn-shapes", record.flow_run_id)
        assert "bundle version 1" in artifact.data and "| after shapes |" in artifact.data and "held" in artifact.data
    finally:
        serve.shutdown()


# --- a crash between training and registration ----------------------------------------------------

CRASH_SCRIPT = textwrap.dedent(
    """
    # A watcher process that dies right after the trained bundle is recorded, before registration.
    # The crash is injected on purpose (os._exit at the stage hook): a real crash cannot be timed.
    import os, sys
    from pipelines.state import Stage, add_stage_hook

    def die(record):
        if record.stage == Stage.TRAINED:
            print("dying after", record.stage.value, flush=True)
            os._exit(17)

    add_stage_hook(die)
    from pipelines.watcher import main
    sys.exit(main(["--once", "--config", sys.argv[1]]))
    """
)


def test_a_crash_after_training_is_finished_by_the_next_watcher_run_without_duplicates(
    prefect_api, bucket, ray_session, tmp_path
):
    from pipelines.state import Stage, StateStore
    from pipelines.watcher import watch_incoming
    from services.lock import LearningLock
    from services.registry import Registry
    from services.storage import open_storage

    config = write_config(tmp_path, bucket)
    settings = Settings.load(config)
    storage = open_storage(settings)
    drop(settings, local_dataset(tmp_path / "src", "quads", QUADS, seed=0), "quads")

    # A real watcher process, on the same Prefect API, dies at the hook (exit code 17).
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(config)],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 17, proc.stdout[-3000:] + proc.stderr[-3000:]

    store = StateStore(storage, settings)
    record = store.get("quads")
    assert record is not None and record.stage == Stage.TRAINED and record.job is not None
    trained_run = record.job["ray_run_id"]
    registry = Registry(settings)
    assert registry.list_versions() == [] and mlflow_runs(settings) == []
    # The dead process still "holds" the lock; it is seen as its leftover.
    assert storage.is_file("artifacts/pipeline/learning.lock")
    assert LearningLock(storage, settings).holder() is None
    row = datasets_json(config)["quads"]
    assert row["state"] == "interrupted" and "stage trained" in row["detail"]

    outcome = watch_incoming(config=str(config))

    assert [(r["name"], r["status"], r["version"]) for r in outcome["results"]] == [("quads", "served", 1)]
    record = store.get("quads")
    assert record is not None and record.stage == Stage.DONE
    assert record.job is not None and record.job["ray_run_id"] == trained_run, "it must not train again"
    assert storage.list_dir("artifacts/ray-train") == [trained_run]
    # Exactly one version, one MLflow run, and aliases that moved once.
    assert [v.version for v in registry.list_versions()] == [1]
    assert len(mlflow_runs(settings)) == 1
    assert registry.get_alias("production") == 1 and registry.alias_history("production") == [1]
    assert registry.get_alias("candidate") == 1
    assert not storage.exists("artifacts/pipeline/learning.lock")


def test_only_transient_errors_are_retried():
    """The retry condition of the storage and registry steps, on Prefect's own failed states."""
    from prefect.states import Failed

    from diki_model.data import DatasetError
    from pipelines.flows import _is_permanent, _retry_transient
    from services.registry import RegistryError
    from services.storage import StorageError
    from services.training import TrainingError, TrainingInputError

    transient = [StorageError("cannot read s3://b/x: timeout"), ConnectionError("refused"), RegistryError("HTTP 503")]
    permanent = [DatasetError("label 7 out of range", "train/part-0.parquet", 3), TrainingInputError("no test split")]
    permanent += [TrainingError("worker 0: RuntimeError"), ValueError("invalid dataset name")]
    for exc in transient:
        assert not _is_permanent(exc) and _retry_transient(None, None, Failed(data=exc)), exc
    for exc in permanent:
        assert _is_permanent(exc) and not _retry_transient(None, None, Failed(data=exc)), exc
