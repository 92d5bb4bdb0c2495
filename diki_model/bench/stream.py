"""The continual-learning benchmark: a task stream, every method in one harness, the MTIL metrics.

After each training step t (and once before any, the zero-shot row), every evaluation set is
scored with its own class names: acc[t, i]. Stream columns give Transfer / Average / Last (exactly
as MTIL defines them); held-out and pre-training columns give zero-shot retention (forward
forgetting). Methods, all on the same backbone and data:

- ``zero-shot``: the frozen model.
- ``diki``: the product's defaults: residual K/V + Gaussian routing + the likelihood-ratio gate
  against the backbone's reference density (the standardised gate when it has none), and a task
  that does not beat zero-shot on its own validation split is refused (never routed to).
- ``diki-standardized``: the same, with the standardised gate instead of the likelihood ratio.
- ``diki-paper``: the same trained tasks with the authors' gate, sigmoid(S/512 - 1).
- ``iki``: the same trained tasks, routed by the Gaussians but with gate 1 (no calibration).
- ``true-task``: the same trained tasks, each learned dataset given its own task with gate 1 and
  every other set the frozen model: the upper bound of routing.
- ``prefix``: L2P-style prompting with the same parameter budget: the task's tokens prepended to
  the frozen keys/values in one softmax, the task chosen by key matching (cosine to the task's
  mean frozen feature), no gate.
- ``finetune``: sequential fine-tuning of the last block of both towers, one task after another.

The four DIKI-family methods share one training run (training always uses the true task with
gate 1; they differ only at inference), and every method reuses cached frozen features, so the
whole default benchmark fits a small CPU budget.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from diki_model.config import DikiConfig
from diki_model.metrics import stream_metrics
from diki_model.model import DikiCLIP, create_diki_model
from diki_model.probe import Learnability, LearnedVerdict, learned_verdict, task_counts
from diki_model.train import (
    TrainConfig,
    apply_statistics,
    collect_statistics,
    num_batches,
    split_train_val,
    train_task,
)

METHODS = ("zero-shot", "diki", "diki-standardized", "diki-paper", "iki", "true-task", "prefix", "finetune")
DIKI_FAMILY = ("diki", "diki-standardized", "diki-paper", "iki", "true-task")
# Methods that, like the product, never route to a task refused by the learning check.
REFUSING = ("diki", "diki-standardized")
ROLES = ("stream", "heldout", "pretrain")


@dataclass
class TaskData:
    """One dataset of a benchmark: its label space and how to load its splits."""

    name: str
    classes: list[str]
    template: str
    role: str  # "stream" | "heldout" | "pretrain"
    train: Callable[[Callable], Dataset] | None  # preprocess -> Dataset of (image tensor, label)
    test: Callable[[Callable], Dataset]


@dataclass
class MethodResult:
    method: str
    eval_names: list[str]
    roles: list[str]
    acc: np.ndarray  # (steps + 1, eval sets): row 0 before any step
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    routing_accuracy: list[float] = field(default_factory=list)  # per step, over learned stream test sets
    mean_gate: dict[str, list[float]] = field(default_factory=dict)  # eval set -> gate per step
    refused: list[str] = field(default_factory=list)  # stream tasks the learning check refused
    learning: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> validation figures

    def stream_matrix(self) -> np.ndarray:
        cols = [i for i, r in enumerate(self.roles) if r == "stream"]
        return self.acc[1:, cols]

    def metrics(self) -> dict[str, float]:
        return stream_metrics(self.stream_matrix()).as_dict()

    def retention(self) -> dict[str, float]:
        """Accuracy change (points) after the last step vs zero-shot, per held-out/pre-training set."""
        return {
            n: float(self.acc[-1, i] - self.acc[0, i])
            for i, (n, r) in enumerate(zip(self.eval_names, self.roles, strict=True))
            if r != "stream"
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "eval_names": self.eval_names,
            "roles": self.roles,
            "acc": self.acc.round(3).tolist(),
            "metrics": self.metrics(),
            "retention": self.retention(),
            "train_seconds": round(self.train_seconds, 2),
            "eval_seconds": round(self.eval_seconds, 2),
            "routing_accuracy": self.routing_accuracy,
            "mean_gate": self.mean_gate,
            "refused": self.refused,
            "learning": self.learning,
        }


class Split:
    """A dataset split as batches: in-memory tensors when small, a DataLoader stream when large."""

    def __init__(self, ds: Dataset, limit: int | None = None, workers: int = 0) -> None:
        self.workers = workers
        if isinstance(ds, TensorDataset):
            x, y = ds.tensors[0], ds.tensors[1]
            self.x, self.y, self.ds = (x[:limit], y[:limit], None) if limit else (x, y, None)
        else:
            n = len(ds) if limit is None else min(limit, len(ds))
            self.x = self.y = None
            self.ds = ds if n == len(ds) else Subset(ds, range(n))

    def __len__(self) -> int:
        return len(self.x) if self.x is not None else len(self.ds)

    def batches(
        self, batch_size: int, indices: torch.Tensor | None = None, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.arange(len(self)) if indices is None else indices
        if shuffle:
            idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
        if self.x is not None:
            for i in range(0, len(idx), batch_size):
                j = idx[i : i + batch_size]
                yield self.x[j], self.y[j]
            return
        loader = DataLoader(Subset(self.ds, idx.tolist()), batch_size=batch_size, num_workers=self.workers)
        for x, y in loader:
            yield x, torch.as_tensor(y, dtype=torch.long)


@dataclass
class _EvalSet:
    data: TaskData
    split: Split
    frozen: torch.Tensor  # frozen features of the shared backbone


class StreamBenchmark:
    """Runs the stream for the requested methods; ``run()`` returns one MethodResult per method."""

    def __init__(
        self,
        backbone: str,
        pretrained: str | None,
        stream: Sequence[TaskData],
        evals: Sequence[TaskData],
        methods: Sequence[str] = METHODS,
        train_cfg: TrainConfig | None = None,
        config: DikiConfig | None = None,
        device: str = "cpu",
        train_limit: int | None = None,
        test_limit: int | None = None,
        batch_size: int = 256,
        finetune_lr: float = 1e-4,
        seed: int = 0,
        workers: int = 0,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        names = [t.name for t in stream]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"the stream needs distinct task names, got {names}")
        for t in stream:
            if t.train is None:
                raise ValueError(f"stream task {t.name!r} has no training split")
        self.backbone, self.pretrained = backbone, pretrained
        self.stream = list(stream)
        # Every stream task is also evaluated; extra sets (held-out, pre-training) come after.
        self.evals = self.stream + [e for e in evals if e.name not in names]
        self.methods = list(methods)
        self.train_cfg = train_cfg or TrainConfig()
        self.config = config or DikiConfig()
        self.device = device
        self.train_limit, self.test_limit, self.batch_size = train_limit, test_limit, batch_size
        self.finetune_lr, self.seed, self.workers = finetune_lr, seed, workers
        self.progress, self.log = progress, log

    # ------------------------------------------------------------------------------- setup
    def _model(self, **overrides: Any) -> DikiCLIP:
        cfg = copy.deepcopy(self.config)
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return create_diki_model(self.backbone, self.pretrained, cfg, device=self.device, seed=self.seed)

    def _load(self, model: DikiCLIP) -> None:
        t0 = time.perf_counter()
        self.train_sets: dict[str, Split] = {}
        for t in self.stream:
            self.train_sets[t.name] = Split(t.train(model.preprocess), self.train_limit, self.workers)
        self.eval_sets: list[_EvalSet] = []
        for e in tqdm(self.evals, desc="frozen features", disable=not self.progress, leave=False):
            split = Split(e.test(model.preprocess), self.test_limit, self.workers)
            self.eval_sets.append(_EvalSet(e, split, self._frozen(model, split)))
        self.log(
            f"loaded {len(self.stream)} stream tasks, {len(self.eval_sets)} evaluation sets "
            f"in {time.perf_counter() - t0:.1f}s"
        )

    @torch.no_grad()
    def _frozen(self, model: DikiCLIP, split: Split) -> torch.Tensor:
        return torch.cat([model.encode_image(x.to(model.device)).cpu() for x, _ in split.batches(self.batch_size)])

    # ----------------------------------------------------------------------------- running
    def run(self) -> dict[str, MethodResult]:
        base = self._model()
        self._load(base)
        results: dict[str, MethodResult] = {}
        if "zero-shot" in self.methods:
            results["zero-shot"] = self._run_zero_shot(base)
        family = [m for m in self.methods if m in DIKI_FAMILY]
        if family:
            results.update(self._run_diki_family(base, family))
        if "prefix" in self.methods:
            results["prefix"] = self._run_prefix()
        if "finetune" in self.methods:
            results["finetune"] = self._run_finetune()
        return {m: results[m] for m in self.methods}

    def _new_result(self, method: str) -> MethodResult:
        steps = len(self.stream)
        return MethodResult(
            method=method,
            eval_names=[e.data.name for e in self.eval_sets],
            roles=[e.data.role for e in self.eval_sets],
            acc=np.zeros((steps + 1, len(self.eval_sets))),
        )

    def _accuracy(self, model: DikiCLIP, ev: _EvalSet, frozen: torch.Tensor | None = None, **kw: Any):
        correct, gates, tasks, start = 0, [], [], 0
        frozen = ev.frozen if frozen is None else frozen
        for x, y in ev.split.batches(self.batch_size):
            sl = slice(start, start + len(y))
            start += len(y)
            extra = {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
            p = model.predict(
                x, labels=ev.data.classes, template=ev.data.template, top_k=1, frozen_features=frozen[sl], **extra
            )
            correct += int((p.label_index == y).sum())
            gates.append(p.gate)
            tasks.append(p.task_index)
        return 100.0 * correct / max(start, 1), torch.cat(gates), torch.cat(tasks)

    def _run_zero_shot(self, model: DikiCLIP) -> MethodResult:
        res = self._new_result("zero-shot")
        t0 = time.perf_counter()
        row = [self._accuracy(model, ev)[0] for ev in self.eval_sets]
        res.acc[:] = np.asarray(row)[None, :]  # the frozen model never changes
        res.eval_seconds = time.perf_counter() - t0
        return res

    def _train(self, model: DikiCLIP, step: int) -> float:
        secs, _ = self._train_and_check(model, step)
        return secs

    def _train_and_check(self, model: DikiCLIP, step: int) -> tuple[float, LearnedVerdict | None]:
        t = self.stream[step]
        data = self.train_sets[t.name]
        cfg = self.train_cfg
        task = model.add_task(t.name, t.classes, t.template, seed=cfg.seed)
        t0 = time.perf_counter()
        apply_statistics(model, task, collect_statistics(model, data.batches(self.batch_size)))
        tr, va = split_train_val(len(data), cfg.val_fraction, cfg.seed)

        def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return data.batches(cfg.batch_size, tr, shuffle=True, seed=cfg.seed * 10_007 + epoch)

        def val() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return data.batches(self.batch_size, va)

        train_task(
            model,
            task,
            train_batches,
            num_batches(len(tr), cfg.batch_size),
            cfg,
            val if len(va) else None,
            progress=self.progress,
        )
        secs = time.perf_counter() - t0
        if not len(va):
            return secs, None
        # The product's learning check, on the task's validation split only (never its test images).
        branch = task_counts(model, task, val(), gate=1.0)
        zero = task_counts(model, task, val(), gate=0.0)
        n = int(branch[1])
        m = Learnability(n, len(t.classes), float(branch[0]) / n, float(zero[0]) / n)
        return secs, learned_verdict(m)

    def _run_diki_family(self, model: DikiCLIP, family: list[str]) -> dict[str, MethodResult]:
        results = {m: self._new_result(m) for m in family}
        gates = {
            "diki": (self.config.gate, self.config.gate_params),
            "diki-standardized": (
                "standardized",
                self.config.gate_params if self.config.gate == "standardized" else {},
            ),
            "diki-paper": ("paper", {}),
            "iki": ("constant", {"value": 1.0}),
        }
        for m in family:
            results[m].acc[0] = self._zero_shot_row(model)
        stream_names = [t.name for t in self.stream]
        for step in range(len(self.stream)):
            self.log(f"[diki] step {step + 1}/{len(self.stream)}: learning {self.stream[step].name}")
            secs, verdict = self._train_and_check(model, step)
            name = self.stream[step].name
            for m in family:
                results[m].train_seconds += secs / len(family)
                if verdict is not None:
                    results[m].learning[name] = {"ok": verdict.ok, "reasons": verdict.reasons, **verdict.checks}
                    if not verdict.ok and m in REFUSING:
                        results[m].refused.append(name)
            if verdict is not None and not verdict.ok:
                self.log(f"[diki] {name} refused: " + "; ".join(verdict.reasons))
            for m in family:
                t0 = time.perf_counter()
                refused = results[m].refused if m in REFUSING else []
                for rec in model.tasks:
                    rec.enabled = rec.name not in refused
                routed_ok, routed_n = 0, 0
                for col, ev in enumerate(self.eval_sets):
                    name = ev.data.name
                    learned = name in stream_names[: step + 1]
                    if m == "true-task":
                        if learned:
                            acc, g, _ = self._accuracy(model, ev, task=stream_names.index(name), gate=1.0)
                        else:
                            acc, g, _ = self._accuracy(model, ev, task=0, gate=0.0)
                    else:
                        gname, params = gates[m]
                        model.set_gate(gname, **params)
                        acc, g, tasks = self._accuracy(model, ev)
                        if learned and name not in refused:
                            routed_ok += int((tasks == stream_names.index(name)).sum())
                            routed_n += len(tasks)
                    results[m].acc[step + 1, col] = acc
                    results[m].mean_gate.setdefault(name, []).append(round(float(g.mean()), 4))
                model.set_gate(self.config.gate, **self.config.gate_params)
                for rec in model.tasks:
                    rec.enabled = True
                if routed_n:
                    results[m].routing_accuracy.append(round(100.0 * routed_ok / routed_n, 2))
                results[m].eval_seconds += time.perf_counter() - t0
        return results

    def _zero_shot_row(self, model: DikiCLIP) -> np.ndarray:
        if not hasattr(self, "_zs_row"):
            self._zs_row = np.asarray([self._accuracy(model, ev)[0] for ev in self.eval_sets])
        return self._zs_row

    def _run_prefix(self) -> MethodResult:
        model = self._model(branch="prefix", gate="constant", gate_params={"value": 1.0})
        res = self._new_result("prefix")
        res.acc[0] = self._zero_shot_row(model)
        keys: list[torch.Tensor] = []
        stream_names = [t.name for t in self.stream]
        for step in range(len(self.stream)):
            self.log(f"[prefix] step {step + 1}/{len(self.stream)}: learning {self.stream[step].name}")
            res.train_seconds += self._train(model, step)
            keys.append(F.normalize(self._frozen(model, self.train_sets[self.stream[step].name]).mean(0), dim=0))
            key_mat = torch.stack(keys)
            t0 = time.perf_counter()
            ok, n = 0, 0
            for col, ev in enumerate(self.eval_sets):
                match = (ev.frozen @ key_mat.T.to(ev.frozen.device)).argmax(1).cpu()
                acc, _, _ = self._accuracy(model, ev, task=match, gate=1.0)
                res.acc[step + 1, col] = acc
                if ev.data.name in stream_names[: step + 1]:
                    ok += int((match == stream_names.index(ev.data.name)).sum())
                    n += len(match)
            res.routing_accuracy.append(round(100.0 * ok / max(n, 1), 2))
            res.eval_seconds += time.perf_counter() - t0
        return res

    def _run_finetune(self) -> MethodResult:
        model = self._model()
        res = self._new_result("finetune")
        res.acc[0] = self._zero_shot_row(model)
        clip = model.clip
        params = [
            *clip.visual.transformer.resblocks[-1].parameters(),
            *clip.transformer.resblocks[-1].parameters(),
            *clip.visual.ln_post.parameters(),
            clip.visual.proj,
            *clip.ln_final.parameters(),
            clip.text_projection,
        ]
        cfg = self.train_cfg
        for step, t in enumerate(self.stream):
            self.log(f"[finetune] step {step + 1}/{len(self.stream)}: learning {t.name}")
            data = self.train_sets[t.name]
            t0 = time.perf_counter()
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=self.finetune_lr, weight_decay=0.0)
            tokens = model.tokenize([t.template.format(c) for c in t.classes])
            steps = cfg.epochs * num_batches(len(data), cfg.batch_size)
            bar = tqdm(total=steps, desc=f"finetune {t.name}", disable=not self.progress, leave=False)
            for epoch in range(cfg.epochs):
                for x, y in data.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 10_007 + step * 101 + epoch):
                    img = F.normalize(clip.encode_image(x.to(model.device)), dim=-1)
                    txt = F.normalize(clip.encode_text(tokens), dim=-1)
                    loss = F.cross_entropy(model.logit_scale * img @ txt.T, y.to(model.device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
            bar.close()
            for p in params:
                p.requires_grad_(False)
            model.invalidate_caches()
            res.train_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            for col, ev in enumerate(self.eval_sets):
                frozen = self._frozen(model, ev.split)  # the backbone itself has changed
                res.acc[step + 1, col] = self._accuracy(model, ev, frozen=frozen)[0]
            res.eval_seconds += time.perf_counter() - t0
        return res
