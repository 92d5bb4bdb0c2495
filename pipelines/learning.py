"""The one learning step: an accepted dataset -> trained, evaluated, registered, promotion decided, served.

Every front door runs this module: ``diki train`` (:func:`learn_dataset`) and the Prefect flow
(:mod:`pipelines.flows`, which wraps each stage in a Prefect task for retries and the UI). Both hold
the same learning lock (:func:`learning_slot`) for the whole step, so the base version is chosen
and extended by one learner at a time and two runs never register siblings of one base.

The stages, each a function ``(ctx, record) -> record`` that writes the dataset's record when it is
complete (so a run that dies anywhere is finished by the next one from the last stage written)::

    accepted --train--> trained --check-learned--> learned --evaluate--> evaluated --register--> registered
      --decide-promotion--> decided --apply-promotion--> applied --reload-serving--> done
                                 \--> not_learned (nothing registered)

- train: the base bundle (production, else the latest version) is fetched and the Ray Train job
  learns the dataset as its next task; the trained bundle is kept in storage.
- check-learned: a task must earn its place: on its validation split its branch must beat zero-shot
  (and chance) by a margin a chance-level task cannot pass (:func:`services.promotion.decide_learned`);
  otherwise the dataset ends ``not_learned`` with the figures, a linear probe's among them.
- evaluate: the accuracy matrix (every task's test set and the held-out sets), kept in storage.
- register: one MLflow run and one registry version per dataset fingerprint (a restart finds them).
- decide-promotion: :func:`services.promotion.decide_promotion` against production; recorded first,
- apply-promotion: then the aliases move (``candidate``; ``production`` when it passed).
- reload-serving: the Serve endpoint is told to load the new production version now.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

from diki_model import read_bundle_manifest, replace_bundle_reference, save_bundle
from diki_model.data import read_manifest
from pipelines.state import DatasetRecord, Stage, StateStore
from services.accuracy import AccuracyMatrix
from services.backbone import create_model
from services.evaluation import build_accuracy_matrix, discover_heldout
from services.lock import LearningLock, LockHolder
from services.promotion import PromotionDecision, decide_learned, decide_promotion
from services.reference import current_reference
from services.registry import TAG_BASE, DatasetRef, Registry
from services.settings import Settings
from services.storage import Storage, dataset_location, normalise_dataset_uri, open_storage
from services.training import (
    EpochHook,
    LearnableDataset,
    TrainingError,
    TrainingInputError,
    TrainJobResult,
    check_dataset,
    run_training_job,
)

__all__ = [
    "CURRENT",
    "STAGES",
    "LearnOptions",
    "LearnOutcome",
    "LearningBusyError",
    "TaskNotLearnedError",
    "LearningContext",
    "LearningSlot",
    "learn_dataset",
    "learning_slot",
    "run_learning",
    "serve_url",
]

log = logging.getLogger(__name__)

CURRENT: Final = "current"  # base version: the production version, else the latest one
_STORE_RETRIES: Final = (2, 5, 15)  # seconds between attempts to keep the trained bundle in storage


class TaskNotLearnedError(RuntimeError):
    """The task trained but did not beat zero-shot on its validation split; nothing was registered."""

    def __init__(self, name: str, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__(f"task {name!r} was not learned, so nothing was registered:\n  " + "\n  ".join(reasons))


class LearningBusyError(RuntimeError):
    """Another process holds the learning lock."""

    def __init__(self, holder: LockHolder | None) -> None:
        self.holder = holder
        super().__init__(f"{holder.describe() if holder else 'another process'} is learning; try again later")


# --- the lock --------------------------------------------------------------------------------------


@dataclass
class LearningSlot:
    acquired: bool
    holder: LockHolder | None = None  # who holds it when it was not acquired
    lock: LearningLock | None = None


@contextmanager
def learning_slot(settings: Settings, *, wait_s: float = 0.0, purpose: str = "learning") -> Iterator[LearningSlot]:
    """Hold the right to learn (the learning lock in storage) for the duration of the block.

    Yields ``LearningSlot(acquired=False, holder=...)`` without blocking longer than ``wait_s`` when
    another process is learning.
    """
    lock = LearningLock(open_storage(settings), settings, purpose=purpose)
    if not lock.acquire(wait_s):
        yield LearningSlot(False, lock.holder())
        return
    try:
        yield LearningSlot(True, None, lock)
    finally:
        lock.release()


# --- the context -----------------------------------------------------------------------------------


@dataclass
class LearnOptions:
    """How to learn, beyond ``settings``: what ``diki train`` and the flow may set."""

    workers: int | None = None
    use_gpu: bool | None = None
    epochs: int | None = None
    heldout: list[str] | None = None  # held-out dataset URIs; None: <storage>/heldout/*
    base_version: int | Literal["current"] | None = CURRENT  # None: the bare backbone
    eval_limit: int | None = None  # evaluate at most this many test images per dataset
    max_failures: int = 2
    cpus_per_worker: float = 1.0
    cache_mb: int = 1024
    epoch_hook: EpochHook | None = None
    output_dir: str | Path | None = None


@dataclass
class LearningContext:
    settings: Settings
    storage: Storage
    store: StateStore  # where records are written (storage for the flow, memory for `diki train`)
    options: LearnOptions = field(default_factory=LearnOptions)
    _registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.settings)
        return self._registry


class MemoryStore(StateStore):
    """Records kept in this process only: ``diki train`` learns a dataset that was never dropped."""

    def __init__(self, storage: Storage, settings: Settings) -> None:
        super().__init__(storage, settings)
        self._records: dict[str, DatasetRecord] = {}

    def get(self, name: str) -> DatasetRecord | None:
        return self._records.get(name)

    def all(self) -> list[DatasetRecord]:
        return list(self._records.values())

    def write(self, record: DatasetRecord) -> None:
        self._records[record.name] = record

    def delete(self, name: str) -> None:
        self._records.pop(name, None)


# --- helpers -----------------------------------------------------------------------------------------


def serve_url(settings: Settings) -> str:
    """The HTTP address of the Serve deployment (a wildcard host is reached through loopback)."""
    host = settings.serve.host
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{settings.serve.port}"


def job_result(record: DatasetRecord) -> TrainJobResult:
    """The training job's result as the record keeps it."""
    assert record.job is not None
    known = {f.name for f in fields(TrainJobResult)}
    values = {k: v for k, v in record.job.items() if k in known}
    return TrainJobResult(**{**values, "bundle_dir": Path(record.job["bundle_dir"])})


