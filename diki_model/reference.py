"""The reference density: what the backbone's usual images look like, for the likelihood-ratio gate.

A task Gaussian alone says how typical an image is *for that task*, not whether the image is more
typical of the task than of everything else the model serves. Images of a domain the model already
handles well (the pre-training domains, or production traffic to keep undisturbed) can score high
under a broad task Gaussian and then take that task's branch. The reference density p_ref is a
small mixture of Gaussians of the frozen features of such images; the likelihood-ratio gate uses
``S_k(f) - log p_ref(f)`` instead of ``S_k(f)``. Routing is unchanged (the reference term is the same
for every task), and serving pays one more batched Gaussian score per component.

The statistics are mergeable (one ``GaussianAccumulator`` per component), so shards and workers fit
separately. On disk a reference is ``reference.safetensors`` (the accumulators) and
``reference.json`` (backbone fingerprint, components, provenance); loading refuses a reference fitted
on another backbone.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diki_model.backbone import BackboneInfo, shipped_checkpoint
from diki_model.data import decode_image, iter_records, list_shards, read_manifest
from diki_model.data.format import resolve
from diki_model.files import ArtifactError, atomic_dir
from diki_model.stats import GaussianAccumulator, GaussianScorer
from diki_model.version import __version__

REFERENCE_TENSORS = "reference.safetensors"
REFERENCE_META = "reference.json"
REFERENCE_VERSION = 1
SHIPPED_REFERENCE_DIR = "reference"  # next to a shipped checkpoint: its default reference
_STATE_KEYS = ("count", "sum", "outer", "sum_sqnorm2", "sum_sqnorm_y")


@dataclass
class ReferenceDensity:
    """A mixture of Gaussians of frozen image features, one component per named group of images."""

    backbone: dict[str, Any]  # BackboneInfo.to_dict() of the backbone the features came from
    components: dict[str, GaussianAccumulator] = field(default_factory=dict)
    shrinkage: str = "ledoit_wolf"
    source: dict[str, Any] = field(default_factory=dict)  # where the images came from (free-form)
    _scorer: GaussianScorer | None = field(default=None, repr=False, compare=False)
    _log_weights: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, backbone: BackboneInfo | dict[str, Any], **kwargs: Any) -> ReferenceDensity:
        info = backbone.to_dict() if isinstance(backbone, BackboneInfo) else dict(backbone)
        return cls(backbone=info, **kwargs)

    @property
    def fingerprint(self) -> str:
        return str(self.backbone.get("fingerprint", ""))

    @property
    def dim(self) -> int:
        return int(self.backbone.get("embed_dim") or next(iter(self.components.values())).dim)

    @property
    def count(self) -> int:
        return sum(acc.count for acc in self.components.values())

    def update(self, features: torch.Tensor, groups: Sequence[str] | str) -> ReferenceDensity:
        """Add frozen features (N, d); ``groups`` names each row's component (or one name for all)."""
        names = [groups] * features.shape[0] if isinstance(groups, str) else list(groups)
        if len(names) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {len(names)} group names")
        for name in sorted(set(names)):
            rows = torch.tensor([i for i, g in enumerate(names) if g == name])
            acc = self.components.get(name)
            if acc is None:
                acc = self.components[name] = GaussianAccumulator(features.shape[1])
            acc.update(features[rows])
        self._scorer = None
        return self

    def merge(self, other: ReferenceDensity) -> ReferenceDensity:
        """Add another reference's statistics (same backbone) into this one, component by component."""
        if other.fingerprint != self.fingerprint:
            raise ValueError("cannot merge references fitted on different backbones")
        for name, acc in other.components.items():
            if name in self.components:
                self.components[name].merge(acc)
            else:
                self.components[name] = GaussianAccumulator.from_state_dict(acc.state_dict())
        self._scorer = None
        return self

    def _ready(self) -> tuple[GaussianScorer, torch.Tensor]:
        if self._scorer is None:
            usable = {n: a for n, a in self.components.items() if a.count >= 2}
            if not usable:
                raise ValueError("the reference density has no component with at least 2 images")
            counts = torch.tensor([a.count for a in usable.values()], dtype=torch.float64)
            self._log_weights = torch.log(counts / counts.sum())
            self._scorer = GaussianScorer([a.finalize(self.shrinkage) for a in usable.values()])
        assert self._log_weights is not None
        return self._scorer, self._log_weights

    @torch.no_grad()
    def log_prob(self, features: torch.Tensor) -> torch.Tensor:
        """log p_ref(f) of (N, d) features, float64 on the CPU: log-sum-exp over weighted components."""
        scorer, log_w = self._ready()
        scores = scorer.score(features).cpu()  # (N, K)
        return torch.logsumexp(scores + log_w[None, :], dim=1)

    def to(self, device: torch.device | str) -> ReferenceDensity:
        """Score on ``device`` from now on (the statistics themselves stay on the CPU)."""
        scorer, _ = self._ready()
        if scorer.w.device != torch.device(device):
            usable = [a for a in self.components.values() if a.count >= 2]
            self._scorer = GaussianScorer([a.finalize(self.shrinkage) for a in usable], device=device)
        return self

    def summary(self) -> dict[str, Any]:
        return {
            "components": {n: a.count for n, a in sorted(self.components.items())},
            "images": self.count,
            "backbone_fingerprint": self.fingerprint,
            "shrinkage": self.shrinkage,
            "source": self.source,
        }


def fit_reference(
    backbone: BackboneInfo,
    batches: Iterable[tuple[torch.Tensor, Sequence[str] | str]],
    shrinkage: str = "ledoit_wolf",
    source: dict[str, Any] | None = None,
) -> ReferenceDensity:
    """A reference from batches of (frozen features, group names)."""
    ref = ReferenceDensity.empty(backbone, shrinkage=shrinkage, source=dict(source or {}))
    for feats, groups in batches:
        ref.update(feats, groups)
    return ref


