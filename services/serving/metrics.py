"""Prometheus metrics of one serving replica, in a registry of its own (not the process-global one).

``GET /metrics`` renders this registry: with several replicas, each scrape reads the replica that
answered, so scrape the replicas (or aggregate with Ray's metrics export) for cluster-wide numbers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "MetricsMiddleware", "ServingMetrics", "current", "set_current"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_GATE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


class ServingMetrics:
    """Every metric the serving app exports; ``render()`` gives the Prometheus text format."""

    def __init__(self, ood_window: int = 1000) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "diki_http_requests", "HTTP requests answered, by route and status code", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "diki_http_request_duration_seconds",
            "Time to answer an HTTP request, by route and status code",
            ["route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "diki_batch_size", "Images per model call made by the dynamic batcher", buckets=_BATCH_BUCKETS, registry=r
        )
        self.predictions = Counter("diki_predictions", "Images classified", registry=r)
        self.routed = Counter(
            "diki_routed_task",
            "Images routed to each task (the task whose Gaussian scored highest)",
            ["task"],
            registry=r,
        )
        self.gate = Histogram("diki_gate", "Gate value of each classified image", buckets=_GATE_BUCKETS, registry=r)
        self.ood = Counter(
            "diki_out_of_distribution",
            "Images whose gate fell below the threshold (answered by the frozen model)",
            registry=r,
        )
        self.ood_ratio = Gauge(
            "diki_out_of_distribution_ratio",
            f"Share of out-of-distribution images among the last {ood_window} classified",
            registry=r,
        )
        self.bundle_version = Gauge(
            "diki_bundle_version", "Registry version of the served bundle (0: zero-shot, no bundle)", registry=r
        )
        self.tasks = Gauge("diki_tasks", "Tasks in the served bundle", registry=r)
        self.registry_up = Gauge(
            "diki_registry_up", "1 if the last registry call succeeded, 0 if it failed", registry=r
        )
        self.registry_errors = Counter(
            "diki_registry_errors", "Failed registry or storage calls, by operation", ["operation"], registry=r
        )
        self.reloads = Counter(
            "diki_bundle_reloads", "Bundle loads attempted, by result (loaded, failed)", ["result"], registry=r
        )
        self.last_reload = Gauge(
            "diki_bundle_loaded_timestamp_seconds", "Unix time the served bundle was switched in", registry=r
        )
        # process_resident_memory_bytes, process_cpu_seconds_total, ...: the replica's own process.
        ProcessCollector(registry=r)
        # Resident memory counts the pages of Ray's shared object store a replica has touched (request
        # bodies travel through it); the process's own memory is the anonymous part.
        self.anonymous_memory = Gauge(
            "diki_process_anonymous_memory_bytes",
            "Resident anonymous (private) memory of the replica process, without shared object-store pages",
            registry=r,
        )
        self.anonymous_memory.set_function(_anonymous_memory)
        self._recent: deque[bool] = deque(maxlen=ood_window)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route, str(status)).observe(seconds)

    def observe_predictions(self, tasks: list[str | None], gates: list[float], ood: list[bool]) -> None:
        self.predictions.inc(len(gates))
        for task, gate, flag in zip(tasks, gates, ood, strict=True):
            if task is not None:
                self.routed.labels(task).inc()
            self.gate.observe(gate)
            if flag:
                self.ood.inc()
            self._recent.append(flag)
        if self._recent:
            self.ood_ratio.set(sum(self._recent) / len(self._recent))

    def set_bundle(self, version: int | None, num_tasks: int, loaded_at: float) -> None:
        self.bundle_version.set(version or 0)
        self.tasks.set(num_tasks)
        self.last_reload.set(loaded_at)

    def registry_call(self, operation: str, ok: bool) -> None:
        self.registry_up.set(1 if ok else 0)
        if not ok:
            self.registry_errors.labels(operation).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _anonymous_memory() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


# The metrics of the replica living in this process (a Serve replica has a process of its own).
# Kept here, behind functions, because Serve ships the deployment class by value: a global set in
# its methods would land in a copy of the app module's namespace, not in the module itself.
_current: ServingMetrics | None = None


def set_current(metrics: ServingMetrics) -> None:
    global _current
    _current = metrics


def current() -> ServingMetrics | None:
    return _current


_DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class MetricsMiddleware:
    """Counts every HTTP answer by route template and status, and times it (pure ASGI: bodies stream through)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        metrics = current()
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:  # FastAPI's own documentation routes do not record themselves
                route = scope.get("path") if scope.get("path") in _DOC_PATHS else "unmatched"
            metrics.observe_request(route, status, time.perf_counter() - start)
