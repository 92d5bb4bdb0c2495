"""What an MLflow user sees, against a real ``mlflow server`` on loopback (sqlite + local artifacts).

Each registered bundle is an MLflow model: ``mlflow.pyfunc.load_model("models:/<name>@production")``
classifies a table of images with per-image routing and gating, exactly as the model library does;
a version's description says what it adds and what was decided; a run carries MLflow's source
tags, spans the work it records, and names its datasets.

The backbone is the random tiny ``diki-test-tiny`` and the tasks are synthetic domains, with random
adapter values so gating has a visible effect (see ``tests/test_serving.py``).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from services.promotion import PromotionDecision
from services.registry import DatasetRef, Registry
from tests.conftest import free_ports
from tests.test_promotion import matrix
from tests.test_serving import CLASSES_A, CLASSES_B, MlflowServer, domain_pngs, make_bundles, preprocess, reference
from tests.test_training import make_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_ports(1)[0])
    srv.start()
    try:
        yield srv.url
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def registered(server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, list[Path]]:
    """v1 = [quadrants], refused; v2 = v1 + colours, promoted: production."""
    bundles = make_bundles(tmp_path_factory.mktemp("bundles"), tasks=2, n=40)
    registry = Registry(make_settings(tmp_path_factory.mktemp("home"), mlflow={"tracking_uri": server}))
    assert registry.register_bundle(bundles[0]) == 1
    registry.apply_promotion(1, PromotionDecision(ok=False, reasons=["new task 'quadrants' does not beat zero-shot"]))
    assert registry.register_bundle(bundles[1]) == 2
    registry.apply_promotion(2, PromotionDecision(ok=True, reasons=["every task within 2.0 points"]))
    return registry, bundles


@pytest.fixture
def tracking(server: str) -> Iterator[None]:
    """``models:/`` URIs resolve through MLflow's process-wide tracking URI, as a user's session would."""
    # ``set_tracking_uri`` also exports MLFLOW_TRACKING_URI, which every later ``Settings.load`` would
    # read: MLflow's own context manager restores the unset state (and the variable) afterwards.
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(server):
        yield


def test_the_production_alias_loads_as_a_pyfunc_that_routes_and_gates_each_image(registered, tracking):
    import mlflow

    registry, bundles = registered
    model = mlflow.pyfunc.load_model(f"models:/{registry.model_name}@production")

    # The signature is recorded: one image per row in, one answer per row out, two parameters.
    meta = model.metadata
    assert meta.get_input_schema().input_names() == ["image"]
    assert meta.get_input_schema().input_types()[0].name == "binary"
    assert meta.get_output_schema().input_names() == ["label", "score", "task", "gate", "out_of_distribution", "top_k"]
    assert {p.name for p in meta.get_params_schema().params} == {"top_k", "task"}

    # The model is stored as code and safetensors + JSON: no pickle anywhere in it.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{registry.model_name}@production"))
    files = [p.name for p in local.rglob("*") if p.is_file()]
    assert "MLmodel" in files and "adapter.safetensors" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files

    # One table mixing both domains: each image is routed on its own.
    pngs_a, _ = domain_pngs(4, len(CLASSES_A), 1.0, seed=50)
    pngs_b, _ = domain_pngs(4, len(CLASSES_B), -1.5, seed=51)
    pngs = [p for pair in zip(pngs_a, pngs_b, strict=True) for p in pair]
    out = model.predict(pd.DataFrame({"image": pngs}))
    assert list(out.columns) == ["label", "score", "task", "gate", "out_of_distribution", "top_k"] and len(out) == 8

    ref = reference(bundles[1])
    expected = ref.predict(preprocess(ref, pngs), top_k=5)
    names = [t.name for t in ref.tasks]
    assert out["label"].tolist() == expected.labels
    assert out["task"].tolist() == [names[int(t)] for t in expected.task_index]
    torch.testing.assert_close(torch.tensor(out["gate"].tolist(), dtype=torch.float64), expected.gate.double())
    torch.testing.assert_close(torch.tensor(out["score"].tolist()), expected.confidence.float())
    assert out["out_of_distribution"].tolist() == expected.ood.tolist()
    assert set(out["task"]) == {"quadrants", "colours"}  # both tasks answered within one call
    top = json.loads(out["top_k"][0])  # the routed task's classes, best first
    classes = CLASSES_A if out["task"][0] == "quadrants" else CLASSES_B
    assert len(top) == min(5, len(classes)) and top[0][0] == out["label"][0] and {t[0] for t in top} <= set(classes)

    # Base64 text (what `mlflow models serve` passes for binary columns) and a forced task.
    as_text = model.predict(pd.DataFrame({"image": [base64.b64encode(p).decode() for p in pngs]}))
    assert as_text["label"].tolist() == expected.labels
    forced = model.predict(pd.DataFrame({"image": pngs[:2]}), params={"task": "colours", "top_k": 2})
    assert forced["task"].tolist() == ["colours", "colours"] and set(forced["label"]) <= set(CLASSES_B)
    assert all(len(json.loads(t)) == 2 for t in forced["top_k"])


def test_versions_say_what_they_add_and_what_was_decided(registered):
    registry, _ = registered
    client, name = registry.client, registry.model_name
    refused = client.get_model_version(name, "1")
    promoted = client.get_model_version(name, "2")
    assert refused.description == (
        "Task 'quadrants' on the bare backbone (1 task). "
        "Promotion refused, candidate only: new task 'quadrants' does not beat zero-shot."
    )
    assert promoted.description == (
        "Adds task 'colours' to version 1 (2 tasks: quadrants > colours). "
        "Promotion passed, now production: every task within 2.0 points."
    )
    assert refused.tags["promotion"] == "refused" and promoted.tags["promotion"] == "passed"
    # Each version is a logged model of its run (the UI's "Logged models"), linked both ways.
    from mlflow.entities import LoggedModelStatus

    model = client.get_logged_model(registry.get_version(2).model_id)
    assert model.source_run_id == promoted.run_id and model.status == LoggedModelStatus.READY
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": name, "version": "2"}]
    outputs = client.get_run(promoted.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [model.model_id]


def test_a_run_spans_its_work_with_source_tags_units_and_datasets(server, tmp_path):
    registry = Registry(make_settings(tmp_path / "home", mlflow={"tracking_uri": server}))
    started = int(time.time() * 1000) - 25_000  # the training job began 25 s before tracking
    run_id = registry.create_run("train-quads", {"diki.task": "quads"}, start_time_ms=started)
    m = matrix(["zero-shot", "quads"], [[25.0, 50.0], [90.0, 45.0]], heldout=1)
    epochs = [{"epoch": 1, "train_loss": 1.2, "train_acc": 0.5, "val_acc": 0.625, "lr": 0.05, "seconds": 3.0}]
    dataset = DatasetRef("quads", "s3://datasets/incoming/quads", "ab" * 32, "training", {"train": 96, "val": 24})
    registry.log_run(
        run_id, {"train.lr": 50.0}, epochs=epochs, metrics={"job_seconds": 25.0}, matrix=m, dataset=dataset
    )
    registry.end_run(run_id)

    run = registry.client.get_run(run_id)
    assert run.info.start_time == started and run.info.end_time - run.info.start_time >= 25_000
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "pipelines/learning.py" and tags["mlflow.source.type"] == "JOB"
    assert tags.get("mlflow.source.git.commit") or tags.get("diki.version")
    assert "mlflow.user" in tags
    # Accuracies in percent everywhere; the schedule's learning rate is not named like the parameter.
    metrics = run.data.metrics
    assert metrics["acc.train"] == 50.0 and metrics["acc.val"] == 62.5 and metrics["acc.task.quads"] == 90.0
    assert metrics["zero_shot_retention"] == 90.0 and metrics["lr_schedule"] == 0.05 and "lr" not in metrics
    assert run.data.params["train.lr"] == "50.0"
    # Datasets: the training set with its fingerprint and size, and every test set of the matrix.
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"quads", "quads (test)", "h0 (test)"}
    train = inputs["quads"]
    assert train.dataset.digest == ("ab" * 32)[:36] and train.tags[0].value == "training"
    assert json.loads(train.dataset.profile) == {
        "fingerprint": "ab" * 32,
        "uri": "s3://datasets/incoming/quads",
        "train_images": 96,
        "val_images": 24,
    }
    assert "s3://datasets/incoming/quads" in train.dataset.source
    assert inputs["h0 (test)"].tags[0].value == "evaluation"
