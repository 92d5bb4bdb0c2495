"""What a serving replica holds, and how it gets the next one: models, bundles, the registry alias.

- :class:`ServedModel` is one immutable snapshot (model + bundle version + task list). A replica
  keeps exactly one reference to the current snapshot and replaces it in a single assignment;
  each request reads the reference once and is answered entirely by that snapshot.
- :class:`ModelLoader` keeps one pristine frozen backbone (never injected, never used to answer)
  and builds every served model as a fresh module tree whose frozen weight tensors are the
  pristine ones (shared, not copied), then loads the bundle's tasks onto it with ``load_bundle``.
  A bundle built on another backbone makes the loader fetch that backbone instead.
- :class:`BundleWatcher` asks the registry which version an alias names and downloads it. Every
  call is bounded in time; failures are recorded (and counted in the metrics), never raised into
  the request path.
- :class:`BundleLifecycle` is the replica's side of hot swap: it holds the current snapshot, loads
  the first one, follows the source (the registry alias, or a local folder) on request and from a
  polling thread, and switches each new snapshot in with one assignment. When the registry is
  unreachable it keeps the last good snapshot.
"""

from __future__ import annotations

import concurrent.futures
import copy
import itertools
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from diki_model import (
    Backbone,
    DikiCLIP,
    DikiConfig,
    load_backbone,
    load_bundle,
    read_bundle_manifest,
    read_task_metadata,
)
from services.serving.schemas import ReloadResponse

if TYPE_CHECKING:
    from services.serving.metrics import ServingMetrics

__all__ = ["BundleLifecycle", "BundleWatcher", "ModelLoader", "RegistryUnavailable", "ServedModel", "redact"]

log = logging.getLogger("diki.serving")

T = TypeVar("T")

_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@")
_MAX_ERROR_CHARS = 500


def redact(text: str) -> str:
    """Drop credentials from URLs inside ``text`` and shorten it, for errors shown or logged."""
    text = _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def describe_error(err: BaseException) -> str:
    return redact(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


@dataclass(frozen=True)
class ServedModel:
    """One immutable serving snapshot. ``version`` None = zero-shot (no bundle)."""

    model: DikiCLIP
    version: int | None
    source: str
    tasks: tuple[dict[str, Any], ...]
    loaded_at: float

    @property
    def mode(self) -> str:
        return "zero-shot" if self.model.num_tasks == 0 else "bundle"

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t["name"] for t in self.tasks)

    def backbone(self) -> dict[str, Any]:
        info = self.model.backbone_info
        return {
            "name": info.name,
            "pretrained": info.pretrained,
            "fingerprint": info.fingerprint[:16],
            "image_size": info.image_size,
            "embed_dim": info.embed_dim,
        }


class ModelLoader:
    """Builds served models that share one frozen backbone's weights."""

    def __init__(
        self,
        backbone: str,
        pretrained: str | None = None,
        seed: int | None = None,
        device: str = "cpu",
        warmup: bool = True,
    ) -> None:
        self.backbone_name = backbone
        self.pretrained = pretrained
        self.seed = seed
        self.device = device
        self.warmup = warmup
        self._base: Backbone | None = None
        self._lock = threading.Lock()

    def base(self) -> Backbone:
        with self._lock:
            if self._base is None:
                self._base = load_backbone(self.backbone_name, self.pretrained, device=self.device, seed=self.seed)
            return self._base

    def _fresh_model(self, base: Backbone, config: DikiConfig) -> DikiCLIP:
        # A new module tree (so adapters are injected into it, not into the pristine backbone),
        # whose parameters and buffers are the pristine backbone's tensors: no second copy of the weights.
        shared = {id(t): t for t in itertools.chain(base.model.parameters(), base.model.buffers())}
        clip = copy.deepcopy(base.model, shared)
        model = DikiCLIP(
            Backbone(model=clip, preprocess=base.preprocess, tokenizer=base.tokenizer, info=base.info), config
        )
        return model.to(self.device)

    def zero_shot(self, config: DikiConfig | None = None) -> ServedModel:
        model = self._fresh_model(self.base(), config or DikiConfig())
        self._warm(model)
        return ServedModel(model=model, version=None, source="none (zero-shot)", tasks=(), loaded_at=time.time())

    def load_dir(self, directory: str | Path, version: int | None, source: str) -> ServedModel:
        """Load a bundle folder onto a fresh model sharing the frozen backbone (or the bundle's own)."""
        directory = Path(directory)
        manifest = read_bundle_manifest(directory)
        base = self.base()
        wanted = str(manifest.backbone.get("fingerprint", ""))
        if wanted != base.info.fingerprint:
            name = manifest.backbone.get("name")
            if not name:
                raise ValueError(f"{directory}: bundle.json names no backbone")
            other = load_backbone(name, manifest.backbone.get("pretrained"), device=self.device)
            if other.info.fingerprint != wanted:
                raise ValueError(
                    f"{directory}: the bundle was built on backbone {name!r} with fingerprint {wanted[:12]}; "
                    f"loading {name!r} here gives {other.info.fingerprint[:12]} and the served backbone is "
                    f"{base.info.name!r} ({base.info.fingerprint[:12]})"
                )
            with self._lock:
                self._base = base = other
        model = self._fresh_model(base, DikiConfig.from_dict(manifest.config))
        load_bundle(directory, model=model)
        tasks = []
        for index, (entry, rec) in enumerate(zip(manifest.tasks, model.tasks, strict=True)):
            meta = read_task_metadata(directory / entry["path"])
            tasks.append(
                {
                    "index": index,
                    "name": rec.name,
                    "classes": list(rec.classes),
                    "template": rec.template,
                    "num_samples": int(rec.num_samples),
                    "dataset_fingerprint": rec.dataset_fingerprint,
                    "created_at": meta.get("created_at"),
                }
            )
        self._warm(model)
        return ServedModel(model=model, version=version, source=source, tasks=tuple(tasks), loaded_at=time.time())

    @torch.no_grad()
    def _warm(self, model: DikiCLIP) -> None:
        """Fill the model's per-task text cache and run one prediction, before it takes traffic."""
        if not self.warmup:
            return
        size = model.backbone_info.image_size
        dummy = torch.zeros(1, 3, size, size)
        if model.num_tasks == 0:
            model.predict(dummy, labels=["a", "b"])
            return
        levels = model.config.text_gate_levels
        for index, rec in enumerate(model.tasks):
            model.text_features(
                rec.prompts(), torch.full((levels,), index, dtype=torch.long), torch.linspace(0, 1, levels)
            )
        model.predict(dummy)


