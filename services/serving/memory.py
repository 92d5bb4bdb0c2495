"""Giving memory back to the system after large request bodies.

A replica reads a large body as many chunks (Serve's ASGI receive proxy pulls the client's body
into the replica as it arrives) and drops them again. glibc's allocator keeps freed chunks inside
its heap, between live objects, and the buffers of a refused request may sit in a reference cycle
(the exception's traceback) until the next garbage collection, so the process's memory would stay
at its peak. :class:`MemoryReleaser` runs ``gc.collect()`` and ``malloc_trim(0)`` (which hands every
wholly free page of every arena back to the kernel) once, shortly after a request whose body passed
a size, and once more shortly after that, when Serve has dropped that request's buffers too.

What stays: the pages of Ray's shared object store that the body passed through are counted in the
replica's resident memory (``RssShmem``) for as long as the store maps them; they are the store's,
bounded by its size, and reused by the next request (``diki_process_anonymous_memory_bytes`` in
``/metrics`` is the replica's own memory).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from typing import Final

__all__ = ["TRIM_AFTER_BYTES", "MemoryReleaser", "release_free_memory"]

log = logging.getLogger("diki.serving")

# Bodies at least this large are followed by a trim (smaller ones leave little behind).
TRIM_AFTER_BYTES: Final = 4 * 1024 * 1024
_TRIM_DELAY_S: Final = 0.5


def _libc() -> ctypes.CDLL | None:
    try:
        name = ctypes.util.find_library("c") or "libc.so.6"
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def release_free_memory() -> bool:
    """``malloc_trim(0)``: return the allocator's free pages to the system. False where there is no glibc."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


class MemoryReleaser:
    """Trims the allocator once after large requests (coalesced: one trim per burst)."""

    def __init__(self, delay_s: float = _TRIM_DELAY_S) -> None:
        self.delay_s = delay_s
        self.trims = 0
        self.seconds = 0.0
        self._pending: asyncio.TimerHandle | None = None

    def after_request(self, body_bytes: int) -> None:
        """Call on the event loop when a request ends; schedules a trim when its body was large."""
        if body_bytes < TRIM_AFTER_BYTES or _LIBC is None:
            return
        if self._pending is not None and not self._pending.cancelled():
            self._pending.cancel()  # a burst of large requests: trim once, after the last
        self._pending = asyncio.get_running_loop().call_later(self.delay_s, self._trim, True)

    def _trim(self, again: bool = False) -> None:
        # Once soon, and once more a little later: Serve drops a request's receive buffers on its own time.
        self._pending = asyncio.get_running_loop().call_later(4 * self.delay_s, self._trim) if again else None
        start = time.perf_counter()
        gc.collect()  # buffers held in reference cycles (an exception's traceback, a request's state)
        release_free_memory()
        self.trims += 1
        self.seconds += time.perf_counter() - start
        log.debug("returned free memory to the system in %.1f ms", 1000 * (time.perf_counter() - start))
