"""A service's log with a size cap: read its output from stdin, append it to a file, rotate the file.

``python logpipe.py LOG MAX_BYTES BACKUPS`` (run by :class:`~services.stack.supervisor.Supervisor`,
one per service, the service's stdout and stderr piped into it). When ``LOG`` would pass
``MAX_BYTES`` it is renamed ``LOG.1`` (``LOG.1`` to ``LOG.2``, ... up to ``BACKUPS`` files; the
oldest is dropped) and a new ``LOG`` is started. It ends when every writer has closed the pipe
(the service and its children are gone), ignores SIGINT, SIGTERM and SIGHUP so that stopping a
service never loses its last lines, and drops output rather than fail (a full disk must not kill the
service with a broken pipe). Standard library only: it runs as a plain script, outside the package.
"""

from __future__ import annotations

import os
import signal
import sys

CHUNK = 65536


class RotatingLog:
    """Append-only file that is rotated before it passes ``max_bytes``."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max(1, max_bytes), max(0, backups)
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        os.close(self._fd)
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{i}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def write(self, data: bytes) -> None:
        """Append ``data``; the file never passes ``max_bytes`` (a rotation starts a new one first)."""
        for i in range(0, len(data), self.max_bytes):
            part = data[i : i + self.max_bytes]
            if self._size and self._size + len(part) > self.max_bytes:
                self._rotate()
            os.write(self._fd, part)
            self._size += len(part)

    def close(self) -> None:
        os.close(self._fd)


def main(argv: list[str]) -> int:
    path, max_bytes, backups = argv[0], int(argv[1]), int(argv[2])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    log = RotatingLog(path, max_bytes, backups)
    stdin = sys.stdin.fileno()
    while True:
        try:
            data = os.read(stdin, CHUNK)
        except InterruptedError:
            continue
        except OSError:
            break
        if not data:
            break
        try:
            log.write(data)
        except OSError:
            pass  # disk full or the folder gone: drop the output, keep the service's pipe open
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
