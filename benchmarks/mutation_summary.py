"""Summarise a `mutmut run` (the `make mutate` target) as JSON and Markdown.

Reads mutmut's per-file results (``mutants/<path>.meta``) and writes
``benchmarks/results/mutation.json`` (killed / survived / timeout / ... and the score, overall and
per module) and ``benchmarks/results/mutation.md`` (the figures and every surviving mutant with its
diff). Survivors that are equivalent to the original code (no test can tell them apart) are listed
with their reason in ``benchmarks/mutation_equivalent.json`` ({mutant name: {"diff": the changed
line, "reason": why it is equivalent}}); an entry whose diff no longer matches is ignored, so a
renumbered mutant shows up as unexplained instead of silently keeping an old reason.

Score = (killed + timeout) / (all mutants - skipped), as mutmut's own badge computes it ("no tests"
mutants count against it). ``score_excluding_equivalent`` also leaves the explained equivalent
survivors out of the denominator. ``--min-score`` makes the command fail below a threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENT_FILE = ROOT / "benchmarks" / "mutation_equivalent.json"
STATUSES = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "skipped", "not checked")


def status_of(exit_code: int | None) -> str:
    """mutmut 3.8's exit-code classes (mutmut.stats.status_by_exit_code)."""
    if exit_code is None:
        return "not checked"
    if exit_code in (1, 3):
        return "killed"
    if exit_code == 0:
        return "survived"
    if exit_code in (5, 33):
        return "no tests"
    if exit_code == 34:
        return "skipped"
    if exit_code in (36, 24, -24, 152, 255):
        return "timeout"
    if exit_code == 37:
        return "caught by type check"
    if exit_code in (-11, -9):
        return "segfault"
    return "suspicious"


def load_results(mutants_dir: Path) -> dict[str, dict[str, str]]:
    """{source path: {mutant name: status}} from every ``.meta`` file mutmut wrote."""
    out: dict[str, dict[str, str]] = {}
    for meta in sorted(mutants_dir.rglob("*.py.meta")):
        source = meta.relative_to(mutants_dir).as_posix().removesuffix(".meta")
        data = json.loads(meta.read_text())
        codes = data.get("exit_code_by_key", {})
        if codes:
            out[source] = {name: status_of(code) for name, code in sorted(codes.items())}
    return out


def mutant_diff(name: str, source: str, mutmut: str) -> str:
    """The mutant's diff as ``mutmut show NAME`` prints it (paths relative to the repository root)."""
    try:  # in-process: one ``mutmut show`` per survivor would start a Python each time
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        return get_diff_for_mutant(name, path=source).strip()
    except Exception:
        shown = subprocess.run([mutmut, "show", name], cwd=ROOT, capture_output=True, text=True, check=False)
        return "\n".join(line for line in shown.stdout.splitlines() if not line.startswith("# ")).strip()


def changed_lines(diff: str) -> list[str]:
    """The ``-``/``+`` lines of a diff (without the file headers): what identifies a mutant's change."""
    return [
        line.rstrip()
        for line in diff.splitlines()
        if line[:1] in "-+" and not line.startswith(("---", "+++"))
    ]


def score(counts: Counter, equivalent: int = 0) -> float | None:
    tested = sum(counts.values()) - counts["skipped"] - equivalent
    if tested <= 0:
        return None
    return round(100.0 * (counts["killed"] + counts["timeout"]) / tested, 2)


def summarise(results: dict[str, dict[str, str]], mutmut: str, wall_s: float | None, command: str) -> tuple[dict, str]:
    equivalent_notes = json.loads(EQUIVALENT_FILE.read_text()) if EQUIVALENT_FILE.exists() else {}
    counts: Counter = Counter()
    modules = {}
    survivors = []
    for source, mutants in results.items():
        c = Counter(mutants.values())
        counts.update(c)
        modules[source] = {"mutants": len(mutants), **{s: c[s] for s in STATUSES if c[s]}, "score": score(c)}
        for name, status in mutants.items():
            if status in ("survived", "no tests", "suspicious"):
                diff = mutant_diff(name, source, mutmut)
                note = equivalent_notes.get(name)
                reason = None
                if note and changed_lines(note["diff"]) == changed_lines(diff):
                    reason = note["reason"]
                survivors.append({"name": name, "module": source, "status": status, "diff": diff, "equivalent": reason})
    n_equivalent = sum(1 for s in survivors if s["equivalent"])
    summary = {
        "tool": "mutmut 3.8.1",
        "command": command,
        "wall_seconds": None if wall_s is None else round(wall_s, 1),
        "mutants": sum(counts.values()),
        **{s.replace(" ", "_"): counts[s] for s in STATUSES},
        "score": score(counts),
        "equivalent_survivors": n_equivalent,
        "unexplained_survivors": len(survivors) - n_equivalent,
        "score_excluding_equivalent": score(counts, n_equivalent),
        "modules": modules,
        "survivors": [{k: v for k, v in s.items() if k != "diff"} for s in survivors],
    }
    return summary, markdown(summary, survivors)


