"""The learning flow: one dataset dropped in ``incoming/<name>/`` -> learned, registered, promoted, served.

Flow ``diki-learn-dataset`` (:func:`learn_dataset_flow`), one Prefect task per stage::

    validate -> accept -> train -> evaluate -> register -> decide-promotion -> apply-promotion -> reload-serving
                 |  (same content learned before: duplicate, nothing new)
    validate/train failure -> quarantine (quarantine/<name>/ + _ERROR.md; nothing registered)

The flow owns what is particular to a drop (validating it in place, moving it out of ``incoming/``,
quarantining it); from ``accepted`` on it runs the one learning step, :func:`pipelines.learning.run_learning`,
the same stages ``diki train`` runs, each wrapped in a Prefect task (retries, the UI). Every stage
writes the dataset's state record (:mod:`pipelines.state`) when it is complete, so a run that dies
anywhere is finished by the next one from the last stage written.

Storage and registry stages retry transient errors (``retries=3``, 2/5/15 s apart); validation and
training do not (a bad dataset stays bad; Ray Train restarts failed workers itself). A permanent error
before registration quarantines the dataset with a report; a transient one leaves the record at its
stage for the next run, and after ``MAX_ATTEMPTS`` failed runs the dataset is quarantined too. After
registration nothing is moved any more (the version names the dataset's location): a stage that keeps
failing ends the record as ``failed`` with the error.

Learning is sequential: a run holds the learning lock (:func:`pipelines.learning.learning_slot`: one
learner across processes, machines and Prefect servers) for its whole duration.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Final

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.learning import STAGES, LearningContext, learning_slot, record_matrix, run_learning
from pipelines.state import ERROR_REPORT, DatasetRecord, Stage, StateStore, accepted_prefix, drop_info
from services.settings import Settings, get_settings
from services.storage import Storage, open_storage, validate_dataset_name

if TYPE_CHECKING:
    from diki_model.data import DatasetReport
    from services.accuracy import AccuracyMatrix

__all__ = ["LEARN_FLOW", "MAX_ATTEMPTS", "learn_dataset_flow", "learn_drop", "load_flow_settings", "mlflow_ui"]

log = logging.getLogger(__name__)

LEARN_FLOW: Final = "diki-learn-dataset"
MAX_ATTEMPTS: Final = 3  # failed runs of one drop before it is quarantined (or marked failed)
_RETRY_DELAYS: Final = [2, 5, 15]
_PRE_REGISTRATION: Final = frozenset({Stage.VALIDATING, Stage.VALIDATED, Stage.ACCEPTED, Stage.TRAINED,
                                      Stage.LEARNED, Stage.EVALUATED, Stage.TRACKING})  # fmt: skip


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


@task(name="validate", cache_policy=NO_CACHE)
def validate_step(ctx: LearningContext, record: DatasetRecord) -> tuple[DatasetRecord, DatasetReport, str | None]:
    """Check the drop in place, in one pass (schema, images, labels, classes, sizes, the learning rules).

    The same pass fingerprints it. Returns the record, the report and, when the dataset cannot be
    learned, why (None when it can).
    """
    from services.training import TrainingInputError, inspect_dataset

    storage = ctx.storage
    uri = storage.dataset_uri(record.location)
    try:
        check = inspect_dataset(ctx.settings, uri, workers=ctx.settings.train.workers, require_test=True)
    except TrainingInputError as exc:
        raise AssertionError(f"storage names an unusable dataset location {uri}: {exc}") from exc
    report = check.report
    report.path = storage.uri(record.location)
    if not report.ok:
        return record, report, f"{len(report.errors)} problem(s), first: {report.errors[0]}"
    if check.dataset is None:
        return record, report, check.summary(storage.uri(record.location))
    dataset = check.dataset
    _logger().info("dataset %r is valid: %d train / %d test images", record.name, report.num_train, report.num_test)
    record = ctx.store.advance(
        record,
        Stage.VALIDATED,
        fingerprint=dataset.fingerprint,
        task_name=dataset.manifest.name,
        num_train=dataset.num_train,
        num_test=dataset.num_test,
    )
    return record, report, None


@task(name="accept", cache_policy=NO_CACHE, **_STEP)
def accept_step(ctx: LearningContext, record: DatasetRecord) -> DatasetRecord | None:
    """Learned before (same fingerprint)? Then a duplicate. Else move the data out of incoming/.

    Returns None when the drop changed since it was validated (a new upload started): the record is
    dropped and the next watcher run sees the new drop.
    """
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
    existing = ctx.registry.find_version_by_dataset(record.fingerprint)
    if existing is not None:
        import json

        from services.registry import TAG_PROMOTION, TAG_PROMOTION_REASONS

        info = ctx.registry.get_version(existing)
        # Who learned this content: the name the version was registered for, else a record that learned
        # it (never another duplicate: two duplicates must not point at each other).
        learner = info.tags.get("dataset_name") or next(
            (
                r.name
                for r in store.all()
                if r.fingerprint == record.fingerprint and r.version and r.stage != Stage.DUPLICATE
            ),
            None,
        )
        if record.location != dst:
            storage.delete_tree(record.location)  # the drop in incoming/; never the accepted copy a version names
        if learner != record.name:
            note = f"same content as {learner!r}" if learner else "same content learned before"
            return store.advance(record, Stage.DUPLICATE, note, version=existing, duplicate_of=learner, location="")
        # This name re-dropped the content it learned (and is served with): the record keeps what the
        # learned dataset is (its accepted location, task, version, run) and says the drop was a duplicate.
        fp = record.fingerprint
        index = info.dataset_fingerprints.index(fp) if fp in info.dataset_fingerprints else len(info.tasks) - 1
        runs = store.run_prefix(fp)
        verdict = info.tags.get(TAG_PROMOTION)
        uri = info.datasets[index] if index < len(info.datasets) else None
        return store.advance(
            record,
            Stage.DUPLICATE,
            "re-dropped: the same content this name learned before; nothing new",
            version=existing,
            duplicate_of=record.name,
            location=dst if moved else "",
            dataset_uri=uri or (storage.dataset_uri(dst) if moved else None),
            task_index=index,
            task_datasets=info.datasets or None,
            base_version=info.base_version,
            run_id=info.run_id,
            bundle=f"{runs}/bundle" if storage.is_file(f"{runs}/bundle/{marker}") else None,
            matrix=f"{runs}/accuracy_matrix.json" if storage.is_file(f"{runs}/accuracy_matrix.json") else None,
            decision={"ok": verdict == "passed", "reasons": json.loads(info.tags.get(TAG_PROMOTION_REASONS) or "[]")}
            if verdict
            else None,
            promoted=verdict == "passed" if verdict else None,
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
    return store.advance(record, Stage.ACCEPTED, location=dst, dataset_uri=storage.dataset_uri(dst))


def _prefect_stage(name: str, fn: Any, ctx: LearningContext, record: DatasetRecord) -> DatasetRecord:
    """Run one learning stage as a Prefect task: training without retries, the others with them."""
    options = {} if name in ("train", "reload-serving") else _STEP
    return task(name=name, cache_policy=NO_CACHE, **options)(fn)(ctx, record)


@task(name="quarantine", cache_policy=NO_CACHE, **_STEP)
def quarantine_step(ctx: LearningContext, record: DatasetRecord) -> DatasetRecord:
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
    return ctx.store.advance(record, Stage.QUARANTINED, location=dst, report=report_rel, error_report=None)


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


def _publish_artifacts(ctx: LearningContext, record: DatasetRecord) -> None:
    """Markdown and link artifacts on the flow run: the outcome, the matrix, MLflow run and version links."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    try:
        if record.stage == Stage.QUARANTINED:
            text = ctx.storage.read_bytes(record.report).decode() if record.report else str(record.error)
            create_markdown_artifact(text, key=_artifact_key("quarantine", record.name), description=record.error)
            return
        if record.stage == Stage.NOT_LEARNED:
            reasons = (record.learned or {}).get("reasons", [])
            create_markdown_artifact(
                "\n".join([f"# `{record.name}`: not learned", "", "Nothing was registered.", ""])
                + "\n".join(f"- {r}" for r in reasons)
                + "\n",
                key=_artifact_key("learn", record.name),
                description=record.error,
            )
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
            f"- promotion {verdict}",
            *[f"  - {reason}" for reason in decision.get("reasons", [])],
            f"- serving: {(record.reload or {}).get('status', '-')} {(record.reload or {}).get('detail', '')}",
            "",
        ]
        if record.matrix:
            lines += ["## Accuracy matrix (%)", "", matrix_markdown(record_matrix(ctx.storage, record)), ""]
        create_markdown_artifact("\n".join(lines), key=_artifact_key("learn", record.name))
        for text, link in _mlflow_links(ctx.settings, record.run_id, record.version).items():
            create_link_artifact(link, link_text=f"{text} ({record.name})", key=_artifact_key("mlflow", text))
    except Exception:  # noqa: BLE001 - artifacts never fail a learned dataset
        log.exception("cannot publish the artifacts of %r", record.name)


