"""``diki serve`` (run the classifier on Ray Serve until Ctrl-C) and ``diki predict`` (ask it about an image)."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.cli.config import ConfigOption, load_settings


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("predict")(predict_command)


def serve_command(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: settings serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default: settings serve.port).")] = None,
    backbone: Annotated[
        str | None, typer.Option(help="Frozen backbone to start with (default: settings backbone.name).")
    ] = None,
    pretrained: Annotated[str | None, typer.Option(help="Pretrained tag or weights path for --backbone.")] = None,
    bundle_dir: Annotated[
        Path | None,
        typer.Option(help="Serve this bundle folder instead of following the registry.", file_okay=False),
    ] = None,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="Replicas (default: settings serve.num_replicas).")
    ] = None,
    gpus: Annotated[float, typer.Option(min=0, help="GPUs per replica (0: CPU).")] = 0.0,
    shutdown_serve_on_exit: Annotated[
        bool,
        typer.Option(
            help="With ray.address: shut Ray Serve down on exit (HTTP proxy included, so the port is freed), "
            "not just remove the app. For a cluster this command owns, as in `diki stack up`."
        ),
    ] = False,
    high_throughput: Annotated[
        bool,
        typer.Option(
            help="Embedded Ray only: Ray Serve's high-throughput mode (HAProxy ingress; replicas then also "
            "listen on all interfaces). See docs/serving.md."
        ),
    ] = False,
) -> None:
    """Serve the production model over HTTP on Ray Serve; blocks until Ctrl-C.

    Embedded (no ray.address): starts Ray in this process and stops it on exit. With ray.address
    set: deploys onto that cluster and removes the app on exit.
    """
    from ray import serve

    from services.ray_runtime import ensure_ray, shutdown_ray
    from services.serving.app import APP_NAME, HIGH_THROUGHPUT_ENV, build_app
    from services.serving.client import ServingClient, ServingError

    settings = load_settings(config)
    host = host or settings.serve.host
    port = port or settings.serve.port
    args: dict[str, Any] = {"num_gpus": gpus}
    if config is not None:
        args["config"] = str(config)
    if backbone:
        args["backbone"] = backbone
    if pretrained:
        args["pretrained"] = pretrained
    if bundle_dir is not None:
        args["bundle_dir"] = str(bundle_dir)
    if replicas:
        args["num_replicas"] = replicas
    try:
        application = build_app(args)
    except ValueError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if high_throughput:
        if settings.ray.address not in (None, "local"):
            typer.secho(
                "error: --high-throughput applies to an embedded Ray; set "
                + " ".join(f"{k}={v}" for k, v in HIGH_THROUGHPUT_ENV.items())
                + " on the cluster's nodes instead",
                fg=typer.colors.RED,
                err=True,
            )
            raise typer.Exit(2)
        os.environ.update(HIGH_THROUGHPUT_ENV)  # read by Ray's processes when they start
    try:
        connection = ensure_ray(settings)
    except ConnectionError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        typer.echo(f"starting the classifier on http://{host}:{port} (Ray: {connection.address or 'in-process'})")
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
        check = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        with ServingClient(f"http://{check}:{port}") as client:
            try:
                ready = client.wait_ready(timeout_s=300)
                typer.echo(f"ready: {ready['message']}")
            except ServingError as exc:
                typer.secho(f"warning: {exc}", fg=typer.colors.YELLOW, err=True)
        if settings.serve.admin_open:
            typer.secho("warning: serve.admin_open: the admin routes answer without a key", fg="yellow", err=True)
        elif settings.serve.admin_key is None:
            from services.serving.keys import admin_key_path

            typer.echo(f"admin routes (/v1/admin/reload): key in {admin_key_path(settings)} (header X-Admin-Key)")
        typer.echo("serving; press Ctrl-C to stop")
        while not stop.wait(1.0):
            pass
        typer.echo("stopping...")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if connection.embedded or shutdown_serve_on_exit:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            if connection.embedded:
                shutdown_ray()
    typer.echo("stopped")


def predict_command(
    image: Annotated[Path, typer.Argument(help="Image file (PNG, JPEG or WebP).", exists=True, dir_okay=False)],
    labels: Annotated[
        str | None, typer.Option(help="Comma-separated labels (open vocabulary); default: the tasks' classes.")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Force this learned task.")] = None,
    top_k: Annotated[int, typer.Option(min=1, max=100, help="How many best labels to show.")] = 5,
    url: Annotated[str | None, typer.Option(help="Server URL (default: settings serve.host and serve.port).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False,
    config: ConfigOption = None,
) -> None:
    """Classify one image with a running server and print the answer."""
    from services.serving.client import ServingClient, ServingError

    settings = load_settings(config)
    if url is None:
        host = "127.0.0.1" if settings.serve.host in ("0.0.0.0", "::") else settings.serve.host
        url = f"http://{host}:{settings.serve.port}"
    key = settings.serve.api_key.get_secret_value() if settings.serve.api_key is not None else None
    label_list = [part.strip() for part in labels.split(",") if part.strip()] if labels is not None else None
    try:
        with ServingClient(url, api_key=key, retry_for_s=5) as client:
            answer = client.classify(image, labels=label_list, task=task, top_k=top_k)
    except ServingError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    version = answer["bundle_version"]
    typer.echo(f"{answer['label']}  ({answer['score']:.3f})")
    typer.echo(
        f"task: {answer['task'] or '-'}   gate: {answer['gate']:.3f}   "
        f"out of distribution: {'yes' if answer['out_of_distribution'] else 'no'}   "
        f"bundle version: {version if version is not None else 'none (zero-shot)'}"
    )
    for entry in answer["top_k"]:
        typer.echo(f"  {entry['score']:.3f}  {entry['label']}")
