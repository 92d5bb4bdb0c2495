"""Model-level benchmark: frozen forward, gated two-pass inference, per-sample vs one adapter per
batch, training step, and Gaussian scoring at 11 and 1,000 tasks.

    python benchmarks/bench_model.py                          # CPU, small ViT (diki-small)
    python benchmarks/bench_model.py --backbone ViT-B-16 --device cuda --batch 256

Writes JSON to benchmarks/results/model-<backbone>-<device>.json and prints a summary. Targets:
per-sample gating within 10% of one adapter per batch; scoring 1,000 tasks under 5% of a
ViT-B-16 forward (the reference forward is measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from diki_model import DikiConfig, GaussianAccumulator, GaussianScorer, Route, create_diki_model
from diki_model.backbone import shipped_checkpoint
from diki_model.train import task_logits

RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(
    fn: Callable[[], object], items: int, device: torch.device, warmup: int, iters: int, min_s: float = 0.0
) -> float:
    """Items per second of fn, after warm-up; repeats until `iters` calls and `min_s` seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    n = 0
    while n < iters or time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    sync(device)
    return items * n / (time.perf_counter() - t0)


def add_benchmark_tasks(model, images: torch.Tensor, num_tasks: int) -> None:
    """Tasks with random V (so the residual branch does real work) and Gaussians that fit the images."""
    feats = model.encode_image(images).float().cpu()
    for t in range(num_tasks):
        model.add_task(f"task{t}", [f"class {c}" for c in range(10)])
        noisy = torch.cat([feats, feats + 0.01 * torch.randn_like(feats)])
        g = GaussianAccumulator(model.feature_dim).update(noisy).finalize()
        model.set_task_statistics(t, g, 0.0, 1.0, noisy.shape[0])
    with torch.no_grad():
        for _, _, layer in model.adapter_layers():
            for v in layer.values:
                v.normal_(0, 0.02)
    model.invalidate_caches()


def bench_scoring(dim: int, tasks: int, batch: int, device: torch.device, iters: int) -> float:
    gens = []
    base = GaussianAccumulator(dim).update(F.normalize(torch.randn(4 * dim, dim, dtype=torch.float64), dim=1))
    g = base.finalize()
    gens = [g] * tasks
    scorer = GaussianScorer(gens, device=device)
    x = F.normalize(torch.randn(batch, dim, device=device), dim=1)
    return rate(lambda: scorer.score(x), batch, device, warmup=2, iters=iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="diki-small" if shipped_checkpoint("diki-small") else "diki-test-tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=11)
    ap.add_argument("--classes", type=int, default=10, help="class prompts per training step")
    ap.add_argument("--train-batch", type=int, default=None, help="images per training step (default: --batch)")
    ap.add_argument("--vit-b-batch", type=int, default=4, help="batch for the ViT-B-16 reference forward (0 = skip)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the image tower")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True  # tower matmuls may use TF32; the scorer turns it off itself

    cfg = DikiConfig(gate="constant")  # gate 1 everywhere: every image takes the gated second pass
    model = create_diki_model(args.backbone, config=cfg, device=device, seed=0)
    if args.compile:
        model.clip.visual = torch.compile(model.clip.visual)
    size = model.backbone_info.image_size
    x = torch.randn(args.batch, 3, size, size, device=device)
    add_benchmark_tasks(model, x, args.tasks)
    b = args.batch
    res: dict[str, object] = {
        "backbone": args.backbone,
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch": b,
        "tasks": args.tasks,
        "feature_dim": model.feature_dim,
        "torch": torch.__version__,
    }
    w, it = 2, args.iters
    with torch.no_grad():
        res["frozen_forward_img_s"] = rate(lambda: model.encode_image(x), b, device, w, it)
        one = Route(task=0, gate=1.0)
        res["one_adapter_per_batch_img_s"] = rate(lambda: model.encode_image(x, one), b, device, w, it)
        mixed = Route(task=torch.arange(b, device=device) % args.tasks, gate=torch.rand(b, device=device))
        res["per_sample_adapter_img_s"] = rate(lambda: model.encode_image(x, mixed), b, device, w, it)
        res["gated_two_pass_img_s"] = rate(lambda: model.predict(x, top_k=1), b, device, w, it)
        model.config.ood_threshold = 2.0  # every image below threshold: answered by the frozen pass alone
        res["ood_one_pass_img_s"] = rate(lambda: model.predict(x, top_k=1), b, device, w, it)
        model.config.ood_threshold = 1e-3

    task = 0
    tokens = model.tokenize([f"a photo of a class {c}." for c in range(args.classes)])
    params = model.adapter_parameters(task)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=5.0)
    tb = args.train_batch or b
    xt = torch.randn(tb, 3, size, size, device=device)
    labels = torch.randint(0, args.classes, (tb,), device=device)

    def step() -> None:
        amp = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )
        with amp:
            logits = task_logits(model, task, xt, tokens)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    res["train_step_img_s"] = rate(step, tb, device, w, it)
    res["train_batch"] = tb
    for p in params:
        p.requires_grad_(False)

    score_batch = 256
    for tasks in (11, 1000):
        res[f"scoring_{tasks}_tasks_512d_img_s"] = bench_scoring(512, tasks, score_batch, device, iters=max(3, it))

    if args.vit_b_batch > 0:
        ref = create_diki_model("ViT-B-16", device=device, seed=0) if args.backbone != "ViT-B-16" else model
        xb = torch.randn(args.vit_b_batch if args.backbone != "ViT-B-16" else b, 3, 224, 224, device=device)
        with torch.no_grad():
            res["vit_b16_forward_img_s"] = rate(lambda: ref.encode_image(xb), xb.shape[0], device, 1, max(2, it // 2))
        vit = res["vit_b16_forward_img_s"]
        res["scoring_1000_tasks_pct_of_vit_b16_forward"] = 100.0 * vit / res["scoring_1000_tasks_512d_img_s"]
    res["per_sample_vs_one_adapter_ratio"] = res["per_sample_adapter_img_s"] / res["one_adapter_per_batch_img_s"]
    res["gated_vs_frozen_ratio"] = res["gated_two_pass_img_s"] / res["frozen_forward_img_s"]
    res["targets"] = {
        "per_sample_within_10pct_of_one_adapter": res["per_sample_vs_one_adapter_ratio"] >= 0.9,
        "scoring_1000_tasks_under_5pct_of_vit_b16": res.get("scoring_1000_tasks_pct_of_vit_b16_forward", 100) < 5,
    }
    out = args.out or RESULTS / f"model-{args.backbone}-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"backbone {args.backbone} on {res['device_name']} ({device}), batch {b}, {args.tasks} tasks")
    for k, v in res.items():
        if k.endswith("_img_s"):
            print(f"  {k:<40} {v:>12.1f}")
    print(f"  per-sample / one adapter per batch       {res['per_sample_vs_one_adapter_ratio']:.3f}  (target >= 0.90)")
    print(f"  gated two-pass / frozen forward          {res['gated_vs_frozen_ratio']:.3f}  (ceiling 0.5)")
    if "scoring_1000_tasks_pct_of_vit_b16_forward" in res:
        pct = res["scoring_1000_tasks_pct_of_vit_b16_forward"]
        print(f"  scoring 1,000 tasks / ViT-B-16 forward   {pct:.2f}%  (target < 5%)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