def record_matrix(storage: Storage, record: DatasetRecord) -> AccuracyMatrix:
    assert record.matrix is not None
    return AccuracyMatrix.from_json(storage.read_bytes(record.matrix).decode("utf-8"), storage.uri(record.matrix))


def _local_bundle(ctx: LearningContext, record: DatasetRecord) -> Path:
    """The trained bundle on this machine: the job's folder, else a copy fetched from storage."""
    job = job_result(record)
    if (job.bundle_dir / "bundle.json").is_file():
        return job.bundle_dir
    assert record.bundle is not None
    marker = ctx.settings.storage.success_marker
    if not ctx.storage.is_file(f"{record.bundle}/{marker}"):
        raise FileNotFoundError(f"the trained bundle of {record.name!r} is missing at {ctx.storage.uri(record.bundle)}")
    dst = ctx.settings.home / "bundles" / job.ray_run_id
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    for rel in ctx.storage.list_files(record.bundle):
        if rel == marker:
            continue
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(ctx.storage.read_bytes(f"{record.bundle}/{rel}"))
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def _resolve_base(registry: Registry, wanted: int | Literal["current"] | None) -> int | None:
    if wanted is None:
        return None
    if wanted == CURRENT:
        return registry.get_alias("production") or registry.latest_version()
    if not isinstance(wanted, int) or wanted < 1:
        raise TrainingInputError(f"base version must be a positive version number, got {wanted!r}")
    if wanted not in {v.version for v in registry.list_versions()}:
        raise TrainingInputError(f"base version {wanted} is not registered as {registry.model_name!r}")
    return wanted


