"""The one place that talks to MLflow: experiment tracking, the model registry, and its aliases.

Layout in MLflow:

- Experiment ``settings.mlflow.experiment_name``: one run per learned task, spanning the training
  job to the promotion decision, with MLflow's source tags, the training parameters, the datasets
  it trained and was evaluated on (``log_inputs``), per-epoch metrics, the accuracy matrix
  (``evaluation/accuracy_matrix.json``), its heatmap and Transfer / Average / Last. Every
  accuracy is in percent.
- Each bundle is logged as an MLflow model (a ``LoggedModel`` of the run, ``pyfunc`` flavour,
  :mod:`services.mlflow_model`) whose one artifact is the bundle folder (``artifacts/bundle``):
  ``mlflow.pyfunc.load_model("models:/diki@production")`` classifies images, and serving
  downloads the same folder.
- Registered model ``settings.mlflow.registry_model_name`` (default ``diki``): version N is that
  model (source ``models:/<model id>``); its description says what it adds and what the promotion
  decided, its tags name its ordered tasks and their dataset fingerprints. A new version holds
  exactly one task more than the version it extends (its ``base_version`` tag).
- Aliases ``candidate`` (the newest version whose promotion was decided) and ``production`` (what is
  served). The promotion policy itself is :mod:`services.promotion`.
  Every alias move is recorded in a registered-model tag ``<alias>_history`` (JSON list), which
  ``rollback`` walks back.

Registration is all-or-nothing: when any step after creating the version fails, the version is
deleted again. An alias is moved in one call, and put back if recording its history fails.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diki_model import read_bundle_manifest
from services.accuracy import AccuracyMatrix
from services.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from services.promotion import PromotionDecision

__all__ = [
    "ALIASES",
    "DatasetRef",
    "Registry",
    "RegistryError",
    "VersionInfo",
    "code_version",
]

ALIASES = ("candidate", "production")
BUNDLE_ARTIFACT = "bundle"  # older versions: the bundle folder among the run's artifacts
MODEL_NAME = "bundle"  # the LoggedModel of each run; the bundle sits in its artifacts/bundle
MODEL_TYPE = "diki-bundle"
_MODEL_BUNDLE_PATH = "artifacts/bundle"  # = services.mlflow_model.BUNDLE_KEY under the model's artifacts/
SOURCE_NAME = "pipelines/learning.py"  # the learning step every front door runs
MATRIX_ARTIFACT = "evaluation/accuracy_matrix.json"
HEATMAP_ARTIFACT = "evaluation"
TAG_TASKS = "tasks"
TAG_FINGERPRINTS = "dataset_fingerprints"
TAG_DATASETS = "datasets"
TAG_FINGERPRINT = "dataset_fingerprint"
TAG_TASK = "task"
TAG_BASE = "base_version"
TAG_PROMOTION = "promotion"  # "passed" or "refused"
TAG_PROMOTION_REASONS = "promotion_reasons"  # JSON list of the decision's reasons
SYSTEM_TAGS = (TAG_TASKS, TAG_FINGERPRINTS, TAG_FINGERPRINT, TAG_TASK, TAG_BASE, "num_tasks", "backbone")


class RegistryError(RuntimeError):
    """A registry operation failed or was refused; nothing was left half-done."""


@dataclass
class VersionInfo:
    """One registered bundle version."""

    version: int
    tasks: list[str]
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None
    created: datetime
    source: str = ""
    dataset_fingerprints: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    base_version: int | None = None
    model_id: str | None = None  # the MLflow LoggedModel (None for versions registered before pyfunc models)


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a run used, as ``mlflow.log_input`` records it: name, URI, fingerprint and size."""

    name: str
    uri: str
    fingerprint: str
    context: str  # "training" or "evaluation"
    size: dict[str, int] = field(default_factory=dict)  # images per split


# --- helpers -----------------------------------------------------------------------------------


