"""The product's own services in the local stack: the Serve application and the served watcher.

``diki stack up`` starts them after the core services (S3, MLflow, Prefect, the Ray head), so that
a dataset pushed into the bucket is learned by the watcher's flows on the Ray head and answered by
the Serve application on that same head. Both read the same settings as the stack (the config file
travels as ``DIKI_CONFIG``) and reach the core services through the stack's client environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.stack import HOST, ServiceFactory, ServiceSpec, StackContext

__all__ = ["STACK_SERVICES", "serve_service", "watcher_service"]


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


def watcher_service(ctx: StackContext) -> ServiceSpec:
    """The served watcher deployment (``python -m pipelines.watcher --serve``).

    Imported when called: the watcher module loads Prefect, which a CLI command must configure first.
    """
    from pipelines.watcher import watcher_service as watcher_spec

    return watcher_spec(ctx)


# Started in this order by `diki stack up` (the CLI), after the core services.
STACK_SERVICES: tuple[ServiceFactory, ...] = (serve_service, watcher_service)
