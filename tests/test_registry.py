"""The MLflow registry of bundles and the promotion gate: embedded (sqlite + local artifacts) and a real
``mlflow server`` whose artifacts live on the SeaweedFS S3 server. No Ray here: bundles are built in-process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diki_model import TrainConfig, create_diki_model, extend_bundle, learn_task, load_bundle  # noqa: E402
from services.promotion import PromotionDecision, decide_promotion  # noqa: E402
from services.registry import Registry, RegistryError  # noqa: E402
from services.settings import PromotionSettings  # noqa: E402
from tests.conftest import free_ports  # noqa: E402
from tests.synthetic import quadrant_domain  # noqa: E402
from tests.test_promotion import matrix  # noqa: E402
from tests.test_training import make_settings, s3_filesystem  # noqa: E402

TASKS = [
    ("alpha", ["north west", "north east", "south west", "south east"], 1.0),
    ("beta", ["red", "green", "blue"], -1.5),
    ("gamma", ["left", "right"], 0.0),
]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 = [alpha], v2 = v1 + beta, v3 = v2 + gamma, and an orphan [beta, gamma] that extends no v1."""
    root = tmp_path_factory.mktemp("bundles")
    model = create_diki_model("diki-test-tiny", seed=0)
    cfg = TrainConfig(epochs=1, batch_size=16)
    for i, (name, classes, background) in enumerate(TASKS):
        x, y = quadrant_domain(40, len(classes), background, seed=i)
        learn_task(model, name, classes, x, y, cfg=cfg, progress=False, dataset_fingerprint=f"fp-{name}")
    extend_bundle(None, model, 0, root / "v1")
    extend_bundle(root / "v1", model, 1, root / "v2")
    extend_bundle(root / "v2", model, 2, root / "v3")
    extend_bundle(None, model, 1, root / "beta-only")
    extend_bundle(root / "beta-only", model, 2, root / "orphan")
    return {name: root / name for name in ("v1", "v2", "v3", "orphan")}


def fresh_model():
    return create_diki_model("diki-test-tiny", seed=0)


