"""Loading the frozen CLIP backbone, and fingerprinting it.

A backbone is named the way open_clip names models:
- an open_clip model name plus a ``pretrained`` tag (``ViT-B-16`` / ``openai``, as the paper;
  needs a machine that can reach the weights hub),
- an open_clip model name plus a local weights file (``.safetensors`` or ``.pt`` state dict),
- ``local-dir:/path`` holding ``open_clip_config.json`` + ``open_clip_model.safetensors``,
- or a project config name (the JSON files in ``diki_model/model_configs``) with a shipped
  checkpoint of that name in ``diki_model/checkpoints`` (used when ``pretrained`` is omitted).

The fingerprint (sha256 of the model config and of every weight tensor, in key order) is what
task artifacts record, so an adapter is never loaded onto a different backbone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
_registered = False


def register_model_configs() -> None:
    """Make the project's model configs known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    for path in sorted(CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(path)
    _registered = True


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a backbone: how to load it again, and a fingerprint of its weights."""

    name: str
    pretrained: str | None
    fingerprint: str
    embed_dim: int
    image_size: int
    context_length: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Backbone:
    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    info: BackboneInfo


def shipped_checkpoint(name: str) -> Path | None:
    path = CHECKPOINT_DIR / name
    return path if (path / "open_clip_model.safetensors").exists() else None


def _resolve(name: str, pretrained: str | None) -> tuple[str, str | None]:
    """Map (name, pretrained) onto open_clip's create arguments."""
    if name.startswith("local-dir:"):
        return name, None
    if pretrained is None:
        ckpt = shipped_checkpoint(name)
        if ckpt is not None:
            return f"local-dir:{ckpt}", None
        return name, None
    p = Path(pretrained).expanduser()
    if p.is_dir():
        return f"local-dir:{p.resolve()}", None
    return name, pretrained


def model_config_dict(model: nn.Module, name: str) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_model_config(name.removeprefix("local-dir:")) if not name.startswith("local-dir:") else None
    if cfg is None and name.startswith("local-dir:"):
        cfg_path = Path(name.removeprefix("local-dir:")) / "open_clip_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text()).get("model_cfg")
    return cfg or {}


def fingerprint_model(model: nn.Module, config: dict[str, Any] | None = None) -> str:
    """sha256 over the config JSON and every tensor of the state dict (names, shapes, bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps(config or {}, sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_backbone(
    name: str, pretrained: str | None = None, device: str | torch.device = "cpu", seed: int | None = None
) -> Backbone:
    """Create the frozen CLIP backbone with its preprocessing and tokenizer.

    ``seed`` makes a randomly initialised backbone (a config without weights) reproducible.
    """
    import open_clip

    register_model_configs()
    model_name, tag = _resolve(name, pretrained)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=tag, device=device)
    except RuntimeError as err:
        raise RuntimeError(f"could not load backbone {name!r} (pretrained={pretrained!r}): {err}") from err
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    config = model_config_dict(model, model_name)
    visual = model.visual
    image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else int(visual.image_size)
    info = BackboneInfo(
        name=name,
        pretrained=pretrained,
        fingerprint=fingerprint_model(model, config),
        embed_dim=int(visual.output_dim),
        image_size=int(image_size),
        context_length=int(getattr(model, "context_length", getattr(tokenizer, "context_length", 77))),
    )
    return Backbone(model=model, preprocess=preprocess, tokenizer=tokenizer, info=info)


# The authors' SGD rate for the residual K/V of OpenAI's CLIP, whose logit scale is 100.
DEFAULT_ADAPTER_LR = 5.0
ADAPTER_TRAINING_FILE = "adapter_training.json"


def adapter_lr(name: str, pretrained: str | None = None) -> float:
    """The SGD learning rate the residual K/V of this backbone is known to train well with.

    The gradient that reaches K/V scales with the backbone's logit scale and activation sizes, so
    the authors' rate of 5 (ViT-B/16, logit scale 100) under-trains a small backbone by an order of
    magnitude. A checkpoint folder (the shipped one, ``local-dir:PATH`` or a ``pretrained`` folder)
    records its measured rate in ``adapter_training.json`` next to the weights; any other backbone
    gets the authors' rate.
    """
    model_name, _ = _resolve(name, pretrained)
    if model_name.startswith("local-dir:"):
        path = Path(model_name.removeprefix("local-dir:")) / ADAPTER_TRAINING_FILE
        if path.is_file():
            return float(json.loads(path.read_text())["lr"])
    return DEFAULT_ADAPTER_LR
