"""Task artifacts: a folder with ``adapter.safetensors`` (K/V per layer and the task Gaussian)
and ``task.json`` (everything else). Nothing is ever pickled or unpickled.

Loading checks that the artifact was made on the same backbone (config + weights fingerprint)
and with the same adapter layout, and refuses a mismatch with a clear error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diki_model.files import ArtifactError, atomic_dir
from diki_model.model import DikiCLIP
from diki_model.stats import Gaussian
from diki_model.version import __version__

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "task.json"
ARTIFACT_VERSION = 1


def library_version() -> str:
    return __version__


def task_metadata(model: DikiCLIP, task: int) -> dict[str, Any]:
    rec = model.tasks[task]
    return {
        "artifact_version": ARTIFACT_VERSION,
        "name": rec.name,
        "classes": rec.classes,
        "template": rec.template,
        "backbone": model.backbone_info.to_dict(),
        "feature_dim": model.feature_dim,
        "num_samples": rec.num_samples,
        "score_mean": rec.score_mean,
        "score_std": rec.score_std,
        "shrinkage": model.config.shrinkage,
        "dataset_fingerprint": rec.dataset_fingerprint,
        "adapter": {
            "prompt_length": model.config.prompt_length,
            "vision_layers": list(model.vision_layers),
            "text_layers": list(model.text_layers),
        },
        "library_version": library_version(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metadata": rec.metadata,
    }


def bundle_manifest_fields(model: DikiCLIP) -> dict[str, Any]:
    """The backbone and config fields every bundle manifest of ``model`` records."""
    return {
        "backbone": model.backbone_info.to_dict(),
        "config": model.config.to_dict(),
        "library_version": library_version(),
    }


def save_task(model: DikiCLIP, task: int, directory: str | Path) -> Path:
    """Write task ``task`` to ``directory`` atomically (a complete folder or nothing)."""
    rec = model.tasks[task]
    if rec.gaussian is None:
        raise ArtifactError(f"task {rec.name!r} has no fitted statistics; fit them before saving")
    tensors = {f"adapter.{k}": v.contiguous() for k, v in model.adapter_state_dict(task).items()}
    tensors["gaussian.mean"] = rec.gaussian.mean.to(torch.float64).contiguous()
    tensors["gaussian.cov"] = rec.gaussian.cov.to(torch.float64).contiguous()
    if rec.holdout_features is not None and rec.holdout_scores is not None:
        tensors["holdout.features"] = rec.holdout_features.to(torch.float32).contiguous()
        tensors["holdout.scores"] = rec.holdout_scores.to(torch.float64).contiguous()
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "diki-task", "name": rec.name})
        (tmp / META_FILE).write_text(json.dumps(task_metadata(model, task), indent=2, sort_keys=True))
    return Path(directory)


def read_task_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.exists():
        raise ArtifactError(f"{path}: missing task metadata")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from err
    for key in ("name", "classes", "template", "backbone", "adapter", "score_mean", "score_std"):
        if key not in meta:
            raise ArtifactError(f"{path}: missing field {key!r}")
    return meta


def check_compatible(model: DikiCLIP, meta: dict[str, Any], where: str) -> None:
    fp = meta["backbone"].get("fingerprint")
    if fp != model.backbone_info.fingerprint:
        raise ArtifactError(
            f"{where}: task {meta['name']!r} was trained on backbone {meta['backbone'].get('name')!r} "
            f"(fingerprint {str(fp)[:12]}), but the model's backbone is {model.backbone_info.name!r} "
            f"(fingerprint {model.backbone_info.fingerprint[:12]})"
        )
    layout = meta["adapter"]
    mine = {
        "prompt_length": model.config.prompt_length,
        "vision_layers": list(model.vision_layers),
        "text_layers": list(model.text_layers),
    }
    for key, value in mine.items():
        if layout.get(key) != value:
            raise ArtifactError(f"{where}: adapter {key} is {layout.get(key)}, the model uses {value}")


def load_task(model: DikiCLIP, directory: str | Path) -> int:
    """Append the task stored in ``directory`` to the model; returns its index."""
    directory = Path(directory)
    meta = read_task_metadata(directory)
    check_compatible(model, meta, str(directory))
    weights = directory / ADAPTER_FILE
    if not weights.exists():
        raise ArtifactError(f"{weights}: missing adapter weights")
    tensors = load_file(str(weights))
    adapter = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    for key in ("gaussian.mean", "gaussian.cov"):
        if key not in tensors:
            raise ArtifactError(f"{weights}: missing tensor {key!r}")
    gaussian = Gaussian(tensors["gaussian.mean"], tensors["gaussian.cov"])
    if gaussian.dim != model.feature_dim:
        raise ArtifactError(f"{weights}: Gaussian of dim {gaussian.dim}, model features are {model.feature_dim}-d")
    task = model.add_task(meta["name"], meta["classes"], meta["template"])
    try:
        model.load_adapter_state_dict(task, adapter)
    except ValueError as err:
        _drop_last_task(model)
        raise ArtifactError(f"{weights}: {err}") from err
    rec = model.tasks[task]
    rec.dataset_fingerprint = meta.get("dataset_fingerprint", "")
    rec.metadata = meta.get("metadata", {})
    # Tasks saved before held-out features were kept have none; the model then gates them with
    # the standardised gate.
    held = (tensors.get("holdout.features"), tensors.get("holdout.scores"))
    try:
        model.set_task_statistics(
            task,
            gaussian,
            float(meta["score_mean"]),
            float(meta["score_std"]),
            int(meta.get("num_samples", 0)),
            *(held if held[0] is not None and held[1] is not None else (None, None)),
        )
    except ValueError as err:
        _drop_last_task(model)
        raise ArtifactError(f"{weights}: {err}") from err
    return task


def _drop_last_task(model: DikiCLIP) -> None:
    """Undo a half-added task. ``nn.ParameterList`` has no ``__delitem__``: rebuild each without its last entry."""
    for _, _, layer in model.adapter_layers():
        layer.keys = nn.ParameterList(list(layer.keys)[:-1])
        layer.values = nn.ParameterList(list(layer.values)[:-1])
    model.tasks.pop()
    model.invalidate_caches()