def run_params(job: TrainJobResult, record: DatasetRecord, bundle_dir: Path) -> dict[str, Any]:
    """The MLflow run's parameters for one learned task (plain data for ``Registry.log_run``)."""
    backbone = read_bundle_manifest(bundle_dir).backbone
    params: dict[str, Any] = {f"train.{k}": v for k, v in job.train_config.items()}
    # bf16 autocast runs on CUDA only: the parameter says what the job really did.
    params["train.amp"] = bool(job.train_config.get("amp")) and job.use_gpu
    params.update(
        {
            "scaling.workers": job.workers,
            "scaling.use_gpu": job.use_gpu,
            "backbone.name": backbone.get("name"),
            "backbone.pretrained": backbone.get("pretrained"),
            "backbone.fingerprint": backbone.get("fingerprint"),
            "dataset.name": record.name,
            "dataset.uri": job.dataset_uri,
            "dataset.fingerprint": job.dataset_fingerprint,
            "dataset.train_images": job.num_train_images,
            "dataset.val_images": job.num_val_images,
            "task.name": job.task_name,
            "task.index": job.task_index,
            "base_version": record.base_version,
            "ray.run_id": job.ray_run_id,
            "ray.job_id": job.ray_job_id,
            "ray.checkpoint": job.checkpoint_path,
        }
    )
    return params


def job_started_ms(job: TrainJobResult, record: DatasetRecord) -> int | None:
    """When the training job began (Unix ms): its end, as the record's ``trained`` entry has it, less its length."""
    trained = next((h.get("at") for h in reversed(record.history) if h.get("stage") == Stage.TRAINED.value), None)
    if not trained:
        return None
    return int((datetime.fromisoformat(trained).timestamp() - job.job_seconds) * 1000)


def run_dataset(job: TrainJobResult, record: DatasetRecord) -> DatasetRef:
    """The dataset the run trained on, as MLflow's dataset tracking records it."""
    size = {"train": job.num_train_images, "val": job.num_val_images}
    return DatasetRef(record.name, job.dataset_uri, job.dataset_fingerprint, "training", size)


def run_summary(job: TrainJobResult) -> dict[str, float]:
    return {
        "train_seconds": job.train_seconds,
        "job_seconds": job.job_seconds,
        "startup_seconds": job.startup_seconds,
        "images_per_second": job.images_per_second,
        "best_epoch": job.best_epoch,
    }


# --- the stages ----------------------------------------------------------------------------------------


def train(ctx: LearningContext, record: DatasetRecord) -> DatasetRecord:
    """The Ray Train job: the dataset as the next task of the base bundle; the result kept in storage."""
    assert record.dataset_uri is not None and record.fingerprint is not None
    opts = ctx.options
    base = _resolve_base(ctx.registry, opts.base_version)
    fs, path = dataset_location(ctx.settings, record.dataset_uri)
    dataset = LearnableDataset(
        record.dataset_uri, record.fingerprint, read_manifest(path, fs), record.num_train or 0, record.num_test or 0
    )
    with tempfile.TemporaryDirectory(prefix="diki-base-") as tmp:
        base_dir = ctx.registry.download_bundle(base, Path(tmp) / "bundle") if base is not None else None
        base_dir = _with_current_reference(ctx, base_dir, Path(tmp) / "bundle")
        job = run_training_job(
            ctx.settings,
            dataset,
            base_bundle=base_dir,
            workers=opts.workers,
            use_gpu=opts.use_gpu,
            epochs=opts.epochs,
            output_dir=opts.output_dir,
            max_failures=opts.max_failures,
            cpus_per_worker=opts.cpus_per_worker,
            cache_mb=opts.cache_mb,
            epoch_hook=opts.epoch_hook,
        )
    log.info("trained task %r (index %d) in %.1f s; bundle tasks %s", job.task_name, job.task_index,
             job.job_seconds, job.tasks)  # fmt: skip
    # Kept in storage so any process can finish the dataset after a crash; retried here, since
    # retrying the stage would train again.
    rel = f"{ctx.store.run_prefix(record.fingerprint)}/bundle"
    for attempt, delay in enumerate((*_STORE_RETRIES, None)):
        try:
            ctx.storage.delete_tree(rel)
            ctx.storage.copy_tree(job.bundle_dir, rel, marker=ctx.settings.storage.success_marker)
            break
        except OSError:
            if delay is None:
                raise
            log.warning("cannot keep the trained bundle in storage (attempt %d); retrying", attempt + 1)
            time.sleep(delay)
    return ctx.store.advance(
        record, Stage.TRAINED, job=job.to_dict(), bundle=rel, task_index=job.task_index, base_version=base
    )


