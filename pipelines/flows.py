"""The learning flow: one dataset dropped in ``incoming/<name>/`` -> learned, registered, promoted, served.

Flow ``diki-learn-dataset`` (:func:`learn_dataset_flow`), one Prefect task per step::

    validate -> accept -> train -> store-bundle -> evaluate -> register -> gate -> promote -> reload-serving
                 |  (same content learned before: duplicate, nothing new)
    validate/train failure -> quarantine (quarantine/<name>/ + _ERROR.md; nothing registered)

Every step writes the dataset's state record (:mod:`pipelines.state`) when it is complete, so a run
that dies anywhere is finished by the next one from the last stage written: the trained bundle and the
accuracy matrix are kept in storage, registration is keyed by the dataset fingerprint
(``Registry.find_version_by_dataset``), the MLflow run id is recorded before anything is logged to it,
the gate's decision is recorded before the aliases move, and each alias moves in one call.

Storage and registry steps retry transient errors (``retries=3``, 2/5/15 s apart); validation and
training do not (a bad dataset stays bad; Ray Train restarts failed workers itself). A permanent error
before registration quarantines the dataset with a report; a transient one leaves the record at its
stage for the next run, and after ``MAX_ATTEMPTS`` failed runs the dataset is quarantined too. After
registration nothing is moved any more (the version names the dataset's location): a step that keeps
failing ends the record as ``failed`` with the error.

Learning is sequential: a run holds the storage lock (:class:`pipelines.state.StorageLock`: one learner
across machines and Prefect servers) and a slot of the Prefect global concurrency limit
``diki-learning`` (limit 1, visible in the Prefect UI) for its whole duration.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.state import (
    ERROR_REPORT,
    DatasetRecord,
    LockHolder,
    Stage,
    StateStore,
    StorageLock,
    accepted_prefix,
    drop_info,
)
from services.settings import Settings, get_settings
from services.storage import Storage, open_storage, validate_dataset_name

if TYPE_CHECKING:
    from diki_model.data import DatasetReport
    from services.evaluation import AccuracyMatrix
    from services.training import TrainJobResult

__all__ = [
    "GLOBAL_LIMIT",
    "LEARN_FLOW",
    "MAX_ATTEMPTS",
    "LearningSlot",
    "StageHook",
    "add_stage_hook",
    "learn_dataset_flow",
    "learn_drop",
    "learning_slot",
    "load_flow_settings",
    "mlflow_ui",
    "remove_stage_hook",
    "serve_url",
]

log = logging.getLogger(__name__)

LEARN_FLOW: Final = "diki-learn-dataset"
GLOBAL_LIMIT: Final = "diki-learning"  # Prefect global concurrency limit, 1 slot
MAX_ATTEMPTS: Final = 3  # failed runs of one drop before it is quarantined (or marked failed)
MIN_IMAGES_PER_CLASS: Final = 2
MAX_IMAGES: Final = 2_000_000
MAX_IMAGE_BYTES: Final = 20 * 1024 * 1024
_GLOBAL_LIMIT_WAIT_S: Final = 15.0
_GLOBAL_LIMIT_LEASE_S: Final = 300.0
_RETRY_DELAYS: Final = [2, 5, 15]
_PRE_REGISTRATION: Final = frozenset(
    {Stage.VALIDATING, Stage.VALIDATED, Stage.ACCEPTED, Stage.TRAINED, Stage.EVALUATED, Stage.TRACKING}
)

StageHook = Callable[[DatasetRecord], None]
_hooks: list[StageHook] = []


def add_stage_hook(hook: StageHook) -> None:
    """Call ``hook(record)`` each time a dataset's state record is written (a stage completed).

    For timings, notifications and tests (which stop the process at a precise stage); a hook that
    raises is logged and ignored.
    """
    _hooks.append(hook)


def remove_stage_hook(hook: StageHook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


def _advance(store: StateStore, record: DatasetRecord, stage: Stage, note: str | None = None, **changes: Any):
    record = store.advance(record, stage, note, **changes)
    for hook in list(_hooks):
        try:
            hook(record)
        except Exception:  # noqa: BLE001 - a hook never breaks the flow
            log.exception("stage hook %r failed", hook)
    return record


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


# --- settings, locations, links ------------------------------------------------------------------


def load_flow_settings(config: str | None) -> Settings:
    """The settings of a flow run: the YAML file ``config`` when given, else the process's settings."""
    return Settings.load(config) if config else get_settings()