@pytest.fixture(scope="module")
def mlflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite tracking store for the module (creating one costs seconds); each test has its own model name."""
    return tmp_path_factory.mktemp("mlflow-home")


@pytest.fixture
def registry(mlflow_home: Path, request: pytest.FixtureRequest) -> Registry:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:60]
    return Registry(make_settings(mlflow_home, mlflow={"registry_model_name": name}))


# --- embedded: sqlite + local artifacts ----------------------------------------------------------


def test_versions_carry_their_lineage_and_download_as_loadable_bundles(bundles, registry, tmp_path):
    assert registry.latest_version() is None and registry.list_versions() == []
    assert registry.get_alias("production") is None

    assert registry.register_bundle(bundles["v1"], datasets=["/data/alpha"]) == 1
    assert registry.register_bundle(bundles["v2"], tags={"note": "second"}) == 2
    assert registry.latest_version() == 2
    v1, v2 = registry.list_versions()
    assert (v1.version, v1.tasks, v1.base_version, v1.dataset_fingerprints) == (1, ["alpha"], None, ["fp-alpha"])
    assert (v2.tasks, v2.base_version, v2.dataset_fingerprints) == (["alpha", "beta"], 1, ["fp-alpha", "fp-beta"])
    assert v1.datasets == ["/data/alpha"] and v2.tags["note"] == "second" and v2.run_id
    assert registry.find_version_by_dataset("fp-beta") == 2 and registry.find_version_by_dataset("fp-x") is None

    local = registry.download_bundle(2, tmp_path / "dl" / "v2")
    assert (local / "bundle.json").exists()
    downloaded = load_bundle(local, model=fresh_model())
    original = load_bundle(bundles["v2"], model=fresh_model())
    assert [t.name for t in downloaded.tasks] == ["alpha", "beta"]
    x, _ = quadrant_domain(6, 3, -1.5, seed=99)
    torch.testing.assert_close(downloaded.predict(x).confidence, original.predict(x).confidence)

    # Each version is an MLflow model of its run, the bundle among its artifacts; they go to the
    # configured local artifact location, not to ./mlruns of the working directory.
    location = Path(registry.settings.mlflow.artifact_location)
    for v in (v1, v2):
        assert v.model_id and v.source == f"models:/{v.model_id}"
        stored = registry.client.get_logged_model(v.model_id).artifact_location
        assert stored.startswith(location.as_uri())
        assert (Path(stored.removeprefix("file://")) / "artifacts" / "bundle" / "bundle.json").exists()


def test_a_bundle_that_extends_no_registered_version_is_refused(bundles, registry, tmp_path):
    registry.register_bundle(bundles["v1"])
    with pytest.raises(RegistryError, match=r"lineage: .*\['beta', 'gamma'\]"):
        registry.register_bundle(bundles["orphan"])
    with pytest.raises(RegistryError, match="lineage"):
        registry.register_bundle(bundles["v3"])  # v3 = [alpha, beta, gamma] needs a [alpha, beta] version
    assert [v.version for v in registry.list_versions()] == [1]


def test_a_failure_after_the_version_exists_removes_it(bundles, registry, tmp_path):
    registry.register_bundle(bundles["v1"])
    # MLflow itself rejects a tag key over 250 characters; tags are applied after the version is created.
    with pytest.raises(RegistryError, match="was removed"):
        registry.register_bundle(bundles["v2"], tags={"k" * 300: "value"})
    assert [v.version for v in registry.list_versions()] == [1]
    assert registry.find_version_by_dataset("fp-beta") is None
    version = registry.register_bundle(bundles["v2"])
    assert registry.get_version(version).tasks == ["alpha", "beta"]


def test_aliases_move_with_history_and_rollback_walks_it_back(bundles, registry, tmp_path):
    for name in ("v1", "v2", "v3"):
        registry.register_bundle(bundles[name])
    with pytest.raises(RegistryError, match="no version 9"):
        registry.set_alias("production", 9)
    assert registry.get_alias("production") is None
    with pytest.raises(RegistryError, match="no production version"):
        registry.rollback()
    registry.set_alias("production", 1)
    registry.promote(2)
    registry.promote(3)
    registry.set_alias("candidate", 3)
    assert registry.alias_history("production") == [1, 2, 3]
    assert {v.version: v.aliases for v in registry.list_versions()} == {1: [], 2: [], 3: ["candidate", "production"]}
    assert registry.rollback() == 2 and registry.get_alias("production") == 2
    assert registry.rollback() == 1 and registry.get_alias("production") == 1
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()
    assert registry.get_alias("production") == 1 and registry.get_alias("candidate") == 3
    # By alias, exactly the tasks of the version it names.
    local = registry.download_bundle(registry.get_alias("production"), tmp_path / "prod")
    assert [t.name for t in load_bundle(local, model=fresh_model()).tasks] == ["alpha"]


def test_the_cli_lists_promotes_and_rolls_back(bundles, registry, mlflow_home, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    registry.register_bundle(bundles["v1"])
    registry.register_bundle(bundles["v2"])
    config = tmp_path / "diki.yaml"
    settings = {"home": str(mlflow_home), "mlflow": {"registry_model_name": registry.model_name}}
    config.write_text(json.dumps({**settings, "backbone": {"name": "diki-test-tiny"}}))
    runner = CliRunner()
    assert runner.invoke(app, ["promote", "1", "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["promote", "2", "--config", str(config)])
    assert result.exit_code == 0 and "production: 1 -> 2" in result.output
    listing = runner.invoke(app, ["tasks", "--config", str(config)], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "alpha > beta" in listing.output and "production" in listing.output
    back = runner.invoke(app, ["rollback", "--config", str(config)])
    assert back.exit_code == 0 and "production: 2 -> 1" in back.output
    assert registry.get_alias("production") == 1
    bad = runner.invoke(app, ["promote", "7", "--config", str(config)])
    assert bad.exit_code == 1 and "no version 7" in bad.output
    missing = runner.invoke(app, ["train", str(tmp_path / "nowhere"), "--config", str(config)])
    assert missing.exit_code == 2 and "manifest.json" in missing.output


# --- promotion applied to the registry -----------------------------------------------------------


def test_a_refused_candidate_leaves_production_untouched(bundles, registry, tmp_path):
    registry.register_bundle(bundles["v1"])
    assert registry.apply_promotion(1, PromotionDecision(ok=True, reasons=["first version"]))
    assert registry.get_alias("production") == 1
    registry.register_bundle(bundles["v2"])
    prev = matrix(["zero-shot", "alpha"], [[25.0], [90.0]])
    new = matrix(["zero-shot", "alpha", "beta"], [[25, 30], [90, 30], [70, 95]])
    decision = decide_promotion(prev, new, PromotionSettings())
    assert not decision.ok
    assert registry.apply_promotion(2, decision) is False
    assert registry.get_alias("production") == 1 and registry.get_alias("candidate") == 2
    tags = registry.get_version(2).tags
    assert tags["promotion"] == "refused" and "drop 20.0 points" in json.loads(tags["promotion_reasons"])[0]
    assert registry.alias_history("production") == [1]
    # What a person reads first in the MLflow UI: what each version adds, and what was decided.
    descriptions = {v: registry.client.get_model_version(registry.model_name, str(v)).description for v in (1, 2)}
    assert (
        descriptions[1]
        == "Task 'alpha' on the bare backbone (1 task). Promotion passed, now production: first version."
    )
    assert descriptions[2].startswith("Adds task 'beta' to version 1 (2 tasks: alpha > beta). Promotion refused")
    assert "candidate only" in descriptions[2] and "90.0% -> 70.0% (drop 20.0 points > 2.0 allowed)" in descriptions[2]


# --- an MLflow server with its artifacts on the S3 server ----------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    s3_filesystem(s3_server).create_dir("models")
    data = tmp_path_factory.mktemp("mlflow-server")
    port = free_ports(1)[0]
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{data / 'mlflow.db'}",
        "--artifacts-destination",
        "s3://models/mlflow",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (data / "server.log").open("wb")
    proc = subprocess.Popen(command, env=env, cwd=data, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", proc, data / "server.log")
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        log.close()


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy at {url} after {timeout_s} s:\n{log.read_text()[-3000:]}")


def test_an_mlflow_server_with_s3_artifacts_registers_and_serves_bundles(bundles, mlflow_server, s3_server, tmp_path):
    settings = make_settings(tmp_path / "home", mlflow={"tracking_uri": mlflow_server})
    registry = Registry(settings)
    assert registry.register_bundle(bundles["v1"]) == 1
    assert registry.register_bundle(bundles["v2"]) == 2
    registry.set_alias("production", 2)
    model_id = registry.get_version(2).model_id
    assert registry.client.get_logged_model(model_id).artifact_location.startswith("mlflow-artifacts:/")
    local = registry.download_bundle(registry.get_alias("production"), tmp_path / "prod")
    model = load_bundle(local, model=fresh_model())
    assert [t.name for t in model.tasks] == ["alpha", "beta"]
    # The bytes really are on the S3 server, under the server's artifacts destination.
    infos = s3_filesystem(s3_server).get_file_info(pafs.FileSelector("models/mlflow", recursive=True))
    manifests = [i.path for i in infos if i.base_name == "bundle.json"]
    assert len(manifests) == 2
    assert not (tmp_path / "home" / "mlartifacts").exists()