def _with_current_reference(ctx: LearningContext, base_dir: Path | None, folder: Path) -> Path | None:
    """The base bundle, carrying the reference fitted on ``reference/`` in storage when there is one.

    The new task's bundle inherits its base's reference, so a reference that appeared or changed since
    the base was built is used from this bundle on. Without a base, an empty bundle carries it.
    """
    reference = current_reference(ctx.settings, ctx.storage)
    if reference is None:
        return base_dir
    if base_dir is None:
        model = create_model(ctx.settings)
        model.set_reference(reference)
        save_bundle(model, folder)
        base_dir = folder
    else:
        replace_bundle_reference(base_dir, reference)
    log.info("training against the reference density of %s", reference.source.get("dataset"))
    return base_dir


def check_learned(ctx: LearningContext, record: DatasetRecord) -> DatasetRecord:
    """Refuse a task that did not learn: nothing of it joins a bundle (see ``decide_learned``)."""
    verdict = decide_learned(job_result(record).learnability, ctx.settings.promotion)
    learned = {"ok": verdict.ok, "reasons": verdict.reasons, "checks": verdict.checks}
    log.info("task %r %s: %s", record.task_name, "learned" if verdict.ok else "not learned", "; ".join(verdict.reasons))
    if verdict.ok:
        return ctx.store.advance(record, Stage.LEARNED, learned=learned)
    return ctx.store.advance(
        record, Stage.NOT_LEARNED, "not learned", learned=learned, error="; ".join(verdict.reasons[1:])
    )


def evaluate(ctx: LearningContext, record: DatasetRecord) -> DatasetRecord:
    """The accuracy matrix: every task's test set and the held-out sets, after each learning step."""
    assert record.dataset_uri is not None and record.fingerprint is not None
    registry, base = ctx.registry, record.base_version
    heldout = ctx.options.heldout
    heldout = discover_heldout(ctx.settings) if heldout is None else [normalise_dataset_uri(h) for h in heldout]
    previous, base_datasets, base_fps = None, [], []
    if base is not None:
        info = registry.get_version(base)
        previous = registry.get_matrix(base)
        base_fps, base_datasets = info.dataset_fingerprints, info.datasets
        if len(base_datasets) != len(info.tasks) and previous is not None:
            base_datasets = [previous.columns[c].uri for c in previous.task_columns()]
        if len(base_datasets) != len(info.tasks):
            raise TrainingError(
                f"version {base} does not record the datasets of its tasks, so the new version cannot be evaluated on them"
            )
    task_datasets = [*base_datasets, record.dataset_uri]
    matrix = build_accuracy_matrix(
        ctx.settings,
        _local_bundle(ctx, record),
        task_datasets,
        heldout,
        previous=previous,
        fingerprints=[*base_fps, record.fingerprint] if len(base_fps) == len(base_datasets) else None,
        limit=ctx.options.eval_limit,
    )
    rel = f"{ctx.store.run_prefix(record.fingerprint)}/accuracy_matrix.json"
    ctx.storage.write_bytes(rel, matrix.to_json().encode("utf-8"))
    return ctx.store.advance(record, Stage.EVALUATED, matrix=rel, task_datasets=task_datasets)


def register(ctx: LearningContext, record: DatasetRecord) -> DatasetRecord:
    """Track the run in MLflow and register the bundle as a new version, once per dataset fingerprint."""
    registry, store = ctx.registry, ctx.store
    assert record.fingerprint is not None
    existing = registry.find_version_by_dataset(record.fingerprint)
    if existing is not None:  # registered by a run that died before recording it
        info = registry.get_version(existing)
        return store.advance(
            record, Stage.REGISTERED, "found registered", version=existing, run_id=record.run_id or info.run_id
        )
    job, matrix = job_result(record), record_matrix(ctx.storage, record)
    resumed = record.run_id is not None
    if record.run_id is None:
        run_id = registry.create_run(
            job.ray_run_id,
            {"diki.task": job.task_name, "diki.dataset": record.name, "diki.fingerprint": record.fingerprint},
            start_time_ms=job_started_ms(job, record),  # the run spans the training job it records
        )
        record = store.advance(record, Stage.TRACKING, run_id=run_id)
    assert record.run_id is not None
    bundle_dir = _local_bundle(ctx, record)
    try:
        registry.log_run(
            record.run_id,
            run_params(job, record, bundle_dir),
            epochs=job.history,
            metrics=run_summary(job),
            matrix=matrix,
            dataset=run_dataset(job, record),
        )
    except Exception as exc:  # noqa: BLE001
        if not resumed:
            raise
        # A resumed run logged (some of) this before; MLflow refuses to change a parameter's value.
        log.warning("re-logging run %s after a restart: %s", record.run_id, exc)
    version = registry.register_bundle(
        bundle_dir,
        run_id=record.run_id,
        tags={
            TAG_BASE: "" if record.base_version is None else str(record.base_version),
            "ray_run_id": job.ray_run_id,
            "dataset_name": record.name,
        },
        datasets=record.task_datasets,
    )
    log.info("registered %r as version %d of %r", record.name, version, registry.model_name)
    return store.advance(record, Stage.REGISTERED, version=version, task_index=job.task_index)