def serve_url(settings: Settings) -> str:
    """The HTTP address of the Serve deployment (a wildcard host is reached through loopback)."""
    host = settings.serve.host
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{settings.serve.port}"


def mlflow_ui(settings: Settings) -> str:
    """Where to look at runs and versions: the MLflow server's URL, or the command that opens a local UI."""
    uri = settings.mlflow.tracking_uri or ""
    if settings.mlflow.is_remote:
        return uri
    return f"mlflow ui --backend-store-uri {uri}"


def _mlflow_links(settings: Settings, run_id: str | None, version: int | None) -> dict[str, str]:
    if not settings.mlflow.is_remote:
        return {}
    from services.registry import Registry

    base = (settings.mlflow.tracking_uri or "").rstrip("/")
    links: dict[str, str] = {}
    if run_id:
        links["MLflow run"] = f"{base}/#/experiments/{Registry(settings).experiment_id}/runs/{run_id}"
    if version is not None:
        links["bundle version"] = f"{base}/#/models/{settings.mlflow.registry_model_name}/versions/{version}"
    return links


def _dataset_uri(storage: Storage, rel: str) -> str:
    """How training, evaluation and the registry name a dataset in storage (a local path or s3:// URI)."""
    return storage.path(rel) if storage.is_local else storage.uri(rel)


# --- errors --------------------------------------------------------------------------------------


def _is_permanent(exc: BaseException) -> bool:
    """Errors that a retry cannot fix: bad input, refused training, programming errors."""
    from diki_model.data import DatasetError
    from services.training import TrainingError, TrainingInputError

    if isinstance(exc, TrainingInputError | TrainingError | DatasetError):
        return True
    if isinstance(exc, OSError):  # storage, network: transient
        return False
    return isinstance(exc, ValueError | TypeError | LookupError | AttributeError | AssertionError)


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry a failed step unless its error is permanent."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the result cannot be read: retry
        return True
    return not (isinstance(exc, BaseException) and _is_permanent(exc))


_STEP = {"retries": 3, "retry_delay_seconds": _RETRY_DELAYS, "retry_condition_fn": _retry_transient}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the steps -----------------------------------------------------------------------------------


@dataclass
class _Context:
    settings: Settings
    storage: Storage
    store: StateStore


@task(name="validate", cache_policy=NO_CACHE)
def validate_step(ctx: _Context, record: DatasetRecord) -> tuple[DatasetRecord, DatasetReport, str | None]:
    """Check the drop in place (schema, images, labels, classes, sizes); fingerprint it when valid.

    Returns the record, the report and, when the dataset cannot be learned, why (None when it can).
    """
    from diki_model.data import dataset_fingerprint, read_manifest, validate_dataset
    from services.training import TrainingInputError, check_dataset

    settings, storage = ctx.settings, ctx.storage
    path = storage.path(record.location)
    report = validate_dataset(
        path,
        storage.filesystem,
        min_images_per_class=MIN_IMAGES_PER_CLASS,
        max_images=MAX_IMAGES,
        max_image_bytes=MAX_IMAGE_BYTES,
    )
    report.path = storage.uri(record.location)
    if not report.ok:
        return record, report, f"{len(report.errors)} problem(s), first: {report.errors[0]}"
    try:  # the training job's own rules (enough images to learn, a test split to evaluate and gate)
        check_dataset(settings, _dataset_uri(storage, record.location), settings.train.workers, require_test=True)
    except TrainingInputError as exc:
        return record, report, str(exc)
    manifest = read_manifest(path, storage.filesystem)
    fingerprint = dataset_fingerprint(path, storage.filesystem)
    _logger().info("dataset %r is valid: %d train / %d test images", record.name, report.num_train, report.num_test)
    record = _advance(ctx.store, record, Stage.VALIDATED, fingerprint=fingerprint, task_name=manifest.name)
    return record, report, None


