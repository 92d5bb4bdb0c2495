"""A supervisor of long-running local processes: start, health-check, stop, status, by pid file.

Nothing here knows which servers it runs; :mod:`services.stack.recipes` says how each one is
started and :class:`services.stack.stack.Stack` puts them together. A service is a
:class:`ServiceSpec` (argv, environment, ports, health check, services to wait for). The
:class:`Supervisor` runs each one in a session of its own, its output in ``<logs>/<name>.log``
(through :mod:`~services.stack.logpipe`, which rotates the file at a size cap, keeping a few older
ones as ``<name>.log.1``, ...), and records it in ``<run>/<name>.pid``: its pid with the process's
start time (a reused pid is not taken for the service), its ports and its stop timeout. Stopping sends SIGTERM, then SIGKILL after
the timeout, then clears whatever the service left in its session.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import httpx

from services.processes import is_alive, process_start_time, reap, session_members, signal_session

__all__ = [
    "HOST",
    "ServiceSpec",
    "ServiceStatus",
    "StackError",
    "Supervisor",
    "find_executable",
    "port_is_free",
]

HOST: Final = "127.0.0.1"

_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_PORT_FREE_TIMEOUT_S: Final = 15.0
_GROUP_EXIT_TIMEOUT_S: Final = 10.0
_LOG_TAIL_LINES: Final = 25
_LOGPIPE: Final = Path(__file__).with_name("logpipe.py")


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
class _Record:
    """The content of a pid file.

    ``start_time`` (unix seconds, from psutil) tells the recorded process from a later one that got
    the same pid; None for a record written without it (it then trusts the pid alone).
    """

    name: str
    pid: int
    start_time: float | None
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
                # Records of older versions hold "start_ticks" (from /proc) instead: not comparable, ignored.
                start_time=None if data.get("start_time") is None else float(data["start_time"]),
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
            "start_time": self.start_time,
            "ports": list(self.ports),
            "started_at": self.started_at,
            "stop_timeout_s": self.stop_timeout_s,
        }
        write_private(path, json.dumps(payload) + "\n")

    def alive(self) -> bool:
        """Whether the recorded process still runs (and is the same process, not a reused pid)."""
        reap(self.pid)
        return is_alive(self.pid, self.start_time)


class Supervisor:
    """Starts, watches and stops services, each recorded in a pid file.

    Args:
        home: the folder the supervisor works on (named in messages).
        data_dir: the default working folder of a service.
        logs_dir / run_dir: log files and pid files (and the lock).
        start_timeout_s / stop_timeout_s: defaults for services that set none.
        stop_last: names of services stopped after all others, together (servers the others use).
        host: the address services listen on (shown in messages).
        log_max_bytes / log_backups: each log file is rotated at this size, keeping this many older ones.
    """

    def __init__(
        self,
        home: Path,
        data_dir: Path,
        logs_dir: Path,
        run_dir: Path,
        *,
        start_timeout_s: float,
        stop_timeout_s: float,
        stop_last: Sequence[str] = (),
        host: str = HOST,
        log_max_bytes: int = 10 * 1024 * 1024,
        log_backups: int = 3,
    ) -> None:
        self.home = home
        self.data_dir = data_dir
        self.logs_dir = logs_dir
        self.run_dir = run_dir
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.stop_last = tuple(stop_last)
        self.host = host
        self.log_max_bytes = log_max_bytes
        self.log_backups = log_backups
        self._lock_guard = threading.RLock()
        self._loggers: list[subprocess.Popen[bytes]] = []  # log pipes started here (reaped when they end)
        self._lock_depth = 0
        self._lock_file: IO[str] | None = None

    # -- public ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the home's lock: another process that asks for it gets a StackError. Re-entrant."""
        with self._lock_guard:
            if self._lock_depth == 0:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                handle = (self.run_dir / "stack.lock").open("a")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    raise StackError(f"another `diki stack` command is working on {self.home}; try again") from None
                self._lock_file = handle
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_file is not None:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                    self._lock_file.close()
                    self._lock_file = None

    def up(self, specs: Sequence[ServiceSpec], say: Callable[[str], None]) -> tuple[list[str], list[str]]:
        """Start every service of ``specs`` (in order) that is not running and wait until all are healthy.

        A service starts once those it waits for are healthy. If one fails to start, those started by
        this call are stopped again and StackError names the service with the end of its log.

        Returns:
            The names started, and the names that were already running.
        """
        for folder in (self.data_dir, self.logs_dir, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        with self.lock():
            running = {s.name for s in specs if self.running(s.name) is not None}
            to_start = [s for s in specs if s.name not in running]
            if not to_start:
                return [], sorted(running)
            self._check_ports_free(to_start)
            started: list[str] = []
            try:
                self._start_and_wait(list(specs), to_start, started, say)
            except BaseException:
                for name in reversed(started):
                    record = self.running(name)
                    if record is not None:
                        say(f"stopping {name} after the failed start")
                        self._stop(record, say)
                    self.pid_file(name).unlink(missing_ok=True)
                raise
            return started, sorted(running)

    def down(self, say: Callable[[str], None]) -> list[str]:
        """Stop every process recorded in a pid file (the ``stop_last`` ones last) and wait for the ports to free.

        Returns:
            The names of the services that were stopped, latest started first (empty when nothing ran).
        """
        if not self.run_dir.is_dir():
            return []
        with self.lock():
            records = []
            for pid_file in sorted(self.run_dir.glob("*.pid")):
                record = _Record.read(pid_file)
                if record is None or not record.alive():
                    pid_file.unlink(missing_ok=True)
                    continue
                records.append(record)
            records.sort(key=lambda r: r.started_at, reverse=True)
            # The others first (a Prefect runner must stop before its server, a Serve app before
            # Ray), then the stop_last services together: each waits on its own process.
            for wave in (
                [r for r in records if r.name not in self.stop_last],
                [r for r in records if r.name in self.stop_last],
            ):
                if wave:
                    with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                        list(pool.map(lambda r: self._stop(r, say), wave))
            stopped = [r.name for r in records]
            for logger in self._loggers:  # the log pipes this process started end with their services
                try:
                    logger.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._loggers = [logger for logger in self._loggers if logger.poll() is None]
            busy = wait_ports_free([p for r in records for p in r.ports], _PORT_FREE_TIMEOUT_S)
            if busy:
                raise StackError(f"stopped the stack but ports {busy} are still in use")
            return stopped

    def status(self, specs: Sequence[ServiceSpec]) -> list[ServiceStatus]:
        """Each service with its pid, port, URL and health (checked now, in parallel), then running orphans."""
        known = {s.name for s in specs}
        orphans = [r for r in self.records() if r.name not in known and r.alive()]
        records = {s.name: self.running(s.name) for s in specs}

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
                self.log(spec.name),
            )

        with ThreadPoolExecutor(max_workers=max(1, len(specs))) as pool:
            rows = list(pool.map(row, specs))
        rows += [
            ServiceStatus(r.name, True, False, r.pid, r.ports[0] if r.ports else None, None, self.log(r.name))
            for r in orphans
        ]
        return rows

    # -- files -----------------------------------------------------------------------------------

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def records(self) -> list[_Record]:
        if not self.run_dir.is_dir():
            return []
        return [r for r in (_Record.read(p) for p in sorted(self.run_dir.glob("*.pid"))) if r is not None]

    def running(self, name: str) -> _Record | None:
        """The pid record of service ``name`` if its process runs, else None."""
        record = _Record.read(self.pid_file(name))
        return record if record is not None and record.alive() else None

    def log_tail(self, name: str) -> str:
        time.sleep(0.2)  # the log pipe writes what the service printed last
        try:
            lines = self.log(name).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    # -- starting --------------------------------------------------------------------------------

    def _start_and_wait(
        self, specs: list[ServiceSpec], to_start: list[ServiceSpec], started: list[str], say: Callable[[str], None]
    ) -> None:
        default_timeout = self.start_timeout_s
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
                    say(f"starting {spec.name}" + (f" on {self.host}:{spec.port}" if spec.port else ""))
                    self._spawn(spec)
                    started.append(spec.name)
                    waiting[spec.name] = (spec, time.monotonic() + (spec.start_timeout_s or default_timeout))
            for name, (spec, deadline) in list(waiting.items()):
                if self.running(name) is None:
                    raise StackError(f"{name} exited during start; end of {self.log(name)}:\n{self.log_tail(name)}")
                if spec.is_healthy():
                    del waiting[name]
                    healthy.add(name)
                    say(f"{name} is healthy")
                elif time.monotonic() > deadline:
                    raise StackError(
                        f"{name} was not healthy after {spec.start_timeout_s or default_timeout:.0f} s "
                        f"({spec.health_url or 'health check'}); end of {self.log(name)}:\n{self.log_tail(name)}"
                    )
            if pending or waiting:
                time.sleep(0.25)

    def _spawn(self, spec: ServiceSpec) -> None:
        env = {k: v for k, v in os.environ.items() if k not in set(spec.unset_env)}
        env.update(spec.env)
        cwd = spec.cwd or self.data_dir
        cwd.mkdir(parents=True, exist_ok=True)
        log = self.log(spec.name)
        # The service writes into a pipe; the log pipe (a session of its own, so stopping the service
        # does not stop it before the last lines) appends to the file and rotates it at the size cap.
        read_end, write_end = os.pipe()
        try:
            os.set_inheritable(read_end, True)
            logger = subprocess.Popen(
                [sys.executable, str(_LOGPIPE), str(log), str(self.log_max_bytes), str(self.log_backups)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
            os.close(read_end)
            read_end = -1
            os.write(write_end, f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {spec.name}\n".encode())
            try:
                proc = subprocess.Popen(
                    list(spec.command),
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=write_end,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise StackError(f"cannot start {spec.name} ({spec.command[0]}): {exc.strerror or exc}") from None
        finally:
            if read_end >= 0:
                os.close(read_end)
            os.close(write_end)  # the service holds the only write end now: its exit ends the log pipe
        self._loggers.append(logger)
        _Record(
            name=spec.name,
            pid=proc.pid,
            start_time=process_start_time(proc.pid),
            ports=spec.ports,
            started_at=time.time(),
            stop_timeout_s=spec.stop_timeout_s or self.stop_timeout_s,
        ).write(self.pid_file(spec.name))

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
            signal_session(record.pid, signal.SIGKILL)
            _wait(lambda: not record.alive(), 5.0)
        # Children the service left behind (same session) get a grace period, then SIGTERM, then SIGKILL.
        if not _wait(lambda: not session_members(record.pid), _GROUP_EXIT_TIMEOUT_S):
            signal_session(record.pid, signal.SIGTERM)
            if not _wait(lambda: not session_members(record.pid), _GROUP_EXIT_TIMEOUT_S):
                signal_session(record.pid, signal.SIGKILL)
        self.pid_file(record.name).unlink(missing_ok=True)


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


def wait_ports_free(ports: Sequence[int], timeout_s: float) -> list[int]:
    """Wait until every port is free; the ports still busy after ``timeout_s``."""
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


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