class RegistryUnavailable(RuntimeError):
    """The registry (or the storage behind it) could not be reached or answered with an error."""


def start_in_thread(fn: Callable[[], T], what: str) -> concurrent.futures.Future[T]:
    """Run ``fn`` in a daemon thread; its future can be waited on with a timeout (and then abandoned)."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            done.set_exception(err)

    threading.Thread(target=run, name=f"diki-{what}", daemon=True).start()
    return done


def wait_for(future: concurrent.futures.Future[T], timeout_s: float, what: str) -> T:
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError as err:
        raise TimeoutError(f"{what} did not answer within {timeout_s:g} s") from err


def call_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s`` (a hung call is abandoned, not joined)."""
    return wait_for(start_in_thread(fn, what), timeout_s, what)


@dataclass
class WatchStatus:
    reachable: bool | None = None
    checked_at: float | None = None
    alias_version: int | None = None
    errors: int = 0


class BundleWatcher:
    """The registry side of hot swap: which version the alias names, and fetching that bundle."""

    def __init__(
        self,
        registry_factory: Callable[[], Any],
        alias: str = "production",
        timeout_s: float = 30.0,
        download_timeout_s: float = 600.0,
        on_call: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._factory = registry_factory
        self._registry: Any = None
        self._connecting: concurrent.futures.Future[Any] | None = None
        self.alias = alias
        self.timeout_s = timeout_s
        self.download_timeout_s = download_timeout_s
        self._on_call = on_call or (lambda op, ok: None)
        self.status = WatchStatus()

    def _client(self) -> Any:
        if self._registry is None:
            # Once per replica, and it may create a local database: a longer bound than single calls.
            # An attempt that outlived its wait is waited for again, never started twice.
            if self._connecting is None or (self._connecting.done() and self._connecting.exception() is not None):
                self._connecting = start_in_thread(self._factory, "registry-connection")
            self._registry = wait_for(self._connecting, max(4 * self.timeout_s, 60.0), "registry connection")
        return self._registry

    def _call(self, operation: str, fn: Callable[[Any], T], timeout_s: float) -> T:
        try:
            result = call_with_timeout(lambda: fn(self._client()), timeout_s, f"registry {operation}")
        except Exception as err:  # noqa: BLE001 - any failure of the registry is an outage for us
            self.status.reachable = False
            self.status.errors += 1
            self.status.checked_at = time.time()
            self._on_call(operation, False)
            raise RegistryUnavailable(f"registry {operation} failed: {describe_error(err)}") from err
        self.status.reachable = True
        self.status.checked_at = time.time()
        self._on_call(operation, True)
        return result

    def alias_version(self) -> int | None:
        """The version the alias names now (None when the alias is not set)."""
        version = self._call("get_alias", lambda r: r.get_alias(self.alias), self.timeout_s)
        self.status.alias_version = version
        return version

    def fetch(self, version: int, loader: ModelLoader) -> ServedModel:
        """Download bundle ``version`` to a scratch folder, load it, and delete the folder."""
        scratch = Path(tempfile.mkdtemp(prefix=f"diki-serve-v{version}-"))
        try:
            path = self._call(
                "download_bundle",
                lambda r: r.download_bundle(version, scratch / "bundle"),
                self.download_timeout_s,
            )
            return loader.load_dir(path, version, f"registry alias {self.alias!r} (version {version})")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


class BundleLifecycle:
    """The snapshot one replica serves, and how it follows its source.

    The source is a local bundle folder (``bundle_dir``: loaded at start, reloaded on request, no
    polling), else the registry alias through ``watcher`` (followed at start, on request and every
    ``poll_interval_s`` from a daemon thread), else nothing (zero-shot). Readers take
    :attr:`current` once and keep that reference; :meth:`refresh` replaces it in one assignment.

    Args:
        loader: builds the snapshots.
        watcher: the registry side; None when no registry is followed.
        metrics: the replica's metrics (reloads, the served bundle).
        bundle_dir / bundle_version: the local folder to serve instead of the registry, and the
            version it is announced as.
        alias: the registry alias followed (for messages).
        poll_interval_s: seconds between two checks of the alias.
    """

    def __init__(
        self,
        loader: ModelLoader,
        watcher: BundleWatcher | None,
        metrics: ServingMetrics,
        *,
        bundle_dir: str | None = None,
        bundle_version: int = 0,
        alias: str = "production",
        poll_interval_s: float = 30.0,
    ) -> None:
        self.loader = loader
        self.watcher = watcher
        self.metrics = metrics
        self.bundle_dir = bundle_dir
        self.bundle_version = bundle_version
        self.alias = alias
        self.poll_interval_s = poll_interval_s
        self.last_error: str | None = None
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self.current: ServedModel = self._initial_state()
        self._publish(self.current)

    def start_polling(self) -> None:
        """Follow the registry alias from a daemon thread until :meth:`stop` (nothing to poll without a registry)."""
        if self.watcher is not None:
            threading.Thread(target=self._poll_loop, name="diki-bundle-poll", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _initial_state(self) -> ServedModel:
        if self.bundle_dir:
            # A configured folder that cannot be loaded is a deployment error: fail loudly.
            return self.loader.load_dir(self.bundle_dir, self.bundle_version, f"folder {self.bundle_dir}")
        if self.watcher is not None:
            try:
                version = self.watcher.alias_version()
                if version is not None:
                    state = self.watcher.fetch(version, self.loader)
                    self.metrics.reloads.labels("loaded").inc()
                    return state
            except Exception as err:  # noqa: BLE001 - start zero-shot and keep trying in the background
                self._record_error(err)
        return self.loader.zero_shot()

    def _record_error(self, err: BaseException) -> None:
        self.last_error = describe_error(err)
        if not isinstance(err, RegistryUnavailable):
            self.metrics.reloads.labels("failed").inc()
        log.warning("bundle reload failed: %s", self.last_error)

    def _publish(self, state: ServedModel) -> None:
        self.metrics.set_bundle(state.version, state.model.num_tasks, state.loaded_at)

    def refresh(self) -> ReloadResponse:
        """Follow the source now: load the version the alias names if it is not the one served, then swap.

        Raises:
            RegistryUnavailable: the registry could not be asked (the served snapshot stays).
            Exception: the bundle could not be loaded (recorded; the served snapshot stays).
        """
        with self._reload_lock:
            previous = self.current.version
            if self.watcher is None:
                if not self.bundle_dir:
                    return ReloadResponse(
                        changed=False,
                        bundle_version=previous,
                        previous_version=previous,
                        registry_version=None,
                        message="no registry configured: serving zero-shot",
                    )
                try:
                    state = self.loader.load_dir(self.bundle_dir, self.bundle_version, f"folder {self.bundle_dir}")
                except Exception as err:  # noqa: BLE001 - recorded; the served model stays
                    self._record_error(err)
                    raise
                self._swap(state)
                return ReloadResponse(
                    changed=True,
                    bundle_version=state.version,
                    previous_version=previous,
                    registry_version=None,
                    message=f"reloaded {self.bundle_dir}",
                )
            try:
                version = self.watcher.alias_version()
                if version is None:
                    self.last_error = None
                    return ReloadResponse(
                        changed=False,
                        bundle_version=previous,
                        previous_version=previous,
                        registry_version=None,
                        message=f"registry alias {self.alias!r} is not set; keeping the served model",
                    )
                if version == previous:
                    self.last_error = None
                    return ReloadResponse(
                        changed=False,
                        bundle_version=previous,
                        previous_version=previous,
                        registry_version=version,
                        message=f"already serving version {version}",
                    )
                state = self.watcher.fetch(version, self.loader)
            except Exception as err:  # noqa: BLE001 - recorded; the last good model keeps serving
                self._record_error(err)
                raise
            self._swap(state)
            self.metrics.reloads.labels("loaded").inc()
            return ReloadResponse(
                changed=True,
                bundle_version=version,
                previous_version=previous,
                registry_version=version,
                message=f"switched from {previous if previous is not None else 'zero-shot'} to version {version}",
            )

    def _swap(self, state: ServedModel) -> None:
        self.current = state  # the switch: one reference assignment
        self.last_error = None
        self._publish(state)
        log.info("serving bundle version %s (%d tasks)", state.version, state.model.num_tasks)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - recorded by refresh(); try again next interval
                pass
