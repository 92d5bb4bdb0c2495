"""The configured frozen backbone (``settings.backbone``), built the same way by every process."""

from __future__ import annotations

import torch

from diki_model import DikiCLIP, DikiConfig, create_diki_model
from services.settings import Settings

__all__ = ["create_model"]


def create_model(settings: Settings, config: DikiConfig | None = None, device: str | torch.device = "cpu") -> DikiCLIP:
    """The configured frozen backbone with an empty adapter pool.

    A backbone without weights (a test config) is initialised from ``settings.train.seed``, so every
    process that builds it gets the same fingerprint.
    """
    return create_diki_model(
        settings.backbone.name, settings.backbone.pretrained, config, device=device, seed=settings.train.seed
    )
