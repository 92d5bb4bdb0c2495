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


# ------------------------------------------------------------------------- several seeds and orders
AGG_COLUMNS = (
    ("transfer", "Transfer"),
    ("average", "Average"),
    ("last", "Last"),
    ("heldout_change", "held-out change"),
    ("pretrain_change", "pre-training change"),
    ("routing_last", "routing (last step)"),
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, var**0.5


def _fmt(values: list[float | None], sign: bool = False) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mean, std = _mean_std(vals)
    body = f"{mean:+.1f}" if sign else f"{mean:.1f}"
    return body if len(vals) == 1 else f"{body} ± {std:.1f}"


def aggregate_runs(runs: dict[str, dict[str, MethodResult]]) -> dict[str, Any]:
    """Mean and spread over runs (``{"order-1/seed-0": results, ...}``) of every summary column and per-set change."""
    methods = list(next(iter(runs.values())))
    out: dict[str, Any] = {"runs": list(runs), "methods": {}}
    for m in methods:
        rows = [next(r for r in summary_rows({m: res[m]})) for res in runs.values()]
        per_set: dict[str, list[float]] = {}
        for res in runs.values():
            for name, change in res[m].retention().items():
                per_set.setdefault(name, []).append(change)
        out["methods"][m] = {
            "columns": {key: [row[key] for row in rows] for key, _ in AGG_COLUMNS},
            "per_set_change": per_set,
            "refused": {run: res[m].refused for run, res in runs.items()},
        }
    return out


def aggregate_markdown(agg: dict[str, Any], bound_method: str = "true-task") -> str:
    """Tables of mean ± standard deviation over the runs: the summary, then each held-out and pre-training set."""
    lines = [f"Mean ± standard deviation over {len(agg['runs'])} runs ({', '.join(agg['runs'])}).", ""]
    lines.append("| method | " + " | ".join(title for _, title in AGG_COLUMNS) + " |")
    lines.append("|---|" + "---|" * len(AGG_COLUMNS))
    for m, a in agg["methods"].items():
        cells = [_fmt(a["columns"][key], sign="change" in key) for key, _ in AGG_COLUMNS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    bound = agg["methods"].get(bound_method)
    if bound is not None:
        lines += ["", f"Last as a share of the {bound_method} bound (run by run, then averaged):", ""]
        lines += ["| method | Last / bound |", "|---|---|"]
        for m, a in agg["methods"].items():
            if m in (bound_method, "zero-shot"):
                continue
            shares = [100 * x / b for x, b in zip(a["columns"]["last"], bound["columns"]["last"], strict=True) if b]
            lines.append(f"| {m} | {_fmt(shares)}% |")
    sets = sorted({s for a in agg["methods"].values() for s in a["per_set_change"]})
    if sets:
        shown = [m for m in agg["methods"] if m not in ("zero-shot", bound_method)]
        lines += ["", "Change vs zero-shot after the last step, per held-out and pre-training set (points):", ""]
        lines += ["| set | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for s in sets:
            cells = [_fmt(agg["methods"][m]["per_set_change"].get(s, []), sign=True) for m in shown]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    refusing = {m: a["refused"] for m, a in agg["methods"].items() if any(a["refused"].values())}
    if refusing:
        lines += ["", "Tasks the learning check refused (validation split only):", ""]
        for m, per_run in refusing.items():
            lines.append(f"- {m}: " + "; ".join(f"{run}: {', '.join(r) or 'none'}" for run, r in per_run.items()))
    return "\n".join(lines)


def write_doc_section(doc: str | Path, marker: str, body: str) -> None:
    """Replace the text between ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` in ``doc`` (appended if absent)."""
    path = Path(doc)
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