def decide(ctx: LearningContext, record: DatasetRecord) -> DatasetRecord:
    """Decide whether the new version may replace production, and record the decision."""
    registry = ctx.registry
    production = registry.get_alias("production")
    # After a restart production may already be this version: compare with what it replaced.
    previous = registry.get_matrix(production) if production is not None and production != record.version else None
    decision = decide_promotion(previous, record_matrix(ctx.storage, record), ctx.settings.promotion)
    log.info("promotion %s: %s", "passed" if decision.ok else "refused", "; ".join(decision.reasons))
    return ctx.store.advance(
        record,
        Stage.DECIDED,
        "passed" if decision.ok else "refused",
        decision={"ok": decision.ok, "reasons": decision.reasons, "checks": decision.checks},
    )


def apply(ctx: LearningContext, record: DatasetRecord) -> DatasetRecord:
    """Apply the recorded decision: the version becomes candidate, and production when it passed."""
    assert record.decision is not None and record.version is not None
    promoted = ctx.registry.apply_promotion(record.version, PromotionDecision(**record.decision))
    if record.run_id:
        ctx.registry.end_run(record.run_id, ok=True)
    return ctx.store.advance(record, Stage.APPLIED, "production" if promoted else "candidate", promoted=promoted)


def reload(ctx: LearningContext, record: DatasetRecord) -> DatasetRecord:
    """Tell the Serve deployment to load the new production version now (it also polls on its own)."""
    from services.serving.client import ServingClient, ServingError

    settings, store = ctx.settings, ctx.store
    if not record.promoted:
        return store.advance(record, Stage.DONE, reload={"status": "skipped", "detail": "not promoted"})
    url = serve_url(settings)
    key = ServingClient.keys_for(settings)
    with ServingClient(url, key, timeout_s=5.0, retry_for_s=0.0) as probe:
        reachable = probe.healthy()
    if not reachable:
        detail = f"no Serve endpoint answers at {url}; it serves version {record.version} when it (re)starts or polls"
        log.info(detail)
        return store.advance(record, Stage.DONE, reload={"status": "no-endpoint", "url": url, "detail": detail})
    try:
        with ServingClient(url, key, timeout_s=600.0, retry_for_s=10.0) as client:
            answer = client.reload()
    except ServingError as exc:  # the replicas still follow the alias on their own
        log.warning("the Serve deployment at %s did not reload: %s", url, exc)
        return store.advance(record, Stage.DONE, reload={"status": "failed", "url": url, "detail": str(exc)})
    served = answer.get("bundle_version")
    status = "reloaded" if served == record.version else "reloaded-other"
    return store.advance(
        record, Stage.DONE, reload={"status": status, "url": url, "bundle_version": served, "answer": answer}
    )


StageFn = Callable[[LearningContext, DatasetRecord], DatasetRecord]

# Which stage function moves a record on from each stage, and its Prefect task name.
STAGES: Final[dict[Stage, tuple[str, StageFn]]] = {
    Stage.ACCEPTED: ("train", train),
    Stage.TRAINED: ("check-learned", check_learned),
    Stage.LEARNED: ("evaluate", evaluate),
    Stage.EVALUATED: ("register", register),
    Stage.TRACKING: ("register", register),
    Stage.REGISTERED: ("decide-promotion", decide),
    Stage.DECIDED: ("apply-promotion", apply),
    Stage.APPLIED: ("reload-serving", reload),
}

StageRunner = Callable[[str, StageFn, LearningContext, DatasetRecord], DatasetRecord]


def _call(name: str, fn: StageFn, ctx: LearningContext, record: DatasetRecord) -> DatasetRecord:
    return fn(ctx, record)


