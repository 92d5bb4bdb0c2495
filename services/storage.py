"""The one place that talks to object storage: a local folder or an S3 bucket, through ``pyarrow.fs``.

Everything is addressed by a relative path under the storage root (``incoming/cats/_SUCCESS``).
Paths from outside are validated here: no absolute paths, no ``..``, no empty or control-character
segments. ``filesystem`` and ``root`` are public so readers that take ``(path, filesystem)`` can
use them with :meth:`Storage.path`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from services.settings import Settings, split_s3_uri

__all__ = [
    "DATASET_NAME_RE",
    "Storage",
    "StorageError",
    "clean_path",
    "dataset_location",
    "normalise_dataset_uri",
    "open_storage",
    "validate_dataset_name",
]

DATASET_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
_COPY_CHUNK: Final = 8 * 1024 * 1024


class StorageError(OSError):
    """A storage operation failed; the message names the operation and the URI, never credentials."""


def validate_dataset_name(name: str) -> str:
    """Return ``name`` if it is a valid dataset name (``^[a-z0-9][a-z0-9_.-]{0,63}$``), else raise ValueError."""
    if not isinstance(name, str) or not DATASET_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"invalid dataset name {name!r}: use 1-64 characters of a-z 0-9 _ . - starting with a letter or digit"
        )
    return name


def clean_path(path: str) -> str:
    """Validate a path relative to the storage root and return it normalised (``a/b/c``, or ``""`` for the root).

    Raises:
        ValueError: for absolute paths, ``..`` or ``.`` segments, empty segments, backslashes or control characters.
    """
    if not isinstance(path, str):
        raise ValueError(f"storage path must be a string, not {type(path).__name__}")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"storage path {path!r} must be relative to the storage root, not absolute")
    stripped = path.rstrip("/")
    if stripped == "":
        return ""
    if "\\" in stripped or _CONTROL_RE.search(stripped):
        raise ValueError(f"storage path {path!r} contains a backslash or a control character")
    segments = stripped.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ValueError(f"storage path {path!r} has an empty, '.' or '..' segment")
        if len(segment) > 255:
            raise ValueError(f"storage path {path!r} has a segment longer than 255 characters")
    return "/".join(segments)


def _token(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


class Storage:
    """Files under one root on one ``pyarrow.fs`` filesystem.

    Attributes:
        filesystem: the pyarrow filesystem (``LocalFileSystem`` or ``S3FileSystem``).
        root: the root as a path on that filesystem (``/abs/.diki/storage`` or ``bucket/prefix``).
        is_local: True for a local folder.
    """

    def __init__(
        self,
        filesystem: pafs.FileSystem,
        root: str,
        *,
        is_local: bool,
        s3_client: Callable[[], Any] | None = None,
    ) -> None:
        self.filesystem = filesystem
        self.root = root.rstrip("/") if root != "/" else root
        self.is_local = is_local
        self._s3_client_factory = s3_client
        self._s3: Any = None

    def __repr__(self) -> str:
        return f"Storage({self.uri()!r})"

    # -- addressing -------------------------------------------------------------------------------

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (validated), for readers that take ``(path, filesystem)``."""
        return _join(self.root, clean_path(rel)) if self.root != "/" else "/" + clean_path(rel)

    def uri(self, rel: str = "") -> str:
        """A URI for messages and records: ``file:///abs/path`` or ``s3://bucket/key``."""
        full = self.path(rel)
        return f"file://{full}" if self.is_local else f"s3://{full}"

    def dataset_uri(self, rel: str) -> str:
        """How training, evaluation and the registry name a dataset at ``rel``: a local path or ``s3://`` URI.

        :func:`dataset_location` turns it back into a filesystem and a path.
        """
        return self.path(rel) if self.is_local else self.uri(rel)

    # -- queries ----------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        """Whether a file or folder exists at ``rel``."""
        with self._errors("check", rel):
            return self.filesystem.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        """Whether a file exists at ``rel``."""
        with self._errors("check", rel):
            return self.filesystem.get_file_info(self.path(rel)).type == pafs.FileType.File

    def list_dir(self, rel: str = "") -> list[str]:
        """Sorted names of the direct children of folder ``rel``; empty when it does not exist."""
        full = self.path(rel)
        with self._errors("list", rel):
            info = self.filesystem.get_file_info(full)
            if info.type == pafs.FileType.NotFound:
                return []
            if info.type != pafs.FileType.Directory:
                raise NotADirectoryError(f"{self.uri(rel)} is a file, not a folder")
            children = self.filesystem.get_file_info(pafs.FileSelector(full, allow_not_found=True))
        return sorted(child.base_name for child in children)

    def list_files(self, rel: str = "") -> list[str]:
        """Sorted paths, relative to ``rel``, of every file below folder ``rel``; empty when it does not exist."""
        full = self.path(rel)
        with self._errors("list", rel):
            infos = self.filesystem.get_file_info(pafs.FileSelector(full, recursive=True, allow_not_found=True))
        prefix = full.rstrip("/") + "/"
        return sorted(
            i.path[len(prefix) :] for i in infos if i.type == pafs.FileType.File and i.path.startswith(prefix)
        )

    def make_dir(self, rel: str) -> None:
        """Create folder ``rel`` and its parents on a local root (for writers that need them); S3 needs none."""
        rel = clean_path(rel)
        if self.is_local:
            with self._errors("create", rel):
                self.filesystem.create_dir(self.path(rel), recursive=True)

    # -- files ------------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes:
        """The contents of file ``rel``. Raises FileNotFoundError naming the URI when it is missing."""
        full = self.path(rel)
        with self._errors("read", rel):
            if self.filesystem.get_file_info(full).type != pafs.FileType.File:
                raise FileNotFoundError(f"no file at {self.uri(rel)}")
            with self.filesystem.open_input_stream(full) as stream:
                return stream.readall()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write file ``rel``. Readers never see a partial file: local writes go to a temp file then rename."""
        rel = clean_path(rel)
        if not rel:
            raise ValueError("cannot write to the storage root itself; give a file path")
        full = self.path(rel)
        with self._errors("write", rel):
            if not self.is_local:
                # An S3 PUT becomes visible only when complete.
                with self.filesystem.open_output_stream(full) as out:
                    out.write(data)
                return
            parent, _, name = full.rpartition("/")
            self.filesystem.create_dir(parent, recursive=True)
            tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
            try:
                with self.filesystem.open_output_stream(tmp) as out:
                    out.write(data)
                os.replace(tmp, full)
            except BaseException:
                with _suppress_missing():
                    os.unlink(tmp)
                raise

    # -- conditional writes (exact compare-and-swap, for the learning lock) ----------------------------
    #
    # Each returns or takes a version token naming one content of the file. On S3 the token is the
    # ETag and the condition travels with the request (``If-None-Match: *``, ``If-Match``), so the
    # server decides; the stack's SeaweedFS honours both. On a local root the check and the write
    # happen under an exclusive ``flock`` of a guard file beside the target.

    def create_exclusive(self, rel: str, data: bytes) -> str | None:
        """Create file ``rel`` with ``data`` unless it exists; the new version token, or None when it existed."""
        if self.is_local:
            with self._guard(rel) as full:
                if os.path.exists(full):
                    return None
                self._write_local(full, data)
                return _token(data)
        return self._s3_put(rel, data, IfNoneMatch="*")

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """The contents of ``rel`` and their version token, or None when there is no such file."""
        if self.is_local:
            try:
                data = Path(self.path(rel)).read_bytes()
            except FileNotFoundError:
                return None
            return data, _token(data)
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._bucket_key(rel)
        with self._errors("read", rel):
            try:
                answer = self._client().get_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise OSError(str(exc)) from exc
            except BotoCoreError as exc:  # connection errors: transient, as pyarrow's OSError
                raise OSError(str(exc)) from exc
            return answer["Body"].read(), answer["ETag"]

    def replace_if(self, rel: str, data: bytes, token: str) -> str | None:
        """Replace ``rel`` with ``data`` only if it still holds version ``token``; the new token, or None."""
        if self.is_local:
            with self._guard(rel) as full:
                try:
                    current = Path(full).read_bytes()
                except FileNotFoundError:
                    return None
                if _token(current) != token:
                    return None
                self._write_local(full, data)
                return _token(data)
        return self._s3_put(rel, data, IfMatch=token)

    def delete_if(self, rel: str, token: str) -> bool:
        """Delete ``rel`` only if it still holds version ``token``; True when deleted."""
        if self.is_local:
            with self._guard(rel) as full:
                try:
                    if _token(Path(full).read_bytes()) != token:
                        return False
                    os.unlink(full)
                except FileNotFoundError:
                    return False
                return True
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._bucket_key(rel)
        with self._errors("delete", rel):
            try:
                self._client().delete_object(Bucket=bucket, Key=key, IfMatch=token)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "NoSuchKey", "404"):
                    return False
                raise OSError(str(exc)) from exc
            except BotoCoreError as exc:
                raise OSError(str(exc)) from exc
            return True

    @contextmanager
    def _guard(self, rel: str) -> Iterator[str]:
        import fcntl

        full = self.path(rel)
        parent, _, name = full.rpartition("/")
        os.makedirs(parent, exist_ok=True)
        fd = os.open(f"{parent}/.{name}.guard", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield full
        finally:
            os.close(fd)  # closing releases the flock

    def _write_local(self, full: str, data: bytes) -> None:
        parent, _, name = full.rpartition("/")
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, full)

    def _bucket_key(self, rel: str) -> tuple[str, str]:
        bucket, _, key = self.path(rel).partition("/")
        return bucket, key

    def _client(self) -> Any:
        if self._s3 is None:
            if self._s3_client_factory is None:
                raise StorageError(f"{self.uri()}: no S3 client for conditional writes")
            self._s3 = self._s3_client_factory()
        return self._s3

    def _s3_put(self, rel: str, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._bucket_key(rel)
        with self._errors("write", rel):
            try:
                return self._client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                    return None
                raise OSError(str(exc)) from exc
            except BotoCoreError as exc:
                raise OSError(str(exc)) from exc

    def put_json(self, rel: str, obj: Any) -> None:
        """Write ``obj`` as indented UTF-8 JSON to ``rel`` (atomically, as :meth:`write_bytes`)."""
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))

    def get_json(self, rel: str) -> Any:
        """Parse the JSON file ``rel``. Raises ValueError naming the URI when it is not valid JSON."""
        raw = self.read_bytes(rel)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.uri(rel)} is not valid JSON: {exc}") from None

    # -- trees ------------------------------------------------------------------------------------

    def copy_tree(self, src_local_dir: str | Path, dst_prefix: str, marker: str = "_SUCCESS") -> int:
        """Upload a local folder to ``dst_prefix``: every file first, the marker file LAST.

        A marker already at the destination is removed before the copy, so a reader that waits for
        the marker never sees a half-copied tree. A file named ``marker`` in the source is not
        copied; the marker written holds ``{"files": n, "bytes": total}``.

        Returns:
            The number of data files copied (the marker not counted).
        """
        src = Path(src_local_dir)
        if not src.is_dir():
            raise FileNotFoundError(f"source folder {src} does not exist or is not a folder")
        dst_prefix = clean_path(dst_prefix)
        if not dst_prefix:
            raise ValueError("copy_tree needs a destination prefix below the storage root")
        marker = clean_path(marker)
        files = sorted(p for p in src.rglob("*") if p.is_file())
        rel_files = [clean_path(p.relative_to(src).as_posix()) for p in files]
        marker_rel = _join(dst_prefix, marker)
        self.delete_tree(marker_rel)
        total = 0
        for local, rel in zip(files, rel_files, strict=True):
            if rel == marker:
                continue
            dst = _join(dst_prefix, rel)
            with self._errors("upload", dst):
                if self.is_local:
                    self.filesystem.create_dir(self.path(dst).rpartition("/")[0], recursive=True)
                with local.open("rb") as source, self.filesystem.open_output_stream(self.path(dst)) as out:
                    while chunk := source.read(_COPY_CHUNK):
                        out.write(chunk)
            total += local.stat().st_size
        count = sum(1 for rel in rel_files if rel != marker)
        self.put_json(marker_rel, {"files": count, "bytes": total})
        return count

    def move_tree(self, src: str, dst: str, marker: str = "_SUCCESS") -> None:
        """Move the folder ``src`` to ``dst`` (which must not exist), e.g. ``incoming/x`` -> ``quarantine/x``.

        Local folders move by one rename. On S3 the objects are copied server-side, the marker last,
        then the source marker is deleted first, so neither side looks complete while half-moved.
        """
        src, dst = clean_path(src), clean_path(dst)
        if not src or not dst:
            raise ValueError("move_tree needs source and destination folders below the storage root")
        if dst == src or dst.startswith(src + "/"):
            raise ValueError(f"cannot move {self.uri(src)} into itself ({self.uri(dst)})")
        with self._errors("move", src):
            info = self.filesystem.get_file_info(self.path(src))
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"nothing to move at {self.uri(src)}")
            if self.exists(dst):
                raise FileExistsError(f"cannot move {self.uri(src)}: {self.uri(dst)} already exists")
            if self.is_local:
                self.filesystem.create_dir(self.path(dst).rpartition("/")[0], recursive=True)
                os.rename(self.path(src), self.path(dst))
                return
            if info.type == pafs.FileType.File:
                self.filesystem.move(self.path(src), self.path(dst))
                return
            files = self.list_files(src)
            for rel in sorted(files, key=lambda r: r == marker):
                self.filesystem.copy_file(self.path(_join(src, rel)), self.path(_join(dst, rel)))
            if marker in files:
                self.filesystem.delete_file(self.path(_join(src, marker)))
            self._delete_s3_dir(src, files)

    def delete_tree(self, rel: str) -> None:
        """Delete the file or folder ``rel`` and everything below it; nothing happens when it is missing."""
        rel = clean_path(rel)
        if not rel:
            raise ValueError("refusing to delete the storage root")
        full = self.path(rel)
        with self._errors("delete", rel):
            info = self.filesystem.get_file_info(full)
            if info.type == pafs.FileType.File:
                self.filesystem.delete_file(full)
            elif info.type == pafs.FileType.Directory:
                if self.is_local:
                    shutil.rmtree(full)
                else:
                    self._delete_s3_dir(rel, self.list_files(rel))

    def _delete_s3_dir(self, rel: str, files: list[str]) -> None:
        """Delete an S3 "folder" whose files (relative to it) are ``files``.

        Some S3 servers (SeaweedFS) keep empty directory entries after every object below them is
        deleted, so the folder would still appear in listings; those are removed bottom-up.
        """
        full = self.path(rel)
        self.filesystem.delete_dir(full)
        if self.filesystem.get_file_info(full).type == pafs.FileType.NotFound:
            return
        folders = {full}
        for file in files:
            parts = file.split("/")[:-1]
            folders.update(_join(full, *parts[: i + 1]) for i in range(len(parts)))
        for folder in sorted(folders, key=lambda f: f.count("/"), reverse=True):
            if self.filesystem.get_file_info(folder).type != pafs.FileType.Directory:
                continue
            if self.filesystem.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True)):
                continue
            self.filesystem.create_dir(folder, recursive=False)
            self.filesystem.delete_dir(folder)

    # -- helpers ----------------------------------------------------------------------------------

    @contextmanager
    def _errors(self, operation: str, rel: str) -> Iterator[None]:
        """Re-raise filesystem errors other than the expected ones as StorageError naming the URI."""
        try:
            yield
        except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError):
            raise
        except OSError as exc:
            raise StorageError(f"cannot {operation} {self.uri(rel)}: {exc}") from exc


@contextmanager
def _suppress_missing() -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        pass


# --- dataset locations: the one converter between URIs and (filesystem, path) -------------------


def normalise_dataset_uri(uri: str | Path) -> str:
    """A dataset location as records keep it: ``s3://`` and ``file://`` URIs as given, local paths made absolute."""
    text = str(uri)
    return text if "://" in text else str(Path(text).expanduser().absolute())


