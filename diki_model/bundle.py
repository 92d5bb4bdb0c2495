"""Bundles: the frozen backbone reference plus the ordered list of task artifacts.

A bundle folder holds ``bundle.json`` and one sub-folder per task (``tasks/000-<name>/`` with
``adapter.safetensors`` + ``task.json``), plus ``reference/`` when the model gates by the likelihood
ratio against a reference density (``diki_model.reference``). Bundle N+1 is bundle N plus one
task, so a bundle names exactly the tasks a served model knows, and the reference it is gated
against. The registry versions bundles; serving loads them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diki_model.artifacts import (
    ArtifactError,
    atomic_dir,
    bundle_manifest_fields,
    load_task,
    read_task_metadata,
    save_task,
)
from diki_model.config import DikiConfig
from diki_model.model import DikiCLIP, create_diki_model
from diki_model.reference import ReferenceDensity, load_reference, save_reference

BUNDLE_FILE = "bundle.json"
BUNDLE_VERSION = 1
REFERENCE_DIR = "reference"


@dataclass
class BundleManifest:
    backbone: dict[str, Any]
    config: dict[str, Any]
    tasks: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "path", "dataset_fingerprint"}]
    library_version: str = ""
    format_version: int = BUNDLE_VERSION
    reference: dict[str, Any] | None = None  # {"path", "images", "components", "source"}

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = BUNDLE_FILE) -> BundleManifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{where}: not valid JSON ({err})") from err
        for key in ("backbone", "config", "tasks"):
            if key not in d:
                raise ArtifactError(f"{where}: missing field {key!r}")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]


def task_folder_name(index: int, name: str) -> str:
    return f"tasks/{index:03d}-{name}"


def _write_reference(model: DikiCLIP, tmp: Path) -> dict[str, Any] | None:
    ref = model.reference
    if ref is None:
        return None
    if not isinstance(ref, ReferenceDensity):
        raise ArtifactError(f"cannot save a reference density of type {type(ref).__name__}")
    save_reference(ref, tmp / REFERENCE_DIR)
    return {"path": REFERENCE_DIR, **ref.summary()}


def save_bundle(model: DikiCLIP, directory: str | Path) -> BundleManifest:
    """Write every task of ``model`` (and its reference density, if any) as a bundle folder, atomically."""
    with atomic_dir(directory) as tmp:
        tasks = []
        for i, rec in enumerate(model.tasks):
            rel = task_folder_name(i, rec.name)
            save_task(model, i, tmp / rel)
            tasks.append({"name": rec.name, "path": rel, "dataset_fingerprint": rec.dataset_fingerprint})
        manifest = BundleManifest(tasks=tasks, reference=_write_reference(model, tmp), **bundle_manifest_fields(model))
        (tmp / BUNDLE_FILE).write_text(manifest.to_json())
    return manifest


def read_bundle_manifest(directory: str | Path) -> BundleManifest:
    path = Path(directory) / BUNDLE_FILE
    if not path.exists():
        raise ArtifactError(f"{path}: missing bundle manifest")
    return BundleManifest.from_json(path.read_text(), str(path))


def load_bundle(
    directory: str | Path,
    model: DikiCLIP | None = None,
    device: str | torch.device = "cpu",
    config: DikiConfig | None = None,
) -> DikiCLIP:
    """A model holding exactly the bundle's tasks, in order.

    Pass ``model`` (with no tasks) to reuse an already loaded backbone; otherwise the backbone is
    loaded from the reference the bundle records.
    """
    directory = Path(directory)
    manifest = read_bundle_manifest(directory)
    if model is None:
        bb = manifest.backbone
        cfg = config or DikiConfig.from_dict(manifest.config)
        model = create_diki_model(bb["name"], bb.get("pretrained"), cfg, device=device)
    if model.num_tasks:
        raise ValueError("load_bundle needs a model without tasks")
    if manifest.backbone.get("fingerprint") != model.backbone_info.fingerprint:
        raise ArtifactError(
            f"{directory}: bundle was built on backbone fingerprint {str(manifest.backbone.get('fingerprint'))[:12]}, "
            f"the model's is {model.backbone_info.fingerprint[:12]}"
        )
    for entry in manifest.tasks:
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ArtifactError(f"{directory}: task path {entry['path']!r} escapes the bundle")
        meta = read_task_metadata(directory / rel)
        if meta["name"] != entry["name"]:
            raise ArtifactError(f"{directory / rel}: holds task {meta['name']!r}, bundle says {entry['name']!r}")
        load_task(model, directory / rel)
    # The bundle decides the reference: one without any is gated as it was evaluated, without.
    ref = manifest.reference
    if ref is not None:
        rel = Path(str(ref.get("path", REFERENCE_DIR)))
        if rel.is_absolute() or ".." in rel.parts:
            raise ArtifactError(f"{directory}: reference path {ref.get('path')!r} escapes the bundle")
        model.set_reference(load_reference(directory / rel, model.backbone_info))
    else:
        model.set_reference(None)
    return model


def extend_bundle(base: str | Path | None, model: DikiCLIP, task: int, directory: str | Path) -> BundleManifest:
    """Write bundle = ``base`` bundle + task ``task`` of ``model`` (copying the base's task folders).

    The new bundle carries the model's current reference density (the base's, or a newer one the
    caller attached), so a reference fitted since the base bundle is used from this bundle on.
    """
    with atomic_dir(directory) as tmp:
        tasks: list[dict[str, Any]] = []
        if base is not None:
            manifest = read_bundle_manifest(base)
            if manifest.backbone.get("fingerprint") != model.backbone_info.fingerprint:
                raise ArtifactError(f"{base}: base bundle was built on another backbone")
            for entry in manifest.tasks:
                shutil.copytree(Path(base) / entry["path"], tmp / entry["path"])
            tasks = list(manifest.tasks)
        name = model.tasks[task].name
        if name in [t["name"] for t in tasks]:
            raise ArtifactError(f"the base bundle already holds a task named {name!r}")
        rel = task_folder_name(len(tasks), name)
        save_task(model, task, tmp / rel)
        tasks.append({"name": name, "path": rel, "dataset_fingerprint": model.tasks[task].dataset_fingerprint})
        new = BundleManifest(tasks=tasks, reference=_write_reference(model, tmp), **bundle_manifest_fields(model))
        (tmp / BUNDLE_FILE).write_text(new.to_json())
    return new


def replace_bundle_reference(directory: str | Path, reference: ReferenceDensity | None) -> BundleManifest:
    """Rewrite a bundle folder with another reference density (or none), atomically; tasks unchanged."""
    directory = Path(directory)
    manifest = read_bundle_manifest(directory)
    if reference is not None and reference.fingerprint != manifest.backbone.get("fingerprint"):
        raise ArtifactError(f"{directory}: the reference density was fitted on another backbone than the bundle's")
    with atomic_dir(directory) as tmp:
        for entry in manifest.tasks:
            shutil.copytree(directory / entry["path"], tmp / entry["path"])
        if reference is not None:
            save_reference(reference, tmp / REFERENCE_DIR)
            manifest.reference = {"path": REFERENCE_DIR, **reference.summary()}
        else:
            manifest.reference = None
        (tmp / BUNDLE_FILE).write_text(manifest.to_json())
    return manifest
