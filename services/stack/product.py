"""The product's own services in the local stack: the Serve application and the served watcher.

``diki stack up`` starts them after the core services (S3, MLflow, Prefect, the Ray head), so that
a dataset pushed into the bucket is learned by the watcher's flows on the Ray head and answered by
the Serve application on that same head. Both read the same settings as the stack (the config file
travels as ``DIKI_CONFIG``) and reach the core services through the stack's client environment.

They are command lines (``python -m pipelines.cli serve``, ``python -m pipelines.watcher --serve``)
with health checks over HTTP: nothing here imports ``pipelines`` (services never do).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx

from services.stack.recipes import ServiceFactory, StackContext
from services.stack.supervisor import HOST, ServiceSpec

__all__ = ["STACK_SERVICES", "runner_is_polling", "serve_service", "watcher_service"]

# The served watcher deployment, as ``pipelines.watcher`` names it (WATCH_FLOW / DEPLOYMENT there).
WATCH_FLOW: Final = "diki-watch-incoming"
WATCH_DEPLOYMENT: Final = "diki-watcher"
# A runner polls the server every few seconds; a deployment not polled for this long has none.
RUNNER_POLL_FRESH_S: Final = 90.0


def serve_service(ctx: StackContext) -> ServiceSpec:
    """``diki serve`` against the stack's Ray head: the classifier on ``serve.port``, healthy once ready."""
    port = ctx.settings.serve.port
    return ServiceSpec(
        name="serve",
        # The stack owns its Ray head: on exit, Serve's HTTP proxy goes too, so the port is free for the next start.
        command=[
            sys.executable,
            "-m",
            "pipelines.cli",
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--shutdown-serve-on-exit",
        ],
        env=ctx.client_env,
        # Relative paths in the settings mean what they mean where `diki stack up` ran.
        cwd=Path.cwd(),
        port=port,
        health_url=f"http://{HOST}:{port}/readyz",
        url=f"http://{HOST}:{port}/docs",
        wait_for=("s3", "mlflow", "ray"),
        # The first start loads the backbone in a replica on the Ray head and warms it up.
        start_timeout_s=max(ctx.settings.stack.start_timeout_s, 240.0),
    )


def runner_is_polling(deployment: dict[str, Any], now: datetime | None = None) -> bool:
    """True when a runner serves the deployment now: Prefect marks it READY and it polled lately.

    ``deployment`` is the server's JSON for it. The deployment record outlives its runner (it stays
    in the server's database after ``stack down``), so its mere existence says nothing about the process.
    """
    if deployment.get("status") != "READY":
        return False
    polled = deployment.get("last_polled")
    if not polled:
        return False
    try:
        when = datetime.fromisoformat(str(polled).replace("Z", "+00:00"))
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return ((now or datetime.now(UTC)) - when).total_seconds() < RUNNER_POLL_FRESH_S


def watcher_service(ctx: StackContext) -> ServiceSpec:
    """The served watcher deployment (``python -m pipelines.watcher --serve``), healthy while its runner polls."""
    api = ctx.client_env["PREFECT_API_URL"]

    def deployed() -> bool:
        # Prefect's REST API, not its Python client: importing Prefect here would configure it for
        # the calling process (its home folder, its API URL) before any CLI command could.
        try:
            response = httpx.get(f"{api}/deployments/name/{WATCH_FLOW}/{WATCH_DEPLOYMENT}", timeout=2.0)
        except httpx.TransportError:
            return False
        return response.is_success and runner_is_polling(response.json())

    return ServiceSpec(
        name="watcher",
        command=[sys.executable, "-m", "pipelines.watcher", "--serve"],
        env=ctx.client_env,
        health_check=deployed,
        url=f"{api.removesuffix('/api')}/deployments",
        wait_for=("s3", "mlflow", "prefect", "ray"),
        # Relative paths in the settings mean what they mean where `diki stack up` ran.
        cwd=Path.cwd(),
    )


# Started in this order by `diki stack up` (the CLI), after the core services.
STACK_SERVICES: tuple[ServiceFactory, ...] = (serve_service, watcher_service)
