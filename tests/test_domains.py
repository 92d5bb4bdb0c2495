"""The offline domains: registry, deterministic builds, the vocabulary design, and `diki data`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diki_model.data import read_manifest, validate_dataset
from diki_model.data.format import NAME_PATTERN
from diki_model.datasets import (
    DEFAULT_STREAM,
    DOMAINS,
    STREAM_ORDERS,
    MissingSourceError,
    build_all,
    build_domain,
    domains_with_role,
    generate_split,
    get_domain,
)
from diki_model.datasets import procedural as P
from diki_model.datasets import sources as S
from diki_model.datasets.domains import FMNIST_SLICES

REPO = Path(__file__).resolve().parents[1]


def test_registry_roles_and_orders():
    assert set(domains_with_role("pretrain")) == {"mnist", "fashion-mnist", "shapes"}
    stream = domains_with_role("stream")
    assert len(stream) >= 6
    assert len(domains_with_role("heldout")) >= 3
    for order in STREAM_ORDERS.values():
        assert sorted(order) == sorted(stream)
    assert STREAM_ORDERS["order-1"] != STREAM_ORDERS["order-2"]
    assert DEFAULT_STREAM in STREAM_ORDERS.values()
    for name, spec in DOMAINS.items():
        assert NAME_PATTERN.match(name) and spec.manifest().num_classes == spec.num_classes
    with pytest.raises(KeyError, match="unknown domain 'nope'"):
        get_domain("nope")


def test_stream_tasks_differ_from_pretraining_in_classes_or_template():
    pretrain = [get_domain(n) for n in domains_with_role("pretrain")]
    for name in domains_with_role("stream"):
        spec = get_domain(name)
        for p in pretrain:
            assert (spec.classes, spec.template) != (p.classes, p.template), name


def test_held_out_domains_reuse_pretraining_words_in_new_combinations():
    vocabulary = set()
    for name in domains_with_role("pretrain"):
        for cls in get_domain(name).classes:
            vocabulary.update(cls.split())
    for name in domains_with_role("heldout"):
        for cls in get_domain(name).classes:
            assert set(cls.split()) <= vocabulary, (name, cls)
    # the shape/colour pairs behind the shape held-out domains never occur in pre-training
    pretrain_pairs = {(c.split()[3], c.split()[1]) for c in get_domain("shapes").classes}
    held_out = {(s, c) for s in P.SHAPES for c in P.COLOURS if P.is_held_out_pair(s, c)}
    assert held_out and not held_out & pretrain_pairs
    assert len(pretrain_pairs | held_out) == len(P.SHAPES) * len(P.COLOURS)
    for colour in P.COLOURS:  # every colour word still appears in pre-training
        assert any(c == colour for _, c in pretrain_pairs)


def test_fashion_mnist_slices_do_not_overlap():
    for split in ("train", "test"):
        ranges = sorted(s[split] for s in FMNIST_SLICES.values())
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@pytest.mark.parametrize("name", list(DOMAINS))
def test_each_domain_generates_deterministically(name):
    spec = get_domain(name)
    n = 12
    images, labels = generate_split(name, "test", seed=0, size=n)
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < spec.num_classes
    again_images, again_labels = generate_split(name, "test", seed=0, size=n)
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    other_images, _ = generate_split(name, "test", seed=1, size=n)
    assert not np.array_equal(images, other_images)
    assert images.std() > 5  # not blank


def test_procedural_labels_are_balanced():
    _, labels = generate_split("outline-shapes", "train", seed=3, size=60)
    assert np.bincount(labels).tolist() == [10] * 6


def test_build_all_writes_valid_datasets(tmp_path):
    names = list(DOMAINS)
    paths = {name: build_domain(name, tmp_path, seed=0, train_size=2 * get_domain(name).num_classes, test_size=6)
             for name in names}  # fmt: skip
    for name, path in paths.items():
        spec = get_domain(name)
        manifest = read_manifest(path)
        assert (manifest.name, manifest.classes, manifest.template) == (name, list(spec.classes), spec.template)
        report = validate_dataset(path)
        assert report.ok, report.to_markdown()
        assert (report.num_train, report.num_test) == (2 * spec.num_classes, 6)
    again = build_all(tmp_path / "again", seed=0, names=["faces"])
    assert Path(again["faces"]).name == "faces"


def test_missing_debian_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "FASHION_MNIST_DIR", tmp_path / "absent")
    S.fashion_mnist.cache_clear()
    try:
        with pytest.raises(MissingSourceError, match=re.escape("apt-get install -y dataset-fashion-mnist")):
            generate_split("fashion-mnist", "train", size=2)
    finally:
        S.fashion_mnist.cache_clear()
    monkeypatch.setattr(P, "FONT_DIR", tmp_path)
    with pytest.raises(MissingSourceError, match=re.escape("apt-get install -y fonts-dejavu-core")):
        generate_split("glyph-letters", "train", size=2)


def test_apt_packages_file_lists_what_the_builders_need():
    packages = (REPO / "infra" / "apt-packages.txt").read_text().split()
    assert {"dataset-fashion-mnist", "fonts-dejavu-core"} <= set(packages)


def test_cli_list_build_and_validate(tmp_path):
    from pipelines.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["data", "list"])
    assert listed.exit_code == 0, listed.output
    for name in DOMAINS:
        assert name in listed.output
    built = runner.invoke(app, ["data", "build", "faces", "textures", "--out", str(tmp_path), "--seed", "1"])
    assert built.exit_code == 0, built.output
    assert read_manifest(tmp_path / "faces").classes == ["face", "background"]
    checked = runner.invoke(app, ["data", "validate", str(tmp_path / "textures")])
    assert checked.exit_code == 0 and "valid" in checked.output
    bad = runner.invoke(app, ["data", "build", "nope", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "unknown domain(s) nope" in bad.output
    (tmp_path / "faces" / "manifest.json").write_text("{}")
    invalid = runner.invoke(app, ["data", "validate", str(tmp_path / "faces")])
    assert invalid.exit_code == 1 and "| manifest.json |" in invalid.output
