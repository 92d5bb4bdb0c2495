"""Summarise a `mutmut run` (the `make mutate` target) as JSON and Markdown.

Reads mutmut's per-file results (``mutants/<path>.meta``) and writes
``benchmarks/results/mutation.json`` (killed / survived / timeout / ... and the score, overall and
per module) and ``benchmarks/results/mutation.md`` (the figures and every surviving mutant).

Every survivor is either unexplained (listed with its diff: kill it with a test), or explained:

- ``message``: the mutant changes only the text of an exception's message (the string that is
  the first argument of ``SomethingError(...)``), recognised here token by token;
- ``equivalent``: listed by hand in ``benchmarks/mutation_equivalent.json`` as
  ``{"function": mutmut's function name, "change": [the diff's -/+ lines], "reason": ...}``. An
  entry matches on the function and the changed lines, not on mutmut's running number, so it
  survives renumbering; one whose lines no longer match is ignored and its mutant shows up as
  unexplained instead of silently keeping an old reason. An entry with ``"kind": "bug"`` marks a
  survivor that a test (xfail until the fix) already targets; it stays counted as a survivor.

Score = (killed + timeout) / (mutants - skipped), as mutmut's own badge computes it ("no tests"
mutants count against it); ``score_excluding_explained`` leaves the explained survivors out of the
denominator. ``--min-score`` makes the command fail when that one is lower.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tokenize
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENT_FILE = ROOT / "benchmarks" / "mutation_equivalent.json"
EXPLAINED = ("equivalent", "message")  # left out of score_excluding_explained; "bug" entries are not
NOT_MESSAGE_FIRST = {"ImageDecodeError"}  # exceptions whose first argument is not their message
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
    return [line.rstrip() for line in diff.splitlines() if line[:1] in "-+" and not line.startswith(("---", "+++"))]


def _tokens(line: str) -> list[tuple[int, str]]:
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if tok.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.COMMENT):
                out.append((tok.type, tok.string))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # an unclosed bracket at the end of a line: the tokens so far are enough
    return out


def message_only(diff: str) -> bool:
    """True when the mutant changes only an exception message: the first argument of ``...Error(``."""
    changed = changed_lines(diff)
    if len(changed) != 2 or not (changed[0].startswith("-") and changed[1].startswith("+")):
        return False
    old, new = _tokens(changed[0][1:]), _tokens(changed[1][1:])
    if len(old) != len(new):
        return False
    diffs = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
    if len(diffs) != 1 or diffs[0] < 2:
        return False
    i = diffs[0]
    t_old, (t_new, s_new) = old[i][0], new[i]
    is_message = t_old == tokenize.STRING and (t_new == tokenize.STRING or s_new == "None")
    # ImageDecodeError(code, message): its first argument is a machine-readable code, not text.
    name = old[i - 2][1] if old[i - 2][0] == tokenize.NAME else ""
    call = name.endswith(("Error", "Exception")) and name not in NOT_MESSAGE_FIRST and old[i - 1][1] == "("
    return is_message and call


def score(counts: Counter, explained: int = 0) -> float | None:
    tested = sum(counts.values()) - counts["skipped"] - explained
    if tested <= 0:
        return None
    return round(100.0 * (counts["killed"] + counts["timeout"]) / tested, 2)


def load_equivalent() -> dict[str, list[dict]]:
    entries = json.loads(EQUIVALENT_FILE.read_text()) if EQUIVALENT_FILE.exists() else []
    by_function: dict[str, list[dict]] = {}
    for entry in entries:
        by_function.setdefault(entry["function"], []).append(entry)
    return by_function


def explain(name: str, diff: str, equivalent: dict[str, list[dict]]) -> tuple[str, str] | None:
    function = name.rpartition("__mutmut_")[0]
    lines = changed_lines(diff)
    for entry in equivalent.get(function, []):
        if [line.rstrip() for line in entry["change"]] == lines:
            return entry.get("kind", "equivalent"), entry["reason"]
    if message_only(diff):
        return "message", "changes only the text of an exception message"
    return None


def summarise(results: dict[str, dict[str, str]], mutmut: str, wall_s: float | None, command: str) -> tuple[dict, str]:
    equivalent = load_equivalent()
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
                kind, reason = explain(name, diff, equivalent) or (None, None)
                survivors.append(
                    {"name": name, "module": source, "status": status, "diff": diff, "kind": kind, "reason": reason}
                )
    n_explained = sum(1 for s in survivors if s["kind"] in EXPLAINED)
    summary = {
        "tool": "mutmut 3.8.1",
        "command": command,
        "wall_seconds": None if wall_s is None else round(wall_s, 1),
        "mutants": sum(counts.values()),
        **{s.replace(" ", "_"): counts[s] for s in STATUSES},
        "score": score(counts),
        "message_survivors": sum(1 for s in survivors if s["kind"] == "message"),
        "equivalent_survivors": sum(1 for s in survivors if s["kind"] == "equivalent"),
        "known_bug_survivors": sum(1 for s in survivors if s["kind"] == "bug"),
        "unexplained_survivors": sum(1 for s in survivors if not s["kind"]),
        "score_excluding_explained": score(counts, n_explained),
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
        "| killed | survived | timeout | no tests | mutants | score | explained survivors | score without them |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {summary['killed']} | {summary['survived']} | {summary['timeout']} | {summary['no_tests']} | "
        f"{summary['mutants']} | {summary['score']}% | "
        f"{summary['message_survivors'] + summary['equivalent_survivors']} | {summary['score_excluding_explained']}% |",
        "",
        "Score = (killed + timeout) / (mutants - skipped). Explained survivors: equivalent mutants (no test",
        "can tell them from the code, reasons below) and mutants that change only an exception's message",
        "text. mutmut 3 mutates function bodies only, and no decorated function (`@torch.no_grad`,",
        "`@property`, `@contextmanager`, ...): those are outside these figures.",
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
    unexplained = [s for s in survivors if not s["kind"]]
    lines += ["", f"## Unexplained survivors ({len(unexplained)})", ""]
    if not unexplained:
        lines.append("None.")
    for s in unexplained:
        lines += [f"### `{s['name']}` ({s['status']})", "", "```diff", s["diff"], "```", ""]
    equivalent = [s for s in survivors if s["kind"] == "equivalent"]
    lines += ["", f"## Equivalent survivors ({len(equivalent)})", ""]
    for s in equivalent:
        changed = " → ".join(f"`{line[1:].strip()}`" for line in changed_lines(s["diff"]))
        lines.append(f"- `{s['name']}`: {changed}. {s['reason']}")
    bugs = [s for s in survivors if s["kind"] == "bug"]
    lines += ["", f"## Survivors behind a known bug ({len(bugs)})", ""]
    lines += ["Tests for these exist but are marked xfail until the bug is fixed; they count as survivors.", ""]
    lines += [] if bugs else ["None."]
    for s in bugs:
        changed = " → ".join(f"`{line[1:].strip()}`" for line in changed_lines(s["diff"]))
        lines.append(f"- `{s['name']}`: {changed}. {s['reason']}")
    messages = [s for s in survivors if s["kind"] == "message"]
    lines += ["", f"## Survivors that change only an exception message ({len(messages)})", ""]
    for s in messages:
        changed = " → ".join(f"`{line[1:].strip()}`" for line in changed_lines(s["diff"]))
        lines.append(f"- `{s['name']}`: {changed}")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / "mutants", help="mutmut's work folder")
    parser.add_argument("--mutmut", default=str(Path(sys.executable).with_name("mutmut")), help="the mutmut command")
    parser.add_argument("--wall-seconds", type=float, default=None, help="wall time of the run, for the record")
    parser.add_argument("--command", default="make mutate", help="the command that produced the run")
    parser.add_argument("--min-score", type=float, default=None, help="fail when score_excluding_explained is lower")
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
        f"timeout {summary['timeout']}, no tests {summary['no_tests']}; score {summary['score']}%, "
        f"{summary['score_excluding_explained']}% without {summary['message_survivors']} message-only and "
        f"{summary['equivalent_survivors']} equivalent survivors; {summary['unexplained_survivors']} unexplained "
        f"-> {args.out / 'mutation.md'}"
    )
    if args.min_score is not None and (summary["score_excluding_explained"] or 0.0) < args.min_score:
        print(f"mutation score below {args.min_score}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
