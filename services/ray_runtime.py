"""The one place that connects this process to Ray.

``ensure_ray(settings)`` either starts Ray inside the process (the embedded default: ``num_cpus``
from ``settings.ray.num_cpus``, no dashboard) or connects to a running cluster
(``settings.ray.address``: ``auto``, ``host:port`` of a head's GCS, or ``ray://host:port`` for the
Ray client). It is idempotent: a process that is already connected keeps its connection.

Ray 2.60 turns token authentication and usage reporting on by default; both are switched off here
(``RAY_AUTH_MODE=disabled``, ``RAY_USAGE_STATS_ENABLED=0``) unless the environment already says
otherwise, before Ray is imported (the local stack sets ``RAY_AUTH_MODE=token`` for its clients when
``stack.ray_token_auth`` is on).

Every worker process of the job runs :func:`quiet_worker_logs` first (Ray's
``worker_process_setup_hook``): it silences warnings that read like faults during a normal run, such
as Ray Train's ``PlacementGroupCleaner`` reporting once a second that the State API is unavailable
(it always is without a dashboard, as in the embedded mode).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from services.settings import Settings

__all__ = [
    "QUIET_WORKER_LOGGERS",
    "RayConnection",
    "configure_ray_environment",
    "ensure_ray",
    "quiet_worker_logs",
    "shutdown_ray",
]

RAY_ENV_DEFAULTS: dict[str, str] = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # The V2 train API is the default in 2.60; pin it so an older environment variable does not flip it.
    "RAY_TRAIN_V2_ENABLED": "1",
}

# Loggers of Ray's own libraries that warn about normal conditions, and the level they are set to in
# the job's worker processes. Ray Train's PlacementGroupCleaner (a detached actor that removes a run's
# placement group if the Train controller dies) polls the State API every second and warns each time
# the API does not answer: always without a dashboard, often on a busy machine.
QUIET_WORKER_LOGGERS: dict[str, int] = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}
SETUP_HOOK = "services.ray_runtime.quiet_worker_logs"

_lock = threading.Lock()


def quiet_worker_logs() -> None:
    """Ray's ``worker_process_setup_hook`` for this project's jobs: set :data:`QUIET_WORKER_LOGGERS`."""
    for name, level in QUIET_WORKER_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


@dataclass(frozen=True)
class RayConnection:
    """How this process is connected to Ray."""

    address: str | None  # None: Ray runs inside this process
    namespace: str
    embedded: bool  # True when this call (or an earlier one) started Ray in-process
    cluster_cpus: float


def configure_ray_environment() -> None:
    """Set the environment variables Ray must see before it starts (existing values win)."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def ensure_ray(settings: Settings, **init_kwargs: Any) -> RayConnection:
    """Connect to Ray as ``settings.ray`` says, once per process; later calls return the live connection.

    Args:
        settings: ``settings.ray.address`` None starts Ray in this process with ``settings.ray.num_cpus``
            logical CPUs (None: what Ray detects) and no dashboard; otherwise ``ray.init(address=...)``.
        init_kwargs: extra ``ray.init`` arguments (e.g. ``runtime_env``), applied on the first call only.

    Raises:
        ConnectionError: when the configured cluster cannot be reached (the message names the address).
    """
    configure_ray_environment()
    import ray

    with _lock:
        if ray.is_initialized():
            return _describe(ray, settings)
        address = settings.ray.address
        kwargs: dict[str, Any] = {
            "namespace": settings.ray.namespace,
            "ignore_reinit_error": True,
            "logging_level": "WARNING",
        }
        kwargs.update(init_kwargs)
        runtime_env = dict(kwargs.get("runtime_env") or {})
        runtime_env.setdefault("worker_process_setup_hook", SETUP_HOOK)
        kwargs["runtime_env"] = runtime_env
        if address is None or address == "local":
            kwargs.setdefault("num_cpus", settings.ray.num_cpus)
            kwargs.setdefault("include_dashboard", False)
            ray.init(**kwargs)
        else:
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, TimeoutError, RuntimeError) as exc:
                raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc
        return _describe(ray, settings)


def _describe(ray: Any, settings: Settings) -> RayConnection:
    address = settings.ray.address if settings.ray.address not in (None, "local") else None
    try:
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
    except Exception:  # a client connection that is shutting down
        cpus = 0.0
    return RayConnection(address=address, namespace=settings.ray.namespace, embedded=address is None, cluster_cpus=cpus)


def shutdown_ray() -> None:
    """Disconnect (and stop an in-process Ray). Safe to call when Ray is not running."""
    import ray

    with _lock:
        if ray.is_initialized():
            ray.shutdown()
