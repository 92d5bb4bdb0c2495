"""Contrastive pre-training of a small CLIP from scratch, on the project's pre-training domains.

Captions come from class names: flat domains (digits, clothing) caption a class with one of a few
templates; attribute-coded domains (shapes: size x colour x fill x shape) caption an image with
its full phrase or a random subset of its attributes ("a red shape", "a small striped star"),
so the text tower learns each word on its own and can be asked about new combinations.

Several images in a batch can fit one caption (two digits "three", every red shape for "a red
shape"), so the loss is CLIP's symmetric InfoNCE with every fitting pair as a positive: each
row's target is uniform over the captions (or images) that describe it.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diki_model.backbone import ADAPTER_TRAINING_FILE, CONFIG_DIR, register_model_configs
from diki_model.data.format import read_manifest
from diki_model.data.reading import decode_image, iter_records
from diki_model.datasets.domains import DOMAINS, DomainSpec, build_domain, domains_with_role, get_domain

MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults, written into every checkpoint
STD = (0.26862954, 0.26130258, 0.27577711)
SHAPE_NOUNS = ("shape", "object", "thing")
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
RECIPE_FILE = "recipe.json"


@dataclass
class PretrainConfig:
    model: str = "diki-small"  # a config in diki_model/model_configs
    domains: tuple[str, ...] = ("mnist", "fashion-mnist", "shapes")
    domain_weights: tuple[float, ...] = (0.25, 0.3, 0.45)  # share of each batch drawn from each domain
    steps: int = 780
    batch_size: int = 128
    lr: float = 1.5e-3
    final_lr_ratio: float = 0.01  # cosine decay ends at lr * this
    warmup_steps: int = 40
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    full_caption_prob: float = 0.4  # attribute-coded images: caption with every attribute this often
    keep_attribute_prob: float = 0.5  # ... otherwise keep each attribute with this probability (at least one)
    max_shift: int = 0  # random translation, pixels (off: it cost digits and clothing accuracy in trials)
    seed: int = 0
    data_seed: int = 0  # seed the domains are built with when missing
    threads: int = 2
    eval_domains: tuple[str, ...] = field(
        default_factory=lambda: tuple(domains_with_role("pretrain") + domains_with_role("heldout"))
    )
    eval_limit: int = 1000  # test images per domain for the zero-shot table

    def __post_init__(self) -> None:
        self.domains, self.domain_weights = tuple(self.domains), tuple(float(w) for w in self.domain_weights)
        self.eval_domains, self.betas = tuple(self.eval_domains), tuple(self.betas)
        if len(self.domains) != len(self.domain_weights) or not self.domains:
            raise ValueError("domains and domain_weights must be non-empty and of the same length")
        for name in (*self.domains, *self.eval_domains):
            get_domain(name)
        if min(self.domain_weights) <= 0:
            raise ValueError(f"domain_weights must be positive, got {self.domain_weights}")
        if self.steps < 1 or self.batch_size < 2 or self.warmup_steps < 0 or self.threads < 1:
            raise ValueError("steps >= 1, batch_size >= 2, warmup_steps >= 0 and threads >= 1 are required")


# --- model ----------------------------------------------------------------------------------


def model_config(name: str) -> dict:
    register_model_configs()
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise KeyError(f"unknown model config {name!r}; known: {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}")
    return cfg


def create_model(name: str) -> nn.Module:
    """A randomly initialised open_clip CLIP of a project config."""
    import open_clip

    return open_clip.CLIP(**model_config(name))


def save_local_dir(model: nn.Module, model_cfg: dict, out_dir: str | Path, *, half: bool = True) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors``: loadable as ``local-dir:<out_dir>``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = model_cfg["vision_cfg"]["image_size"]
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"size": size, "mode": "RGB", "mean": list(MEAN), "std": list(STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }  # fmt: skip
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    dtype = torch.float16 if half else torch.float32
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}  # fmt: skip
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def load_local_dir(path: str | Path) -> tuple[nn.Module, Callable, Callable]:
    """(model in eval mode, image preprocess, tokenizer) of a ``local-dir`` checkpoint, offline."""
    import open_clip

    path = Path(path).absolute()
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / required).is_file():
            raise FileNotFoundError(f"{path / required} not found: not an open_clip local-dir checkpoint")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{path}")


# --- data -----------------------------------------------------------------------------------


def load_images(path: str | Path, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as uint8 (N, 3, H, W) images and int64 labels."""
    images, labels = [], []
    for batch, batch_labels in iter_records(path, split):
        images.extend(np.asarray(decode_image(b)) for b in batch)
        labels.append(batch_labels)
        if limit is not None and len(images) >= limit:
            break
    x = torch.from_numpy(np.stack(images[:limit])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.concatenate(labels)[:limit])
    return x, y


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the model's input, exactly as the checkpoint's preprocess does it."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def ensure_domain(data_dir: str | Path, name: str, seed: int) -> Path:
    path = Path(data_dir) / name
    if not (path / "manifest.json").is_file():
        build_domain(name, data_dir, seed)
    return path