@task(name="accept", cache_policy=NO_CACHE, **_STEP)
def accept_step(ctx: _Context, record: DatasetRecord) -> DatasetRecord | None:
    """Learned before (same fingerprint)? Then a duplicate. Else move the data out of incoming/.

    Returns None when the drop changed since it was validated (a new upload started): the record is
    dropped and the next watcher run sees the new drop.
    """
    from services.registry import Registry

    settings, storage, store = ctx.settings, ctx.storage, ctx.store
    assert record.fingerprint is not None
    marker = settings.storage.success_marker
    dst = accepted_prefix(settings, record.name, record.fingerprint)
    moved = storage.is_file(f"{dst}/{marker}")
    if not moved:
        now = drop_info(storage, settings, record.name)
        if not now.complete or now.identity != record.drop:
            _logger().warning("incoming/%s changed while it was validated; it is checked again", record.name)
            store.delete(record.name)
            return None
    existing = Registry(settings).find_version_by_dataset(record.fingerprint)
    if existing is not None:
        twin = next(
            (r for r in store.all() if r.fingerprint == record.fingerprint and r.name != record.name and r.version),
            None,
        )
        storage.delete_tree(record.location)
        note = f"same content as {twin.name!r}" if twin else "same content learned before"
        return _advance(
            store,
            record,
            Stage.DUPLICATE,
            note,
            version=existing,
            duplicate_of=twin.name if twin else None,
            location="",
        )
    if moved:  # moved before a crash: only the leftovers of the source remain
        if storage.exists(record.location):
            storage.delete_tree(record.location)
    else:
        if storage.exists(dst):  # a half-moved copy from a crash
            storage.delete_tree(dst)
        storage.move_tree(record.location, dst, marker=marker)
    stale = f"{settings.storage.quarantine_prefix}/{record.name}"
    if storage.exists(stale):  # an earlier, bad drop of this name
        storage.delete_tree(stale)
    return _advance(store, record, Stage.ACCEPTED, location=dst, dataset_uri=_dataset_uri(storage, dst))


@task(name="train", cache_policy=NO_CACHE)
def train_step(ctx: _Context, record: DatasetRecord) -> TrainJobResult:
    """The Ray Train job: the dataset as the next task of the production bundle (else the latest)."""
    from services.training import CURRENT, run_training_job

    assert record.dataset_uri is not None
    job = run_training_job(ctx.settings, record.dataset_uri, base_version=CURRENT)
    _logger().info(
        "trained task %r (index %d) in %.1f s; bundle tasks %s",
        job.task_name,
        job.task_index,
        job.job_seconds,
        job.tasks,
    )
    return job


@task(name="store-bundle", cache_policy=NO_CACHE, **_STEP)
def store_bundle_step(ctx: _Context, record: DatasetRecord, job: TrainJobResult) -> DatasetRecord:
    """Keep the trained bundle in storage, so any process can finish the dataset after a crash."""
    assert record.fingerprint is not None
    rel = f"{ctx.store.run_prefix(record.fingerprint)}/bundle"
    ctx.storage.delete_tree(rel)
    ctx.storage.copy_tree(job.bundle_dir, rel, marker=ctx.settings.storage.success_marker)
    return _advance(ctx.store, record, Stage.TRAINED, job=job.to_dict(), bundle=rel, task_index=job.task_index)


def _job(record: DatasetRecord) -> TrainJobResult:
    from dataclasses import fields

    from services.training import TrainJobResult

    assert record.job is not None
    known = {f.name for f in fields(TrainJobResult)}
    values = {k: v for k, v in record.job.items() if k in known}
    return TrainJobResult(**{**values, "bundle_dir": Path(record.job["bundle_dir"])})


