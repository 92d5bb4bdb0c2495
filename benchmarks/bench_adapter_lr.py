"""Learning-rate sweep of the residual K/V on one backbone: which SGD rate learns each domain.

    python benchmarks/bench_adapter_lr.py                                # diki-small, lr 5,50,150, 5 domains
    python benchmarks/bench_adapter_lr.py --lrs 5,20,50 --domains textures,optdigits --images 400

For every domain and rate, a fresh model learns that one task (statistics, then K/V with the
authors' schedule: SGD without momentum, cosine per iteration, best epoch on a 10% validation
split) from the first ``--images`` training images. The rate is chosen on that validation split
(the best epoch's validation accuracy, true task and gate 1), never on test images; the test
images are scored afterwards, with the true task and gate 1 (the upper bound DIKI's routing aims
at) and frozen (zero-shot), only to report what the chosen rate gives. A
linear probe on the frozen image features (logistic regression) gives what the frozen features
alone can separate: the ceiling a K/V that barely moves the features can approach.

This is how ``diki_model/checkpoints/<name>/adapter_training.json`` chose its rate. Writes
benchmarks/results/adapter-lr-<backbone>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diki_model import DikiConfig, TrainConfig, create_diki_model, learn_task  # noqa: E402
from diki_model.bench.offline import domain_task  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEFAULT_DOMAINS = "textures,synthetic-textures,outline-shapes,glyph-letters,optdigits"


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=10.0).fit(train_x.numpy(), train_y.numpy())
    return float((clf.predict(test_x.numpy()) == test_y.numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="diki-small")
    parser.add_argument("--domains", default=DEFAULT_DOMAINS)
    parser.add_argument("--lrs", default="5,50,150")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=600, help="training images per domain")
    parser.add_argument("--test", type=int, default=400, help="test images per domain")
    parser.add_argument("--data", default=".diki/data", help="built domains (missing ones are built)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lrs = [float(v) for v in args.lrs.split(",")]
    rows = []
    for name in [d.strip() for d in args.domains.split(",") if d.strip()]:
        data = domain_task(Path(args.data), name)
        probe_model = create_diki_model(args.backbone, None, DikiConfig(), seed=0)
        xtr, ytr = data.train(probe_model.preprocess).tensors
        xte, yte = data.test(probe_model.preprocess).tensors
        xtr, ytr, xte, yte = xtr[: args.images], ytr[: args.images], xte[: args.test], yte[: args.test]
        with torch.no_grad():
            ftr = F.normalize(probe_model.encode_image(xtr), dim=-1)
            fte = F.normalize(probe_model.encode_image(xte), dim=-1)
        probe = linear_probe(ftr, ytr, fte, yte)
        for lr in lrs:
            model = create_diki_model(args.backbone, None, DikiConfig(), seed=0)
            cfg = TrainConfig(lr=lr, epochs=args.epochs, batch_size=args.batch_size, seed=0)
            t0 = time.perf_counter()
            task, result = learn_task(model, name, data.classes, xtr, ytr, data.template, cfg, progress=False)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                tuned = model.predict(xte, labels=data.classes, template=data.template, task=task, gate=1.0)
                frozen = model.predict(xte, labels=data.classes, template=data.template, task=task, gate=0.0)
            row = {
                "domain": name,
                "lr": lr,
                "zero_shot": round(100 * float((frozen.label_index == yte).float().mean()), 2),
                "val_true_task": round(100 * float(result.best_val or 0.0), 2),
                "true_task": round(100 * float((tuned.label_index == yte).float().mean()), 2),
                "linear_probe": round(100 * probe, 2),
                "best_epoch": result.best_epoch,
                "final_train_loss": round(result.history[-1].train_loss, 4),
                "seconds": round(seconds, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = {}
    for name in dict.fromkeys(r["domain"] for r in rows):
        mine = [r for r in rows if r["domain"] == name]
        best[name] = max(mine, key=lambda r: r["val_true_task"])["lr"]
    val_mean = {lr: float(np.mean([r["val_true_task"] for r in rows if r["lr"] == lr])) for lr in lrs}
    mean = {lr: float(np.mean([r["true_task"] for r in rows if r["lr"] == lr])) for lr in lrs}
    out = {
        "backbone": args.backbone,
        "command": "python benchmarks/bench_adapter_lr.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("data", "threads")
        ),
        "rows": rows,
        "best_lr_per_domain": best,
        "chosen_on": "validation split (10% of the training images)",
        "chosen_lr": max(val_mean, key=lambda lr: val_mean[lr]),
        "mean_val_true_task_per_lr": {str(k): round(v, 2) for k, v in val_mean.items()},
        "mean_true_task_per_lr": {str(k): round(v, 2) for k, v in mean.items()},
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"adapter-lr-{args.backbone}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\n{'domain':20s} {'zero-shot':>9s} {'probe':>6s} " + " ".join(f"lr={lr:g}".rjust(8) for lr in lrs))
    for name in best:
        mine = {r["lr"]: r for r in rows if r["domain"] == name}
        first = next(iter(mine.values()))
        print(
            f"{name:20s} {first['zero_shot']:9.1f} {first['linear_probe']:6.1f} "
            + " ".join(f"{mine[lr]['true_task']:8.1f}" for lr in lrs)
        )
    print("mean validation accuracy per rate (the choice): " + ", ".join(f"{k}: {v:.1f}" for k, v in val_mean.items()))
    print("mean test accuracy per rate (reported only): " + ", ".join(f"{k}: {v:.1f}" for k, v in mean.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