class Captioner:
    """Captions and the attributes they assert, for every class of the pre-training domains.

    Attributes are indices into one vocabulary of (factor, word) pairs shared by all domains, so
    "does caption j describe image i" is a matrix product.
    """

    def __init__(self, specs: Sequence[DomainSpec]) -> None:
        self.specs = list(specs)
        self.vocab: dict[tuple[str, str], int] = {}
        # per domain, per class: the (factor, word) pairs of the class
        self.class_attrs: list[list[list[tuple[str, str]]]] = []
        for spec in self.specs:
            per_class = []
            for cls in spec.classes:
                if spec.factors:
                    words = cls.split(" ", len(spec.factors) - 1)
                    pairs = [(factor, w) for (factor, _), w in zip(spec.factors, words, strict=True)]
                else:
                    pairs = [(spec.name, cls)]
                for pair in pairs:
                    self.vocab.setdefault(pair, len(self.vocab))
                per_class.append(pairs)
            self.class_attrs.append(per_class)

    def image_attributes(self, domain: int, labels: np.ndarray) -> torch.Tensor:
        """(N, V) multi-hot of what each image is."""
        out = torch.zeros(len(labels), len(self.vocab))
        for i, label in enumerate(labels):
            out[i, [self.vocab[p] for p in self.class_attrs[domain][label]]] = 1
        return out

    def caption(self, domain: int, label: int, rng: np.random.Generator, cfg: PretrainConfig) -> tuple[str, list[int]]:
        spec = self.specs[domain]
        pairs = self.class_attrs[domain][label]
        templates = (spec.template, *spec.caption_templates)
        template = templates[rng.integers(len(templates))]
        if not spec.factors or rng.uniform() < cfg.full_caption_prob:
            kept = pairs
        else:
            keep = rng.uniform(size=len(pairs)) < cfg.keep_attribute_prob
            if not keep.any():
                keep[rng.integers(len(pairs))] = True
            kept = [p for p, k in zip(pairs, keep, strict=True) if k]
        words = [w for _, w in kept]
        if spec.factors and kept[-1][0] != spec.factors[-1][0]:  # the noun was dropped: use a generic one
            words.append(SHAPE_NOUNS[rng.integers(len(SHAPE_NOUNS))])
        return template.format(" ".join(words)), [self.vocab[p] for p in kept]


def caption_fits(asserted: torch.Tensor, image_attributes: torch.Tensor) -> torch.Tensor:
    """(images, captions) 0/1 matrix: caption j fits image i when it asserts nothing image i lacks.

    ``asserted`` is (captions, V) and ``image_attributes`` (images, V), both multi-hot over the vocabulary.
    """
    return ((asserted @ (1 - image_attributes).t()) == 0).t().float()


