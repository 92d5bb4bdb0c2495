"""Files every artifact writer shares: the artifact error and the atomic folder write."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class ArtifactError(ValueError):
    """A task artifact is missing, malformed, or does not fit the model it is loaded into."""


@contextlib.contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it replaces ``directory`` only if the block succeeds."""
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