def _local_bundle(ctx: _Context, record: DatasetRecord) -> Path:
    """The trained bundle on this machine: the job's folder, else a copy fetched from storage."""
    job = _job(record)
    if (job.bundle_dir / "bundle.json").is_file():
        return job.bundle_dir
    assert record.bundle is not None
    marker = ctx.settings.storage.success_marker
    if not ctx.storage.is_file(f"{record.bundle}/{marker}"):
        raise FileNotFoundError(f"the trained bundle of {record.name!r} is missing at {ctx.storage.uri(record.bundle)}")
    dst = ctx.settings.home / "bundles" / job.ray_run_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=_mkdir(dst.parent)))
    for rel in ctx.storage.list_files(record.bundle):
        if rel == marker:
            continue
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(ctx.storage.read_bytes(f"{record.bundle}/{rel}"))
    if dst.exists():
        import shutil

        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _matrix(ctx: _Context, record: DatasetRecord) -> AccuracyMatrix:
    from services.evaluation import AccuracyMatrix

    assert record.matrix is not None
    return AccuracyMatrix.from_json(
        ctx.storage.read_bytes(record.matrix).decode("utf-8"), ctx.storage.uri(record.matrix)
    )


@task(name="evaluate", cache_policy=NO_CACHE, **_STEP)
def evaluate_step(ctx: _Context, record: DatasetRecord) -> DatasetRecord:
    """The accuracy matrix: every task's test set and the held-out sets, after each learning step."""
    from services.evaluation import discover_heldout
    from services.training import evaluate_new_version

    job = _job(record)
    assert record.dataset_uri is not None and record.fingerprint is not None
    matrix, task_datasets = evaluate_new_version(
        ctx.settings,
        _local_bundle(ctx, record),
        job.base_version,
        record.dataset_uri,
        record.fingerprint,
        discover_heldout(ctx.settings),
    )
    rel = f"{ctx.store.run_prefix(record.fingerprint)}/accuracy_matrix.json"
    ctx.storage.write_bytes(rel, matrix.to_json().encode("utf-8"))
    return _advance(ctx.store, record, Stage.EVALUATED, matrix=rel, task_datasets=task_datasets)


@task(name="register", cache_policy=NO_CACHE, **_STEP)
def register_step(ctx: _Context, record: DatasetRecord) -> DatasetRecord:
    """Track the run in MLflow and register the bundle as a new version, once per dataset fingerprint."""
    from services.registry import TAG_BASE, Registry

    settings, store = ctx.settings, ctx.store
    registry = Registry(settings)
    assert record.fingerprint is not None
    existing = registry.find_version_by_dataset(record.fingerprint)
    if existing is not None:  # registered by a run that died before recording it
        info = registry.get_version(existing)
        return _advance(
            store, record, Stage.REGISTERED, "found registered", version=existing, run_id=record.run_id or info.run_id
        )
    job, matrix = _job(record), _matrix(ctx, record)
    resumed = record.run_id is not None
    if record.run_id is None:
        run_id = registry.create_run(
            job.ray_run_id,
            {"diki.task": job.task_name, "diki.dataset": record.name, "diki.fingerprint": record.fingerprint},
        )
        record = _advance(store, record, Stage.TRACKING, run_id=run_id)
    assert record.run_id is not None
    try:
        registry.log_training_run(job, matrix, run_id=record.run_id, extra_params={"dataset.name": record.name})
    except Exception as exc:  # noqa: BLE001
        if not resumed:
            raise
        # A resumed run logged (some of) this before; MLflow refuses to change a parameter's value.
        _logger().warning("re-logging run %s after a restart: %s", record.run_id, exc)
    bundle_dir = _local_bundle(ctx, record)
    version = registry.register_bundle(
        bundle_dir,
        run_id=record.run_id,
        tags={
            TAG_BASE: "" if job.base_version is None else str(job.base_version),
            "ray_run_id": job.ray_run_id,
            "dataset_name": record.name,
        },
        datasets=record.task_datasets,
    )
    _logger().info("registered %r as version %d of %r", record.name, version, registry.model_name)
    return _advance(store, record, Stage.REGISTERED, version=version, task_index=job.task_index)