def multi_positive_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE where ``positives[i, j]`` marks that caption j describes image i (diagonal included)."""
    logits = logit_scale * image_features @ text_features.t()  # (B images, B captions)
    targets = positives / positives.sum(dim=1, keepdim=True)
    targets_t = positives.t() / positives.t().sum(dim=1, keepdim=True)
    loss_i2t = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t2i = -(targets_t * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def random_shift(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the edge pixels."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images.float(), (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    rows = (offsets[:, 0, None] + torch.arange(h)).view(n, 1, h, 1)
    cols = (offsets[:, 1, None] + torch.arange(w)).view(n, 1, 1, w)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1), rows, cols]


# --- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def zero_shot_accuracy(
    model: nn.Module,
    tokenizer: Callable,
    images: torch.Tensor,
    labels: torch.Tensor,
    prompts: list[str],
    batch_size: int = 500,
) -> float:
    """Top-1 accuracy of classifying uint8 images by their nearest class prompt."""
    model.eval()
    text = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    correct = 0
    for start in range(0, len(labels), batch_size):
        feats = F.normalize(model.encode_image(normalize(images[start : start + batch_size])), dim=-1)
        correct += int(((feats @ text.t()).argmax(dim=1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def zero_shot_table(
    model: nn.Module, tokenizer: Callable, data_dir: str | Path, domains: Sequence[str], limit: int, data_seed: int = 0
) -> dict[str, dict]:
    table = {}
    for name in domains:
        path = ensure_domain(data_dir, name, data_seed)
        manifest = read_manifest(path)
        images, labels = load_images(path, "test", limit)
        acc = zero_shot_accuracy(model, tokenizer, images, labels, manifest.prompts())
        table[name] = {"role": DOMAINS[name].role, "accuracy": round(acc, 4),
                       "chance": round(1 / manifest.num_classes, 4), "classes": manifest.num_classes,
                       "images": len(labels), "template": manifest.template}  # fmt: skip
    return table


# --- training -------------------------------------------------------------------------------


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = (
            p.ndim < 2 or "logit_scale" in name or "positional_embedding" in name or name.endswith("class_embedding")
        )
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class PretrainResult:
    model: nn.Module
    losses: list[float]
    train_seconds: float
    train_images: dict[str, int]


def train(
    cfg: PretrainConfig, data_dir: str | Path, *, progress: bool = True, device: str | torch.device = "cpu"
) -> PretrainResult:
    """Train ``cfg.model`` from scratch on ``cfg.domains`` (built into ``data_dir`` first if missing)."""
    import open_clip
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    register_model_configs()
    model = create_model(cfg.model).to(device).train()
    tokenizer = open_clip.get_tokenizer(cfg.model)

    specs = [get_domain(name) for name in cfg.domains]
    data = [load_images(ensure_domain(data_dir, name, cfg.data_seed), "train") for name in cfg.domains]
    captioner = Captioner(specs)
    token_cache: dict[str, torch.Tensor] = {}
    weights = np.array(cfg.domain_weights) / sum(cfg.domain_weights)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=1e-6)

    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"pretrain {cfg.model}", disable=not progress, unit="step")
    for step in bar:
        counts = np.bincount(rng.choice(len(specs), size=cfg.batch_size, p=weights), minlength=len(specs))
        images, attrs, caption_attrs, texts = [], [], [], []
        for d, count in enumerate(counts):
            if count == 0:
                continue
            idx = rng.integers(0, len(data[d][1]), size=count)
            labels = data[d][1][idx].numpy()
            images.append(data[d][0][idx])
            attrs.append(captioner.image_attributes(d, labels))
            for label in labels:
                text, asserted = captioner.caption(d, int(label), rng, cfg)
                texts.append(text)
                row = torch.zeros(len(captioner.vocab))
                row[asserted] = 1
                caption_attrs.append(row)
        for text in texts:
            if text not in token_cache:
                token_cache[text] = tokenizer([text])[0]
        positives = caption_fits(torch.stack(caption_attrs), torch.cat(attrs))
        x = normalize(random_shift(torch.cat(images), cfg.max_shift, gen).round().to(torch.uint8)).to(device)
        tokens = torch.stack([token_cache[t] for t in texts]).to(device)

        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        image_features, text_features, logit_scale = model(x, tokens)[:3]
        loss = multi_positive_clip_loss(image_features, text_features, logit_scale, positives.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", scale=f"{float(logit_scale.detach()):.1f}")
    return PretrainResult(
        model=model.cpu().eval(),
        losses=losses,
        train_seconds=time.perf_counter() - start,
        train_images={name: len(d[1]) for name, d in zip(cfg.domains, data, strict=True)},
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pretrain(
    cfg: PretrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    command: str | None = None,
    progress: bool = True,
    half: bool = True,
    device: str | torch.device = "cpu",
) -> dict:
    """Train, write the ``local-dir`` checkpoint and ``recipe.json``, and return the recipe.

    The zero-shot table is measured on the checkpoint as written (reloaded from disk), so it is
    what anyone loading the checkpoint gets.
    """
    import open_clip

    from diki_model.data.validation import dataset_fingerprint

    wall_start = time.perf_counter()
    result = train(cfg, data_dir, progress=progress, device=device)
    out = save_local_dir(result.model, model_config(cfg.model), out_dir, half=half)
    # A learning rate measured for earlier weights in this folder does not hold for the new ones.
    (out / ADAPTER_TRAINING_FILE).unlink(missing_ok=True)
    model, _, tokenizer = load_local_dir(out)
    torch.set_num_threads(cfg.threads)
    table = zero_shot_table(model, tokenizer, data_dir, cfg.eval_domains, cfg.eval_limit, cfg.data_seed)
    used = sorted(set(cfg.domains) | set(cfg.eval_domains), key=list(DOMAINS).index)
    recipe = {
        "model": cfg.model,
        "model_cfg": model_config(cfg.model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_dtype": "float16" if half else "float32",
        "weights_sha256": sha256_file(out / WEIGHTS_FILE),
        "command": command or f"diki data pretrain --out {out_dir} --seed {cfg.seed}",
        "config": asdict(cfg),
        "train_images": result.train_images,
        "dataset_fingerprints": {name: dataset_fingerprint(Path(data_dir) / name) for name in used},
        "final_loss": round(float(np.mean(result.losses[-20:])), 4),
        "loss_curve": [round(float(np.mean(result.losses[i : i + 50])), 4) for i in range(0, len(result.losses), 50)],
        "train_seconds": round(result.train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "zero_shot": table,
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "machine": {"processor": platform.processor() or platform.machine(), "threads": cfg.threads,
                    "device": str(device)},
    }  # fmt: skip
    text = json.dumps(recipe, indent=2) + "\n"
    (out / RECIPE_FILE).write_text(text)
    return json.loads(text)
