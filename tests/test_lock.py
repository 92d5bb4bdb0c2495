"""The learning lock on a local storage root: exact acquisition, renewal, release, takeover of a dead holder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from services.lock import LearningLock, LockHolder, lock_path
from services.settings import Settings
from services.storage import open_storage


def local(tmp_path: Path):
    settings = Settings.load(home=str(tmp_path / "home"), storage={"root": str(tmp_path / "storage")})
    return open_storage(settings), settings


def test_one_holder_at_a_time_renewal_keeps_the_start_and_release_frees_it(tmp_path):
    storage, settings = local(tmp_path)
    first = LearningLock(storage, settings, purpose="learning a", ttl_s=0.4)
    second = LearningLock(storage, settings, purpose="learning b", ttl_s=0.4)
    assert first.acquire() and first.held
    assert not second.acquire()  # even in the same process
    held = second.holder()
    assert held is not None and held.purpose == "learning a" and held.pid == os.getpid()
    time.sleep(0.5)  # past the lease: the renewal thread has extended it
    renewed = second.holder()
    assert renewed is not None and renewed.expires_at > held.expires_at
    assert renewed.acquired_at == held.acquired_at
    assert not second.acquire()
    first.release()
    assert not storage.exists(lock_path(settings)) and second.holder() is None
    assert second.acquire()
    second.release()


def test_a_lock_whose_holder_died_is_taken_over_at_once(tmp_path):
    storage, settings = local(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = LockHolder("someone", LearningLock(storage, settings).host, int(dead.stdout), "learning x",
                       time.time(), time.time() + 3600)  # fmt: skip
    assert storage.create_exclusive(lock_path(settings), stale.to_bytes()) is not None
    lock = LearningLock(storage, settings)
    assert lock.holder() is None  # its process is gone
    assert lock.acquire()
    assert lock.holder() is not None and lock.holder().owner == lock.owner
    lock.release()


def test_compare_and_swap_writes_refuse_a_stale_token(tmp_path):
    storage, _ = local(tmp_path)
    token = storage.create_exclusive("a/x.lock", b"one")
    assert token is not None and storage.create_exclusive("a/x.lock", b"two") is None
    newer = storage.replace_if("a/x.lock", b"three", token)
    assert newer is not None and storage.replace_if("a/x.lock", b"four", token) is None
    assert storage.read_versioned("a/x.lock") == (b"three", newer)
    assert not storage.delete_if("a/x.lock", token) and storage.delete_if("a/x.lock", newer)
    assert storage.read_versioned("a/x.lock") is None
