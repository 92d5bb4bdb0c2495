"""Contrastive pre-training: the loss, the captions, a smoke run, and the shipped backbone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from diki_model.datasets import build_domain, generate_split, get_domain
from diki_model.pretrain import (
    CONFIG_DIR,
    Captioner,
    PretrainConfig,
    caption_fits,
    load_images,
    load_local_dir,
    multi_positive_clip_loss,
    normalize,
    pretrain,
    random_shift,
    train,
    zero_shot_accuracy,
)

SHIPPED = Path(__file__).resolve().parents[1] / "diki_model" / "checkpoints" / "diki-small"


def test_loss_is_clip_loss_when_every_caption_is_distinct():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    scale = torch.tensor(10.0)
    expected = open_clip.ClipLoss()(img, txt, scale)
    assert torch.allclose(multi_positive_clip_loss(img, txt, scale, torch.eye(6)), expected, atol=1e-6)


def test_loss_is_at_its_optimum_when_a_shared_caption_matches_both_images():
    # images 0 and 1 are two pictures of the same thing, captions 0 and 1 are the same text
    base = F.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    positives = torch.eye(4)
    positives[0, 1] = positives[1, 0] = 1
    img, txt = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss = multi_positive_clip_loss(img, txt, torch.tensor(100.0), positives)
    loss.backward()
    target_entropy = math.log(2) / 2  # rows 0 and 1 spread over two captions, rows 2 and 3 over one
    assert abs(float(loss.detach()) - target_entropy) < 1e-5
    assert img.grad.abs().max() < 1e-6 and txt.grad.abs().max() < 1e-6
    # moving image 1 away from its caption only costs
    moved = base.clone()
    moved[1] = torch.tensor([0.0, 0.0, -1.0])
    assert multi_positive_clip_loss(moved, base, torch.tensor(100.0), positives) > loss + 1


def test_captions_assert_what_they_say_and_fit_the_right_images():
    shapes, mnist = get_domain("shapes"), get_domain("mnist")
    captioner = Captioner([shapes, mnist])
    rng = np.random.default_rng(0)
    label = shapes.classes.index("small red striped star")
    full, asserted = captioner.caption(0, label, rng, PretrainConfig(full_caption_prob=1.0))
    assert "small red striped star" in full and len(asserted) == 4
    cfg = PretrainConfig(full_caption_prob=0.0, keep_attribute_prob=0.3)
    partial = [captioner.caption(0, label, rng, cfg) for _ in range(200)]
    assert all(1 <= len(a) <= 4 for _, a in partial)
    assert any(text.endswith((" shape.", " object.", " thing.")) for text, _ in partial)  # noun dropped
    digit, _ = captioner.caption(1, 3, rng, cfg)
    assert "three" in digit

    red = torch.zeros(len(captioner.vocab))
    red[captioner.vocab[("colour", "red")]] = 1
    images = [shapes.classes.index(c) for c in ("large red dotted square", "small green striped square")]
    attrs = torch.cat([captioner.image_attributes(0, np.array(images)), captioner.image_attributes(1, np.array([3]))])
    fits = caption_fits(torch.stack([red, attrs[2]]), attrs)
    assert fits.tolist() == [[1, 0], [0, 0], [0, 1]]


def test_random_shift_translates_within_bounds():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).view(2, 3, 5, 5)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(random_shift(images, 0, gen), images)
    shifted = random_shift(images, 1, gen)
    assert shifted.shape == images.shape
    assert torch.equal(shifted[:, :, 1:-1, 1:-1].round(), shifted[:, :, 1:-1, 1:-1])
    for i in range(2):  # each image is a shifted copy of itself: its centre pixel comes from a neighbour
        centre = shifted[i, 0, 2, 2]
        assert centre in images[i, 0, 1:4, 1:4]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for name in ("mnist", "fashion-mnist", "shapes", "shape-fill"):
        build_domain(name, root, seed=0, train_size=48, test_size=24)
    return root


def tiny_config(**overrides) -> PretrainConfig:
    fields = dict(model="diki-test-tiny", steps=3, batch_size=16, warmup_steps=1, eval_domains=("mnist", "shape-fill"),
                  eval_limit=24)  # fmt: skip
    return PretrainConfig(**(fields | overrides))


def test_training_is_deterministic_under_a_seed(tiny_data):
    first = train(tiny_config(seed=3, steps=2), tiny_data, progress=False)
    again = train(tiny_config(seed=3, steps=2), tiny_data, progress=False)
    other = train(tiny_config(seed=4, steps=2), tiny_data, progress=False)
    assert first.losses == again.losses
    assert first.losses != other.losses
    assert first.train_images == {"mnist": 48, "fashion-mnist": 48, "shapes": 48}
    for (name, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_pretrain_writes_a_loadable_local_dir_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    # A rate measured for earlier weights in the folder must not outlive them.
    (out / "adapter_training.json").write_text('{"lr": 99.0}')
    recipe = pretrain(
        tiny_config(), tiny_data, out, command="diki data pretrain --model diki-test-tiny", progress=False
    )
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors",
                                                     "recipe.json"]  # fmt: skip
    assert json.loads((out / "recipe.json").read_text()) == recipe
    assert recipe["command"] == "diki data pretrain --model diki-test-tiny"
    assert recipe["config"]["steps"] == 3 and recipe["versions"]["open_clip"] == open_clip.__version__
    assert set(recipe["zero_shot"]) == {"mnist", "shape-fill"} and recipe["zero_shot"]["mnist"]["chance"] == 0.1
    assert set(recipe["dataset_fingerprints"]) == {"mnist", "fashion-mnist", "shapes", "shape-fill"}
    assert all(t.dtype == torch.float16 for t in load_file(out / "open_clip_model.safetensors").values())

    # open_clip's own local-dir loader, strict about every key
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    expected = json.loads((CONFIG_DIR / "diki-test-tiny.json").read_text())
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"] == expected
    assert tokenizer.context_length == expected["text_cfg"]["context_length"]
    images, labels = load_images(tiny_data / "mnist", "test", limit=24)
    acc = zero_shot_accuracy(model.eval(), tokenizer, images, labels, get_domain("mnist").manifest().prompts())
    assert round(acc, 4) == recipe["zero_shot"]["mnist"]["accuracy"]


def test_unknown_model_or_domain_is_refused():
    with pytest.raises(KeyError, match="unknown domain"):
        PretrainConfig(domains=("mnist", "nope"), domain_weights=(1, 1))
    with pytest.raises(ValueError, match="same length"):
        PretrainConfig(domains=("mnist",), domain_weights=(1, 1))
    with pytest.raises(FileNotFoundError, match="not an open_clip local-dir checkpoint"):
        load_local_dir(CONFIG_DIR)


def test_shipped_backbone_loads_offline_and_knows_its_domains(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = SHIPPED / "open_clip_model.safetensors"
    assert weights.stat().st_size < 20 * 1024 * 1024
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    assert recipe["model_cfg"] == json.loads((CONFIG_DIR / "diki-small.json").read_text())
    assert "diki data pretrain" in recipe["command"] and recipe["config"]["seed"] == 0

    model, preprocess, tokenizer = load_local_dir(SHIPPED)
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 8e6
    images, labels = generate_split("mnist", "test", seed=0, size=8)
    # the checkpoint's preprocessing is exactly the normalisation it was trained with
    via_preprocess = torch.stack([preprocess(Image.fromarray(i)) for i in images])
    assert torch.allclose(via_preprocess, normalize(torch.from_numpy(images).permute(0, 3, 1, 2)), atol=1e-6)

    for name, chance_multiple in (("mnist", 5), ("fashion-mnist", 4), ("clothing-colour", 3)):
        images, labels = generate_split(name, "test", seed=0, size=200)
        prompts = get_domain(name).manifest().prompts()
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        acc = zero_shot_accuracy(model, tokenizer, x, torch.from_numpy(labels), prompts)
        assert acc > chance_multiple / len(prompts), (name, acc)
