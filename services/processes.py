"""Process checks for the local stack and the learning lock, through psutil.

A pid alone does not name a process: the kernel reuses pids. Where a pid is recorded for later (a
stack service's pid file, the holder of the learning lock), its start time is recorded beside it,
and a process counts as the same one only when both match.
"""

from __future__ import annotations

import contextlib
import os
import signal

import psutil

__all__ = ["is_alive", "process_start_time", "reap", "session_members", "signal_session"]


def process_start_time(pid: int | None = None) -> float | None:
    """When the process ``pid`` (default: this one) started, in unix seconds; None when there is none."""
    try:
        return psutil.Process(pid if pid is not None else os.getpid()).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def is_alive(pid: int, start_time: float | None = None) -> bool:
    """True while ``pid`` runs (a zombie does not count); with ``start_time``, only if it is that same process."""
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        # create_time is rounded differently on each read of /proc; a reused pid starts much later.
        return start_time is None or abs(proc.create_time() - start_time) < 1.0
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, ValueError):
        return True


def reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def session_members(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (each stack service runs in a session of its own)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                continue
            if os.getsid(proc.pid) == sid:
                members.append(proc.pid)
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            continue
    return members


def signal_session(sid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to every live process of session ``sid``."""
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    reap(sid)
