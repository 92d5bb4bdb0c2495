"""The watcher on real Prefect, Ray, MLflow and S3: partial uploads, arrival order, duplicates, the lock,
and the served deployment on a real Prefect server.

Shares the Prefect harness and helpers of ``test_pipeline.py`` (one harness for the session).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.settings import Settings
from tests.conftest import free_ports
from tests.test_pipeline import (
    BUCKET,
    datasets_json,
    drop,
    local_dataset,
    mlflow_runs,
    s3fs,
    start_prefect_harness,
    write_config,
)
from tests.test_training import CORNERS, QUADS

REPO = Path(__file__).resolve().parent.parent


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


def test_a_partial_upload_is_ignored_until_its_marker_appears(prefect_api, bucket, ray_session, tmp_path):
    from pipelines.watcher import pending_datasets, watch_incoming
    from services.registry import Registry
    from services.storage import open_storage

    config = write_config(tmp_path, bucket)
    settings = Settings.load(config)
    storage = open_storage(settings)
    src = local_dataset(tmp_path / "src", "quads", QUADS, seed=0, shard_rows=40)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    # Half an upload: the manifest and the first shards, no marker.
    for path in files[: len(files) // 2]:
        storage.write_bytes(f"incoming/quads/{path.relative_to(src).as_posix()}", path.read_bytes())

    assert pending_datasets(settings) == []
    outcome = watch_incoming(config=str(config))
    assert outcome == {"pending": [], "results": []}
    assert datasets_json(config)["quads"]["state"] == "incomplete"
    assert not storage.exists("artifacts/pipeline/state/quads.json")
    assert Registry(settings).list_versions() == []

    # The rest of the files, then the marker: now it is learned.
    for path in files[len(files) // 2 :]:
        storage.write_bytes(f"incoming/quads/{path.relative_to(src).as_posix()}", path.read_bytes())
    assert pending_datasets(settings) == []
    storage.put_json("incoming/quads/_SUCCESS", {})
    assert pending_datasets(settings) == ["quads"]
    outcome = watch_incoming(config=str(config))
    assert [(r["name"], r["status"], r["version"]) for r in outcome["results"]] == [("quads", "served", 1)]
    versions = Registry(settings).list_versions()
    assert [v.tasks for v in versions] == [["quads"]]
    assert datasets_json(config)["quads"]["state"] == "served"


def test_two_drops_are_learned_in_arrival_order_and_a_duplicate_creates_nothing(
    prefect_api, bucket, ray_session, tmp_path
):
    from pipelines.state import StateStore
    from pipelines.watcher import pending_datasets, watch_incoming
    from services.registry import Registry
    from services.storage import open_storage

    config = write_config(tmp_path, bucket)
    settings = Settings.load(config)
    storage = open_storage(settings)
    zeta = local_dataset(tmp_path / "src", "zeta", QUADS, seed=0)
    alpha = local_dataset(tmp_path / "src", "alpha", CORNERS, seed=2, background=190)
    # Dropped together, zeta first: arrival (the marker's time) wins over the name's order.
    drop(settings, zeta, "zeta")
    time.sleep(1.2)  # S3 keeps modification times to the second
    drop(settings, alpha, "alpha")
    assert pending_datasets(settings) == ["zeta", "alpha"]
    rows = datasets_json(config)
    assert rows["zeta"]["state"] == rows["alpha"]["state"] == "waiting"

    outcome = watch_incoming(config=str(config))

    assert [(r["name"], r["status"], r["version"]) for r in outcome["results"]] == [
        ("zeta", "served", 1),
        ("alpha", "served", 2),
    ]
    registry = Registry(settings)
    v1, v2 = registry.list_versions()
    assert v1.tasks == ["zeta"] and v2.tasks == ["zeta", "alpha"]
    assert v2.base_version == 1 and v2.dataset_fingerprints[:1] == v1.dataset_fingerprints
    assert registry.get_alias("production") == 2 and registry.alias_history("production") == [1, 2]
    rows = datasets_json(config)
    assert rows["zeta"]["detail"] == "served as task 0 in bundle version 2 (production)"
    assert rows["alpha"]["detail"] == "served as task 1 in bundle version 2 (production)"

    # The same content again, under another name and with another manifest name: nothing new.
    runs = len(mlflow_runs(settings))
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in zeta.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(zeta)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    manifest = (copy / "manifest.json").read_text().replace('"zeta"', '"zeta-again"')
    (copy / "manifest.json").write_text(manifest)
    drop(settings, copy, "zeta-again")
    outcome = watch_incoming(config=str(config))
    [result] = outcome["results"]
    assert (result["status"], result["version"], result["duplicate_of"]) == ("duplicate", 1, "zeta")
    assert [v.version for v in registry.list_versions()] == [1, 2] and len(mlflow_runs(settings)) == runs
    assert not storage.exists("incoming/zeta-again")
    assert len(storage.list_dir("artifacts/ray-train")) == 2
    row = datasets_json(config)["zeta-again"]
    assert row["state"] == "duplicate"
    assert row["detail"] == "same content as 'zeta': served as task 0 in bundle version 2 (production)"
    record = StateStore(storage, settings).get("zeta-again")
    assert record is not None and record.fingerprint == StateStore(storage, settings).get("zeta").fingerprint


LOCK_HOLDER = """
import sys, time
from services.settings import Settings
from services.storage import open_storage
from services.lock import LearningLock

