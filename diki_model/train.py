"""Learning one task: fit its Gaussian statistics, then train its residual K/V.

Plain PyTorch and device-agnostic (bf16 autocast on CUDA). The same functions run in a single
process and inside distributed workers: the caller provides the batches of its shard and, for
data parallelism, an ``all_reduce_mean`` that averages a tensor across workers (gradients after
each backward pass, and the validation counts). Defaults are the authors': SGD lr 5 without
momentum or weight decay, cosine per iteration to lr * 1e-3, 10 epochs, batch 128, one prompt
template, cross-entropy over the task's classes, the best epoch chosen on a validation split.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diki_model.adapters import Route
from diki_model.model import DikiCLIP
from diki_model.stats import Gaussian, GaussianAccumulator, GaussianScorer, ScoreStats

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
BatchSource = Callable[[int], Batches]  # epoch -> batches of (images, labels)
AllReduce = Callable[[torch.Tensor], torch.Tensor]
OPTIMIZERS = ("sgd", "adamw")
# Held-out features kept per task for the likelihood-ratio gate (512 x 512-d float32 = 1 MiB).
MAX_HOLDOUT_KEPT = 512


@dataclass
class TrainConfig:
    # "sgd" is the authors' choice (lr 5 on ViT-B/16). "adamw" normalises the step per parameter,
    # so one learning rate holds across backbone widths and activation scales (small backbones).
    optimizer: str = "sgd"
    lr: float = 5.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    min_lr_ratio: float = 1e-3  # cosine schedule ends at lr * min_lr_ratio
    val_fraction: float = 0.1
    select_best: bool = True
    seed: int = 0
    amp: bool = True  # bf16 autocast when on CUDA

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"lr, epochs and batch_size must be positive, got {self.lr}, {self.epochs}, {self.batch_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_acc: float
    val_acc: float | None
    lr: float
    seconds: float


@dataclass
class TrainState:
    """Everything needed to resume training of a task after the given epoch."""

    epoch: int  # number of finished epochs
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    best_val: float = float("-inf")
    best_epoch: int = -1
    best_adapter: dict[str, torch.Tensor] | None = None
    history: list[EpochResult] = field(default_factory=list)


@dataclass
class TrainResult:
    history: list[EpochResult]
    best_epoch: int
    best_val: float | None
    seconds: float


class TaskStatistics:
    """Mergeable statistics of one task's frozen features, with a held-out part.

    Every ``holdout_every``-th image (by arrival order) is held out: the Gaussian is fitted on all
    images, and the held-out images, scored by the Gaussian of the others, give the task's
    in-distribution score mean and std that the standardised gate needs.
    """

    def __init__(self, dim: int, holdout_every: int = 5) -> None:
        self.fit = GaussianAccumulator(dim)
        self.held = GaussianAccumulator(dim)
        self.held_features: list[torch.Tensor] = []
        self.holdout_every = holdout_every
        self._seen = 0

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().to("cpu", torch.float64)
        pos = torch.arange(self._seen, self._seen + f.shape[0])
        held = (pos % self.holdout_every) == (self.holdout_every - 1)
        self._seen += f.shape[0]
        if (~held).any():
            self.fit.update(f[~held])
        if held.any():
            self.held.update(f[held])
            self.held_features.append(f[held].float())

    def merge(self, other: TaskStatistics) -> TaskStatistics:
        self.fit.merge(other.fit)
        self.held.merge(other.held)
        self.held_features.extend(other.held_features)
        self._seen += other._seen
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"fit.{k}": v for k, v in self.fit.state_dict().items()}
        out.update({f"held.{k}": v for k, v in self.held.state_dict().items()})
        dim = self.fit.dim
        out["held_features"] = torch.cat(self.held_features) if self.held_features else torch.zeros(0, dim)
        out["meta"] = torch.tensor([self.holdout_every, self._seen], dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> TaskStatistics:
        holdout_every, seen = (int(x) for x in state["meta"])
        fit = GaussianAccumulator.from_state_dict({k[4:]: v for k, v in state.items() if k.startswith("fit.")})
        obj = cls(fit.dim, holdout_every)
        obj.fit = fit
        obj.held = GaussianAccumulator.from_state_dict({k[5:]: v for k, v in state.items() if k.startswith("held.")})
        obj.held_features = [state["held_features"].float()] if state["held_features"].numel() else []
        obj._seen = seen
        return obj

    @property
    def count(self) -> int:
        return self.fit.count + self.held.count

    def finalize(self, shrinkage: str = "ledoit_wolf") -> tuple[Gaussian, float, float]:
        """(Gaussian of all images, held-out score mean, held-out score std)."""
        fit = self.fit_task(shrinkage)
        return fit.gaussian, fit.score_mean, fit.score_std

    def fit_task(self, shrinkage: str = "ledoit_wolf", keep_holdout: int = MAX_HOLDOUT_KEPT) -> TaskFit:
        """The task's Gaussian, its held-out score statistics and (up to ``keep_holdout``) held-out
        features with their scores, for calibrating a likelihood-ratio gate later."""
        if self.held.count < 2 or self.fit.count < 2:
            raise ValueError(
                f"too few images to fit task statistics: {self.count} (need at least {2 * self.holdout_every})"
            )
        partial = self.fit.finalize(shrinkage)
        held = torch.cat(self.held_features)
        scores = GaussianScorer([partial], dtype=torch.float64).score(held)[:, 0]
        stats = ScoreStats().update(scores)
        full = copy.deepcopy(self.fit).merge(self.held).finalize(shrinkage)
        # Evenly spaced rows keep the stored sample representative of the whole arrival order.
        keep = torch.linspace(0, len(held) - 1, min(len(held), keep_holdout)).round().long().unique()
        return TaskFit(full, stats.mean, max(stats.std, 1e-6), held[keep].float(), scores[keep])


@dataclass
class TaskFit:
    gaussian: Gaussian
    score_mean: float
    score_std: float
    holdout_features: torch.Tensor  # (H, d) float32
    holdout_scores: torch.Tensor  # (H,) float64, under the Gaussian fitted without them


@torch.no_grad()
def collect_statistics(model: DikiCLIP, batches: Batches, holdout_every: int | None = None) -> TaskStatistics:
    """Accumulate frozen-feature statistics over a stream of (images, labels) batches."""
    stats = TaskStatistics(model.feature_dim, holdout_every or model.config.holdout_every)
    for images, _ in batches:
        stats.update(model.encode_image(images.to(model.device)))
    return stats


def apply_statistics(model: DikiCLIP, task: int, stats: TaskStatistics) -> None:
    fit = stats.fit_task(model.config.shrinkage)
    model.set_task_statistics(
        task, fit.gaussian, fit.score_mean, fit.score_std, stats.count, fit.holdout_features, fit.holdout_scores
    )


def _autocast(model: DikiCLIP, cfg: TrainConfig):
    if cfg.amp and model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def task_logits(model: DikiCLIP, task: int, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Training forward: both towers routed to ``task`` with gate 1 (the true task)."""
    route = Route(task=task, gate=1.0)
    with model.routing(vision=route, text=route):
        img = F.normalize(model.clip.encode_image(images), dim=-1)
        txt = F.normalize(model.clip.encode_text(tokens), dim=-1)
    return model.logit_scale * img.float() @ txt.float().T


