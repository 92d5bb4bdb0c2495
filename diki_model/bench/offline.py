"""The offline benchmark stream: domains built by ``diki data build`` (built here when missing)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils.data import TensorDataset

from diki_model.bench.stream import TaskData
from diki_model.data import load_split_tensors, read_manifest
from diki_model.datasets import DOMAINS, STREAM_ORDERS, build_domain, domains_with_role


def _split_loader(path: str, split: str) -> Callable[[Callable], TensorDataset]:
    def load(preprocess: Callable) -> TensorDataset:
        return TensorDataset(*load_split_tensors(path, split, preprocess))

    return load


def domain_task(data_dir: Path, name: str, seed: int = 0, build_missing: bool = True) -> TaskData:
    path = data_dir / name
    if not (path / "manifest.json").exists():
        if not build_missing:
            raise FileNotFoundError(f"{path}: domain not built; run `diki data build {name} --out {data_dir}`")
        build_domain(name, data_dir, seed)
    manifest = read_manifest(str(path))
    role = DOMAINS[name].role
    return TaskData(
        name=name,
        classes=list(manifest.classes),
        template=manifest.template,
        role=role,
        train=_split_loader(str(path), "train"),
        test=_split_loader(str(path), "test"),
    )


def offline_stream(
    data_dir: str | Path,
    order: str | Sequence[str] = "order-1",
    extra_roles: Sequence[str] = ("heldout", "pretrain"),
    seed: int = 0,
    build_missing: bool = True,
) -> tuple[list[TaskData], list[TaskData]]:
    """(stream tasks in order, extra evaluation sets: held-out then pre-training domains)."""
    data_dir = Path(data_dir)
    if isinstance(order, str):
        if order not in STREAM_ORDERS:
            raise ValueError(f"unknown stream order {order!r}; choose one of {sorted(STREAM_ORDERS)}")
        names = list(STREAM_ORDERS[order])
    else:
        names = list(order)
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; see `diki data list`")
    stream = [domain_task(data_dir, n, seed, build_missing) for n in names]
    extras = [domain_task(data_dir, n, seed, build_missing) for role in extra_roles for n in domains_with_role(role)]
    return stream, extras