settings = Settings.load(sys.argv[1])
lock = LearningLock(open_storage(settings), settings, purpose="learning elsewhere")
assert lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_watcher_does_not_learn_while_another_process_holds_the_lock(prefect_api, bucket, tmp_path):
    """The storage lock spans processes; a holder that dies (SIGKILL) leaves a lock that is taken over."""
    from pipelines.learning import learning_slot
    from pipelines.watcher import watch_incoming
    from services.lock import LearningLock
    from services.storage import open_storage

    config = write_config(tmp_path, bucket)
    settings = Settings.load(config)
    storage = open_storage(settings)
    drop(settings, local_dataset(tmp_path / "src", "quads", QUADS, seed=0), "quads")
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        seen = LearningLock(storage, settings).holder()
        assert seen is not None and seen.pid == holder.pid and seen.purpose == "learning elsewhere"

        outcome = watch_incoming(config=str(config))

        [result] = outcome["results"]
        assert result["status"] == "busy" and f"pid {holder.pid}" in result["detail"]
        assert datasets_json(config)["quads"]["state"] == "waiting"  # untouched, no record
        assert not storage.exists("artifacts/pipeline/state/quads.json")
        # In this process too, only one holder at a time.
        with learning_slot(settings) as slot:
            assert not slot.acquired and slot.holder is not None and slot.holder.pid == holder.pid
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    # The holder is gone without releasing: its lock is stale at once (same host, dead pid).
    assert storage.is_file("artifacts/pipeline/learning.lock")
    assert LearningLock(storage, settings).holder() is None
    with learning_slot(settings) as slot:
        assert slot.acquired and slot.lock is not None and slot.lock.held
        assert LearningLock(storage, settings).holder() is not None
        with learning_slot(settings) as second:
            assert not second.acquired
    assert not storage.exists("artifacts/pipeline/learning.lock")


# --- the served deployment on a real Prefect server -------------------------------------------------


def _wait(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited {proc.returncode}\n{log.read_text()[-3000:] if log else ''}")
        try:
            value = predicate()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"{what}: not after {timeout_s} s\n{log.read_text()[-3000:] if log else ''}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout_s: float = 60) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
def test_the_served_watcher_deployment_runs_on_its_schedule_on_a_prefect_server(bucket, tmp_path):
    """`python -m pipelines.watcher --serve` against `prefect server start`: an interval schedule, and a pass
    that a run of the deployment makes (nothing to learn: it lists incoming/ and reports)."""
    port = free_ports(1)[0]
    api = f"http://127.0.0.1:{port}/api"
    config = write_config(tmp_path, bucket, pipeline={"poll_interval_s": 5, "prefect_api_url": api})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=api,
        HF_HUB_OFFLINE="1",
    )
    server_log, runner_log = tmp_path / "server.log", tmp_path / "runner.log"
    with server_log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    runner = None
    try:
        _wait(lambda: httpx.get(f"{api}/health", timeout=2).is_success, 180, "prefect server", server, server_log)
        with runner_log.open("wb") as out:
            runner = subprocess.Popen(
                [sys.executable, "-m", "pipelines.watcher", "--serve", "--config", str(config)],
                env=env,
                cwd=tmp_path,  # the runner imports the flow by module name, not by file path
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"{api}/deployments/name/diki-watch-incoming/diki-watcher"
        deployment = _wait(
            lambda: (r := httpx.get(url, timeout=2)).is_success and r.json(), 240, "deployment", runner, runner_log
        )
        [schedule] = deployment["schedules"]
        assert schedule["schedule"]["interval"] == 5.0 and schedule["active"]
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["parameters"] == {"config": str(config)}

        def completed() -> list:
            body = {
                "deployments": {"id": {"any_": [deployment["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
            }
            return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=5).json()

        # A run of the schedule (or, if the scheduler is slow to start, one asked for now) completes.
        try:
            runs = _wait(completed, 90, "a scheduled run", runner, runner_log)
        except AssertionError:
            httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=5).raise_for_status()
            runs = _wait(completed, 180, "a triggered run", runner, runner_log)
        assert runs[0]["name"] and runs[0]["state"]["type"] == "COMPLETED"
    finally:
        if runner is not None:
            _stop(runner)  # the runner before the server, or the server hangs on shutdown
        _stop(server, signal.SIGTERM)


def test_diki_watch_polls_in_the_foreground_and_ctrl_c_stops_it_cleanly(bucket, tmp_path):
    """`diki watch` in a real process: it lists incoming/ every poll; SIGINT (Ctrl-C) ends it with code 130."""
    config = write_config(tmp_path, bucket, pipeline={"poll_interval_s": 0.5})
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "diki"), "watch", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("Watching s3://") and "every 0.5 s; Ctrl-C stops" in first, first
        assert "ephemeral Prefect API" in first
        time.sleep(2)  # a few idle polls: nothing pending, so no flow run and no Prefect API start
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 130, out
    assert "Stopped." in out and "Traceback" not in out
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()
