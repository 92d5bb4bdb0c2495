"""The watcher: polls the incoming prefix and starts one learning run per new complete dataset, in order.

Open-source Prefect has no webhooks, so arrival is found by listing ``incoming/`` every
``pipeline.poll_interval_s`` seconds. A pass of flow ``diki-watch-incoming`` (:func:`watch_incoming`)
first finishes every unfinished dataset (a run that died), then learns each complete new drop in
arrival order (marker time, then name), one learning run (subflow ``diki-learn-dataset``) after the
other. A pass stops at the first dataset it cannot finish (a transient error, or another process
learning), so the order is kept: the next pass starts there.

Two ways to run it:

- embedded (ephemeral Prefect API): ``diki watch`` polls in the foreground (:func:`run_watcher`);
  ``--once`` does one pass;
- with a Prefect server (the local stack): ``python -m pipelines.watcher --serve`` runs
  :func:`serve_watcher`, a served deployment ``diki-watch-incoming/diki-watcher`` with an interval
  schedule, visible and triggerable in the Prefect UI. Its stack service is
  :func:`services.stack.product.watcher_service`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from pipelines.flows import learn_dataset_flow, load_flow_settings
from pipelines.state import StateStore, scan_incoming
from services.settings import Settings
from services.stack.product import WATCH_DEPLOYMENT
from services.stack.product import WATCH_FLOW as WATCH_FLOW_NAME
from services.storage import Storage, open_storage

__all__ = [
    "DEPLOYMENT",
    "WATCH_FLOW",
    "main",
    "pending_datasets",
    "run_watcher",
    "serve_watcher",
    "watch_incoming",
]

log = logging.getLogger(__name__)

# The stack's health check asks the Prefect server for this deployment: one pair of names for both.
WATCH_FLOW: Final = WATCH_FLOW_NAME
DEPLOYMENT: Final = WATCH_DEPLOYMENT


def pending_datasets(settings: Settings, storage: Storage | None = None) -> list[str]:
    """Names to learn, in order: unfinished datasets (oldest first), then complete new drops by arrival."""
    storage = storage or open_storage(settings)
    records = StateStore(storage, settings).all()
    unfinished = [r.name for r in records if not r.terminal]
    drops = scan_incoming(storage, settings)
    for drop in drops:
        if not drop.valid_name:
            log.warning("ignoring %s/%s: not a valid dataset name", settings.storage.incoming_prefix, drop.name)
    new = [d.name for d in drops if d.complete and d.valid_name and d.name not in unfinished]
    return unfinished + new


@task(name="list-incoming", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def list_incoming_step(settings: Settings) -> list[str]:
    return pending_datasets(settings)


@flow(name=WATCH_FLOW, validate_parameters=True)
def watch_incoming(config: str | None = None, max_datasets: int | None = None) -> dict[str, Any]:
    """One pass: learn every pending dataset, one after the other (see the module docstring).

    Args:
        config: a settings YAML file (default: the process's settings); passed to each learning run.
        max_datasets: learn at most this many in this pass.
    """
    from prefect.artifacts import create_table_artifact

    settings = load_flow_settings(config)
    names = list_incoming_step(settings)
    todo = names if max_datasets is None else names[:max_datasets]
    results: list[dict[str, Any]] = []
    for name in todo:
        try:
            result = learn_dataset_flow(name=name, config=config)
        except Exception as exc:  # recorded on the dataset; the next pass resumes it first
            results.append({"name": name, "status": "error", "detail": f"{type(exc).__name__}: {exc}"})
            break
        results.append(result)
        if result.get("status") == "busy":
            break
    if results:
        rows = [
            {
                "dataset": r["name"],
                "status": r["status"],
                "version": r.get("version"),
                "detail": r.get("error") or r.get("detail") or "",
            }
            for r in results
        ]
        try:
            create_table_artifact(rows, key="diki-watch-pass", description=f"{len(results)} dataset(s) this pass")
        except Exception:  # noqa: BLE001 - the summary never fails a pass
            log.exception("cannot publish the watcher's summary")
    return {"pending": names, "results": results}


def describe_result(result: dict[str, Any]) -> str:
    """One line for a learning run's outcome."""
    name, status = result["name"], result["status"]
    version = result.get("version")
    if status == "served":
        return f"{name}: learned as task {result.get('task_index')}, version {version} is now production"
    if status == "candidate":
        return f"{name}: learned as version {version}, a candidate only (its promotion was refused)"
    if status == "duplicate":
        twin = f" as {result['duplicate_of']!r}" if result.get("duplicate_of") else ""
        return f"{name}: duplicate, the same content was learned before{twin} (version {version}); nothing new"
    if status == "not_learned":
        return f"{name}: not learned, nothing registered: {result.get('error') or ''}".rstrip()
    if status in ("quarantined", "failed"):
        return f"{name}: {status}: {(result.get('error') or '').splitlines()[0] if result.get('error') else ''}"
    return f"{name}: {status} {result.get('detail') or result.get('error') or ''}".rstrip()


def run_watcher(
    settings: Settings,
    *,
    config: str | None = None,
    once: bool = False,
    echo: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> int:
    """Poll in the foreground: a pass (a flow run) whenever something is pending, else sleep.

    Listing storage is cheap and needs no flow run, so an idle watcher leaves no runs behind. Returns
    the number of learning runs that did not end well (for ``--once``'s exit code). Ctrl-C
    (KeyboardInterrupt) propagates: a run it interrupts is resumed by the next watcher.
    """
    stop = stop or threading.Event()
    poll = settings.pipeline.poll_interval_s
    while True:
        problems = 0
        try:
            names = pending_datasets(settings)
        except OSError as exc:
            echo(f"cannot list {settings.storage.incoming_prefix}/: {exc}; trying again in {poll:g} s")
            names, problems = [], 1
        if names:
            echo(f"{len(names)} dataset(s) to learn: {', '.join(names)}")
            outcome = watch_incoming(config=config)
            for result in outcome["results"]:
                echo(describe_result(result))
                problems += result["status"] in ("error", "failed", "quarantined", "not_learned")
        elif once:
            echo(f"nothing to learn in {settings.storage.incoming_prefix}/")
        if once or stop.wait(poll):
            return problems


def serve_watcher(settings: Settings, *, config: str | None = None, name: str = DEPLOYMENT) -> None:
    """Serve the watcher as deployment ``diki-watch-incoming/<name>`` on an interval schedule (blocks).

    Needs a Prefect server (``pipeline.prefect_api_url``). Runs never overlap (a deployment concurrency
    limit of one that cancels a new run while one is going). Stop it (SIGINT/SIGTERM) before the server.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from pipelines.prefect_runtime import configure_prefect, require_server

    require_server(settings)
    configure_prefect(settings)
    watch_incoming.serve(
        name=name,
        interval=timedelta(seconds=settings.pipeline.poll_interval_s),
        parameters={"config": config} if config else {},
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        description=f"Polls {settings.storage.incoming_prefix}/ and learns each new complete dataset in order.",
        tags=["diki"],
        limit=1,
        # Runs import `pipelines.watcher` by module name, so the runner's working folder does not matter.
        entrypoint_type=EntrypointType.MODULE_PATH,
        print_starting_message=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.watcher", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--serve", action="store_true", help="serve the watcher deployment (needs a Prefect server)")
    mode.add_argument("--once", action="store_true", help="one pass, then exit")
    parser.add_argument("--config", help="settings YAML file (default: $DIKI_CONFIG)")
    args = parser.parse_args(argv)

    from pipelines.prefect_runtime import PrefectUnavailable, configure_prefect
    from services.settings import SettingsError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load(args.config)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mode_info = configure_prefect(settings)
    if args.serve:
        try:
            serve_watcher(settings, config=args.config)
        except PrefectUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    print(f"watching {settings.storage.incoming_prefix}/ of {open_storage(settings).uri()} ({mode_info.describe()})")
    try:
        return 1 if run_watcher(settings, config=args.config, once=args.once) else 0
    except KeyboardInterrupt:
        print("stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