def dataset_location(settings: Settings, uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a dataset: ``s3://bucket/prefix``, ``file:///abs`` or a local path.

    S3 uses the endpoint and credentials of ``settings.s3`` (the ``AWS_*`` variables), never the URI.

    Raises:
        ValueError: an unsupported scheme or an invalid bucket or prefix.
    """
    text = str(uri)
    if text.startswith("s3://"):
        bucket, prefix = split_s3_uri(text)
        return _s3_filesystem(settings), _join(bucket, prefix).rstrip("/")
    if text.startswith("file://"):
        return pafs.LocalFileSystem(), str(Path(unquote(urlsplit(text).path)).absolute())
    if "://" in text:
        raise ValueError(f"dataset location {text!r}: only s3://, file:// and local paths are supported")
    return pafs.LocalFileSystem(), normalise_dataset_uri(text)


def open_storage(settings: Settings) -> Storage:
    """Open the storage named by ``settings.storage.root``: a local folder or ``s3://bucket/prefix``.

    Nothing is created or contacted here. For S3, credentials come from ``settings.s3`` as arguments
    (or the default AWS chain when unset), never from the URI.
    """
    root = settings.storage.root
    if root is None:  # pragma: no cover - Settings always fills it
        raise ValueError("storage.root is not set")
    if not root.startswith("s3://"):
        return Storage(pafs.LocalFileSystem(), root, is_local=True)
    bucket, prefix = split_s3_uri(root)
    return Storage(
        _s3_filesystem(settings), _join(bucket, prefix), is_local=False, s3_client=lambda: _s3_client(settings)
    )


def _s3_client(settings: Settings) -> Any:
    """A boto3 client for what pyarrow cannot send: conditional writes."""
    import boto3
    from botocore.config import Config

    s3 = settings.s3
    kwargs: dict[str, Any] = {
        "region_name": s3.region,
        "config": Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3}),
    }
    if s3.endpoint_url:
        kwargs["endpoint_url"] = s3.endpoint_url
    if s3.access_key_id is not None and s3.secret_access_key is not None:
        kwargs["aws_access_key_id"] = s3.access_key_id.get_secret_value()
        kwargs["aws_secret_access_key"] = s3.secret_access_key.get_secret_value()
        if s3.session_token is not None:
            kwargs["aws_session_token"] = s3.session_token.get_secret_value()
    return boto3.client("s3", **kwargs)


def _s3_filesystem(settings: Settings) -> pafs.S3FileSystem:
    s3 = settings.s3
    kwargs: dict[str, Any] = {"region": s3.region, "connect_timeout": 5.0, "request_timeout": 60.0}
    if s3.access_key_id is not None and s3.secret_access_key is not None:
        kwargs["access_key"] = s3.access_key_id.get_secret_value()
        kwargs["secret_key"] = s3.secret_access_key.get_secret_value()
        if s3.session_token is not None:
            kwargs["session_token"] = s3.session_token.get_secret_value()
    if s3.endpoint_url:
        parts = urlsplit(s3.endpoint_url)
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme
    return pafs.S3FileSystem(**kwargs)