def markdown(summary: dict, survivors: list[dict]) -> str:
    wall = summary["wall_seconds"]
    lines = [
        "# Mutation testing",
        "",
        f"`{summary['command']}` ({summary['tool']}" + (f", {wall / 60:.1f} min wall" if wall else "") + ").",
        "",
        "| killed | survived | timeout | no tests | suspicious | mutants | score | score without equivalent |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary['killed']} | {summary['survived']} | {summary['timeout']} | {summary['no_tests']} | "
        f"{summary['suspicious']} | {summary['mutants']} | {summary['score']}% | {summary['score_excluding_equivalent']}% |",
        "",
        "Score = (killed + timeout) / (mutants - skipped). mutmut 3 mutates only function bodies and leaves",
        "decorated functions (`@torch.no_grad`, `@property`, `@contextmanager`, ...) alone; see the",
        "notes in `benchmarks/mutation_equivalent.json` for how those are covered.",
        "",
        "## Per module",
        "",
        "| module | mutants | killed | survived | timeout | no tests | score |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for module, m in summary["modules"].items():
        lines.append(
            f"| `{module}` | {m['mutants']} | {m.get('killed', 0)} | {m.get('survived', 0)} | {m.get('timeout', 0)} | "
            f"{m.get('no tests', 0)} | {m['score']}% |"
        )
    unexplained = [s for s in survivors if not s["equivalent"]]
    equivalent = [s for s in survivors if s["equivalent"]]
    lines += ["", f"## Survivors without an explanation ({len(unexplained)})", ""]
    if not unexplained:
        lines.append("None.")
    for s in unexplained:
        lines += [f"### `{s['name']}` ({s['status']})", "", "```diff", s["diff"], "```", ""]
    lines += ["", f"## Equivalent survivors ({len(equivalent)})", ""]
    lines += ["No test can tell these from the original code:", ""] if equivalent else ["None."]
    for s in equivalent:
        changed = " / ".join(f"`{line}`" for line in changed_lines(s["diff"]))
        lines.append(f"- `{s['name']}`: {changed}. {s['equivalent']}")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / "mutants", help="mutmut's work folder")
    parser.add_argument("--mutmut", default=str(Path(sys.executable).with_name("mutmut")), help="the mutmut command")
    parser.add_argument("--wall-seconds", type=float, default=None, help="wall time of the run, for the record")
    parser.add_argument("--command", default="make mutate", help="the command that produced the run")
    parser.add_argument("--min-score", type=float, default=None, help="fail when score_excluding_equivalent is lower")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.chdir(ROOT)  # mutmut reads its work folder relative to the repository root
    results = load_results(args.mutants)
    if not results:
        print(f"no mutmut results under {args.mutants}; run `make mutate` first", file=sys.stderr)
        return 2
    summary, md = summarise(results, args.mutmut, args.wall_seconds, args.command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutation.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "mutation.md").write_text(md)
    print(
        f"mutants {summary['mutants']}: killed {summary['killed']}, survived {summary['survived']}, "
        f"timeout {summary['timeout']}, no tests {summary['no_tests']}; score {summary['score']}% "
        f"({summary['score_excluding_equivalent']}% without {summary['equivalent_survivors']} equivalent); "
        f"{summary['unexplained_survivors']} unexplained survivors -> {args.out / 'mutation.md'}"
    )
    if args.min_score is not None and (summary["score_excluding_equivalent"] or 0.0) < args.min_score:
        print(f"mutation score below {args.min_score}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