@torch.no_grad()
def fit_reference_from_datasets(
    model: Any,
    datasets: Sequence[tuple[str, str | Path]],
    splits: Sequence[str] = ("train",),
    limit: int | None = None,
    group_by: str = "dataset",
    filesystem: Any = None,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> ReferenceDensity:
    """Fit a reference on datasets in the project's format, with ``model``'s frozen image tower.

    ``datasets`` is ``[(name, path), ...]``. ``group_by="dataset"`` gives one component per dataset,
    ``"class"`` one per class of each dataset (``<name>/<class>``): for a single ``reference/``
    dataset whose classes name the kinds of traffic it holds. ``limit`` caps the images per dataset.
    ``progress`` is called with the number of images scored after each batch.
    """
    if group_by not in ("dataset", "class"):
        raise ValueError(f"group_by must be 'dataset' or 'class', got {group_by!r}")
    ref = ReferenceDensity.empty(
        model.backbone_info,
        shrinkage=model.config.shrinkage,
        source={"datasets": {n: str(p) for n, p in datasets}, "splits": list(splits), "limit": limit},
    )
    for name, path in datasets:
        fs, root = resolve(path, filesystem)
        classes = read_manifest(root, fs).classes
        taken = 0
        for split in splits:
            if split != "train" and not list_shards(root, split, fs):
                continue
            for images, labels in iter_records(root, split, fs, batch_rows=batch_size):
                if limit is not None:
                    images, labels = images[: limit - taken], labels[: limit - taken]
                if not images:
                    break
                x = torch.stack([model.preprocess(decode_image(b)) for b in images]).to(model.device)
                feats = model.encode_image(x).cpu()
                groups = name if group_by == "dataset" else [f"{name}/{classes[int(y)]}" for y in labels]
                ref.update(feats, groups)
                taken += len(images)
                if progress is not None:
                    progress(len(images))
                if limit is not None and taken >= limit:
                    break
    if not ref.components:
        raise ValueError("no images to fit a reference density on")
    return ref


def save_reference(ref: ReferenceDensity, directory: str | Path) -> Path:
    """Write the reference atomically: a complete folder or nothing."""
    if not ref.components:
        raise ArtifactError("cannot save an empty reference density")
    tensors: dict[str, torch.Tensor] = {}
    names = sorted(ref.components)
    for i, name in enumerate(names):
        for key, value in ref.components[name].state_dict().items():
            tensors[f"component.{i}.{key}"] = value.contiguous()
    meta = {
        "format": "diki-reference",
        "format_version": REFERENCE_VERSION,
        "backbone": ref.backbone,
        "components": names,
        "counts": [ref.components[n].count for n in names],
        "shrinkage": ref.shrinkage,
        "source": ref.source,
        "library_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / REFERENCE_TENSORS), metadata={"format": "diki-reference"})
        (tmp / REFERENCE_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Path(directory)


def read_reference_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / REFERENCE_META
    if not path.exists():
        raise ArtifactError(f"{path}: missing reference metadata")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from err
    for key in ("backbone", "components", "shrinkage"):
        if key not in meta:
            raise ArtifactError(f"{path}: missing field {key!r}")
    return meta


def load_reference(directory: str | Path, backbone: BackboneInfo | None = None) -> ReferenceDensity:
    """Read a reference; with ``backbone``, refuse one fitted on a different backbone."""
    directory = Path(directory)
    meta = read_reference_metadata(directory)
    fp = str(meta["backbone"].get("fingerprint", ""))
    if backbone is not None and fp != backbone.fingerprint:
        raise ArtifactError(
            f"{directory}: reference density was fitted on backbone {meta['backbone'].get('name')!r} "
            f"(fingerprint {fp[:12]}), but the model's backbone is {backbone.name!r} "
            f"(fingerprint {backbone.fingerprint[:12]})"
        )
    path = directory / REFERENCE_TENSORS
    if not path.exists():
        raise ArtifactError(f"{path}: missing reference statistics")
    tensors = load_file(str(path))
    ref = ReferenceDensity(backbone=meta["backbone"], shrinkage=meta["shrinkage"], source=meta.get("source", {}))
    for i, name in enumerate(meta["components"]):
        try:
            state = {key: tensors[f"component.{i}.{key}"] for key in _STATE_KEYS}
        except KeyError as err:
            raise ArtifactError(f"{path}: component {name!r} is missing tensor {err}") from err
        ref.components[str(name)] = GaussianAccumulator.from_state_dict(state)
    dims = {a.dim for a in ref.components.values()}
    if len(dims) != 1 or (backbone is not None and dims != {backbone.embed_dim}):
        raise ArtifactError(f"{path}: component dims {sorted(dims)} do not match the backbone's features")
    if not math.isfinite(float(sum(a.sum.sum() for a in ref.components.values()))):
        raise ArtifactError(f"{path}: reference statistics are not finite")
    return ref


def shipped_reference(backbone: BackboneInfo) -> ReferenceDensity | None:
    """The reference shipped with a checkpoint of ``diki_model/checkpoints/`` (None if there is none,
    or if the loaded weights are not the shipped ones)."""
    folder = shipped_checkpoint(backbone.name)
    if folder is None or not (folder / SHIPPED_REFERENCE_DIR / REFERENCE_META).exists():
        return None
    meta = read_reference_metadata(folder / SHIPPED_REFERENCE_DIR)
    if meta["backbone"].get("fingerprint") != backbone.fingerprint:
        return None
    return load_reference(folder / SHIPPED_REFERENCE_DIR, backbone)