# --- the flow --------------------------------------------------------------------------------------


def _result(record: DatasetRecord | None, name: str, status: str | None = None, detail: str = "") -> dict[str, Any]:
    if record is None:
        return {"name": name, "status": status or "skipped", "detail": detail}
    if status is None:
        status = {
            Stage.DONE: "served" if record.promoted else "candidate",
            Stage.DUPLICATE: "duplicate",
            Stage.QUARANTINED: "quarantined",
            Stage.NOT_LEARNED: "not_learned",
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


def _start(ctx: LearningContext, name: str) -> DatasetRecord | None:
    """The record to work on: an unfinished one, or a new one for a complete drop; None when nothing to do."""
    record = ctx.store.get(name)
    if record is not None and not record.terminal:
        return record
    drop = drop_info(ctx.storage, ctx.settings, name)
    if not drop.complete:
        return None
    record = DatasetRecord(name=name, stage=Stage.VALIDATING, location=drop.path, drop=drop.identity)
    return ctx.store.advance(record, Stage.VALIDATING, "dropped")


def _quarantine(
    ctx: LearningContext, record: DatasetRecord, stage: Stage, reason: str, report: Any = None
) -> DatasetRecord:
    text = error_report(record, stage, reason, report, ctx.storage)
    record = ctx.store.advance(record, Stage.QUARANTINING, error=reason, error_report=text)
    if record.run_id:  # an MLflow run was opened for the registration: close it as failed
        try:
            ctx.registry.end_run(record.run_id, ok=False)
        except Exception as exc:  # noqa: BLE001 - the quarantine matters more than the run's status
            _logger().warning("cannot close MLflow run %s: %s", record.run_id, exc)
    return quarantine_step(ctx, record)


def _run_stages(ctx: LearningContext, record: DatasetRecord) -> DatasetRecord | None:
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

            try:  # the one learning step, from training on; a refused job quarantines the drop
                record = run_learning(ctx, record, _prefect_stage)
            except (TrainingInputError, TrainingError) as exc:
                current = ctx.store.get(record.name) or record
                if current.stage != Stage.ACCEPTED:
                    raise
                record = _quarantine(ctx, current, Stage.ACCEPTED, str(exc))
        elif stage in STAGES:
            record = run_learning(ctx, record, _prefect_stage)
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
    ctx = LearningContext(settings, storage, StateStore(storage, settings))
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
            final = ctx.store.advance(current, Stage.FAILED, current.error)
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