@task(name="gate", cache_policy=NO_CACHE, **_STEP)
def gate_step(ctx: _Context, record: DatasetRecord) -> DatasetRecord:
    """Decide whether the new version may replace production, and record the decision."""
    from services.registry import Registry, promotion_gate

    registry = Registry(ctx.settings)
    production = registry.get_alias("production")
    previous = registry.get_matrix(production) if production is not None and production != record.version else None
    decision = promotion_gate(previous, _matrix(ctx, record), ctx.settings.promotion)
    _logger().info("gate %s: %s", "passed" if decision.ok else "refused", "; ".join(decision.reasons))
    return _advance(
        ctx.store,
        record,
        Stage.GATING,
        "passed" if decision.ok else "refused",
        decision={"ok": decision.ok, "reasons": decision.reasons, "checks": decision.checks},
    )


@task(name="promote", cache_policy=NO_CACHE, **_STEP)
def promote_step(ctx: _Context, record: DatasetRecord) -> DatasetRecord:
    """Apply the recorded decision: the version becomes candidate, and production when the gate passed."""
    from services.registry import GateDecision, Registry

    assert record.decision is not None and record.version is not None
    registry = Registry(ctx.settings)
    decision = GateDecision(**record.decision)
    promoted = registry.apply_gate(record.version, decision)
    if record.run_id:
        registry.end_run(record.run_id, ok=True)
    return _advance(ctx.store, record, Stage.GATED, "production" if promoted else "candidate", promoted=promoted)


@task(name="reload-serving", cache_policy=NO_CACHE)
def reload_step(ctx: _Context, record: DatasetRecord) -> DatasetRecord:
    """Tell the Serve deployment to load the new production version now (it also polls on its own)."""
    from services.serving.client import ServingClient, ServingError

    settings = ctx.settings
    if not record.promoted:
        return _advance(ctx.store, record, Stage.DONE, reload={"status": "skipped", "detail": "not promoted"})
    url = serve_url(settings)
    key = settings.serve.api_key.get_secret_value() if settings.serve.api_key else None
    with ServingClient(url, key, timeout_s=5.0, retry_for_s=0.0) as probe:
        reachable = probe.healthy()
    if not reachable:
        detail = f"no Serve endpoint answers at {url}; it serves version {record.version} when it (re)starts or polls"
        _logger().info(detail)
        return _advance(ctx.store, record, Stage.DONE, reload={"status": "no-endpoint", "url": url, "detail": detail})
    try:
        with ServingClient(url, key, timeout_s=600.0, retry_for_s=10.0) as client:
            answer = client.reload()
    except ServingError as exc:  # the replicas still follow the alias on their own
        _logger().warning("the Serve deployment at %s did not reload: %s", url, exc)
        return _advance(ctx.store, record, Stage.DONE, reload={"status": "failed", "url": url, "detail": str(exc)})
    served = answer.get("bundle_version")
    status = "reloaded" if served == record.version else "reloaded-other"
    return _advance(
        ctx.store, record, Stage.DONE, reload={"status": status, "url": url, "bundle_version": served, "answer": answer}
    )


@task(name="quarantine", cache_policy=NO_CACHE, **_STEP)
def quarantine_step(ctx: _Context, record: DatasetRecord) -> DatasetRecord:
    """Move the dataset to quarantine/<name>/ and write its report there (``_ERROR.md``)."""
    storage, settings = ctx.storage, ctx.settings
    dst = f"{settings.storage.quarantine_prefix}/{record.name}"
    if record.location and record.location != dst and storage.exists(record.location):
        if storage.exists(dst):  # an earlier quarantine of this name: the new failure replaces it
            storage.delete_tree(dst)
        storage.move_tree(record.location, dst, marker=settings.storage.success_marker)
    report_rel = f"{dst}/{ERROR_REPORT}"
    storage.write_bytes(report_rel, (record.error_report or f"# `{record.name}`\n\n{record.error}\n").encode())
    _logger().warning("dataset %r quarantined at %s: %s", record.name, storage.uri(dst), record.error)
    return _advance(ctx.store, record, Stage.QUARANTINED, location=dst, report=report_rel, error_report=None)


# --- reports and artifacts -----------------------------------------------------------------------


