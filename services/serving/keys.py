"""The keys of the serving endpoint: the optional API key of the classify routes and the admin key.

The admin routes (``POST /v1/admin/reload``) are never open by default. Their key is, in order:

1. ``serve.admin_key`` (``DIKI_SERVE__ADMIN_KEY``, e.g. from a Kubernetes Secret);
2. else the key file ``serve.admin_key_file`` (default ``<home>/serve/admin.key``), which
   :func:`ensure_admin_key` creates once with owner-only permissions (0600, folder 0700) when the
   app is built (``diki serve``, so also the local stack's ``serve`` service);
3. ``serve.admin_open: true`` (development only) opens them without a key.

Every process of the same user with the same settings (the CLI, the watcher's learning runs) finds
the key with :func:`read_admin_key`; :func:`serving_keys` gives both keys for
:class:`~services.serving.client.ServingClient`.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from services.settings import Settings

__all__ = [
    "ADMIN_KEY_HEADER",
    "ServingKeys",
    "admin_key_path",
    "ensure_admin_key",
    "read_admin_key",
    "serving_keys",
]

log = logging.getLogger("diki.serving")

ADMIN_KEY_HEADER: Final = "X-Admin-Key"


@dataclass(frozen=True)
class ServingKeys:
    """The keys a client sends: ``api_key`` on every call (when the server has one), ``admin_key`` on admin calls."""

    api_key: str | None = None
    admin_key: str | None = None

    def __repr__(self) -> str:  # never print a key
        return f"ServingKeys(api_key={'***' if self.api_key else None}, admin_key={'***' if self.admin_key else None})"


def admin_key_path(settings: Settings) -> Path:
    """Where the generated admin key is kept: ``serve.admin_key_file``, else ``<home>/serve/admin.key``."""
    return settings.serve.admin_key_file or settings.home / "serve" / "admin.key"


def _read(path: Path) -> str | None:
    try:
        info = path.stat()
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and info.st_uid == os.getuid():
            os.chmod(path, 0o600)  # a key others could read is no key: make it owner-only again
        value = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return value or None


def read_admin_key(settings: Settings) -> str | None:
    """The admin key as a client finds it: the setting, else the key file (None when neither exists)."""
    key = settings.serve.admin_key
    if key is not None and key.get_secret_value():
        return key.get_secret_value()
    return _read(admin_key_path(settings))


def ensure_admin_key(settings: Settings) -> str | None:
    """The admin key of the server: the setting, else the key file, created (0600) when missing.

    Two processes that start at once end up with the same key (the file is created exclusively).
    Returns None when no key is set and the file cannot be written (e.g. a read-only home): the
    admin routes then stay closed unless a replica finds ``serve.admin_key`` in its own environment.
    """
    existing = read_admin_key(settings)
    if existing is not None:
        return existing
    path = admin_key_path(settings)
    key = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    except OSError as exc:
        log.warning("cannot create the admin key file %s (%s); the admin routes stay closed", path, exc.strerror)
        return None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    return key


def serving_keys(settings: Settings) -> ServingKeys:
    """Both keys for a client of the endpoint these settings describe (``ServingClient(url, serving_keys(s))``)."""
    api = settings.serve.api_key
    return ServingKeys(
        api_key=api.get_secret_value() or None if api is not None else None,
        admin_key=read_admin_key(settings),
    )