def code_version() -> str:
    """The git commit of the code when it runs from a checkout, else the installed package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        sha = out.stdout.strip()
        if sha:
            return sha
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return version("diki")
    except Exception:
        from diki_model import __version__

        return __version__


def source_tags() -> dict[str, str]:
    """MLflow's own run tags for who ran what code: the UI's Source, Version and Created by."""
    tags = {"mlflow.source.name": SOURCE_NAME, "mlflow.source.type": "JOB"}
    version = code_version()
    if re.fullmatch(r"[0-9a-f]{40}", version):
        tags["mlflow.source.git.commit"] = version
    else:
        tags["diki.version"] = version
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        pass
    return tags


def _dataset_entity(ref: DatasetRef) -> Any:
    """The MLflow dataset of ``ref``: its source resolved from the URI (S3, local, ...), digest = fingerprint."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset

    try:
        source = resolve_dataset_source(ref.uri)
    except Exception:  # a scheme MLflow has no source for
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        source = HTTPDatasetSource(ref.uri)
    # MLflow keeps at most 36 characters of a digest; the whole fingerprint goes in the profile.
    entity = MetaDataset(source=source, name=ref.name, digest=ref.fingerprint[:36])._to_mlflow_entity()
    profile = {"fingerprint": ref.fingerprint, "uri": ref.uri, **{f"{k}_images": v for k, v in ref.size.items()}}
    return Dataset(entity.name, entity.digest, entity.source_type, entity.source, None, json.dumps(profile))


def lineage_description(tasks: list[str], base_version: int | None) -> str:
    """One line on what a version is: the task it adds and the version it extends."""
    new = tasks[-1] if tasks else "?"
    if base_version is None:
        return f"Task '{new}' on the bare backbone (1 task)."
    return f"Adds task '{new}' to version {base_version} ({len(tasks)} tasks: {' > '.join(tasks)})."


def promotion_summary(decision: PromotionDecision) -> str:
    """One line on the promotion decision: the verdict and the figures that decided it."""
    if decision.ok:
        figures = "; ".join(decision.reasons[:3])
        return f"Promotion passed, now production: {figures}."
    failed = [r for r in decision.reasons if " > " in r or " < " in r or "does not beat" in r or "missing" in r]
    return f"Promotion refused, candidate only: {'; '.join(failed or decision.reasons[:1])}."


# Per-epoch values as ``train_task`` reports them -> metric name and the factor to percent.
_EPOCH_METRICS = {
    "train_loss": ("train_loss", 1.0),
    "train_acc": ("acc.train", 100.0),
    "val_acc": ("acc.val", 100.0),
    "lr": ("lr_schedule", 1.0),
    "seconds": ("epoch_seconds", 1.0),
}


def _epoch_metrics(epochs: Sequence[dict[str, Any]]) -> list[tuple[str, float, int]]:
    return [
        (name, float(h[key]) * factor, int(h["epoch"]))
        for h in epochs
        for key, (name, factor) in _EPOCH_METRICS.items()
        if h.get(key) is not None
    ]


def _matrix_metrics(matrix: AccuracyMatrix) -> dict[str, float]:
    out = {k: v for k, v in matrix.stream_metrics().items() if v is not None}
    retention = matrix.zero_shot_retention()
    if retention is not None:
        out["zero_shot_retention"] = 100.0 * retention
    for j, col in enumerate(matrix.columns):
        out[f"acc.{col.kind}.{col.name}"] = matrix.acc[-1][j]
    return out


def _model_id(source: str | None) -> str | None:
    """The logged model a version's source names (``models:/m-...``); None for a plain artifact folder."""
    if source and source.startswith("models:/m-") and "/" not in source[len("models:/") :]:
        return source[len("models:/") :]
    return None


def _use_tracking_uri(uri: str) -> Any:
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri as use

    return use(uri)


def _loads_list(value: str | None) -> list[Any]:
    if not value:
        return []
    try:
        out = json.loads(value)
    except json.JSONDecodeError:
        return []
    return out if isinstance(out, list) else []


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


