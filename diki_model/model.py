"""DikiCLIP: a frozen open_clip model with a growing pool of task adapters, routed per sample.

Inference for a batch of images (``predict``):
1. frozen pass of the image tower -> f(x), L2-normalised;
2. score f(x) against every task Gaussian in one batched operation; task = argmax, gate =
   calibration(max score), or with the likelihood-ratio gate calibration(max score - log p_ref(f))
   where p_ref is the reference density of the images the model must not disturb;
3. images whose gate is below ``ood_threshold`` keep their frozen features (and are flagged out
   of distribution); the rest get a second, gated pass with their own task's K/V and gate;
4. text side: class-prompt features of each task are cached at ``text_gate_levels`` gate levels
   and linearly interpolated at the sample's gate, so the text tower is gated per sample
   without re-encoding prompts per image.
Every step depends only on the sample itself, so predictions are batch-invariant.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from diki_model.adapters import ResidualKVAttention, Route, inject_residual_kv
from diki_model.backbone import Backbone, BackboneInfo, load_backbone
from diki_model.calibration import StandardizedGate, make_gate
from diki_model.config import DikiConfig
from diki_model.reference import ReferenceDensity, shipped_reference
from diki_model.stats import Gaussian, GaussianScorer

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass
class TaskRecord:
    """Everything known about a learned task besides its K/V parameters."""

    name: str
    classes: list[str]
    template: str = DEFAULT_TEMPLATE
    gaussian: Gaussian | None = None
    score_mean: float = 0.0
    score_std: float = 1.0
    num_samples: int = 0
    dataset_fingerprint: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    # Frozen features of the task's held-out images and their log-densities under the Gaussian of
    # the other images: what the likelihood-ratio gate is calibrated on, whatever the reference.
    holdout_features: torch.Tensor | None = None
    holdout_scores: torch.Tensor | None = None
    # A disabled task is never routed to (it keeps its branch for explicit use); not saved.
    enabled: bool = True

    def prompts(self) -> list[str]:
        return [self.template.format(c) for c in self.classes]


@dataclass
class Prediction:
    """Per-sample results of ``DikiCLIP.predict``; tensors have one entry per image."""

    label_index: torch.Tensor  # (B,) index into the sample's label space
    labels: list[str]  # (B,) predicted label names
    confidence: torch.Tensor  # (B,) softmax probability of the predicted label
    top_k: list[list[tuple[str, float]]]
    task_index: torch.Tensor  # (B,) routed task, -1 when no task is learned
    gate: torch.Tensor  # (B,) gate in [0, 1]
    ood: torch.Tensor  # (B,) bool: gate below the threshold, answered by the frozen model
    task_scores: torch.Tensor | None  # (B, T) log-densities, float64


class DikiCLIP(nn.Module):
    """A frozen CLIP with DIKI adapters. Create with ``create_diki_model``."""

    def __init__(self, backbone: Backbone, config: DikiConfig | None = None) -> None:
        super().__init__()
        self.config = config or DikiConfig()
        self.clip = backbone.model
        self.preprocess = backbone.preprocess
        self.tokenizer = backbone.tokenizer
        self.backbone_info: BackboneInfo = backbone.info
        self._routing, injected = inject_residual_kv(
            self.clip,
            self.config.prompt_length,
            self.config.vision_layers,
            self.config.text_layers,
            self.config.default_layer_count,
            self.config.branch,
        )
        self.vision_layers = tuple(injected["vision"])
        self.text_layers = tuple(injected["text"])
        self.tasks: list[TaskRecord] = []
        self.gate_fn = make_gate(self.config.gate, **self.config.gate_params)
        self.reference: ReferenceDensity | None = None
        self._gate_stats: torch.Tensor | None = None
        self._scorer: GaussianScorer | None = None
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._text_cache_size = 4096
        self.eval()

    # ----------------------------------------------------------------------------- structure
    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def feature_dim(self) -> int:
        return self.backbone_info.embed_dim

    def adapter_layers(self) -> Iterator[tuple[str, int, ResidualKVAttention]]:
        for tower, layers in (("vision", self.vision_layers), ("text", self.text_layers)):
            blocks = self.clip.visual.transformer.resblocks if tower == "vision" else self.clip.transformer.resblocks
            for i in layers:
                yield tower, i, blocks[i].attn

    def set_gate(self, name: str, **params: float) -> None:
        """Switch the gate calibration (the statistics it needs are already in every task)."""
        self.gate_fn = make_gate(name, **params)
        self.config.gate, self.config.gate_params = name, dict(params)
        self._gate_stats = None

    def set_reference(self, reference: ReferenceDensity | None) -> None:
        """Attach (or with None, detach) the reference density the likelihood-ratio gate uses."""
        if reference is not None and reference.fingerprint != self.backbone_info.fingerprint:
            raise ValueError(
                f"reference density was fitted on backbone fingerprint {reference.fingerprint[:12]}, "
                f"the model's is {self.backbone_info.fingerprint[:12]}"
            )
        self.reference = reference
        self._gate_stats = None

    @property
    def uses_reference(self) -> bool:
        """True when images are gated by the likelihood ratio against ``reference``.

        The ratio gate needs a reference and every task's held-out features; without them the model
        falls back to the standardised gate, which needs neither.
        """
        return (
            self.gate_fn.name == "ratio"
            and self.reference is not None
            and all(t.holdout_features is not None and len(t.holdout_features) >= 2 for t in self.tasks)
        )

    def task_index(self, name: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.name == name:
                return i
        raise KeyError(f"unknown task {name!r}; known tasks: {[t.name for t in self.tasks]}")

    def add_task(
        self, name: str, classes: Sequence[str], template: str = DEFAULT_TEMPLATE, seed: int | None = None
    ) -> int:
        """Grow the pool by one task (V = 0, K ~ U(-1, 1)); returns its index."""
        if any(t.name == name for t in self.tasks):
            raise ValueError(f"a task named {name!r} is already in the model")
        if len(classes) < 2:
            raise ValueError(f"task {name!r} needs at least 2 classes, got {len(classes)}")
        if template.count("{}") != 1:
            raise ValueError(f"template must contain exactly one '{{}}', got {template!r}")
        index = len(self.tasks)
        gen = torch.Generator().manual_seed((seed if seed is not None else 0) * 1_000_003 + index)
        for _, _, layer in self.adapter_layers():
            layer.add_task(gen)
        self.tasks.append(TaskRecord(name=name, classes=list(classes), template=template))
        self._invalidate()
        return index

    def adapter_parameters(self, task: int) -> list[nn.Parameter]:
        return [p for _, _, layer in self.adapter_layers() for p in (layer.keys[task], layer.values[task])]

    def adapter_state_dict(self, task: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for tower, i, layer in self.adapter_layers():
            out[f"{tower}.{i}.key"] = layer.keys[task].detach().cpu().clone()
            out[f"{tower}.{i}.value"] = layer.values[task].detach().cpu().clone()
        return out

    def load_adapter_state_dict(self, task: int, state: dict[str, torch.Tensor]) -> None:
        expected = {f"{tower}.{i}.{kind}" for tower, i, _ in self.adapter_layers() for kind in ("key", "value")}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise ValueError(
                f"adapter state does not match this model's layers: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        with torch.no_grad():
            for tower, i, layer in self.adapter_layers():
                for kind, plist in (("key", layer.keys), ("value", layer.values)):
                    src = state[f"{tower}.{i}.{kind}"]
                    if src.shape != plist[task].shape:
                        raise ValueError(
                            f"{tower} layer {i} {kind}: shape {tuple(src.shape)} != {tuple(plist[task].shape)}"
                        )
                    plist[task].copy_(src.to(plist[task].device, plist[task].dtype))
        self._invalidate(task)

    def set_task_statistics(
        self,
        task: int,
        gaussian: Gaussian,
        score_mean: float,
        score_std: float,
        num_samples: int,
        holdout_features: torch.Tensor | None = None,
        holdout_scores: torch.Tensor | None = None,
    ) -> None:
        if gaussian.dim != self.feature_dim:
            raise ValueError(f"Gaussian of dim {gaussian.dim} does not match feature dim {self.feature_dim}")
        if (holdout_features is None) != (holdout_scores is None):
            raise ValueError("held-out features and their scores go together")
        if holdout_features is not None and holdout_scores is not None:
            if holdout_features.ndim != 2 or holdout_features.shape[1] != self.feature_dim:
                raise ValueError(
                    f"held-out features must be (N, {self.feature_dim}), got {tuple(holdout_features.shape)}"
                )
            if holdout_scores.shape != (holdout_features.shape[0],):
                raise ValueError("one held-out score per held-out feature row is needed")
            holdout_features = holdout_features.detach().to("cpu", torch.float32)
            holdout_scores = holdout_scores.detach().to("cpu", torch.float64)
        rec = self.tasks[task]
        rec.gaussian, rec.score_mean, rec.score_std, rec.num_samples = gaussian, score_mean, score_std, num_samples
        rec.holdout_features, rec.holdout_scores = holdout_features, holdout_scores
        self._scorer = None
        self._gate_stats = None

    def _invalidate(self, task: int | None = None) -> None:
        self._scorer = None
        self._gate_stats = None
        if task is None:
            self._text_cache.clear()
        else:
            for key in [k for k in self._text_cache if k[1] == task]:
                del self._text_cache[key]

    def invalidate_caches(self, task: int | None = None) -> None:
        """Drop cached text features (call after changing a task's parameters by hand)."""
        self._invalidate(task)

    # ------------------------------------------------------------------------------ encoders
    @contextlib.contextmanager
    def routing(self, vision: Route | None = None, text: Route | None = None) -> Iterator[None]:
        """Activate residual branches for the duration of a forward pass."""
        routes = self._routing.routes
        prev = dict(routes)
        routes["vision"], routes["text"] = vision, text
        try:
            yield
        finally:
            routes.update(prev)

    def _amp(self) -> contextlib.AbstractContextManager:
        # bf16 autocast on CUDA (as the performance anchors measure); exact float32 elsewhere.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode_image(self, images: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        """L2-normalised image features (float32); ``route=None`` is the untouched frozen CLIP."""
        with self.routing(vision=route), self._amp():
            return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        with self.routing(text=route), self._amp():
            return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts)).to(self.device)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    # ------------------------------------------------------------------------------- routing
    def scorer(self) -> GaussianScorer | None:
        if self._scorer is None:
            fitted = [t.gaussian for t in self.tasks if t.gaussian is not None]
            if not fitted:
                return None
            if len(fitted) != len(self.tasks):
                missing = [t.name for t in self.tasks if t.gaussian is None]
                raise RuntimeError(f"tasks without fitted statistics cannot be routed: {missing}")
            self._scorer = GaussianScorer(fitted, device=self.device)
            if self.reference is not None:
                self.reference.to(self.device)
        return self._scorer

    def score_stats(self) -> torch.Tensor:
        """Per-task statistics (T, 2) of the active calibration (see ``diki_model.calibration``)."""
        if not self.uses_reference:
            return torch.tensor([[t.score_mean, t.score_std] for t in self.tasks], dtype=torch.float64)
        if self._gate_stats is None:
            q = float(getattr(self.gate_fn, "quantile", 0.05))
            rows = []
            for t in self.tasks:
                ratio = self.holdout_ratios(t)
                rows.append([float(torch.quantile(ratio, q)), float(ratio.std()) if len(ratio) > 1 else 1.0])
            self._gate_stats = torch.tensor(rows, dtype=torch.float64)
        return self._gate_stats

    def holdout_ratios(self, task: TaskRecord) -> torch.Tensor:
        """Log-likelihood ratios (task vs reference) of a task's held-out images, float64."""
        if self.reference is None or task.holdout_features is None or task.holdout_scores is None:
            raise RuntimeError(f"task {task.name!r}: no reference or no held-out features to compare")
        return task.holdout_scores - self.reference.log_prob(task.holdout_features)

    def _calibrate(self, best: torch.Tensor, task: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        if self.uses_reference:
            assert self.reference is not None
            ratio = best - self.reference.log_prob(frozen).cpu()
            return self.gate_fn(ratio, task, self.score_stats()).clamp(0.0, 1.0)
        # The ratio gate without a reference falls back to the standardised gate's defaults.
        gate_fn = StandardizedGate() if self.gate_fn.name == "ratio" else self.gate_fn
        return gate_fn(best, task, self.score_stats()).clamp(0.0, 1.0)

    def route(self, frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Task index (B,), gate (B,) and all task scores (B, T) for frozen image features."""
        scorer = self.scorer()
        if scorer is None:
            b = frozen.shape[0]
            return torch.full((b,), -1, dtype=torch.long), torch.zeros(b, dtype=torch.float64), torch.zeros(b, 0)
        scores = scorer.score(frozen).cpu()
        disabled = [i for i, t in enumerate(self.tasks) if not t.enabled]
        if disabled:
            scores[:, disabled] = -math.inf
        best, task = scores.max(dim=1)
        return task, self._calibrate(best, task, frozen), scores

    def task_gate(self, frozen: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate of every sample for one given task (used when the caller forces a task)."""
        scorer = self.scorer()
        if scorer is None:
            raise RuntimeError("no task statistics fitted")
        scores = scorer.score(frozen).cpu()
        idx = torch.full((frozen.shape[0],), task, dtype=torch.long)
        return self._calibrate(scores[:, task], idx, frozen), scores

    # --------------------------------------------------------------------------- text cache
    @torch.no_grad()
    def _text_level(self, prompts: tuple[str, ...], task: int, level: int) -> torch.Tensor:
        levels = self.config.text_gate_levels
        # Level 0 is the frozen text tower, the same for every task.
        key = (prompts, -1 if level == 0 else task, level)
        hit = self._text_cache.get(key)
        if hit is not None:
            self._text_cache.move_to_end(key)
            return hit
        route = None if level == 0 else Route(task=task, gate=level / (levels - 1))
        feats = self.encode_text(self.tokenize(prompts), route).float()
        self._text_cache[key] = feats
        if len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return feats

    @torch.no_grad()
    def _text_levels(self, prompts: tuple[str, ...], task: int) -> torch.Tensor:
        """Prompt features of one task at every gate level, (L, C, D); cached."""
        key = (prompts, task, "table")
        table = self._text_cache.get(key)
        if table is None:
            table = torch.stack([self._text_level(prompts, task, lv) for lv in range(self.config.text_gate_levels)])
            self._text_cache[key] = table
        return table

    def text_features(self, prompts: Sequence[str], task: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Per-sample text features (B, C, D) at the sample's task and gate (interpolated levels)."""
        prompts = tuple(prompts)
        levels = self.config.text_gate_levels
        pos = gate.to(torch.float64).clamp(0, 1) * (levels - 1)
        lo = pos.floor().long().clamp(max=levels - 1)
        hi = (lo + 1).clamp(max=levels - 1)
        frac = (pos - lo).float().to(self.device)[:, None, None]
        lo, hi = lo.to(self.device), hi.to(self.device)
        out = torch.empty(len(task), len(prompts), self.feature_dim, device=self.device)
        for t in torch.unique(task).tolist():
            rows = (task == t).nonzero().flatten().to(self.device)
            table = self._text_levels(prompts, int(t))  # (L, C, D)
            mixed = (1 - frac[rows]) * table[lo[rows]] + frac[rows] * table[hi[rows]]
            out[rows] = F.normalize(mixed, dim=-1)
        return out

    # ----------------------------------------------------------------------------- predict
    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        labels: Sequence[str] | None = None,
        template: str = DEFAULT_TEMPLATE,
        task: int | str | torch.Tensor | None = None,
        gate: float | None = None,
        top_k: int = 5,
        frozen_features: torch.Tensor | None = None,
    ) -> Prediction:
        """Classify preprocessed images (B, 3, H, W).

        Label space: ``labels`` (open vocabulary, formatted with ``template``), else the classes of
        ``task`` (forced; a name, an index, or one index per image), else the classes of each
        image's routed task. ``gate`` overrides the calibrated gate for every image (1.0 with a
        forced task = the true-task upper bound). ``frozen_features`` (the images' frozen,
        normalised features) skips the first pass when the caller already has them.
        """
        images = images.to(self.device)
        bsz = images.shape[0]
        frozen = self.encode_image(images) if frozen_features is None else frozen_features.to(self.device)
        if isinstance(task, torch.Tensor):
            task_vec = task.to(torch.long).cpu()
            if task_vec.shape != (bsz,) or task_vec.min() < 0 or task_vec.max() >= self.num_tasks:
                raise ValueError(f"per-image tasks must be {bsz} indices in [0, {self.num_tasks})")
            gate_vec = torch.full((bsz,), 1.0 if gate is None else float(gate), dtype=torch.float64)
            scores = None
        elif task is not None:
            t_idx = self.task_index(task) if isinstance(task, str) else int(task)
            if not 0 <= t_idx < self.num_tasks:
                raise IndexError(f"task {t_idx} out of range: the model holds {self.num_tasks} tasks")
            task_vec = torch.full((bsz,), t_idx, dtype=torch.long)
            if gate is None:
                gate_vec, scores = self.task_gate(frozen, t_idx)
            else:
                gate_vec, scores = torch.full((bsz,), float(gate), dtype=torch.float64), None
        else:
            task_vec, gate_vec, scores = self.route(frozen)
            if gate is not None and self.num_tasks:
                gate_vec = torch.full((bsz,), float(gate), dtype=torch.float64)
            if labels is None and self.num_tasks == 0:
                raise ValueError("no task has been learned yet: pass `labels` to classify zero-shot")
        if self.config.routing == "batch" and task is None and self.num_tasks:
            task_vec = torch.full((bsz,), int(torch.mode(task_vec).values), dtype=torch.long)
        task_vec = task_vec.clone()

        active = (gate_vec >= self.config.ood_threshold) & (task_vec >= 0)
        feats = frozen.clone()
        if active.any():
            idx = active.nonzero().flatten()
            route = Route(task=task_vec[idx].to(self.device), gate=gate_vec[idx].to(self.device, torch.float32))
            feats[idx.to(self.device)] = self.encode_image(images[idx.to(self.device)], route)
        text_gate = torch.where(active, gate_vec, torch.zeros_like(gate_vec))
        if self.config.routing == "batch" and task is None and self.num_tasks:
            text_gate = torch.full_like(gate_vec, float(gate_vec.mean()))

        logits, names = self._logits(feats, task_vec, text_gate, labels, template)
        probs = logits.softmax(dim=-1)
        conf, best = probs.max(dim=-1)
        k = min(top_k, probs.shape[-1])
        top_p, top_i = probs.topk(k, dim=-1)
        top = [
            [(names[b][int(j)], float(p)) for p, j in zip(top_p[b], top_i[b], strict=True) if int(j) < len(names[b])]
            for b in range(bsz)
        ]
        return Prediction(
            label_index=best.cpu(),
            labels=[names[b][int(best[b])] for b in range(bsz)],
            confidence=conf.cpu(),
            top_k=top,
            task_index=task_vec,
            gate=gate_vec.float(),
            ood=~active,
            task_scores=scores,
        )

    def _logits(
        self,
        feats: torch.Tensor,
        task_vec: torch.Tensor,
        text_gate: torch.Tensor,
        labels: Sequence[str] | None,
        template: str,
    ) -> tuple[torch.Tensor, list[list[str]]]:
        scale = self.logit_scale.float()
        if labels is not None:
            prompts = [template.format(c) for c in labels]
            text = self._gated_text(prompts, task_vec, text_gate)  # (B, C, D)
            logits = scale * torch.einsum("bd,bcd->bc", feats.float(), text)
            return logits, [list(labels)] * feats.shape[0]
        # Each image in its own task's label space: pad to the widest space with -inf.
        width = max(len(self.tasks[int(t)].classes) for t in task_vec)
        logits = torch.full((feats.shape[0], width), -math.inf, device=self.device)
        names: list[list[str]] = [[] for _ in range(feats.shape[0])]
        for t in torch.unique(task_vec).tolist():
            rows = (task_vec == t).nonzero().flatten()
            rec = self.tasks[t]
            text = self._gated_text(rec.prompts(), task_vec[rows], text_gate[rows])
            logits[rows.to(self.device), : len(rec.classes)] = scale * torch.einsum(
                "bd,bcd->bc", feats[rows.to(self.device)].float(), text
            )
            for r in rows.tolist():
                names[r] = rec.classes
        return logits, names

    def _gated_text(self, prompts: list[str], task_vec: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if self.config.routing == "batch" or self.num_tasks == 0:
            # Exact (unquantised) gate; the authors' mode uses one gate for the whole batch.
            if self.num_tasks == 0:
                feats = self._text_level(tuple(prompts), -1, 0)
            else:
                route = Route(task=int(task_vec[0]), gate=float(gate[0]))
                feats = self.encode_text(self.tokenize(prompts), route).float()
            return feats.unsqueeze(0).expand(len(task_vec), -1, -1)
        return self.text_features(prompts, task_vec.clamp_min(0), gate)


def create_diki_model(
    backbone: str = "diki-small",
    pretrained: str | None = None,
    config: DikiConfig | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    reference: ReferenceDensity | Literal["shipped"] | None = "shipped",
) -> DikiCLIP:
    """The factory: load a frozen open_clip backbone and inject the DIKI adapter pool.

    ``seed`` only matters for a backbone without weights (random initialisation). ``reference`` is
    the density the likelihood-ratio gate compares against: by default the one shipped with the
    checkpoint (when the backbone is a shipped one), or a given one, or None.
    """
    model = DikiCLIP(load_backbone(backbone, pretrained, device=device, seed=seed), config)
    if reference == "shipped":
        reference = shipped_reference(model.backbone_info)
    model.set_reference(reference)
    return model.to(device)


def l2_features(model: DikiCLIP, images: torch.Tensor) -> torch.Tensor:
    """Frozen, L2-normalised image features (what the task Gaussians are fitted on)."""
    with torch.no_grad():
        return model.encode_image(images.to(model.device))
