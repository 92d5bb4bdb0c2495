"""The reference density the likelihood-ratio gate compares against, from ``<root>/reference/`` in storage.

A user drops there a dataset in the project's format (any labels; each class becomes one component
of the mixture) holding images of the traffic the model must not disturb. Before each training job
the learning step asks for the current reference: the dataset's listing (names, sizes, modification
times) gives a signature, and a reference fitted on that signature with the configured backbone is
kept under ``<artifacts>/references/<backbone fp12>-<signature12>/`` (safetensors + JSON), so it is
fitted once when the dataset appears or changes and reused after that. Without a ``reference/``
dataset there is nothing to fit, and a bundle keeps its reference (a shipped backbone's own one, or
none).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from diki_model import DikiCLIP, ReferenceDensity, fit_reference_from_datasets, load_reference, save_reference
from diki_model.data import validate_dataset
from services.backbone import create_model
from services.settings import Settings
from services.storage import Storage

__all__ = ["ReferenceDatasetError", "current_reference", "reference_signature"]

log = logging.getLogger(__name__)
REFERENCE_FILES = ("reference.json", "reference.safetensors")


class ReferenceDatasetError(ValueError):
    """The ``reference/`` dataset cannot be used; the message says what and where."""


def reference_signature(storage: Storage, prefix: str) -> str | None:
    """A hash of the dataset's listing under ``prefix`` (None when there is no dataset there)."""
    if not storage.is_file(f"{prefix}/manifest.json"):
        return None
    full = storage.path(prefix)
    infos = storage.filesystem.get_file_info(pafs.FileSelector(full, recursive=True, allow_not_found=True))
    digest = hashlib.sha256()
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        digest.update(f"{info.path[len(full) :]}\0{info.size}\0{mtime}\n".encode())
    return digest.hexdigest()


def _artifact_prefix(settings: Settings, fingerprint: str, signature: str) -> str:
    return f"{settings.storage.artifacts_prefix}/references/{fingerprint[:12]}-{signature[:12]}"


def current_reference(settings: Settings, storage: Storage, model: DikiCLIP | None = None) -> ReferenceDensity | None:
    """The reference fitted on the ``reference/`` dataset as it is now (fitting it if it is new), or None.

    ``model`` (the configured backbone, no tasks needed) is built when a fit is needed and not given.

    Raises:
        ReferenceDatasetError: the dataset is not valid; nothing is fitted or kept.
    """
    prefix = settings.storage.reference_prefix
    signature = reference_signature(storage, prefix)
    if signature is None:
        return None
    model = model or create_model(settings)
    info = model.backbone_info
    dest = _artifact_prefix(settings, info.fingerprint, signature)
    marker = settings.storage.success_marker
    with tempfile.TemporaryDirectory(prefix="diki-reference-") as tmp:
        local = Path(tmp) / "reference"
        if storage.is_file(f"{dest}/{marker}"):
            local.mkdir()
            for name in REFERENCE_FILES:
                (local / name).write_bytes(storage.read_bytes(f"{dest}/{name}"))
            return load_reference(local, info)
        uri = storage.dataset_uri(prefix)
        report = validate_dataset(storage.path(prefix), storage.filesystem, min_images_per_class=2)
        if not report.ok:
            problems = "; ".join(str(e) for e in report.errors[:5])
            raise ReferenceDatasetError(f"reference dataset {uri} is not valid: {problems}")
        log.info("fitting the reference density on %s (%d images)", uri, report.num_train + report.num_test)
        ref = fit_reference_from_datasets(model, [(prefix, storage.path(prefix))], splits=("train", "test"),
                                          group_by="class", filesystem=storage.filesystem)  # fmt: skip
        ref.source = {"dataset": uri, "fingerprint": report.fingerprint, "signature": signature}
        save_reference(ref, local)
        storage.copy_tree(local, dest, marker=marker)
        log.info("reference density kept at %s: %s", storage.uri(dest), ref.summary()["components"])
        return ref