def run_learning(ctx: LearningContext, record: DatasetRecord, run_stage: StageRunner = _call) -> DatasetRecord:
    """Take ``record`` from its stage (accepted, or wherever an earlier run stopped) to ``done``.

    ``run_stage(name, fn, ctx, record)`` runs one stage; the flow passes one that wraps each in a
    Prefect task. The caller holds the learning lock.
    """
    while record.stage in STAGES:
        name, fn = STAGES[record.stage]
        record = run_stage(name, fn, ctx, record)
    return record


# --- `diki train` --------------------------------------------------------------------------------------


@dataclass
class LearnOutcome:
    """What :func:`learn_dataset` did."""

    version: int  # the registered version holding the dataset's task
    reused: bool  # True: the dataset was already learned (nothing was trained)
    promoted: bool  # True: the promotion passed and ``production`` now points at ``version``
    base_version: int | None = None
    job: TrainJobResult | None = None
    matrix: AccuracyMatrix | None = None
    decision: PromotionDecision | None = None
    run_id: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    reload: dict[str, Any] | None = None


def learn_dataset(
    settings: Settings,
    dataset_uri: str,
    *,
    workers: int | None = None,
    use_gpu: bool | None = None,
    epochs: int | None = None,
    heldout: list[str] | None = None,
    base_version: int | Literal["current"] | None = CURRENT,
    eval_limit: int | None = None,
    lock_wait_s: float = 0.0,
    **job_options: Any,
) -> LearnOutcome:
    """Learn one dataset end to end (what ``diki train`` runs): the same stages as the watcher's flow.

    Idempotent: a dataset whose fingerprint a version already learned returns that version.
    ``heldout`` lists held-out dataset URIs (default: ``<storage>/heldout/*``). Extra keyword
    arguments go to the training job (``max_failures``, ``epoch_hook``, ``cpus_per_worker``, ...).

    Raises:
        TrainingInputError: before any compute, for a bad dataset (it also needs a test split).
        LearningBusyError: another process held the learning lock for longer than ``lock_wait_s``.
        TrainingError: the job failed; nothing was registered.
        RegistryError: registration failed; nothing was left registered.
    """
    known = {f.name for f in fields(LearnOptions)}
    unknown = sorted(set(job_options) - known)
    if unknown:
        raise TypeError(f"unknown options {unknown}")
    options = LearnOptions(
        workers=workers,
        use_gpu=use_gpu,
        epochs=epochs,
        heldout=heldout,
        base_version=base_version,
        eval_limit=eval_limit,
        **job_options,
    )
    dataset = check_dataset(settings, dataset_uri, workers, require_test=True)  # the one validation pass
    name = dataset.manifest.name
    with learning_slot(settings, wait_s=lock_wait_s, purpose=f"learning {name}") as slot:
        if not slot.acquired:
            raise LearningBusyError(slot.holder)
        storage = open_storage(settings)
        ctx = LearningContext(settings, storage, MemoryStore(storage, settings), options)
        existing = ctx.registry.find_version_by_dataset(dataset.fingerprint)
        if existing is not None:
            production = ctx.registry.get_alias("production")
            return LearnOutcome(version=existing, reused=True, promoted=production == existing)
        record = DatasetRecord(
            name=name,
            stage=Stage.ACCEPTED,
            location="",
            fingerprint=dataset.fingerprint,
            task_name=name,
            dataset_uri=dataset.uri,
            num_train=dataset.num_train,
            num_test=dataset.num_test,
        )
        try:
            final = run_learning(ctx, record)
        except Exception:
            current = ctx.store.get(name)
            if current is not None and current.run_id and current.version is None:
                ctx.registry.end_run(current.run_id, ok=False)
            raise
    if final.stage == Stage.NOT_LEARNED:
        raise TaskNotLearnedError(name, (final.learned or {}).get("reasons", []))
    assert final.version is not None and final.decision is not None
    matrix = record_matrix(storage, final)
    return LearnOutcome(
        version=final.version,
        reused=False,
        promoted=bool(final.promoted),
        base_version=final.base_version,
        job=job_result(final),
        matrix=matrix,
        decision=PromotionDecision(**final.decision),
        run_id=final.run_id,
        metrics=matrix.stream_metrics(),
        reload=final.reload,
    )
