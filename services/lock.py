"""The learning lock: at most one process learns at a time, across processes, machines and Prefect servers.

The lock is one file in object storage (``<artifacts>/pipeline/learning.lock``) holding who has it
and until when. Every change to it is an exact compare-and-swap (:meth:`Storage.create_exclusive`,
:meth:`Storage.replace_if`, :meth:`Storage.delete_if`): on S3 a conditional write that the server
decides (``If-None-Match: *`` to take a free lock, ``If-Match: <ETag>`` to renew, take over or
release), on a local root a check-and-write under ``flock``. Of two processes that race, exactly one
wins; there is no write-wait-read-back window.

A holder renews its lease every ``ttl_s / 4`` from a background thread. A lock is free when absent,
when its lease expired (its holder stopped renewing: a machine died), or at once when its holder
ran on this host and that process is gone (pid and start time checked with psutil, so a reused pid
does not keep a dead holder's lock alive).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Final

from services.processes import is_alive, process_start_time
from services.settings import Settings
from services.storage import Storage

__all__ = ["LOCK_FILE", "LearningLock", "LockHolder", "lock_path"]

log = logging.getLogger(__name__)

LOCK_FILE: Final = "learning.lock"


def lock_path(settings: Settings) -> str:
    """Where the lock lives, relative to the storage root."""
    return f"{settings.storage.artifacts_prefix}/pipeline/{LOCK_FILE}"


@dataclass
class LockHolder:
    """Who holds the learning lock, as written in the lock file."""

    owner: str
    host: str
    pid: int
    purpose: str
    acquired_at: float
    expires_at: float
    started_at: float | None = None  # the holder process's start time (tells a reused pid apart)

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.acquired_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"pid {self.pid} on {self.host} ({self.purpose}) since {since}"

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LockHolder:
        doc = json.loads(data)
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})


class LearningLock:
    """The right to learn, held by one process at a time (see the module docstring)."""

    def __init__(
        self, storage: Storage, settings: Settings, *, purpose: str = "learning", ttl_s: float = 120.0
    ) -> None:
        self.storage = storage
        self.rel = lock_path(settings)
        self.purpose = purpose
        self.ttl_s = ttl_s
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.lost = False
        self._token: str | None = None
        self._acquired_at = 0.0  # kept across renewals: the lock file says since when it is held
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # the token is shared with the renewal thread

    def __enter__(self) -> LearningLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._held and not self.lost

    def holder(self) -> LockHolder | None:
        """The current holder, or None when the lock is free (absent, expired, or its process is gone)."""
        current = self._read()
        return None if current is None or self._stale(current[0]) else current[0]

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> bool:
        """Take the lock, waiting up to ``wait_s`` seconds for its holder to finish. True when taken."""
        if self._held:
            return True
        deadline = time.monotonic() + wait_s
        while True:
            if self._try_once():
                self._held, self.lost = True, False
                self._stop.clear()
                self._thread = threading.Thread(target=self._renew_loop, name="diki-lock-renewal", daemon=True)
                self._thread.start()
                return True
            if time.monotonic() + poll_s > deadline:
                return False
            time.sleep(poll_s)

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._held = False
        with self._mutex:
            token, self._token = self._token, None
        if token is not None and not self.lost:
            self.storage.delete_if(self.rel, token)

    # -- internals --------------------------------------------------------------------------------

    def _record(self) -> LockHolder:
        now = time.time()
        return LockHolder(self.owner, self.host, os.getpid(), self.purpose, now, now + self.ttl_s, process_start_time())

    def _read(self) -> tuple[LockHolder, str] | None:
        found = self.storage.read_versioned(self.rel)
        if found is None:
            return None
        data, token = found
        try:
            return LockHolder.from_bytes(data), token
        except (ValueError, KeyError, TypeError):
            log.warning("learning lock %s is unreadable; treating it as expired", self.storage.uri(self.rel))
            return LockHolder("", "", 0, "unreadable", 0.0, 0.0), token

    def _stale(self, holder: LockHolder) -> bool:
        if holder.expires_at < time.time():
            return True
        return holder.host == self.host and holder.pid != os.getpid() and not is_alive(holder.pid, holder.started_at)

    def _try_once(self) -> bool:
        record = self._record()
        mine = record.to_bytes()
        token = self.storage.create_exclusive(self.rel, mine)
        if token is None:
            current = self._read()
            if current is None:  # released between our attempt and the read: try again at once
                token = self.storage.create_exclusive(self.rel, mine)
            elif self._stale(current[0]):
                log.warning("taking over the learning lock: its holder, %s, is gone", current[0].describe())
                token = self.storage.replace_if(self.rel, mine, current[1])
        if token is None:
            return False
        with self._mutex:
            self._token, self._acquired_at = token, record.acquired_at
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                with self._mutex:
                    if self._token is None:
                        return
                    record = self._record()
                    record.acquired_at = self._acquired_at
                    token = self.storage.replace_if(self.rel, record.to_bytes(), self._token)
                    if token is None:
                        self.lost = True
                        log.error("the learning lock %s was taken by another process", self.storage.uri(self.rel))
                        return
                    self._token = token
            except (OSError, ValueError) as exc:  # transient: try again at the next renewal
                log.warning("cannot renew the learning lock: %s", exc)