def error_report(
    record: DatasetRecord, stage: Stage, reason: str, report: DatasetReport | None, storage: Storage
) -> str:
    """The Markdown of ``_ERROR.md``: what failed, where, and how to fix it."""
    lines = [
        f"# Dataset `{record.name}` was quarantined",
        "",
        f"- failed while: **{stage.value}**",
        f"- dropped at: `{storage.uri(record.location or '')}`",
    ]
    if record.fingerprint:
        lines.append(f"- fingerprint: `{record.fingerprint}`")
    lines += ["", "## What is wrong", "", "```text", reason.strip(), "```", ""]
    if report is not None:
        nested = ["##" + line if line.startswith("#") else line for line in report.to_markdown().splitlines()]
        lines += ["## Validation report", "", *nested, ""]
    lines += [
        "## How to fix it",
        "",
        "Correct the dataset and drop it again under the same name (data first, `_SUCCESS` last), e.g.",
        f"`diki push PATH --name {record.name}`. Nothing was registered or deployed from this drop.",
        "",
    ]
    return "\n".join(lines)


def matrix_markdown(matrix: AccuracyMatrix) -> str:
    """The accuracy matrix (%) as a Markdown table: one row per learning step, one column per test set."""
    header = ["model", *[c.name + (" (held-out)" if c.kind == "heldout" else "") for c in matrix.columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in zip(matrix.rows, matrix.acc, strict=True):
        label = name if name == "zero-shot" else f"after {name}"
        lines.append("| " + " | ".join([label, *[f"{v:.1f}" for v in row]]) + " |")
    return "\n".join(lines)


def _artifact_key(prefix: str, name: str) -> str:
    return f"{prefix}-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def _publish_artifacts(ctx: _Context, record: DatasetRecord) -> None:
    """Markdown and link artifacts on the flow run: the outcome, the matrix, MLflow run and version links."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    try:
        if record.stage == Stage.QUARANTINED:
            text = ctx.storage.read_bytes(record.report).decode() if record.report else str(record.error)
            create_markdown_artifact(text, key=_artifact_key("quarantine", record.name), description=record.error)
            return
        if record.stage == Stage.DUPLICATE:
            twin = f" as {record.duplicate_of!r}" if record.duplicate_of else ""
            create_markdown_artifact(
                f"# `{record.name}`: duplicate\n\nThe same content was learned before{twin} "
                f"(version {record.version}). Nothing new was trained or registered.\n",
                key=_artifact_key("learn", record.name),
            )
            return
        if record.stage not in (Stage.DONE, Stage.FAILED):
            return
        decision = record.decision or {}
        verdict = "passed: now production" if record.promoted else "refused: candidate only"
        lines = [
            f"# `{record.name}` -> bundle version {record.version}",
            "",
            f"- task `{record.task_name}`, index {record.task_index}",
            f"- dataset: `{record.dataset_uri}` (fingerprint `{(record.fingerprint or '')[:16]}`)",
            f"- MLflow run: `{record.run_id}`; registered model `{ctx.settings.mlflow.registry_model_name}` "
            f"version {record.version}",
            f"- promotion gate {verdict}",
            *[f"  - {reason}" for reason in decision.get("reasons", [])],
            f"- serving: {(record.reload or {}).get('status', '-')} {(record.reload or {}).get('detail', '')}",
            "",
        ]
        if record.matrix:
            lines += ["## Accuracy matrix (%)", "", matrix_markdown(_matrix(ctx, record)), ""]
        create_markdown_artifact("\n".join(lines), key=_artifact_key("learn", record.name))
        for text, link in _mlflow_links(ctx.settings, record.run_id, record.version).items():
            create_link_artifact(link, link_text=f"{text} ({record.name})", key=_artifact_key("mlflow", text))
    except Exception:  # noqa: BLE001 - artifacts never fail a learned dataset
        log.exception("cannot publish the artifacts of %r", record.name)


# --- the slot: one learner at a time ----------------------------------------------------------------


@dataclass
class LearningSlot:
    acquired: bool
    holder: LockHolder | None = None  # who holds it when it was not acquired
    lock: StorageLock | None = None


@contextmanager
def _prefect_slot() -> Iterator[None]:
    """A slot of the Prefect global concurrency limit ``diki-learning`` (created with limit 1).

    Called while holding the storage lock, so a slot that stays taken is a leftover of a process that
    died holding it (an ephemeral API does not expire leases): it is released and taken again.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GLOBAL_LIMIT, 1)
    with ExitStack() as stack:
        for attempt in (1, 2):
            try:
                stack.enter_context(
                    concurrency(
                        GLOBAL_LIMIT,
                        occupy=1,
                        timeout_seconds=_GLOBAL_LIMIT_WAIT_S,
                        lease_duration=_GLOBAL_LIMIT_LEASE_S,
                        strict=True,
                        raise_on_lease_renewal_failure=False,
                    )
                )
                break
            except TimeoutError:
                if attempt == 2:
                    raise
                _logger().warning("the %r slot is held by a process that is gone; releasing it", GLOBAL_LIMIT)
                with get_client(sync_client=True) as client:
                    client.update_global_concurrency_limit(GLOBAL_LIMIT, GlobalConcurrencyLimitUpdate(active_slots=0))
        yield


@contextmanager
def learning_slot(settings: Settings, *, wait_s: float = 0.0, purpose: str = "learning") -> Iterator[LearningSlot]:
    """Hold the right to learn: the storage lock, then the Prefect global concurrency slot.

    Yields ``LearningSlot(acquired=False, holder=...)`` without blocking longer than ``wait_s`` when
    another process is learning.
    """
    lock = StorageLock(open_storage(settings), settings, purpose=purpose)
    if not lock.acquire(wait_s):
        yield LearningSlot(False, lock.holder())
        return
    try:
        with _prefect_slot():
            yield LearningSlot(True, None, lock)
    finally:
        lock.release()


# --- the flow --------------------------------------------------------------------------------------


def _result(record: DatasetRecord | None, name: str, status: str | None = None, detail: str = "") -> dict[str, Any]:
    if record is None:
        return {"name": name, "status": status or "skipped", "detail": detail}
    if status is None:
        status = {
            Stage.DONE: "served" if record.promoted else "candidate",
            Stage.DUPLICATE: "duplicate",
            Stage.QUARANTINED: "quarantined",
            Stage.FAILED: "failed",
        }.get(record.stage, "interrupted")
    return {
        "name": name,
        "status": status,
        "stage": record.stage.value,
        "version": record.version,
        "task_index": record.task_index,
        "promoted": record.promoted,
        "fingerprint": record.fingerprint,
        "duplicate_of": record.duplicate_of,
        "error": record.error,
        "detail": detail,
    }


def _start(ctx: _Context, name: str) -> DatasetRecord | None:
    """The record to work on: an unfinished one, or a new one for a complete drop; None when nothing to do."""
    record = ctx.store.get(name)
    if record is not None and not record.terminal:
        return record
    drop = drop_info(ctx.storage, ctx.settings, name)
    if not drop.complete:
        return None
    record = DatasetRecord(name=name, stage=Stage.VALIDATING, location=drop.path, drop=drop.identity)
    return _advance(ctx.store, record, Stage.VALIDATING, "dropped")


def _quarantine(ctx: _Context, record: DatasetRecord, stage: Stage, reason: str, report: Any = None) -> DatasetRecord:
    text = error_report(record, stage, reason, report, ctx.storage)
    record = _advance(ctx.store, record, Stage.QUARANTINING, error=reason, error_report=text)
    if record.run_id:  # an MLflow run was opened for the registration: close it as failed
        from services.registry import Registry

        try:
            Registry(ctx.settings).end_run(record.run_id, ok=False)
        except Exception as exc:  # noqa: BLE001 - the quarantine matters more than the run's status
            _logger().warning("cannot close MLflow run %s: %s", record.run_id, exc)
    return quarantine_step(ctx, record)


def _run_stages(ctx: _Context, record: DatasetRecord) -> DatasetRecord | None:
    while not record.terminal:
        stage = record.stage
        if stage == Stage.VALIDATING:
            if not ctx.storage.exists(record.location):
                _logger().warning("incoming/%s disappeared before it was validated", record.name)
                ctx.store.delete(record.name)
                return None
            record, report, problem = validate_step(ctx, record)
            if problem is not None:
                record = _quarantine(ctx, record, Stage.VALIDATING, problem, report)
        elif stage == Stage.VALIDATED:
            accepted = accept_step(ctx, record)
            if accepted is None:
                return None
            record = accepted
        elif stage == Stage.ACCEPTED:
            from services.training import TrainingError, TrainingInputError

            try:
                job = train_step(ctx, record)
            except (TrainingInputError, TrainingError) as exc:
                record = _quarantine(ctx, record, Stage.ACCEPTED, str(exc))
                continue
            record = store_bundle_step(ctx, record, job)
        elif stage == Stage.TRAINED:
            record = evaluate_step(ctx, record)
        elif stage in (Stage.EVALUATED, Stage.TRACKING):
            record = register_step(ctx, record)
        elif stage == Stage.REGISTERED:
            record = gate_step(ctx, record)
        elif stage == Stage.GATING:
            record = promote_step(ctx, record)
        elif stage == Stage.GATED:
            record = reload_step(ctx, record)
        elif stage == Stage.QUARANTINING:
            record = quarantine_step(ctx, record)
        else:  # pragma: no cover - every active stage is handled above
            raise AssertionError(f"no step for stage {stage}")
    return record


def learn_drop(settings: Settings, name: str) -> dict[str, Any]:
    """Take the drop ``incoming/<name>`` (or its unfinished record) through every remaining step.

    The caller holds the learning slot. Returns a summary (``status``: served, candidate, duplicate,
    quarantined, failed, skipped). A transient error is re-raised after it is recorded, so the flow run
    fails and the next run resumes; it quarantines once the drop has failed ``MAX_ATTEMPTS`` times.
    """
    from prefect.runtime import flow_run

    storage = open_storage(settings)
    ctx = _Context(settings, storage, StateStore(storage, settings))
    record = _start(ctx, name)
    if record is None:
        return _result(None, name, "skipped", f"no complete drop at {settings.storage.incoming_prefix}/{name}")
    if flow_run.id:
        record.flow_run_id = str(flow_run.id)
    stage = record.stage
    try:
        final = _run_stages(ctx, record)
    except Exception as exc:
        current = ctx.store.get(name) or record
        stage = current.stage
        current.attempts += 1
        current.error = f"at {stage.value}: {_describe(exc)}"
        permanent = _is_permanent(exc)
        _logger().error("learning %r failed at %s (attempt %d): %s", name, stage.value, current.attempts, current.error)
        if stage == Stage.QUARANTINING:  # finishing a quarantine failed: only a later run can finish it
            ctx.store.put(current)
            raise
        if stage in _PRE_REGISTRATION and (permanent or current.attempts >= MAX_ATTEMPTS):
            why = "a permanent error" if permanent else f"{current.attempts} failed attempts"
            final = _quarantine(ctx, current, stage, f"{_describe(exc)}\n\n(quarantined after {why})")
        elif stage not in _PRE_REGISTRATION and current.attempts >= MAX_ATTEMPTS:
            final = _advance(ctx.store, current, Stage.FAILED, current.error)
        else:
            ctx.store.put(current)
            raise
    if final is None:
        return _result(None, name, "skipped", "the drop changed or disappeared; it is looked at again on the next run")
    _publish_artifacts(ctx, final)
    return _result(final, name)


@flow(name=LEARN_FLOW, flow_run_name="learn-{name}", validate_parameters=True)
def learn_dataset_flow(name: str, config: str | None = None, lock_wait_s: float = 0.0) -> dict[str, Any]:
    """Learn the dataset dropped at ``incoming/<name>/`` (or finish its interrupted run).

    Args:
        name: the dataset's folder name under the incoming prefix.
        config: a settings YAML file for this run (default: the process's settings).
        lock_wait_s: how long to wait when another process is learning (then ``status`` is ``busy``).
    """
    validate_dataset_name(name)
    settings = load_flow_settings(config)
    with learning_slot(settings, wait_s=lock_wait_s, purpose=f"learning {name}") as slot:
        if not slot.acquired:
            holder = slot.holder.describe() if slot.holder else "another process"
            return _result(None, name, "busy", f"{holder} is learning; try again later")
        return learn_drop(settings, name)
