"""The format of a training checkpoint: safetensors for tensors, JSON for everything else, never pickles.

A checkpoint holds what a restarted worker group needs to resume exactly: the adapter, the best
adapter so far, the optimizer and scheduler state, the epoch, the history and the task's merged
frozen-feature statistics.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diki_model import EpochResult, TaskStatistics, TrainState

__all__ = ["BUNDLE_DIR", "CHECKPOINT_FORMAT", "RESULT_JSON", "read_checkpoint", "write_checkpoint"]

CHECKPOINT_FORMAT = "diki-train-checkpoint"
CHECKPOINT_VERSION = 1
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
RESULT_JSON = "result.json"  # the final checkpoint's summary of the job
BUNDLE_DIR = "bundle"  # the final checkpoint's result bundle


def _json_ready(obj: Any, where: str) -> Any:
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where} cannot be stored as JSON: {exc}") from exc
    return obj


def write_checkpoint(directory: Path, state: TrainState, stats: TaskStatistics, meta: dict[str, Any]) -> None:
    """Write a resumable training state: tensors to safetensors, everything else to JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.adapter.items():
        tensors[f"adapter.{k}"] = v.detach().cpu().contiguous()
    if state.best_adapter is not None:
        for k, v in state.best_adapter.items():
            tensors[f"best_adapter.{k}"] = v.detach().cpu().clone().contiguous()  # may share the adapter's memory
    for k, v in stats.state_dict().items():
        tensors[f"stats.{k}"] = v.detach().cpu().contiguous()
    optim_state: dict[str, dict[str, Any]] = {}
    for pid, entry in state.optimizer.get("state", {}).items():
        out: dict[str, Any] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                key = f"optimizer.{pid}.{name}"
                tensors[key] = value.detach().cpu().contiguous()
                out[name] = {"tensor": key}
            else:
                out[name] = {"value": value}
        optim_state[str(pid)] = out
    doc = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "epoch": state.epoch,
        "best_val": state.best_val,
        "best_epoch": state.best_epoch,
        "has_best_adapter": state.best_adapter is not None,
        "history": [asdict(h) for h in state.history],
        "optimizer": {"param_groups": state.optimizer.get("param_groups", []), "state": optim_state},
        "scheduler": state.scheduler,
        "meta": meta,
    }
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": CHECKPOINT_FORMAT})
    (directory / STATE_JSON).write_text(json.dumps(_json_ready(doc, "training state"), indent=1, sort_keys=True))


def read_checkpoint(directory: Path) -> tuple[TrainState, TaskStatistics, dict[str, Any]]:
    """Read what ``write_checkpoint`` wrote (raises ValueError naming the folder when it is not one)."""
    try:
        doc = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory}: not a readable training checkpoint ({exc})") from exc
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: not a training checkpoint (format {doc.get('format')!r})")

    def prefixed(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    optimizer = {"param_groups": doc["optimizer"]["param_groups"], "state": {}}
    for pid, entry in doc["optimizer"]["state"].items():
        optimizer["state"][int(pid)] = {
            name: tensors[v["tensor"]] if "tensor" in v else v["value"] for name, v in entry.items()
        }
    state = TrainState(
        epoch=int(doc["epoch"]),
        adapter=prefixed("adapter."),
        optimizer=optimizer,
        scheduler=doc["scheduler"],
        best_val=float(doc["best_val"]),
        best_epoch=int(doc["best_epoch"]),
        best_adapter=prefixed("best_adapter.") if doc["has_best_adapter"] else None,
        history=[EpochResult(**h) for h in doc["history"]],
    )
    return state, TaskStatistics.from_state_dict(prefixed("stats.")), doc.get("meta", {})