# --- the registry ------------------------------------------------------------------------------


class Registry:
    """MLflow tracking and model registry for bundles, as configured in ``settings.mlflow``."""

    def __init__(self, settings: Settings) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        self.settings = settings
        uri = settings.mlflow.tracking_uri
        if uri is None:  # pragma: no cover - Settings always fills it
            raise RegistryError("mlflow.tracking_uri is not set")
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = uri
        self.model_name = settings.mlflow.registry_model_name
        self.client: MlflowClient = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self._experiment_id: str | None = None

    def __repr__(self) -> str:
        return f"Registry(model={self.model_name!r})"

    # -- tracking --------------------------------------------------------------------------------

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            name = self.settings.mlflow.experiment_name
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                location = self.settings.mlflow.artifact_location
                if location and "://" not in location:
                    Path(location).mkdir(parents=True, exist_ok=True)
                    location = Path(location).as_uri()
                try:
                    self._experiment_id = self.client.create_experiment(name, artifact_location=location)
                except Exception as exc:  # created concurrently by another process
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise RegistryError(f"cannot create MLflow experiment {name!r}: {exc}") from exc
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def create_run(self, name: str, tags: dict[str, str] | None = None, *, start_time_ms: int | None = None) -> str:
        """A new run with MLflow's source tags; ``start_time_ms`` backdates it to when its work began."""
        run = self.client.create_run(
            self.experiment_id, start_time=start_time_ms, run_name=name, tags={**source_tags(), **(tags or {})}
        )
        return run.info.run_id

    def end_run(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def log_run(
        self,
        run_id: str,
        params: dict[str, Any],
        *,
        epochs: Sequence[dict[str, Any]] = (),
        metrics: dict[str, float] | None = None,
        matrix: AccuracyMatrix | None = None,
        dataset: DatasetRef | None = None,
    ) -> None:
        """Record one learned task on run ``run_id``: parameters, datasets, per-epoch and summary metrics, the matrix.

        Every accuracy is logged in percent, as the matrix holds it: ``acc.train`` and ``acc.val`` per
        epoch, ``acc.<task|heldout>.<name>`` after the step, Transfer / Average / Last, and
        ``zero_shot_retention`` (held-out accuracy now, in percent of the frozen backbone's).

        Args:
            params: parameter name -> value (stored as text).
            epochs: one dict per epoch with ``epoch`` and any of ``train_loss``, ``train_acc`` and
                ``val_acc`` (fractions), ``lr`` (the schedule's value at the epoch's end, logged
                as ``lr_schedule``) and ``seconds`` (logged as step-indexed metrics).
            metrics: summary metrics (step 0).
            matrix: the accuracy matrix, logged as JSON with its heatmap; its Transfer / Average /
                Last, zero-shot retention and last-row accuracies become metrics, its test sets
                evaluation datasets.
            dataset: the dataset the task was trained on (a training dataset of the run).
        """
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        logged = [Metric(k, v, now, step) for k, v, step in _epoch_metrics(epochs)]
        summary = dict(metrics or {})
        if matrix is not None:
            summary.update(_matrix_metrics(matrix))
        logged += [Metric(k, float(v), now, 0) for k, v in summary.items()]
        self.client.log_batch(
            run_id,
            metrics=logged,
            params=[Param(k, "" if v is None else str(v)[:6000]) for k, v in params.items()],
        )
        self.log_datasets(run_id, [dataset] if dataset is not None else [], matrix)
        if matrix is not None:
            self.client.log_text(run_id, matrix.to_json(), MATRIX_ARTIFACT)
            with tempfile.TemporaryDirectory(prefix="diki-heatmap-") as tmp:
                path = matrix.heatmap(Path(tmp) / "accuracy_heatmap.png")
                self.client.log_artifact(run_id, str(path), HEATMAP_ARTIFACT)

    def log_datasets(self, run_id: str, datasets: Sequence[DatasetRef], matrix: AccuracyMatrix | None = None) -> None:
        """The run's datasets (the UI's Dataset column and panel): ``datasets`` plus the matrix's test sets."""
        from mlflow.entities import DatasetInput, InputTag

        refs = list(datasets)
        if matrix is not None:
            refs += [
                DatasetRef(f"{c.name} (test)", c.uri, c.fingerprint or c.uri, "evaluation", {"test": c.count})
                for c in matrix.columns
            ]
        inputs = [
            DatasetInput(_dataset_entity(ref), [InputTag("mlflow.data.context", ref.context)])
            for ref in refs
            if ref.uri
        ]
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    # -- versions --------------------------------------------------------------------------------

    def _model_versions(self) -> list[Any]:
        try:
            return list(self.client.search_model_versions(f"name='{self.model_name}'", max_results=10_000))
        except Exception as exc:
            if _not_found(exc):
                return []
            raise

    def _aliases(self) -> dict[str, int]:
        try:
            model = self.client.get_registered_model(self.model_name)
        except Exception as exc:
            if _not_found(exc):
                return {}
            raise
        return {alias: int(v) for alias, v in (model.aliases or {}).items()}

    def _model_tags(self) -> dict[str, str]:
        try:
            return dict(self.client.get_registered_model(self.model_name).tags or {})
        except Exception as exc:
            if _not_found(exc):
                return {}
            raise

    def _info(self, mv: Any, aliases: dict[str, int]) -> VersionInfo:
        tags = dict(mv.tags or {})
        base = tags.get(TAG_BASE)
        return VersionInfo(
            version=int(mv.version),
            tasks=[str(t) for t in _loads_list(tags.get(TAG_TASKS))],
            aliases=sorted(a for a, v in aliases.items() if v == int(mv.version)),
            tags=tags,
            run_id=mv.run_id or None,
            created=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC),
            source=mv.source or "",
            dataset_fingerprints=[str(f) for f in _loads_list(tags.get(TAG_FINGERPRINTS))],
            datasets=[str(d) for d in _loads_list(tags.get(TAG_DATASETS))],
            base_version=int(base) if base and base.isdigit() else None,
            model_id=_model_id(mv.source),
        )

    def list_versions(self) -> list[VersionInfo]:
        """Every version, oldest first, with its tasks, aliases and tags."""
        aliases = self._aliases()
        return sorted((self._info(mv, aliases) for mv in self._model_versions()), key=lambda v: v.version)

    def get_version(self, version: int) -> VersionInfo:
        try:
            mv = self.client.get_model_version(self.model_name, str(version))
        except Exception as exc:
            if _not_found(exc):
                raise RegistryError(f"{self.model_name!r} has no version {version}") from exc
            raise
        return self._info(mv, self._aliases())

    def latest_version(self) -> int | None:
        versions = [int(mv.version) for mv in self._model_versions()]
        return max(versions) if versions else None

    def find_version_by_dataset(self, fingerprint: str) -> int | None:
        """The newest version that learned the dataset with this fingerprint as its own new task."""
        found = [v.version for v in self.list_versions() if v.tags.get(TAG_FINGERPRINT) == fingerprint]
        return max(found) if found else None

    def _ensure_model(self) -> None:
        try:
            self.client.get_registered_model(self.model_name)
        except Exception as exc:
            if not _not_found(exc):
                raise
            try:
                self.client.create_registered_model(
                    self.model_name, description="DIKI bundles: version N+1 = version N + one learned task."
                )
            except Exception as create_exc:  # created concurrently
                if "already exists" not in str(create_exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(
                    getattr(create_exc, "error_code", "")
                ):
                    raise

    def register_bundle(
        self,
        bundle_dir: Path,
        *,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        datasets: list[str] | None = None,
    ) -> int:
        """Register a bundle folder as a new version and return its number.

        The bundle must extend a registered version by exactly one task (or hold one task). Its folder
        is logged as the run's ``bundle/`` artifacts (a new run when ``run_id`` is None), the version is
        created with its lineage tags, then ``tags`` are applied; if anything after creating the version
        fails, the version is deleted and ``RegistryError`` raised.

        Args:
            datasets: the dataset URI of each task, in order (kept for later evaluations).
        """
        bundle_dir = Path(bundle_dir)
        manifest = read_bundle_manifest(bundle_dir)
        names = manifest.task_names
        fps = [str(t.get("dataset_fingerprint", "")) for t in manifest.tasks]
        if not names:
            raise RegistryError(f"{bundle_dir}: the bundle holds no task")
        if datasets is not None and len(datasets) != len(names):
            raise RegistryError(f"{bundle_dir}: {len(names)} tasks but {len(datasets)} dataset URIs")
        backbone_fp = str(manifest.backbone.get("fingerprint", ""))
        parent = self._parent(names, fps, backbone_fp, (tags or {}).get(TAG_BASE))
        own_run = run_id is None
        if own_run:
            run_id = self.create_run(f"register-{names[-1]}", {"diki.task": names[-1]})
        assert run_id is not None
        try:
            model_id = self._log_model(run_id, bundle_dir, names)
            source = f"models:/{model_id}"  # how MLflow links a version to its logged model
            self._ensure_model()
        except Exception as exc:
            if own_run:
                self.end_run(run_id, ok=False)
            raise RegistryError(f"cannot store bundle {bundle_dir} in MLflow run {run_id}: {exc}") from exc
        system = {
            TAG_TASKS: json.dumps(names),
            TAG_FINGERPRINTS: json.dumps(fps),
            TAG_FINGERPRINT: fps[-1],
            TAG_TASK: names[-1],
            TAG_BASE: "" if parent is None else str(parent),
            "num_tasks": str(len(names)),
            "backbone": str(manifest.backbone.get("name", "")),
            "backbone_fingerprint": backbone_fp,
        }
        if datasets is not None:
            system[TAG_DATASETS] = json.dumps([str(d) for d in datasets])
        try:
            # An embedded store resolves ``models:/<id>`` through MLflow's process-wide tracking URI.
            with _use_tracking_uri(self.tracking_uri):
                mv = self.client.create_model_version(
                    self.model_name,
                    source,
                    run_id=run_id,
                    tags=system,
                    description=lineage_description(names, parent),
                    model_id=model_id,
                )
        except Exception as exc:
            self._mark_failed(model_id)
            if own_run:
                self.end_run(run_id, ok=False)
            raise RegistryError(f"cannot create a version of {self.model_name!r} for {bundle_dir}: {exc}") from exc
        version = int(mv.version)
        try:
            if mv.status != "READY":
                raise RegistryError(f"version {version} is {mv.status}: {mv.status_message}")
            stored = _MODEL_BUNDLE_PATH
            listed = {a.path.rsplit("/", 1)[-1] for a in self.client.list_logged_model_artifacts(model_id, stored)}
            if "bundle.json" not in listed:
                raise RegistryError(f"bundle.json missing from the stored model at {source}/{stored}")
            self.client.set_logged_model_tags(
                model_id, {"mlflow.modelVersions": json.dumps([{"name": self.model_name, "version": str(version)}])}
            )
            for key, value in (tags or {}).items():
                if key in SYSTEM_TAGS:
                    continue
                self.client.set_model_version_tag(self.model_name, str(version), key, value)
        except Exception as exc:
            try:
                self.client.delete_model_version(self.model_name, str(version))
            except Exception as cleanup:  # pragma: no cover - reported with the original error
                raise RegistryError(
                    f"registering {bundle_dir} failed ({exc}) and version {version} could not be deleted: {cleanup}"
                ) from exc
            self._mark_failed(model_id)
            if own_run:
                self.end_run(run_id, ok=False)
            raise RegistryError(f"registering {bundle_dir} failed, version {version} was removed: {exc}") from exc
        if own_run:
            self.end_run(run_id, ok=True)
        return version

    def _log_model(self, run_id: str, bundle_dir: Path, names: list[str]) -> str:
        """Log ``bundle_dir`` as the run's MLflow model (pyfunc, signature recorded); returns its model id."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model
        from mlflow.pyfunc import save_model

        from services.mlflow_model import BUNDLE_KEY, model_signature, pip_requirements

        run = self.client.get_run(run_id)
        logged = self.client.create_logged_model(
            run.info.experiment_id,
            name=MODEL_NAME,
            source_run_id=run_id,
            tags={TAG_TASKS: json.dumps(names), TAG_TASK: names[-1]},
            params={k: v[:6000] for k, v in run.data.params.items()},
            model_type=MODEL_TYPE,
        )
        model_id = logged.model_id
        try:
            with tempfile.TemporaryDirectory(prefix="diki-pyfunc-") as tmp:
                # The artifact's folder name is kept by MLflow: stage the bundle as artifacts/bundle.
                staged = Path(tmp) / BUNDLE_KEY
                shutil.copytree(bundle_dir, staged)
                local = Path(tmp) / "model"
                save_model(
                    path=str(local),
                    # A code path, not an instance: MLflow stores the source, never a pickle.
                    python_model=str(Path(__file__).with_name("mlflow_model_code.py")),
                    artifacts={BUNDLE_KEY: str(staged)},
                    signature=model_signature(),
                    pip_requirements=pip_requirements(),
                    model_config={"seed": self.settings.train.seed, "device": "cpu"},
                    mlflow_model=Model(
                        artifact_path=logged.artifact_location, model_uuid=model_id, run_id=run_id, model_id=model_id
                    ),
                )
                self.client.log_model_artifacts(model_id, str(local))
            self.client.finalize_logged_model(model_id, LoggedModelStatus.READY)
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
        except Exception:
            self._mark_failed(model_id)
            raise
        return model_id

    def _mark_failed(self, model_id: str) -> None:
        """A logged model no version holds is marked FAILED, so the UI shows it is not a usable bundle."""
        from mlflow.entities import LoggedModelStatus

        try:
            self.client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        except Exception:  # noqa: BLE001 - best effort; the original error is what is reported
            pass

    def _bundle_uri(self, info: VersionInfo) -> str:
        """Where the version's bundle folder is stored: inside its MLflow model, or (older versions) its source."""
        if info.model_id:
            location = self.client.get_logged_model(info.model_id).artifact_location
            return f"{location.rstrip('/')}/{_MODEL_BUNDLE_PATH}"
        return info.source

    def _parent(self, names: list[str], fps: list[str], backbone_fp: str, wanted: str | None) -> int | None:
        if len(names) == 1:
            return None
        candidates = [
            v
            for v in self.list_versions()
            if v.tasks == names[:-1]
            and (not v.dataset_fingerprints or v.dataset_fingerprints == fps[:-1])
            and v.tags.get("backbone_fingerprint", backbone_fp) == backbone_fp
        ]
        if wanted and wanted.isdigit():
            chosen = [v for v in candidates if v.version == int(wanted)]
            if not chosen:
                raise RegistryError(
                    f"lineage: version {wanted} does not hold the bundle's first {len(names) - 1} tasks {names[:-1]}"
                )
            return chosen[0].version
        if not candidates:
            raise RegistryError(
                f"lineage: the bundle's tasks {names} do not extend any registered version by one task "
                f"(no version holds exactly {names[:-1]})"
            )
        return max(v.version for v in candidates)

    def download_bundle(self, version: int, dst: Path) -> Path:
        """Fetch version ``version`` into the folder ``dst`` (replaced); checks it names the version's tasks."""
        import mlflow

        info = self.get_version(version)
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=self._bundle_uri(info), dst_path=str(tmp), tracking_uri=self.tracking_uri
            )
            manifest = read_bundle_manifest(local)
            if info.tasks and manifest.task_names != info.tasks:
                raise RegistryError(
                    f"version {version}: stored bundle holds tasks {manifest.task_names}, the version names {info.tasks}"
                )
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(local, dst)
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(f"cannot download version {version} of {self.model_name!r}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dst

    def get_matrix(self, version: int) -> AccuracyMatrix | None:
        """The accuracy matrix recorded with the version's run, if any."""
        info = self.get_version(version)
        if not info.run_id:
            return None
        with tempfile.TemporaryDirectory(prefix="diki-matrix-") as tmp:
            try:
                path = self.client.download_artifacts(info.run_id, MATRIX_ARTIFACT, tmp)
            except Exception:
                return None
            return AccuracyMatrix.from_json(Path(path).read_text(), f"version {version} {MATRIX_ARTIFACT}")

    # -- aliases ---------------------------------------------------------------------------------

    def get_alias(self, alias: str) -> int | None:
        return self._aliases().get(alias)

    def alias_history(self, alias: str) -> list[int]:
        return [int(v) for v in _loads_list(self._model_tags().get(f"{alias}_history"))]

    def set_alias(self, alias: str, version: int) -> None:
        """Point ``alias`` at ``version`` and append it to the alias's history."""
        self._move_alias(alias, version, None)

    def _move_alias(self, alias: str, version: int, history: list[int] | None) -> None:
        if not alias or not alias.replace("_", "").replace("-", "").isalnum():
            raise RegistryError(f"invalid alias {alias!r}")
        self.get_version(version)  # raises when it does not exist
        old = self.get_alias(alias)
        if history is None:
            history = self.alias_history(alias)
            if old is not None and (not history or history[-1] != old):
                history.append(old)
            if not history or history[-1] != version:
                history.append(version)
        self.client.set_registered_model_alias(self.model_name, alias, str(version))
        try:
            self.client.set_registered_model_tag(self.model_name, f"{alias}_history", json.dumps(history))
        except Exception as exc:
            try:
                if old is None:
                    self.client.delete_registered_model_alias(self.model_name, alias)
                else:
                    self.client.set_registered_model_alias(self.model_name, alias, str(old))
            except Exception as restore:  # pragma: no cover - reported with the original error
                raise RegistryError(f"moving {alias!r} failed ({exc}) and could not be undone: {restore}") from exc
            raise RegistryError(f"moving {alias!r} to version {version} failed and was undone: {exc}") from exc

    def promote(self, version: int) -> None:
        """Make ``version`` the production version (an operator's decision: the promotion policy is not applied)."""
        self.set_alias("production", version)

    def rollback(self) -> int:
        """Move ``production`` back to the version it pointed at before; returns that version."""
        current = self.get_alias("production")
        if current is None:
            raise RegistryError(f"{self.model_name!r} has no production version to roll back")
        history = self.alias_history("production")
        if not history or history[-1] != current:
            history.append(current)
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise RegistryError(f"version {current} is the first production version: there is nothing to roll back to")
        previous = history[-1]
        self._move_alias("production", previous, history)
        self.client.set_model_version_tag(
            self.model_name, str(current), "rolled_back_at", datetime.now(UTC).isoformat()
        )
        return previous

    def apply_promotion(self, version: int, decision: PromotionDecision) -> bool:
        """Record the promotion decision on ``version``, make it ``candidate``, and ``production`` if it passed.

        The version's description, what a person reads first in the MLflow UI, says what it adds and
        what was decided; the tags keep the same for machines.
        """
        verdict = "passed" if decision.ok else "refused"
        info = self.get_version(version)
        self.client.update_model_version(
            self.model_name,
            str(version),
            description=f"{lineage_description(info.tasks, info.base_version)} {promotion_summary(decision)}",
        )
        self.client.set_model_version_tag(self.model_name, str(version), TAG_PROMOTION, verdict)
        self.client.set_model_version_tag(
            self.model_name, str(version), TAG_PROMOTION_REASONS, json.dumps(decision.reasons)[:5000]
        )
        self.set_alias("candidate", version)
        if decision.ok:
            self.set_alias("production", version)
        return decision.ok
