"""Fault benchmark: what a client of the Serve app sees while things go wrong, in one run on loopback.

    python benchmarks/bench_faults.py                      # diki-test-tiny, 4 clients, ~20 s per phase
    python benchmarks/bench_faults.py --clients 8 --phase-s 30

One real world, started here: an MLflow server (SQLite, local artifacts) holding two bundle versions
(v1 = one task, v2 = two tasks; production = v2), Ray in this process and the Serve app following the
``production`` alias (polling every second). A few clients send ``/v1/classify`` (JSON, a 32x32 PNG)
without retries, so every failed request counts. Phases, one after the other:

- ``hot_swap``: production moves v2 -> v1 while the clients run;
- ``rollback``: production moves back v1 -> v2;
- ``registry_outage``: the MLflow server is stopped (SIGTERM) for 10 s, then started again;
- ``registry_hang``: the MLflow server is frozen (SIGSTOP) for 10 s while 8 admin reloads arrive at
  once, and a 480 kB PNG is classified meanwhile (the probe saw 58 s for it before the fix);
- ``replica_kill``: the replica is killed (``ray.kill``); Serve starts a new one. Requests in flight get
  Ray Serve's proxy's answer (plain-text 500, see docs/serving.md); the recovery time is from the
  kill to the first answer of the new replica;
- ``oversized``: two 112 MB batch bodies with a Content-Length and two sent chunked, over the body
  limit; the replica's resident and anonymous memory (``/metrics``) before and 2 s after.

Writes ``benchmarks/results/faults.json`` (or ``--out``) and prints a Markdown summary table. Not part
of ``make test``. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"
APP = "diki-faults"
MIB = 1024 * 1024


@dataclass
class Sample:
    start: float
    end: float
    status: int  # 0: no answer (connection error)
    json: bool
    version: int | None


@dataclass
class Load:
    """Clients sending /v1/classify without retries until stopped; every answer recorded."""

    url: str
    image: bytes
    clients: int
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        import httpx

        body = {"image_base64": base64.b64encode(self.image).decode()}

        def client() -> None:
            with httpx.Client(base_url=self.url, timeout=30) as http:
                while not self._stop.is_set():
                    t0 = time.monotonic()
                    try:
                        r = http.post("/v1/classify", json=body)
                        is_json = r.headers.get("content-type", "").startswith("application/json")
                        version = r.json().get("bundle_version") if is_json and r.status_code == 200 else None
                        self.samples.append(Sample(t0, time.monotonic(), r.status_code, is_json, version))
                    except httpx.HTTPError:
                        self.samples.append(Sample(t0, time.monotonic(), 0, False, None))
                        time.sleep(0.05)

        self._threads = [threading.Thread(target=client, daemon=True) for _ in range(self.clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def summary(samples: list[Sample], since: float) -> dict[str, Any]:
    latencies = sorted(s.end - s.start for s in samples)
    failed = [s for s in samples if s.status != 200]

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 4) if latencies else None

    return {
        "requests": len(samples),
        "ok": len(samples) - len(failed),
        "lost": len(failed),
        "lost_plain_text_500": sum(1 for s in failed if s.status == 500 and not s.json),
        "lost_json": sum(1 for s in failed if s.json),
        "lost_no_answer": sum(1 for s in failed if s.status == 0),
        "statuses": {str(k): sum(1 for s in samples if s.status == k) for k in sorted({s.status for s in samples})},
        "versions": sorted({s.version for s in samples if s.version is not None}),
        "p50_s": pct(0.5),
        "p99_s": pct(0.99),
        "max_s": round(latencies[-1], 4) if latencies else None,
        "seconds": round(time.monotonic() - since, 1),
    }


def wait_version(url: str, version: int, timeout_s: float = 60) -> float:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).json().get("bundle_version") == version:
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - not ready yet
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not serve version {version} within {timeout_s} s")


def phase(name: str, load: Load, action: Callable[[dict[str, Any]], None], duration_s: float) -> dict[str, Any]:
    print(f"  {name} ...", flush=True)
    load.samples = []
    t0 = time.monotonic()
    load.start()
    extra: dict[str, Any] = {}
    try:
        action(extra)
        left = duration_s - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
    finally:
        load.stop()
        load._stop = threading.Event()
    out = summary(load.samples, t0)
    out.update(extra)
    return out


def replica_actors() -> list[str]:
    import ray

    names = (a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
    return sorted(n for n in names if n.startswith(f"SERVE_REPLICA::{APP}#"))


def memory(url: str) -> dict[str, float]:
    import httpx

    from tests.test_serving import metric

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        "resident_mb": round(metric(text, "process_resident_memory_bytes") / 1e6, 1),
        "anonymous_mb": round(metric(text, "diki_process_anonymous_memory_bytes") / 1e6, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--phase-s", type=float, default=20.0, help="length of each phase (the kill phase may run longer)")
    ap.add_argument("--out", type=Path, default=RESULTS / "faults.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import httpx
    import ray
    from ray import serve

    from services.ray_runtime import ensure_ray, shutdown_ray
    from services.registry import Registry
    from services.serving.app import build_app
    from services.serving.client import ServingClient, serving_keys
    from services.settings import Settings
    from tests.conftest import free_ports
    from tests.test_serving import MlflowServer, domain_pngs, make_bundles, noise_png, send_until_answered

    started = time.monotonic()
    results: dict[str, Any] = {
        "backbone": "diki-test-tiny",
        "clients": args.clients,
        "phase_s": args.phase_s,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "phases": {},
    }
    with tempfile.TemporaryDirectory(prefix="diki-faults-") as tmp_name:
        tmp = Path(tmp_name)
        mlflow_port, http_port = free_ports(2)
        mlflow = MlflowServer(tmp, mlflow_port)
        mlflow.spawn()
        overrides = {"home": str(tmp / "home"), "mlflow": {"tracking_uri": mlflow.url}}
        settings = Settings.load(**overrides, ray={"num_cpus": 2})
        url = f"http://127.0.0.1:{http_port}"
        try:
            print("setting up: two bundles, MLflow, Ray, Serve", flush=True)
            bundles = make_bundles(tmp)
            mlflow.wait()
            registry = Registry(settings)
            v1, v2 = registry.register_bundle(bundles[0]), registry.register_bundle(bundles[1])
            registry.set_alias("production", v2)
            ensure_ray(settings, log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
            app = {
                "settings": overrides,
                "backbone": "diki-test-tiny",
                "seed": 0,
                "poll_interval_s": 1.0,
                "registry_timeout_s": 5,
                "max_batch_size": 8,
                "num_cpus": 0.5,
            }
            serve.run(build_app(app), name=APP, route_prefix="/", blocking=False)
            with ServingClient(url) as c:
                c.wait_ready(300, version=v2)
            image = domain_pngs(1, 4, 1.0, seed=1)[0][0]
            load = Load(url, image, args.clients)
            phases = results["phases"]

            def swap_to(version: int) -> Callable[[dict[str, Any]], None]:
                def act(extra: dict[str, Any]) -> None:
                    time.sleep(5)
                    registry.set_alias("production", version)
                    extra["switch_s"] = round(wait_version(url, version), 2)

                return act

            phases["hot_swap"] = phase("hot_swap", load, swap_to(v1), args.phase_s)
            phases["rollback"] = phase("rollback", load, swap_to(v2), args.phase_s)

            def outage(extra: dict[str, Any]) -> None:
                time.sleep(3)
                mlflow.stop()
                time.sleep(10)
                with httpx.Client(base_url=url, timeout=10) as http:
                    extra["readyz_during"] = {
                        k: http.get("/readyz").json().get(k) for k in ("registry_reachable", "bundle_version")
                    }
                mlflow.start()

            phases["registry_outage"] = phase("registry_outage", load, outage, args.phase_s + 10)
            with ServingClient(url) as c:
                deadline = time.monotonic() + 60
                while c.ready()["registry_reachable"] is not True and time.monotonic() < deadline:
                    time.sleep(0.3)

            headers = {"X-Admin-Key": serving_keys(settings).admin_key or ""}

            def hang(extra: dict[str, Any]) -> None:
                time.sleep(3)
                assert mlflow.proc is not None
                os.killpg(mlflow.proc.pid, signal.SIGSTOP)
                statuses: list[int] = []
                try:

                    def reload() -> None:
                        t0 = time.monotonic()
                        r = httpx.post(f"{url}/v1/admin/reload", headers=headers, timeout=120)
                        statuses.append(r.status_code)
                        extra.setdefault("reload_s", []).append(round(time.monotonic() - t0, 2))

                    threads = [threading.Thread(target=reload) for _ in range(8)]
                    for t in threads:
                        t.start()
                    time.sleep(1.0)
                    big = noise_png(7, size=400)
                    t0 = time.monotonic()
                    r = httpx.post(f"{url}/v1/classify", files={"file": ("big.png", big, "image/png")}, timeout=120)
                    extra["large_png_kb"] = round(len(big) / 1000)
                    extra["large_png_classify_s"] = round(time.monotonic() - t0, 3)
                    extra["large_png_status"] = r.status_code
                    time.sleep(8)
                finally:
                    os.killpg(mlflow.proc.pid, signal.SIGCONT)
                for t in threads:
                    t.join(120)
                extra["reload_statuses"] = {str(s): statuses.count(s) for s in sorted(set(statuses))}

            phases["registry_hang"] = phase("registry_hang", load, hang, args.phase_s)

            def kill(extra: dict[str, Any]) -> None:
                time.sleep(3)
                before = replica_actors()
                killed_at = time.monotonic()
                ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
                deadline = killed_at + 120
                while time.monotonic() < deadline:
                    after = replica_actors()
                    answered = [s for s in load.samples if s.start > killed_at and s.status == 200]
                    if after and after != before and answered:
                        extra["recovery_s"] = round(min(s.end for s in answered) - killed_at, 2)
                        break
                    time.sleep(0.2)
                time.sleep(3)

            phases["replica_kill"] = phase("replica_kill", load, kill, args.phase_s)

            print("  oversized ...", flush=True)
            with ServingClient(url) as c:
                c.wait_ready(120)
            big = base64.b64encode(os.urandom(10 * MIB)).decode()
            body = json.dumps({"items": [{"image_base64": big, "labels": ["a", "b"]}] * 8}).encode()
            del big
            before = memory(url)
            target = f"{url}/v1/classify/batch"
            oversized: dict[str, Any] = {"body_mb": round(len(body) / 1e6, 1), "memory_before": before, "requests": []}
            for how in ("content-length", "content-length", "chunked", "chunked"):
                t0 = time.monotonic()
                if how == "chunked":
                    head = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
                    chunks = (body[i : i + MIB] for i in range(0, len(body), MIB))
                else:
                    head = {"Content-Type": "application/json", "Content-Length": str(len(body))}
                    chunks = iter([body[:65536]])
                status, answer, sent = send_until_answered(target, head, chunks)
                code = json.loads(answer).get("error", {}).get("code") if answer.strip().startswith(b"{") else None
                oversized["requests"].append(
                    {"how": how, "status": status, "code": code, "seconds": round(time.monotonic() - t0, 2)}
                )
            time.sleep(2.0)
            oversized["memory_after"] = memory(url)
            phases["oversized"] = oversized
        finally:
            try:
                serve.shutdown()
            finally:
                shutdown_ray()
                mlflow.stop()
    results["total_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out}")
    return 0


def table(results: dict[str, Any]) -> str:
    """The Markdown summary: one row per phase."""
    p = results["phases"]
    rows = ["| phase | requests | lost | what else |", "|---|---|---|---|"]
    for name, detail in (
        ("hot_swap", lambda d: f"switch in {d.get('switch_s')} s, versions {d['versions']}"),
        ("rollback", lambda d: f"switch in {d.get('switch_s')} s, versions {d['versions']}"),
        ("registry_outage", lambda d: f"readyz while down: {d.get('readyz_during')}"),
        (
            "registry_hang",
            lambda d: (
                f"{d.get('large_png_kb')} kB PNG classified in {d.get('large_png_classify_s')} s; "
                f"8 reloads: {d.get('reload_statuses')}; p99 {d['p99_s']} s"
            ),
        ),
        (
            "replica_kill",
            lambda d: (
                f"recovery {d.get('recovery_s')} s; lost: {d['lost_plain_text_500']} plain-text 500, "
                f"{d['lost_json']} JSON, {d['lost_no_answer']} no answer"
            ),
        ),
    ):
        if name in p:
            d = p[name]
            rows.append(f"| {name} | {d['requests']} | {d['lost']} | {detail(d)} |")
    if "oversized" in p:
        o = p["oversized"]
        answers = ", ".join(f"{r['how']} {r['status']} {r['code']} in {r['seconds']} s" for r in o["requests"])
        rows.append(
            f"| oversized ({o['body_mb']} MB bodies) | {len(o['requests'])} | - | {answers}; replica memory "
            f"{o['memory_before']['resident_mb']} -> {o['memory_after']['resident_mb']} MB resident, "
            f"{o['memory_before']['anonymous_mb']} -> {o['memory_after']['anonymous_mb']} MB anonymous |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
