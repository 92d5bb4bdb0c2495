"""The main job, end to end on embedded defaults: drop datasets, watch them get learned and served.

Everything runs on this machine: a local folder as object storage, MLflow on a sqlite file,
ephemeral Prefect, Ray in this process, Serve on 127.0.0.1. The demo builds the offline domains,
starts the Serve app and the watcher, drops the demo tasks into ``incoming/`` one after another,
and, while each is being learned, sends real HTTP requests to the endpoint: images from learned
tasks, from the task being learned (not yet served) and from a domain never learned.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEMO_TASKS = ("faces", "fashion-inverted", "optdigits", "textures")
DEMO_HELDOUT = ("shape-colour", "clothing-colour")
PROBES_PER_SET = 4


@dataclass
class ProbeSet:
    """A few test images of one domain, with their true class names."""

    name: str
    kind: str  # "task" | "heldout"
    images: list[bytes]
    labels: list[str]


@dataclass
class ProbeStats:
    sent: int = 0
    failed: int = 0
    routed_right: int = 0  # learned task images answered by their own task
    correct: int = 0
    gates: list[float] = field(default_factory=list)
    ood: int = 0
    versions: set[int] = field(default_factory=set)


@dataclass
class DemoState:
    tasks: list[str]
    phase: dict[str, str] = field(default_factory=dict)  # task -> waiting / learning / served vN / ...
    probes: dict[str, ProbeStats] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    version: int | None = None
    started: float = field(default_factory=time.monotonic)


def demo_settings_file(home: Path, port: int, epochs: int, backbone: str) -> Path:
    """The demo's settings as a YAML file (the watcher's flows and the Serve replicas read it too)."""
    cfg = {
        "home": str(home),
        "storage": {"root": str(home / "storage")},
        "mlflow": {
            "tracking_uri": f"sqlite:///{home / 'mlflow.db'}",
            "artifact_location": str(home / "mlartifacts"),
        },
        "train": {"epochs": epochs, "batch_size": 64, "workers": 1},
        "backbone": {"name": backbone},
        "serve": {"host": "127.0.0.1", "port": port, "poll_interval_s": 2.0},
        "pipeline": {"poll_interval_s": 2.0},
        # Few epochs and small test sets (60 face images): allow 10-point drops before refusing.
        "promotion": {"max_task_drop": 0.10, "min_zero_shot_retention": 0.9},
    }
    home.mkdir(parents=True, exist_ok=True)
    path = home / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def reset_demo_home(home: Path) -> None:
    """Start clean: remove the state of an earlier demo run (built datasets are kept elsewhere)."""
    for name in ("storage", "mlartifacts", "mlflow.db", "prefect", "logs", "heatmap.png", "summary.json"):
        p = home / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def build_data(data_dir: Path, names: Sequence[str], echo: Callable[[str], None]) -> dict[str, Path]:
    from rich.progress import Progress

    from diki_model.datasets import build_domain

    paths = {}
    missing = [n for n in names if not (data_dir / n / "manifest.json").exists()]
    with Progress(transient=True) as progress:
        bar = progress.add_task("building demo datasets", total=len(missing))
        for n in missing:
            build_domain(n, data_dir)
            progress.advance(bar)
    for n in names:
        paths[n] = data_dir / n
    if missing:
        echo(f"built {len(missing)} dataset(s) in {data_dir}: {', '.join(missing)}")
    return paths


def load_probes(path: Path, name: str, kind: str, count: int = PROBES_PER_SET) -> ProbeSet:
    from diki_model.data import iter_records, read_manifest

    manifest = read_manifest(str(path))
    images: list[bytes] = []
    labels: list[str] = []
    for batch, ys in iter_records(str(path), "test"):
        for img, y in zip(batch, ys, strict=True):
            images.append(img)
            labels.append(manifest.classes[int(y)])
            if len(images) >= count * 4:
                break
        if len(images) >= count * 4:
            break
    # Spread the probes over the classes a little: take every 4th of the first images.
    return ProbeSet(name, kind, images[::4][:count], labels[::4][:count])


def probe_once(client: Any, probes: Sequence[ProbeSet], state: DemoState, learned: Sequence[str]) -> None:
    from services.serving.client import ServingError

    for p in probes:
        stats = state.probes.setdefault(p.name, ProbeStats())
        try:
            answer = client.classify_batch(p.images, top_k=1) if learned else None
        except ServingError as exc:
            stats.failed += len(p.images)
            state.log.append(f"probe {p.name}: {exc}")
            continue
        if answer is None:
            continue
        for item, truth in zip(answer["results"], p.labels, strict=True):
            stats.sent += 1
            stats.versions.add(int(answer.get("bundle_version") or item.get("bundle_version") or 0))
            stats.gates.append(float(item["gate"]))
            stats.ood += bool(item["out_of_distribution"])
            if p.name in learned and item.get("task") == p.name:
                stats.routed_right += 1
                stats.correct += item["label"] == truth


def stacked(name: str) -> str:
    """A column header on several short lines: broken after each hyphen and at spaces, "(held-out)" kept whole."""
    parts: list[str] = []
    for word in name.split(" "):
        if word.startswith("("):
            parts.append(word)
            continue
        pieces = word.split("-")
        parts += [p + "-" for p in pieces[:-1]] + [pieces[-1]]
    return "\n".join(p for p in parts if p)


def compact_table(title: str) -> Any:
    """A table that fits 80 columns (or a pipe, which rich renders at 80): no outer box, one space between
    columns, headers that wrap rather than cut (names are never shortened to "shape-co…")."""
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False)


def render(state: DemoState, probes: Sequence[ProbeSet]) -> Any:
    table = compact_table(f"diki demo  ({time.monotonic() - state.started:.0f}s, production: v{state.version or '-'})")
    table.add_column("domain", no_wrap=True, min_width=max([len(p.name) for p in probes] or [6]))
    table.add_column("state", overflow="fold", min_width=12)
    for col in ("probes", "routed to itself", "accuracy", "mean gate", "out of distribution"):
        header = col.replace(" ", "\n", 1) if col != "out of distribution" else "out of\ndistribution"
        table.add_column(header, justify="right", overflow="fold", min_width=max(map(len, header.split("\n"))))
    for p in probes:
        s = state.probes.get(p.name, ProbeStats())
        phase = state.phase.get(p.name, "held-out (never learned)" if p.kind == "heldout" else "waiting")
        learned = phase.startswith("served")
        table.add_row(
            p.name,
            phase,
            str(s.sent),
            f"{100 * s.routed_right / s.sent:.0f}%" if s.sent and learned else "-",
            f"{100 * s.correct / max(s.routed_right, 1):.0f}%" if s.routed_right else "-",
            f"{sum(s.gates[-8:]) / len(s.gates[-8:]):.3f}" if s.gates else "-",
            f"{100 * s.ood / s.sent:.0f}%" if s.sent else "-",
        )
    return table


def quiet_logs() -> None:
    """Keep the live view readable: services log to their own files, only warnings reach the terminal."""
    import logging
    import os

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    for name in ("ray", "ray.serve", "ray.train", "mlflow", "prefect", "httpx", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def wait_for(predicate: Callable[[], bool], timeout_s: float, tick: Callable[[], None], every_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        tick()
        time.sleep(every_s)
    return predicate()


def run_demo(
    home: Path,
    data_dir: Path,
    tasks: Sequence[str] = DEMO_TASKS,
    heldout: Sequence[str] = DEMO_HELDOUT,
    epochs: int = 3,
    port: int = 8000,
    backbone: str = "diki-small",
    fresh: bool = True,
    task_timeout_s: float = 600.0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    from ray import serve
    from rich.console import Console
    from rich.live import Live

    from pipelines.prefect_runtime import configure_prefect
    from pipelines.state import Stage, StateStore
    from pipelines.watcher import run_watcher
    from services.ray_runtime import ensure_ray, shutdown_ray
    from services.registry import Registry
    from services.serving.app import APP_NAME, build_app
    from services.serving.client import ServingClient
    from services.settings import Settings
    from services.storage import open_storage

    console = Console()
    home = home.absolute()
    if fresh:
        reset_demo_home(home)
    config = demo_settings_file(home, port, epochs, backbone)
    settings = Settings.load(config)
    paths = build_data(data_dir, [*tasks, *heldout], echo)
    storage = open_storage(settings)
    records = StateStore(storage, settings)
    for name in heldout:
        if not storage.exists(f"heldout/{name}/manifest.json"):
            storage.copy_tree(paths[name], f"heldout/{name}")
    probes = [load_probes(paths[n], n, "task") for n in tasks] + [load_probes(paths[n], n, "heldout") for n in heldout]
    state = DemoState(tasks=list(tasks))
    stop = threading.Event()
    watcher: threading.Thread | None = None
    registry = Registry(settings)
    try:
        echo("starting Ray, the Serve endpoint and the watcher (embedded)...")
        quiet_logs()
        configure_prefect(settings)
        ensure_ray(settings, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": str(config)}), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        client = ServingClient(url, retry_for_s=10.0)
        client.wait_ready(timeout_s=300)
        watcher = threading.Thread(
            target=run_watcher,
            kwargs={"settings": settings, "config": str(config), "stop": stop, "echo": state.log.append},
            name="diki-watcher",
            daemon=True,
        )
        watcher.start()
        learned: list[str] = []
        with Live(render(state, probes), console=console, refresh_per_second=2) as live:

            def tick() -> None:
                probe_once(client, probes, state, learned)
                live.update(render(state, probes))

            for name in tasks:
                state.phase[name] = "dropped, learning"
                live.update(render(state, probes))
                if not storage.exists(f"incoming/{name}/{settings.storage.success_marker}"):
                    storage.copy_tree(paths[name], f"incoming/{name}")

                def settled(name: str = name) -> bool:
                    # Done when a version holding the task is served, its promotion was refused (a
                    # candidate), or the task was not learned (nothing registered).
                    record = records.get(name)
                    if record is not None and record.stage == Stage.NOT_LEARNED:
                        checks = (record.learned or {}).get("checks", {})
                        b, z = checks.get("branch_acc"), checks.get("zero_shot_acc")
                        figures = f" ({100 * b:.0f}% vs {100 * z:.0f}% zero-shot)" if b is not None else ""
                        state.phase[name] = f"not learned{figures}"
                        return True
                    for info in registry.list_versions():
                        if name not in info.tasks or info.tasks[-1] != name:
                            continue
                        if "production" in info.aliases:
                            state.version = info.version
                            if client.ready().get("bundle_version") == info.version:
                                state.phase[name] = f"served (v{info.version})"
                                return True
                        elif info.tags.get("promotion") and info.tags.get("promotion") != "passed":
                            reasons = json.loads(info.tags.get("promotion_reasons") or "[]") or [""]
                            reason = next((r for r in reasons if "does not" in r or "drop" in r), reasons[0])
                            state.phase[name] = f"candidate v{info.version}, promotion refused: {str(reason)[:70]}"
                            return True
                    return False

                if not wait_for(settled, task_timeout_s, tick):
                    state.phase[name] = "not served in time"
                    live.update(render(state, probes))
                    raise TimeoutError(f"{name} was not served within {task_timeout_s:.0f}s; see `diki datasets`")
                if state.phase[name].startswith("served"):
                    learned.append(name)
                for _ in range(2):
                    tick()
        return summarize(settings, registry, state, home, url, console)
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(timeout=60)
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        shutdown_ray()


def matrix_table(matrix: Any, version: int | None) -> Any:
    """The accuracy matrix (%) as a table readable at 80 columns: one row per learning step."""
    table = compact_table(f"accuracy (%) after each step, bundle v{version}")
    table.add_column("after", no_wrap=True, min_width=max([len(r) for r in matrix.rows] or [5]))
    for c in matrix.columns:
        header = stacked(c.name + (" (held-out)" if c.kind == "heldout" else ""))
        table.add_column(header, justify="right", overflow="fold", min_width=max(map(len, header.split("\n"))))
    for row, accs in zip(matrix.rows, matrix.acc, strict=True):
        table.add_row(row, *[f"{a:.1f}" for a in accs])
    return table


def summarize(settings: Any, registry: Any, state: DemoState, home: Path, url: str, console: Any) -> dict[str, Any]:
    version = registry.get_alias("production")
    matrix = registry.get_matrix(version) if version else None
    summary: dict[str, Any] = {"production_version": version, "tasks": state.tasks}
    if matrix is not None:
        console.print(matrix_table(matrix, version))
        metrics = matrix.stream_metrics()
        retention = matrix.zero_shot_retention()
        heatmap = matrix.heatmap(home / "heatmap.png")
        summary.update(metrics=metrics, zero_shot_retention=retention, heatmap=str(heatmap), matrix=matrix.to_dict())

        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        console.print(
            f"Transfer {fmt(metrics['transfer'])}  Average {fmt(metrics['average'])}  Last {fmt(metrics['last'])}"
            + (f"  held-out zero-shot retention {100 * retention:.1f}%" if retention is not None else "")
        )
        console.print(f"heatmap: {heatmap}")
    probes = {
        n: {"sent": s.sent, "failed": s.failed, "routed_right": s.routed_right, "ood": s.ood}
        for n, s in state.probes.items()
    }
    summary["probes"] = probes
    (home / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"summary: {home / 'summary.json'}")
    console.print(
        "MLflow UI:  .venv/bin/mlflow ui --backend-store-uri "
        f"{settings.mlflow.tracking_uri} --host 127.0.0.1 --port 5000   (then open http://127.0.0.1:5000)"
    )
    console.print(
        f"endpoint:   {url}/docs (OpenAPI) - the demo stops it on exit; `diki serve --config {home / 'demo.yaml'}` restarts it"
    )
    console.print(f"            .venv/bin/diki predict IMAGE --url {url}")
    return summary
