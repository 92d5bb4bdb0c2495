"""What the pipeline keeps in object storage: the drops in ``incoming/``, one state record per dataset name,
the learning lock, and the per-dataset run files that make every step resumable.

Layout under the storage root (prefixes from ``settings.storage``)::

    incoming/<name>/...            producers drop datasets here; ``_SUCCESS`` (written last) marks one complete
    quarantine/<name>/_ERROR.md    datasets that failed, with a report of what is wrong
    artifacts/datasets/<name>-<fp12>/   accepted datasets, moved out of incoming/ (immutable: the registry
                                        records this location for every later evaluation)
    artifacts/pipeline/state/<name>.json   the state record of the latest drop named <name>
    artifacts/pipeline/runs/<fingerprint>/ the trained bundle and the accuracy matrix of that dataset
    artifacts/pipeline/learning.lock       who is learning now (:mod:`services.lock`)

Every record write is one atomic object write (a temp file renamed on a local root, one PUT on S3),
so a reader sees the previous record or the next one, never a mix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import pyarrow.fs as pafs

from services.settings import Settings
from services.storage import Storage, validate_dataset_name

__all__ = [
    "ACTIVE_STAGES",
    "TERMINAL_STAGES",
    "DatasetRecord",
    "DatasetStatus",
    "Drop",
    "Stage",
    "StageHook",
    "StateStore",
    "ERROR_REPORT",
    "accepted_prefix",
    "add_stage_hook",
    "drop_info",
    "overview",
    "pipeline_prefix",
    "scan_incoming",
]

log = logging.getLogger(__name__)

ERROR_REPORT: Final = "_ERROR.md"
_ACCEPTED_DIR: Final = "datasets"


class Stage(StrEnum):
    """Where a dataset is in the learning flow. Each stage is written once its step is complete."""

    VALIDATING = "validating"  # a new drop is being checked in incoming/
    VALIDATED = "validated"  # valid, fingerprinted; about to move out of incoming/
    ACCEPTED = "accepted"  # moved to artifacts/datasets/; training next
    TRAINED = "trained"  # the Ray Train job finished; the bundle is in storage
    LEARNED = "learned"  # the task beat zero-shot on its validation split: it may join a bundle
    EVALUATED = "evaluated"  # the accuracy matrix is in storage
    TRACKING = "tracking"  # an MLflow run exists (run_id) for the registration
    REGISTERED = "registered"  # a registry version holds the dataset's task
    DECIDED = "decided"  # the promotion decision is recorded; aliases are being moved
    APPLIED = "applied"  # candidate (and production when it passed) point at the version
    DONE = "done"  # finished; the Serve deployment was told to reload when it runs
    QUARANTINING = "quarantining"  # failed; being moved to quarantine/<name>/ with its report
    DUPLICATE = "duplicate"  # the same content was learned before: nothing new was made
    QUARANTINED = "quarantined"  # moved to quarantine/<name>/ with _ERROR.md; nothing registered
    NOT_LEARNED = "not_learned"  # trained, but it did not beat zero-shot on validation; nothing registered
    FAILED = "failed"  # a step after registration kept failing; the version exists, see `error`


TERMINAL_STAGES: Final = frozenset({Stage.DONE, Stage.DUPLICATE, Stage.QUARANTINED, Stage.FAILED, Stage.NOT_LEARNED})
ACTIVE_STAGES: Final = tuple(s for s in Stage if s not in TERMINAL_STAGES)
# Stage names written by earlier releases, read as today's.
_RENAMED_STAGES: Final = {"gating": Stage.DECIDED, "gated": Stage.APPLIED}

StageHook = Callable[["DatasetRecord"], None]
_hooks: list[StageHook] = []


def add_stage_hook(hook: StageHook) -> None:
    """Call ``hook(record)`` each time a dataset's record advances to a stage (a stage completed).

    For timings, notifications and tests (which stop the process at a precise stage); a hook that
    raises is logged and ignored.
    """
    _hooks.append(hook)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def pipeline_prefix(settings: Settings, *parts: str) -> str:
    """``<artifacts prefix>/pipeline/...``: where the pipeline keeps its own files."""
    return "/".join([settings.storage.artifacts_prefix, "pipeline", *parts])


def accepted_prefix(settings: Settings, name: str, fingerprint: str) -> str:
    """Where an accepted dataset lives once it left incoming/: ``<artifacts>/datasets/<name>-<fp12>``."""
    return f"{settings.storage.artifacts_prefix}/{_ACCEPTED_DIR}/{validate_dataset_name(name)}-{fingerprint[:12]}"


@dataclass
class DatasetRecord:
    """The state of the latest drop of one dataset name (``<artifacts>/pipeline/state/<name>.json``)."""

    name: str
    stage: Stage
    location: str  # where the data is now, relative to the storage root
    drop: dict[str, Any] = field(default_factory=dict)  # the marker seen: {"time": unix s, "content": {...}}
    fingerprint: str | None = None
    task_name: str | None = None  # the manifest's name: the task's name in the model
    num_train: int | None = None  # training and test images, as validation counted them
    num_test: int | None = None
    attempts: int = 0  # failed flow runs of this drop so far
    error: str | None = None  # the last error (transient or final)
    report: str | None = None  # quarantine report, relative to the storage root
    duplicate_of: str | None = None  # name of the dataset that learned the same content
    error_report: str | None = None  # the Markdown written to _ERROR.md (kept until it is written)
    dataset_uri: str | None = None  # the accepted dataset, as training and the registry name it
    job: dict[str, Any] | None = None  # TrainJobResult.to_dict()
    base_version: int | None = None  # the version the new task extends (None: the bare backbone)
    bundle: str | None = None  # the trained bundle folder in storage
    matrix: str | None = None  # the accuracy matrix JSON in storage
    task_datasets: list[str] | None = None  # dataset URI of every task of the new version, in order
    run_id: str | None = None  # MLflow run
    version: int | None = None  # registry version holding this dataset's task
    task_index: int | None = None
    decision: dict[str, Any] | None = None  # {"ok": bool, "reasons": [...]}
    learned: dict[str, Any] | None = None  # the learning check: {"ok": bool, "reasons": [...], "checks": {...}}
    promoted: bool | None = None
    reload: dict[str, Any] | None = None  # what the Serve deployment answered
    flow_run_id: str | None = None
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    history: list[dict[str, Any]] = field(default_factory=list)  # [{"stage", "at", "note"?}]

    @property
    def terminal(self) -> bool:
        return self.stage in TERMINAL_STAGES

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stage"] = self.stage.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> DatasetRecord:
        known = {f.name for f in fields(cls)}
        try:
            values = {k: v for k, v in data.items() if k in known}
            values["stage"] = _RENAMED_STAGES.get(values["stage"]) or Stage(values["stage"])
            record = cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} is not a pipeline state record: {exc}") from None
        validate_dataset_name(record.name)
        return record


class StateStore:
    """Reads and writes the state records of one storage."""

    def __init__(self, storage: Storage, settings: Settings) -> None:
        self.storage = storage
        self.settings = settings
        self.prefix = pipeline_prefix(settings, "state")

    def path(self, name: str) -> str:
        return f"{self.prefix}/{validate_dataset_name(name)}.json"

    def get(self, name: str) -> DatasetRecord | None:
        rel = self.path(name)
        if not self.storage.is_file(rel):
            return None
        return DatasetRecord.from_dict(self.storage.get_json(rel), self.storage.uri(rel))

    def all(self) -> list[DatasetRecord]:
        """Every record, oldest first. A record that cannot be read is skipped with a warning."""
        out = []
        for file in self.storage.list_dir(self.prefix):
            if not file.endswith(".json") or file.startswith("."):
                continue
            try:
                record = self.get(file[: -len(".json")])
            except ValueError as exc:
                log.warning("skipping %s: %s", file, exc)
                continue
            if record is not None:
                out.append(record)
        return sorted(out, key=lambda r: (r.created_at, r.name))

    def put(self, record: DatasetRecord) -> DatasetRecord:
        record.updated_at = _now()
        self.write(record)
        return record

    def write(self, record: DatasetRecord) -> None:
        """One atomic object write of the record."""
        self.storage.put_json(self.path(record.name), record.to_dict())

    def advance(self, record: DatasetRecord, stage: Stage, note: str | None = None, **changes: Any) -> DatasetRecord:
        """Set ``stage`` (and the fields given), append it to the history, and write the record."""
        for key, value in changes.items():
            if not hasattr(record, key):
                raise AttributeError(f"DatasetRecord has no field {key!r}")
            setattr(record, key, value)
        record.stage = stage
        entry: dict[str, Any] = {"stage": stage.value, "at": _now()}
        if note:
            entry["note"] = note
        record.history.append(entry)
        record = self.put(record)
        for hook in list(_hooks):
            try:
                hook(record)
            except Exception:  # noqa: BLE001 - a hook never breaks learning
                log.exception("stage hook %r failed", hook)
        return record

    def delete(self, name: str) -> None:
        self.storage.delete_tree(self.path(name))

    def run_prefix(self, fingerprint: str) -> str:
        """Where the trained bundle and the accuracy matrix of one dataset are kept."""
        if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
            raise ValueError(f"invalid dataset fingerprint {fingerprint!r}")
        return pipeline_prefix(self.settings, "runs", fingerprint)


# --- the incoming prefix -----------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    """One folder in the incoming prefix."""

    name: str
    path: str  # relative to the storage root
    complete: bool  # the marker exists
    marker_time: float | None  # the marker's modification time (unix seconds)
    valid_name: bool = True
    marker: dict[str, Any] | None = None  # what the marker holds ({"files", "bytes"} when `diki push` wrote it)

    @property
    def identity(self) -> dict[str, Any]:
        return {"time": self.marker_time, "content": self.marker or {}}


def _marker_content(storage: Storage, rel: str) -> dict[str, Any]:
    try:
        data = storage.get_json(rel)
    except (ValueError, FileNotFoundError):
        return {}
    return data if isinstance(data, dict) else {}


def scan_incoming(storage: Storage, settings: Settings) -> list[Drop]:
    """Every folder under the incoming prefix, complete ones in arrival order (marker time, then name) first.

    Folders whose name is not a valid dataset name are returned with ``valid_name=False`` and are never
    read; files directly under the prefix are ignored.
    """
    prefix = settings.storage.incoming_prefix
    marker = settings.storage.success_marker
    base = storage.path(prefix)
    infos = storage.filesystem.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    drops: list[Drop] = []
    for info in infos:
        if info.type != pafs.FileType.Directory:
            continue
        name = info.base_name
        try:
            validate_dataset_name(name)
        except ValueError:
            drops.append(Drop(name, f"{prefix}/{name}", False, None, valid_name=False))
            continue
        rel = f"{prefix}/{name}"
        marker_info = storage.filesystem.get_file_info(storage.path(f"{rel}/{marker}"))
        complete = marker_info.type == pafs.FileType.File
        mtime = marker_info.mtime.timestamp() if complete and marker_info.mtime is not None else None
        drops.append(Drop(name, rel, complete, mtime))
    return sorted(drops, key=lambda d: (not d.complete, d.marker_time or 0.0, d.name))


def drop_info(storage: Storage, settings: Settings, name: str) -> Drop:
    """The drop ``incoming/<name>`` as it is now (``complete=False`` when there is no marker or no folder)."""
    rel = f"{settings.storage.incoming_prefix}/{validate_dataset_name(name)}"
    marker = f"{rel}/{settings.storage.success_marker}"
    info = storage.filesystem.get_file_info(storage.path(marker))
    if info.type != pafs.FileType.File:
        return Drop(name, rel, False, None)
    mtime = info.mtime.timestamp() if info.mtime is not None else None
    return Drop(name, rel, True, mtime, marker=_marker_content(storage, marker))


# --- what `diki datasets` shows ----------------------------------------------------------------


@dataclass
class DatasetStatus:
    """One row of ``diki datasets``."""

    name: str
    state: str  # waiting, incomplete, learning, interrupted, served, registered, candidate, duplicate,
    #             quarantined, not_learned, failed, ignored
    detail: str
    fingerprint: str | None = None
    version: int | None = None
    updated: str | None = None  # ISO time of the last change (the marker time for drops)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts is not None else None


class _RegistryView:
    """The registry facts the overview needs, read once (or the reason they could not be read)."""

    def __init__(self, settings: Settings) -> None:
        self.versions: dict[int, Any] = {}
        self.production: int | None = None
        self.error: str | None = None
        try:
            from services.registry import Registry

            for info in Registry(settings).list_versions():
                self.versions[info.version] = info
                if "production" in info.aliases:
                    self.production = info.version
        except Exception as exc:  # noqa: BLE001 - the overview still shows what storage says
            self.error = f"registry unreachable ({type(exc).__name__})"

    def describe(
        self, fingerprint: str | None, version: int | None, decision: dict[str, Any] | None
    ) -> tuple[str, str]:
        if self.error:
            return "registered", f"version {version} ({self.error})"
        prod = self.versions.get(self.production) if self.production is not None else None
        if prod is not None and fingerprint and fingerprint in prod.dataset_fingerprints:
            index = prod.dataset_fingerprints.index(fingerprint)
            return "served", f"served as task {index} in bundle version {prod.version} (production)"
        info = self.versions.get(version) if version is not None else None
        if info is None:
            return "registered", f"version {version} is no longer in the registry"
        verdict = info.tags.get("promotion", info.tags.get("gate"))  # "gate": tag name of earlier releases
        refused = (decision is not None and not decision.get("ok", True)) or verdict == "refused"
        if refused:
            reasons = (decision or {}).get("reasons") or []
            why = next((r for r in reasons if r.startswith(("task ", "zero-shot retention on"))), None)
            why = why or (reasons[0] if reasons else "see the version's promotion_reasons tag")
            return "candidate", f"registered as candidate {version} (promotion refused: {why})"
        current = f"production is version {self.production}" if self.production is not None else "no production"
        return "registered", f"registered as version {version}, not served ({current})"


def overview(settings: Settings, storage: Storage | None = None) -> list[DatasetStatus]:
    """Every dataset the pipeline knows, from storage (records, incoming/, quarantine/) and the registry.

    One row per record (the latest drop of a name) plus a row for each new drop waiting in incoming/.
    """
    from services.lock import LearningLock
    from services.storage import open_storage

    storage = storage or open_storage(settings)
    store = StateStore(storage, settings)
    records = {r.name: r for r in store.all()}
    drops = scan_incoming(storage, settings)
    holder = LearningLock(storage, settings).holder()
    registry = _RegistryView(settings) if any(r.version is not None for r in records.values()) else None
    rows: list[DatasetStatus] = []
    marker = settings.storage.success_marker
    for drop in drops:
        record = records.get(drop.name)
        if record is not None and not record.terminal and record.location == drop.path:
            continue  # shown with its record
        if not drop.valid_name:
            rows.append(DatasetStatus(drop.name, "ignored", "not a valid dataset name (a-z 0-9 _ . -, max 64)"))
        elif drop.complete:
            rows.append(
                DatasetStatus(drop.name, "waiting", "complete, not learned yet", updated=_iso(drop.marker_time))
            )
        else:
            rows.append(DatasetStatus(drop.name, "incomplete", f"no {marker} marker yet (still uploading?)"))
    for record in records.values():
        fp, version = record.fingerprint, record.version
        if not record.terminal:
            if holder is not None and holder.purpose.endswith(f" {record.name}"):
                state, detail = "learning", f"stage: {record.stage.value}"
            else:
                state = "interrupted"
                detail = f"stopped at stage {record.stage.value}; the next watcher run finishes it"
                if record.error:
                    detail += f" (last error: {record.error.splitlines()[0]})"
        elif record.stage == Stage.QUARANTINED:
            state = "quarantined"
            first = (record.error or "").strip().splitlines()
            report = storage.uri(record.report) if record.report else storage.uri(record.location)
            detail = f"{first[0] if first else 'see the report'} (report: {report})"
        elif record.stage == Stage.NOT_LEARNED:
            state = "not_learned"
            reasons = (record.learned or {}).get("reasons") or [record.error or "it did not beat zero-shot"]
            detail = "not learned, nothing registered: " + "; ".join(reasons)
        elif record.stage == Stage.DUPLICATE and record.duplicate_of == record.name and version is not None:
            # Dropped again under the name that learned it: the served row stays the served row.
            assert registry is not None
            state, detail = registry.describe(fp, version, record.decision)
            detail += "; dropped again with the same content: nothing new"
        elif record.stage == Stage.DUPLICATE:
            state = "duplicate"
            twin = f"same content as {record.duplicate_of!r}" if record.duplicate_of else "same content learned before"
            assert registry is not None
            detail = f"{twin}: {registry.describe(fp, version, None)[1]}"
        else:
            assert registry is not None and version is not None
            state, detail = registry.describe(fp, version, record.decision)
            reload = record.reload or {}
            if state == "served" and reload.get("status") == "failed":
                detail += f"; the endpoint {reload.get('url')} did not load it and keeps polling"
            if record.stage == Stage.FAILED:
                state, detail = "failed", f"{detail}; {record.error}"
        rows.append(DatasetStatus(record.name, state, detail, fp, version, record.updated_at))
    known = {r.name for r in rows}
    for name in storage.list_dir(settings.storage.quarantine_prefix):
        if name not in known:
            rel = f"{settings.storage.quarantine_prefix}/{name}/{ERROR_REPORT}"
            rows.append(DatasetStatus(name, "quarantined", f"see {storage.uri(rel)}"))
    order = {"learning": 0, "interrupted": 1, "waiting": 2, "incomplete": 3}
    return sorted(rows, key=lambda r: (order.get(r.state, 4), r.name))
