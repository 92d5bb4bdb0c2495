"""The Serve app's configuration, in three layers resolved once, in the driver.

1. :class:`AppArgs`: the arguments of ``build_app`` (a ``serve run``/KubeRay Serve config, or code);
   every field is optional.
2. The project settings (``settings.serve``, ``settings.backbone``, the registry's), which fill in
   whatever the arguments leave out.
3. :class:`ReplicaConfig`: everything a replica needs, resolved from the two, plus the Serve
   deployment options (:func:`replica_config`). It travels to the replicas and holds no secret:
   the settings without their secret fields (each replica's own environment supplies them) and the
   API key and the admin key only as hashes (:mod:`services.serving.keys` says where the admin key
   comes from; building the app creates its key file when there is none).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["HIGH_THROUGHPUT_ENV", "AppArgs", "ReplicaConfig", "hash_key", "public_settings", "replica_config"]

# Ray Serve's documented high-throughput mode (Ray >= 2.55): HAProxy as the HTTP ingress instead of
# the Python proxy, and replicas that run user code on their main loop with buffered request logs.
# Read when Ray starts, so it must be in the environment of every Ray node (``diki serve
# --high-throughput`` sets it for an embedded Ray). HAProxy makes replicas listen on all interfaces.
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


class AppArgs(BaseModel):
    """Arguments of :func:`~services.serving.app.build_app` (from ``serve run``/KubeRay YAML or code); None = from settings."""

    model_config = ConfigDict(extra="forbid")

    # Settings: a YAML file for this process, and/or overrides by section ({"mlflow": {...}}).
    config: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    # The frozen backbone to start with (a bundle built on another one makes the replica load that one).
    backbone: str | None = None
    pretrained: str | None = None
    # Only for randomly initialised backbones (tests, benchmarks): makes the weights reproducible.
    seed: int | None = None
    device: str | None = None  # None: cuda when num_gpus > 0, else cpu
    # Serve one local bundle folder instead of following the registry (no polling).
    bundle_dir: str | None = None
    bundle_version: int = 0
    registry: bool = True
    alias: str = Field(default="production", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    num_replicas: int | None = Field(default=None, ge=1)
    num_cpus: float | None = Field(default=None, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_batch_size: int | None = Field(default=None, ge=1)
    batch_wait_timeout_s: float | None = Field(default=None, ge=0)
    poll_interval_s: float | None = Field(default=None, gt=0)
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    # Images per /v1/classify/batch call; None: max_batch_size.
    max_batch_images: int | None = Field(default=None, ge=1)
    torch_threads: int | None = Field(default=None, ge=1)
    registry_timeout_s: float = Field(default=15.0, gt=0)
    warmup: bool = True
    deployment_name: str = Field(default="DikiClassifier", pattern=r"^[A-Za-z0-9_-]{1,64}$")


class ReplicaConfig(BaseModel):
    """Everything a replica needs, resolved in the driver. Holds no secret (the API key only as a hash)."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any]  # non-secret settings; secrets come from the replica's own environment
    backbone: str
    pretrained: str | None
    seed: int | None
    device: str
    bundle_dir: str | None
    bundle_version: int
    registry: bool
    alias: str
    max_batch_size: int
    batch_wait_timeout_s: float
    poll_interval_s: float
    max_batch_images: int
    max_image_bytes: int
    max_image_pixels: int
    max_labels: int
    torch_threads: int | None
    registry_timeout_s: float
    warmup: bool
    api_key_sha256: str | None
    # The admin routes' key, as a hash (None with admin_open, or when no key could be made: then a
    # replica looks for serve.admin_key in its own environment, else the admin routes stay closed).
    admin_key_sha256: str | None = None
    admin_open: bool = False
    max_request_bytes: int = 32 * 1024 * 1024


def _is_secret(field: Any) -> bool:
    return "SecretStr" in str(field.annotation)


def public_settings(model: BaseModel) -> dict[str, Any]:
    """Settings as plain data without any secret field (set or not), so the replica's environment supplies them."""
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if _is_secret(field) or isinstance(value, SecretStr):
            continue
        if isinstance(value, BaseModel):
            out[name] = public_settings(value)
        elif isinstance(value, Path):
            out[name] = str(value)
        elif isinstance(value, list | tuple):
            out[name] = [str(v) if isinstance(v, Path) else v for v in value]
        else:
            out[name] = value
    return out


def hash_key(key: str) -> str:
    """How an API key travels and is compared: its SHA-256, in hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def replica_config(args: AppArgs) -> tuple[ReplicaConfig, dict[str, Any]]:
    """Resolve ``args`` against the settings: the replica's config and the deployment options."""
    from services.serving.keys import ensure_admin_key
    from services.settings import Settings, get_settings

    settings = Settings.load(args.config, **args.settings) if (args.config or args.settings) else get_settings()
    s = settings.serve
    admin_key = None if s.admin_open else ensure_admin_key(settings)
    max_batch = args.max_batch_size or s.max_batch_size
    num_gpus = args.num_gpus
    device = args.device or ("cuda" if num_gpus > 0 else "cpu")
    key = s.api_key.get_secret_value() if s.api_key is not None else ""
    cfg = ReplicaConfig(
        settings=public_settings(settings),
        backbone=args.backbone or settings.backbone.name,
        pretrained=args.pretrained if args.backbone else (args.pretrained or settings.backbone.pretrained),
        seed=args.seed,
        device=device,
        bundle_dir=str(Path(args.bundle_dir).expanduser().absolute()) if args.bundle_dir else None,
        bundle_version=args.bundle_version,
        registry=args.registry and not args.bundle_dir,
        alias=args.alias,
        max_batch_size=max_batch,
        batch_wait_timeout_s=args.batch_wait_timeout_s
        if args.batch_wait_timeout_s is not None
        else s.batch_wait_timeout_s,
        poll_interval_s=args.poll_interval_s or s.poll_interval_s,
        max_batch_images=args.max_batch_images or max_batch,
        max_image_bytes=s.max_image_bytes,
        max_image_pixels=s.max_image_pixels,
        max_labels=s.max_labels,
        torch_threads=args.torch_threads,
        registry_timeout_s=args.registry_timeout_s,
        warmup=args.warmup,
        api_key_sha256=hash_key(key) if key else None,
        admin_key_sha256=hash_key(admin_key) if admin_key else None,
        admin_open=s.admin_open,
        max_request_bytes=s.max_request_bytes,
    )
    actor: dict[str, Any] = {"num_cpus": args.num_cpus or s.num_cpus}
    if num_gpus:
        actor["num_gpus"] = num_gpus
    options: dict[str, Any] = {
        "name": args.deployment_name,
        "ray_actor_options": actor,
        # Batching needs several requests in flight on the replica at once.
        "max_ongoing_requests": args.max_ongoing_requests or max(32, 4 * max_batch),
        "graceful_shutdown_timeout_s": 10,
    }
    # Only when asked for: a Serve config (KubeRay) may give an autoscaling_config instead.
    if args.num_replicas or "num_replicas" in s.model_fields_set:
        options["num_replicas"] = args.num_replicas or s.num_replicas
    return cfg, options
