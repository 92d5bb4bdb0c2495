"""Benchmark reports: JSON, heatmap PNGs and a markdown table, from MethodResults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diki_model.bench.stream import MethodResult
from diki_model.metrics import plot_heatmap


def summary_rows(results: dict[str, MethodResult]) -> list[dict[str, Any]]:
    rows = []
    for m, r in results.items():
        met = r.metrics()
        ret = r.retention()
        held = [v for k, v in ret.items() if r.roles[r.eval_names.index(k)] == "heldout"]
        pre = [v for k, v in ret.items() if r.roles[r.eval_names.index(k)] == "pretrain"]
        rows.append(
            {
                "method": m,
                "transfer": met["transfer"],
                "average": met["average"],
                "last": met["last"],
                "heldout_change": sum(held) / len(held) if held else None,
                "pretrain_change": sum(pre) / len(pre) if pre else None,
                "routing_last": r.routing_accuracy[-1] if r.routing_accuracy else None,
                "train_seconds": r.train_seconds,
                "eval_seconds": r.eval_seconds,
            }
        )
    return rows


def markdown_table(results: dict[str, MethodResult]) -> str:
    def f(v: float | None, sign: bool = False) -> str:
        if v is None:
            return "-"
        return f"{v:+.1f}" if sign else f"{v:.1f}"

    lines = [
        "| method | Transfer | Average | Last | held-out change | pre-training change | routing (last step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary_rows(results):
        lines.append(
            f"| {r['method']} | {f(r['transfer'])} | {f(r['average'])} | {f(r['last'])} | "
            f"{f(r['heldout_change'], True)} | {f(r['pretrain_change'], True)} | {f(r['routing_last'])} |"
        )
    return "\n".join(lines)


def write_report(results: dict[str, MethodResult], out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``results.json``, ``summary.md`` and one heatmap per method; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    payload = {"meta": meta, "summary": summary_rows(results), "methods": {m: r.to_dict() for m, r in results.items()}}
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(payload, indent=2))
    paths["summary"] = out / "summary.md"
    paths["summary"].write_text(markdown_table(results) + "\n")
    for m, r in results.items():
        rows = ["zero-shot"] + [f"after {n}" for n, role in zip(r.eval_names, r.roles, strict=True) if role == "stream"]
        paths[f"heatmap-{m}"] = plot_heatmap(
            r.acc, r.eval_names, out / f"heatmap-{m}.png", title=f"{m}: accuracy (%) after each step", row_names=rows
        )
    return paths