@torch.no_grad()
def _evaluate_counts(
    model: DikiCLIP, task: int, batches: Batches, tokens: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    correct = torch.zeros(2, dtype=torch.float64)
    for images, labels in batches:
        with _autocast(model, cfg):
            logits = task_logits(model, task, images.to(model.device), tokens)
        correct[0] += (logits.argmax(dim=-1).cpu() == labels).sum()
        correct[1] += labels.numel()
    return correct


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def cosine_lambda(total_steps: int, min_ratio: float) -> Callable[[int], float]:
    def fn(step: int) -> float:
        progress = min(step / max(total_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def train_task(
    model: DikiCLIP,
    task: int,
    train_batches: BatchSource,
    steps_per_epoch: int,
    cfg: TrainConfig | None = None,
    val_batches: Callable[[], Batches] | None = None,
    *,
    all_reduce_mean: AllReduce | None = None,
    start_state: TrainState | None = None,
    on_epoch_end: Callable[[EpochResult, TrainState], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train task ``task``'s K/V (all other parameters frozen). Returns the per-epoch history.

    ``steps_per_epoch`` must equal the number of batches ``train_batches(epoch)`` yields (the
    cosine schedule runs per iteration). With ``select_best`` and validation batches, the adapter
    of the best validation epoch is kept.
    """
    cfg = cfg or TrainConfig()
    if not 0 <= task < model.num_tasks:
        raise IndexError(f"task {task} out of range: the model holds {model.num_tasks} tasks")
    if steps_per_epoch < 1:
        raise ValueError("steps_per_epoch must be >= 1 (the task has no training batches)")
    torch.manual_seed(cfg.seed)
    params = model.adapter_parameters(task)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_lambda(cfg.epochs * steps_per_epoch, cfg.min_lr_ratio)
    )
    state = start_state
    if state is not None:
        model.load_adapter_state_dict(task, state.adapter)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
    else:
        state = TrainState(epoch=0, adapter={}, optimizer={}, scheduler={})
    tokens = model.tokenize(model.tasks[task].prompts())
    t0 = time.perf_counter()
    model.train(False)  # frozen backbone: no dropout, no batch-norm updates
    bar = tqdm(
        total=(cfg.epochs - state.epoch) * steps_per_epoch,
        desc=f"train {model.tasks[task].name}",
        disable=not progress,
        leave=False,
    )
    try:
        for epoch in range(state.epoch, cfg.epochs):
            e0 = time.perf_counter()
            sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
            steps = 0
            for images, labels in train_batches(epoch):
                images, labels = images.to(model.device), labels.to(model.device)
                with _autocast(model, cfg):
                    logits = task_logits(model, task, images, tokens)
                loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if all_reduce_mean is not None:
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        p.grad.copy_(all_reduce_mean(p.grad))
                optimizer.step()
                scheduler.step()
                steps += 1
                loss_value = float(loss.detach())
                sums += torch.tensor(
                    [loss_value * labels.numel(), float((logits.detach().argmax(-1) == labels).sum()), labels.numel()],
                    dtype=torch.float64,
                )
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_value:.3f}")
            if steps != steps_per_epoch:
                raise ValueError(f"epoch {epoch} yielded {steps} batches, expected steps_per_epoch={steps_per_epoch}")
            if all_reduce_mean is not None:
                sums = all_reduce_mean(sums)
            val_acc = None
            if val_batches is not None:
                counts = _evaluate_counts(model, task, val_batches(), tokens, cfg)
                if all_reduce_mean is not None:
                    counts = all_reduce_mean(counts)
                val_acc = float(counts[0] / counts[1]) if counts[1] > 0 else None
            result = EpochResult(
                epoch=epoch + 1,
                train_loss=float(sums[0] / sums[2]),
                train_acc=float(sums[1] / sums[2]),
                val_acc=val_acc,
                lr=float(optimizer.param_groups[0]["lr"]),
                seconds=time.perf_counter() - e0,
            )
            state.history.append(result)
            state.epoch = epoch + 1
            state.adapter = model.adapter_state_dict(task)
            metric = val_acc if val_acc is not None else -result.train_loss
            if cfg.select_best and metric > state.best_val:
                state.best_val, state.best_epoch, state.best_adapter = metric, epoch + 1, state.adapter
            state.optimizer = copy.deepcopy(optimizer.state_dict())
            state.scheduler = scheduler.state_dict()
            if on_epoch_end is not None:
                on_epoch_end(result, state)
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    if cfg.select_best and state.best_adapter is not None:
        model.load_adapter_state_dict(task, state.best_adapter)
    model.invalidate_caches(task)
    return TrainResult(
        history=state.history,
        best_epoch=state.best_epoch if cfg.select_best else state.epoch,
        best_val=state.best_val if val_batches is not None and cfg.select_best else None,
        seconds=time.perf_counter() - t0,
    )


def tensor_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0
) -> BatchSource:
    """A BatchSource over in-memory tensors, reshuffled deterministically each epoch."""

    def source(epoch: int) -> Batches:
        n = images.shape[0]
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
        else:
            order = torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield images[idx], labels[idx]

    return source


def num_batches(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def split_train_val(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic index split; the validation part is empty when val_fraction is 0."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    n_val = min(n_val, n - 1)
    return order[n_val:], order[:n_val]


def learn_task(
    model: DikiCLIP,
    name: str,
    classes: list[str],
    images: torch.Tensor,
    labels: torch.Tensor,
    template: str = "a photo of a {}.",
    cfg: TrainConfig | None = None,
    progress: bool = True,
    dataset_fingerprint: str = "",
) -> tuple[int, TrainResult]:
    """Single-process convenience: add a task, fit its statistics, train it on tensors."""
    cfg = cfg or TrainConfig()
    task = model.add_task(name, classes, template, seed=cfg.seed)
    model.tasks[task].dataset_fingerprint = dataset_fingerprint
    stats = collect_statistics(model, tensor_batches(images, labels, 256, shuffle=False)(0))
    apply_statistics(model, task, stats)
    train_idx, val_idx = split_train_val(images.shape[0], cfg.val_fraction, cfg.seed)
    tr_x, tr_y = images[train_idx], labels[train_idx]
    val = None
    if len(val_idx):
        va_x, va_y = images[val_idx], labels[val_idx]
        val_src = tensor_batches(va_x, va_y, 256, shuffle=False)

        def val() -> Batches:
            return val_src(0)

    result = train_task(
        model,
        task,
        tensor_batches(tr_x, tr_y, cfg.batch_size, seed=cfg.seed),
        num_batches(tr_x.shape[0], cfg.batch_size),
        cfg,
        val,
        progress=progress,
    )
    return task, result
