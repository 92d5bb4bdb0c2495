"""The local stack: the settings turned into services, handed to the supervisor, and the client's view of it.

:class:`Stack` builds the service list (the core servers of :mod:`services.stack.recipes`, then
the ``stack.extra_services`` hooks of the settings, then the factories the caller passes), runs
it with a :class:`~services.stack.supervisor.Supervisor` in ``<stack home>``, and keeps
``stack.env`` (mode 0600): the variables that point a client at the stack, with the S3
credentials (from settings, or generated once and reused).
"""

from __future__ import annotations

import importlib
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from services.settings import Settings
from services.stack.recipes import CORE_SERVICES, ServiceFactory, StackContext, core_services
from services.stack.supervisor import HOST, ServiceSpec, ServiceStatus, StackError, Supervisor, write_private

__all__ = ["Stack", "UpResult"]

_ENV_FILE: Final = "stack.env"
_RAY_TOKEN_FILE: Final = "ray-auth-token"


@dataclass(frozen=True)
class UpResult:
    """What :meth:`Stack.up` did."""

    started: list[str]
    already_running: list[str]
    env_file: Path

    @property
    def was_already_up(self) -> bool:
        return not self.started


class Stack:
    """The local stack described by ``settings.stack``.

    Args:
        settings: the project settings (ports, folders, credentials, Ray CPUs).
        extra_services: more service factories, started after the core services and the hooks of
            ``settings.stack.extra_services``.
    """

    def __init__(self, settings: Settings, extra_services: Sequence[ServiceFactory] = ()) -> None:
        assert settings.stack.home is not None
        self.settings = settings
        self.home = settings.stack.home
        self.data_dir = self.home / "data"
        self.logs_dir = self.home / "logs"
        self.run_dir = self.home / "run"
        self.env_file = self.home / _ENV_FILE
        self.ray_token_file = self.home / _RAY_TOKEN_FILE
        self._extra = list(extra_services)
        self.supervisor = Supervisor(
            self.home,
            self.data_dir,
            self.logs_dir,
            self.run_dir,
            start_timeout_s=settings.stack.start_timeout_s,
            stop_timeout_s=settings.stack.stop_timeout_s,
            stop_last=CORE_SERVICES,
            log_max_bytes=settings.stack.log_max_bytes,
            log_backups=settings.stack.log_backups,
        )

    # -- public ----------------------------------------------------------------------------------

    def client_env(self, *, create_credentials: bool = False) -> dict[str, str]:
        """The variables that point a client (the CLI, flows, Serve) at this stack, credentials included."""
        ports = self.settings.stack.ports
        access_key, secret_key = self._credentials(create=create_credentials)
        env = {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_ENDPOINT_URL": f"http://{HOST}:{ports.s3}",
            "AWS_REGION": self.settings.s3.region,
            "DIKI_STORAGE__ROOT": f"s3://{self.settings.stack.bucket}/storage",
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{ports.mlflow}",
            "PREFECT_API_URL": f"http://{HOST}:{ports.prefect}/api",
            "RAY_ADDRESS": f"{HOST}:{ports.ray}",
        }
        if self.settings.stack.ray_token_auth and self._ray_token(create=create_credentials):
            # Ray reads the token from this file (never from a command line); clients need both.
            env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.ray_token_file)})
        return env

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
        specs = core_services(ctx)
        factories = [_import_hook(h) for h in self.settings.stack.extra_services]
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
        # Under the lock: two `up`s at once must not both generate credentials.
        with self.supervisor.lock():
            specs = self.services(create_credentials=True)
            self._write_env_file()
            # The admin key of the Serve application (services.serving.keys): made here, before `serve`
            # starts, so the CLI and the watcher of this home find it.
            from services.serving.keys import ensure_admin_key

            ensure_admin_key(self.settings)
            started, running = self.supervisor.up(specs, say)
        return UpResult(started=started, already_running=running, env_file=self.env_file)

    def down(self, progress: Callable[[str], None] | None = None) -> list[str]:
        """Stop every process recorded in a pid file (the extra services first) and wait for the ports to free.

        Returns:
            The names of the services that were stopped (empty when nothing ran).
        """
        return self.supervisor.down(progress or (lambda _msg: None))

    def status(self) -> list[ServiceStatus]:
        """Each service with its pid, port, URL and health (checked now, in parallel)."""
        return self.supervisor.status(self.services())

    # -- credentials and the env file ------------------------------------------------------------

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
        write_private(
            self.env_file, _format_env({"AWS_ACCESS_KEY_ID": generated[0], "AWS_SECRET_ACCESS_KEY": generated[1]})
        )
        return generated

    def _ray_token(self, *, create: bool) -> str | None:
        """The Ray head's authentication token (``stack.ray_token_auth``), kept owner-only in the stack home."""
        try:
            token = self.ray_token_file.read_text(encoding="utf-8").strip()
        except OSError:
            token = ""
        if token or not create:
            return token or None
        token = secrets.token_hex(32)
        write_private(self.ray_token_file, token + "\n")
        return token

    def _write_env_file(self) -> None:
        write_private(self.env_file, _format_env(self.client_env()))


# -- helpers -------------------------------------------------------------------------------------


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
