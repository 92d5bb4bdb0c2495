"""What the pipeline keeps in object storage: the drops in ``incoming/``, one state record per dataset name,
the learning lock, and the per-dataset run files that make every step resumable.

Layout under the storage root (prefixes from ``settings.storage``)::

    incoming/<name>/...            producers drop datasets here; ``_SUCCESS`` (written last) marks one complete
    quarantine/<name>/_ERROR.md    datasets that failed, with a report of what is wrong
    artifacts/datasets/<name>-<fp12>/   accepted datasets, moved out of incoming/ (immutable: the registry
                                        records this location for every later evaluation)
    artifacts/pipeline/state/<name>.json   the state record of the latest drop named <name>
    artifacts/pipeline/runs/<fingerprint>/ the trained bundle and the accuracy matrix of that dataset
    artifacts/pipeline/learning.lock       who is learning now (a lease)

Every record write is one atomic object write (a temp file renamed on a local root, one PUT on S3),
so a reader sees the previous record or the next one, never a mix.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
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
    "LockHolder",
    "Stage",
    "StateStore",
    "StorageLock",
    "ERROR_REPORT",
    "accepted_prefix",
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
    EVALUATED = "evaluated"  # the accuracy matrix is in storage
    TRACKING = "tracking"  # an MLflow run exists (run_id) for the registration
    REGISTERED = "registered"  # a registry version holds the dataset's task
    GATING = "gating"  # the gate's decision is recorded; aliases are being applied
    GATED = "gated"  # candidate (and production when it passed) point at the version
    DONE = "done"  # finished; the Serve deployment was told to reload when it runs
    QUARANTINING = "quarantining"  # failed; being moved to quarantine/<name>/ with its report
    DUPLICATE = "duplicate"  # the same content was learned before: nothing new was made
    QUARANTINED = "quarantined"  # moved to quarantine/<name>/ with _ERROR.md; nothing registered
    FAILED = "failed"  # a step after registration kept failing; the version exists, see `error`


TERMINAL_STAGES: Final = frozenset({Stage.DONE, Stage.DUPLICATE, Stage.QUARANTINED, Stage.FAILED})
ACTIVE_STAGES: Final = tuple(s for s in Stage if s not in TERMINAL_STAGES)


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
    attempts: int = 0  # failed flow runs of this drop so far
    error: str | None = None  # the last error (transient or final)
    report: str | None = None  # quarantine report, relative to the storage root
    duplicate_of: str | None = None  # name of the dataset that learned the same content
    error_report: str | None = None  # the Markdown written to _ERROR.md (kept until it is written)
    dataset_uri: str | None = None  # the accepted dataset, as training and the registry name it
    job: dict[str, Any] | None = None  # TrainJobResult.to_dict()
    bundle: str | None = None  # the trained bundle folder in storage
    matrix: str | None = None  # the accuracy matrix JSON in storage
    task_datasets: list[str] | None = None  # dataset URI of every task of the new version, in order
    run_id: str | None = None  # MLflow run
    version: int | None = None  # registry version holding this dataset's task
    task_index: int | None = None
    decision: dict[str, Any] | None = None  # {"ok": bool, "reasons": [...]}
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
            values["stage"] = Stage(values["stage"])
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
        self.storage.put_json(self.path(record.name), record.to_dict())
        return record

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
        return self.put(record)

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


# --- the learning lock -------------------------------------------------------------------------


@dataclass
class LockHolder:
    """Who holds the learning lock, as written in the lock file."""

    owner: str
    host: str
    pid: int
    purpose: str
    acquired_at: float
    expires_at: float

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.acquired_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"pid {self.pid} on {self.host} ({self.purpose}) since {since}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process that its parent has not reaped yet
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


class StorageLock:
    """A lease in object storage: at most one process learns at a time, across machines and Prefect servers.

    Acquiring writes ``{owner, host, pid, expires_at}`` when the lock is free, waits ``settle_s`` and reads
    it back: of two processes that raced, the one whose write landed last keeps it and the other backs off
    (``settle_s`` must exceed the gap between one's read and its write, milliseconds). A background
    thread renews the lease every ``ttl_s / 4``. A lock is free when absent, when its lease expired
    (its holder stopped renewing), or at once when its holder ran on this host and that process is gone.
    """

    def __init__(
        self,
        storage: Storage,
        settings: Settings,
        *,
        purpose: str = "learning",
        ttl_s: float = 120.0,
        settle_s: float | None = None,
    ) -> None:
        self.storage = storage
        self.rel = pipeline_prefix(settings, "learning.lock")
        self.purpose = purpose
        self.ttl_s = ttl_s
        self.settle_s = settle_s if settle_s is not None else (0.1 if storage.is_local else 0.5)
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.lost = False
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StorageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._held and not self.lost

    def holder(self) -> LockHolder | None:
        """The current holder, or None when the lock is free (absent, expired, or its process is gone)."""
        current = self._read()
        return None if current is None or self._stale(current) else current

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> bool:
        """Take the lock, waiting up to ``wait_s`` seconds for its holder to finish. True when taken."""
        if self._held:
            return True
        deadline = time.monotonic() + wait_s
        while True:
            if self._try_once():
                self._held, self.lost = True, False
                self._stop.clear()
                self._thread = threading.Thread(target=self._renew_loop, name="diki-lock-renewal", daemon=True)
                self._thread.start()
                return True
            if time.monotonic() + poll_s > deadline:
                return False
            time.sleep(poll_s)

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._held = False
        current = self._read()
        if current is not None and current.owner == self.owner:
            self.storage.delete_tree(self.rel)

    def _record(self) -> LockHolder:
        now = time.time()
        return LockHolder(self.owner, self.host, os.getpid(), self.purpose, now, now + self.ttl_s)

    def _read(self) -> LockHolder | None:
        if not self.storage.is_file(self.rel):
            return None
        try:
            data = self.storage.get_json(self.rel)
            return LockHolder(**{f.name: data[f.name] for f in fields(LockHolder)})
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("learning lock %s is unreadable; treating it as free", self.storage.uri(self.rel))
            return None

    def _stale(self, holder: LockHolder) -> bool:
        if holder.expires_at < time.time():
            return True
        return holder.host == self.host and holder.pid != os.getpid() and not _pid_alive(holder.pid)

    def _try_once(self) -> bool:
        current = self._read()
        if current is not None and current.owner != self.owner and not self._stale(current):
            return False
        if current is not None and current.owner != self.owner:
            log.warning("taking over the learning lock: its holder, %s, is gone", current.describe())
        mine = self._record()
        self.storage.put_json(self.rel, asdict(mine))
        time.sleep(self.settle_s)
        after = self._read()
        return after is not None and after.owner == self.owner

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self._read()
                if current is None or current.owner != self.owner:
                    self.lost = True
                    log.error("the learning lock %s was taken by another process", self.storage.uri(self.rel))
                    return
                current.expires_at = time.time() + self.ttl_s
                self.storage.put_json(self.rel, asdict(current))
            except OSError as exc:  # transient: try again at the next renewal
                log.warning("cannot renew the learning lock: %s", exc)


# --- what `diki datasets` shows ----------------------------------------------------------------


@dataclass
class DatasetStatus:
    """One row of ``diki datasets``."""

    name: str
    state: str  # waiting, incomplete, learning, interrupted, served, registered, candidate, duplicate,
    #             quarantined, failed, ignored
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
        refused = (decision is not None and not decision.get("ok", True)) or info.tags.get("gate") == "refused"
        if refused:
            reasons = (decision or {}).get("reasons") or []
            why = next((r for r in reasons if r.startswith(("task ", "zero-shot retention on"))), None)
            why = why or (reasons[0] if reasons else "see the version's gate_reasons tag")
            return "candidate", f"registered as candidate {version} (gate refused: {why})"
        current = f"production is version {self.production}" if self.production is not None else "no production"
        return "registered", f"registered as version {version}, not served ({current})"


def overview(settings: Settings, storage: Storage | None = None) -> list[DatasetStatus]:
    """Every dataset the pipeline knows, from storage (records, incoming/, quarantine/) and the registry.

    One row per record (the latest drop of a name) plus a row for each new drop waiting in incoming/.
    """
    from services.storage import open_storage

    storage = storage or open_storage(settings)
    store = StateStore(storage, settings)
    records = {r.name: r for r in store.all()}
    drops = scan_incoming(storage, settings)
    holder = StorageLock(storage, settings).holder()
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
