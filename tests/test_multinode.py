"""Ray Train and Ray Serve on a real multi-node Ray cluster, started on this machine.

The cluster: a head and two worker nodes, each a ``ray start --block`` process of its own with its
own temp folder (``--temp-dir``), working directory and ``TMPDIR``, one logical CPU each, joined by
address like the KubeRay pods of ``infra/k8s``. Nodes share no process and no disk the product
uses: datasets, Ray Train checkpoints and results, the MLflow artifacts (bundles) all go through
the session's real S3 server (SeaweedFS). The driver (this process) attaches to the head.

What is checked, in file order (one cluster for the module):

1. a two-worker Train job runs its workers on two different nodes (node ids the workers report),
   and its statistics and adapter equal the same computation in one process (``atol=1e-6``, the
   tolerance of the two-worker test in ``test_training.py``); every worker process runs with an
   audit hook (``sys.addaudithook``) that records any file it opens under the driver's temp folder
   or another node's folder: there must be none;
2. the node of one training worker is killed (SIGKILL of every process of that node) mid-training:
   the job resumes from its last checkpoint (in S3) on the nodes left and registers once;
3. Serve with two replicas on two nodes behind the head's proxy: requests spread over both (counted
   by the request ids in each replica's log, in that node's own temp folder) and a hot swap under
   load loses no request;
4. the watcher: a drop into ``incoming/`` in S3, one pass of the watcher flow (Prefect's test
   harness), trained on the cluster (on the node whose CPU the replicas leave free), registered in
   MLflow (artifacts in S3), promoted, reloaded and answered by both replicas on their two nodes;
5. killing one replica's node loses at most the requests in flight on it (every answer of the
   application is JSON; those lost requests Serve's own proxy answers with a plain-text 500);
6. (fast, no cluster) the nodes get the settings and the Serve entry point of ``infra/k8s``.

What is faked, and why: the backbone is the random tiny ``diki-test-tiny`` (no pretrained weights
exist here); the nodes are processes on one machine (one IP), so the Serve proxy runs on the head
only (``proxy_location="HeadOnly"``; on Kubernetes every pod has its own IP); a training epoch is
slowed by an 8 s sleep in the epoch hook so that the node kill lands mid-training; the watcher's
promotion checks are off (the random backbone learns nothing measurable; ``test_promotion.py``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import S3Server, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

RAY = str(Path(sys.executable).parent / "ray")
APP = "diki-mn"
RECORDER = "diki-mn-recorder"
AUDIT_ENV = "DIKI_TEST_AUDIT_LOG"
FORBIDDEN_ENV = "DIKI_TEST_FORBIDDEN_PATHS"
DATA_BUCKET, STORE_BUCKET, MLFLOW_BUCKET = "mn-data", "mn-store", "mn-mlflow"
# The Serve application's arguments (services.serving.app:build_app, as in infra/k8s/rayservice.yaml).
SERVE_ARGS: dict[str, Any] = {
    "backbone": "diki-test-tiny",
    "seed": 0,
    "num_replicas": 2,
    "num_cpus": 0.5,
    "poll_interval_s": 0.5,
    "registry_timeout_s": 5,
    "max_batch_size": 8,
}


# ------------------------------------------------------------------------------ worker-side hooks
def audit_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for this module's jobs: the product's hook, plus a file audit.

    Every ``open`` of a path under one of ``$DIKI_TEST_FORBIDDEN_PATHS`` (the driver's temp folder,
    the other nodes' folders) is appended to ``$DIKI_TEST_AUDIT_LOG``, a file in the node's own folder.
    """
    import threading as _threading

    from services.ray_runtime import quiet_worker_logs

    quiet_worker_logs()
    log = os.environ.get(AUDIT_ENV)
    forbidden = tuple(p for p in os.environ.get(FORBIDDEN_ENV, "").split(os.pathsep) if p)
    if not log or not forbidden:
        return
    busy = _threading.local()

    def write(line: str) -> None:
        busy.on = True
        try:
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode() + b"\n")
            finally:
                os.close(fd)
        finally:
            busy.on = False

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or getattr(busy, "on", False) or not args or isinstance(args[0], int):
            return
        try:
            path = os.path.abspath(os.fsdecode(args[0]))
        except (TypeError, ValueError):
            return
        if path.startswith(forbidden):
            write(f"OPEN {os.getpid()} {path}")

    sys.addaudithook(hook)
    write(f"AUDITED {os.getpid()}")


def _record(kind: str, **data: Any) -> None:
    """Tell the module's recorder actor (on the head) something a worker saw."""
    import ray

    recorder = ray.get_actor(RECORDER, namespace="diki-mn")
    ray.get(recorder.add.remote({"kind": kind, "unix": time.time(), **data}))


def report_placement(epoch: int, rank: int) -> None:
    """Epoch hook: the worker's node id, working directory and temp folder, to the recorder."""
    import ray

    _record(
        "epoch",
        epoch=epoch,
        rank=rank,
        node_id=ray.get_runtime_context().get_node_id(),
        cwd=os.getcwd(),
        tmp=tempfile.gettempdir(),
        pid=os.getpid(),
    )


def slow_first_epoch(epoch: int, rank: int) -> None:
    """Epoch hook: report, then give the test 8 s after epoch 1 to kill a node (see the module docstring)."""
    report_placement(epoch, rank)
    if epoch == 1:
        time.sleep(8)


# ------------------------------------------------------------------------------ the cluster
def node_settings_env(s3: S3Server, mlflow_url: str) -> dict[str, str]:
    """The settings every node gets in its environment: the variables the KubeRay pods get from the
    ``diki-config`` ConfigMap and the ``diki-s3`` Secret (``infra/k8s``), with this machine's values."""
    return {
        "DIKI_STORAGE__ROOT": f"s3://{STORE_BUCKET}/storage",
        "AWS_ENDPOINT_URL": s3.endpoint,
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
        "AWS_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": mlflow_url,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
    }


def test_the_nodes_get_the_settings_and_entry_point_of_the_kuberay_manifests() -> None:
    """No cluster needed: what this module gives its nodes is what ``infra/k8s`` gives the Ray pods."""
    import yaml

    from services.serving.config import AppArgs

    k8s = Path(__file__).resolve().parent.parent / "infra" / "k8s"
    config = yaml.safe_load((k8s / "config.yaml").read_text())["data"]
    for manifest in ("raycluster.yaml", "rayservice.yaml"):
        doc = yaml.safe_load((k8s / manifest).read_text())
        cluster = doc["spec"].get("rayClusterConfig", doc["spec"])
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            [container] = group["template"]["spec"]["containers"]
            assert {"configMapRef": {"name": "diki-config"}} in container["envFrom"]
            given = set(config) | {e["name"] for e in container.get("env", [])}
            missing = set(node_settings_env(S3Server("http://h:1", "a", "b"), "http://m:1")) - given
            assert not missing, f"{manifest} {group.get('groupName', 'head')}: the test's nodes get {missing}"
    serve = yaml.safe_load(yaml.safe_load((k8s / "rayservice.yaml").read_text())["spec"]["serveConfigV2"])
    [app] = serve["applications"]
    assert app["import_path"] == "services.serving.app:build_app"  # what the `served` fixture builds
    AppArgs.model_validate(app["args"])
    assert set(SERVE_ARGS) <= set(AppArgs.model_fields)


@dataclass
class Node:
    name: str
    root: Path
    proc: subprocess.Popen[bytes]
    manager_port: int
    head: bool
    node_id: str = ""

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"


@dataclass
class LocalCluster:
    """Ray nodes as separate ``ray start --block`` processes, each in its own folder under ``base``."""

    base: Path
    env: dict[str, str]
    driver_dirs: list[str]
    nodes: list[Node] = field(default_factory=list)
    address: str = ""
    _next_block: int = 0

    def start(self, name: str, head: bool = False) -> Node:
        root = self.base / name
        for sub in ("cwd", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        gcs, manager, objects, metrics, agent, agent_grpc, client = free_ports(7)
        # Each node its own slice of Ray's worker port range, so nodes on one host never collide.
        low = 10100 + 400 * (os.getpid() % 20) + 100 * self._next_block % 400
        self._next_block += 1
        command = [
            RAY,
            "start",
            "--block",
            "--num-cpus=1",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={root / 'ray'}",
            f"--node-manager-port={manager}",
            f"--object-manager-port={objects}",
            f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 99}",
            f"--object-store-memory={100 * 1024 * 1024}",
            "--disable-usage-stats",
        ]
        if head:
            command += ["--head", f"--port={gcs}", "--include-dashboard=false", f"--ray-client-server-port={client}"]
            self.address = f"127.0.0.1:{gcs}"
        else:
            command.append(f"--address={self.address}")
        others = [str(n.root) for n in self.nodes] + [str(self.base / f) for f in ("head", "w1", "w2", "w3")]
        forbidden = [*self.driver_dirs, *(p for p in others if p != str(root))]
        env = {
            **self.env,
            # Where a process of the node finds its cluster (another Ray runs on this machine too).
            "RAY_ADDRESS": self.address,
            "TMPDIR": str(root / "tmp"),
            AUDIT_ENV: str(root / "audit.log"),
            FORBIDDEN_ENV: os.pathsep.join(dict.fromkeys(forbidden)),
        }
        log = (root / "node.log").open("wb")
        proc = subprocess.Popen(
            command, env=env, cwd=root / "cwd", stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        node = Node(name, root, proc, manager, head)
        self.nodes.append(node)
        return node

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.proc.poll() is None and n.node_id]

    def wait_for_nodes(self, timeout_s: float = 120) -> None:
        """Until every started node is alive in the GCS; fills in the node ids (by node manager port)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            by_port = {n["NodeManagerPort"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
            pending = [n for n in self.nodes if n.proc.poll() is None and n.manager_port not in by_port]
            for n in self.nodes:
                n.node_id = by_port.get(n.manager_port, n.node_id)
            if not pending:
                return
            for n in pending:
                if n.proc.poll() is not None:
                    raise RuntimeError(f"node {n.name} exited: {(n.root / 'node.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes {[n.name for n in pending]} did not join in {timeout_s} s")
            time.sleep(0.5)

    def node_of(self, node_id: str) -> Node:
        [node] = [n for n in self.nodes if n.node_id == node_id]
        return node

    def processes(self, node: Node) -> list[Any]:
        """Every process of one node: its ``ray start`` process group and all their descendants."""
        import psutil

        found: dict[int, Any] = {}
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) == node.proc.pid:
                    found[proc.pid] = proc
            except (ProcessLookupError, psutil.Error):
                continue
        for proc in list(found.values()):
            with contextlib.suppress(psutil.Error):
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
        return list(found.values())

    def kill(self, node: Node) -> float:
        """A node failure: SIGKILL every process of the node at once. Returns when (unix time) it happened."""
        import psutil

        procs = self.processes(node)
        at = time.time()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        node.proc.wait(timeout=10)
        return at

    def stop(self, node: Node) -> None:
        """A clean stop of one node (SIGTERM to its ``ray start``, then SIGKILL whatever is left)."""
        import psutil

        procs = self.processes(node)
        if node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=20)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.kill()
        psutil.wait_procs(procs, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout=10)

    def stop_all(self) -> None:
        for node in [n for n in self.nodes if not n.head] + [n for n in self.nodes if n.head]:
            self.stop(node)

    def audit_lines(self) -> list[str]:
        return [line for n in self.nodes if n.audit_log.exists() for line in n.audit_log.read_text().splitlines()]

    def replica_logs(self) -> dict[str, tuple[Node, Path]]:
        """Serve replica id -> (the node whose temp folder holds its log, the log file)."""
        out: dict[str, tuple[Node, Path]] = {}
        for node in self.nodes:
            for path in (node.root / "ray").glob(f"session_*/logs/serve/replica_{APP}_*.log"):
                out[path.stem.rsplit("_", 1)[-1]] = (node, path)
        return out


class MlflowS3Server:
    """An MLflow server (sqlite) whose artifacts live in the S3 server (``--artifacts-destination s3://``)."""

    def __init__(self, root: Path, port: int, s3: S3Server) -> None:
        self.root, self.port, self.url = root, port, f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "DIKI_"))}
        env.update(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            MLFLOW_S3_ENDPOINT_URL=s3.endpoint,
            AWS_ACCESS_KEY_ID=s3.access_key,
            AWS_SECRET_ACCESS_KEY=s3.secret_key,
        )
        log = (root / "mlflow.log").open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{MLFLOW_BUCKET}/artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def wait(self, timeout_s: float = 90) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'mlflow.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=1.0).is_success:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"mlflow server not healthy after {timeout_s} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@dataclass
class World:
    cluster: LocalCluster
    s3: S3Server
    mlflow: MlflowS3Server
    tmp: Path
    overrides: dict[str, Any]
    http_port: int
    recorder: Any
    figures: dict[str, Any] = field(default_factory=dict)
    bundles: dict[str, Path] = field(default_factory=dict)

    def settings(self, **more: Any) -> Any:
        from tests.test_training import deep_merge, make_settings

        return make_settings(self.tmp / "home", **deep_merge(self.overrides, more))

    def records(self, kind: str = "epoch") -> list[dict[str, Any]]:
        import ray

        return [r for r in ray.get(self.recorder.all.remote()) if r["kind"] == kind]

    def clear_records(self) -> None:
        import ray

        ray.get(self.recorder.clear.remote())


@pytest.fixture(scope="module")
def world(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import ray

    from services.ray_runtime import ensure_ray, shutdown_ray
    from tests.test_training import s3_filesystem

    shutdown_ray()  # this module's driver connects to its own cluster
    tmp = tmp_path_factory.mktemp("multinode")
    fs = s3_filesystem(s3_server)
    for bucket in (DATA_BUCKET, STORE_BUCKET, MLFLOW_BUCKET):
        fs.create_dir(bucket)
    mlflow_port, http_port = free_ports(2)
    mlflow = MlflowS3Server(tmp, mlflow_port, s3_server)
    # Short paths: Ray's Unix sockets live in the temp folders.
    base = Path(tempfile.mkdtemp(prefix="dk-mn-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIKI_", "AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        # The code every node runs, as in the image (the audit hook and the epoch hooks live in this module).
        PYTHONPATH=os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p
        ),
        # A dead node is noticed in ~3 s instead of ~30 s.
        RAY_health_check_period_ms="1000",
        RAY_health_check_failure_threshold="3",
        RAY_health_check_timeout_ms="1000",
        # The one proxy (on the head, see the module docstring) would send every request to a replica on
        # its own node; on Kubernetes a proxy per node behind the Service spreads them. Spread them here.
        RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING="0",
        # On 2 busy cores a node's agents can take more than the default 30 s to start.
        RAY_agent_register_timeout_ms="120000",
    )
    env.update(node_settings_env(s3_server, mlflow.url))
    cluster = LocalCluster(base, env, driver_dirs=[str(tmp_path_factory.getbasetemp())])
    try:
        cluster.start("head", head=True)
        overrides = {
            "s3": {
                "endpoint_url": s3_server.endpoint,
                "access_key_id": s3_server.access_key,
                "secret_access_key": s3_server.secret_key,
            },
            "storage": {"root": f"s3://{STORE_BUCKET}/storage"},
            "ray": {"address": cluster.address, "namespace": "diki-mn"},
            "mlflow": {"tracking_uri": mlflow.url},
            "serve": {"host": "127.0.0.1", "port": http_port},
        }
        from tests.test_training import make_settings

        settings = make_settings(tmp / "home", **overrides)
        deadline = time.monotonic() + 90
        while True:
            try:
                ensure_ray(settings, runtime_env={"worker_process_setup_hook": f"{__name__}.audit_worker"})
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        cluster.wait_for_nodes()
        for name in ("w1", "w2"):  # one at a time: three nodes starting at once overload 2 cores
            cluster.start(name)
            cluster.wait_for_nodes()
        head = next(n for n in cluster.nodes if n.head)
        assert ray.get_runtime_context().get_node_id() == head.node_id, "the driver attaches to the head"

        @ray.remote(num_cpus=0)
        class Recorder:
            def __init__(self) -> None:
                self.rows: list[dict[str, Any]] = []

            def add(self, row: dict[str, Any]) -> None:
                self.rows.append(row)

            def all(self) -> list[dict[str, Any]]:
                return list(self.rows)

            def clear(self) -> None:
                self.rows.clear()

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        recorder = Recorder.options(
            name=RECORDER, scheduling_strategy=NodeAffinitySchedulingStrategy(head.node_id, soft=False)
        ).remote()
        ray.get(recorder.all.remote())
        mlflow.wait()
        w = World(cluster, s3_server, mlflow, tmp, overrides, http_port, recorder)
        yield w
        print("\nmulti-node figures:", json.dumps(w.figures, indent=1, sort_keys=True))
    finally:
        try:
            from ray import serve

            if ray.is_initialized():
                with contextlib.suppress(Exception):
                    serve.shutdown()
        finally:
            shutdown_ray()
            cluster.stop_all()
            mlflow.stop()
            shutil.rmtree(base, ignore_errors=True)


def _no_forbidden_reads(world: World) -> None:
    lines = world.cluster.audit_lines()
    assert any(line.startswith("AUDITED") for line in lines), "the audit hook ran in no worker"
    assert [line for line in lines if line.startswith("OPEN")] == [], (
        "a worker read the driver's or another node's disk"
    )


# ------------------------------------------------------------------------------ training
def test_two_train_workers_on_two_nodes_equal_the_single_process_result(world: World) -> None:
    import torch

    from diki_model import create_diki_model, load_bundle
    from services.training import run_training_job
    from tests.test_training import CORNERS, make_dataset, s3_filesystem

    fs = s3_filesystem(world.s3)
    root = f"{DATA_BUCKET}/incoming/corners"
    # One shard: the two workers split it by rows.
    make_dataset(
        root, "corners", CORNERS, background=190, seed=2, shard_rows=500, filesystem=fs, template="a {} patch."
    )
    settings = world.settings()
    world.clear_records()
    t0 = time.time()
    job = run_training_job(settings, f"s3://{root}", workers=2, epochs=2, epoch_hook=report_placement)
    world.figures["train_job_seconds"] = round(time.time() - t0, 1)

    # Placement: rank 0 and rank 1 ran on two different nodes, in those nodes' own folders.
    rows = world.records()
    placement = {r["rank"]: r for r in rows if r["epoch"] == 1}
    assert sorted(placement) == [0, 1]
    nodes = {rank: world.cluster.node_of(r["node_id"]) for rank, r in placement.items()}
    assert nodes[0] is not nodes[1], f"both workers ran on node {nodes[0].name}"
    for rank, r in placement.items():
        node = nodes[rank]
        # Ray Train runs a worker in a folder of its node's session (<node>/ray/session_*/artifacts/<run>).
        assert r["cwd"].startswith(f"{node.root}/") and r["tmp"] == str(node.tmp), r
        assert r["cwd"] != os.getcwd() and r["tmp"] != tempfile.gettempdir()
    world.figures["train_placement"] = {f"rank {k}": f"{nodes[k].name} {nodes[k].node_id[:12]}" for k in nodes}

    # Checkpoints and the result went through S3 only.
    assert job.checkpoint_path.startswith(f"s3://{STORE_BUCKET}/storage/artifacts/ray-train/{job.ray_run_id}/")
    _no_forbidden_reads(world)

    # The same computation in this process: both workers' parts, one batch of 16 = two of 8 averaged.
    model = load_bundle(job.bundle_dir, model=create_diki_model("diki-test-tiny", seed=0))
    reference, full = _single_process_reference(settings, f"s3://{root}", world_size=2)
    gaussian = model.tasks[0].gaussian
    assert model.tasks[0].num_samples == 96
    torch.testing.assert_close(gaussian.mean, full.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(gaussian.cov, full.cov, atol=1e-6, rtol=0)
    adapter = model.adapter_state_dict(0)
    assert adapter.keys() == reference.keys() and adapter
    for key, value in reference.items():
        torch.testing.assert_close(adapter[key], value, atol=1e-6, rtol=0)
    world.bundles["corners"] = job.bundle_dir


def _single_process_reference(settings: Any, uri: str, world_size: int) -> tuple[dict[str, Any], Any]:
    """What ``train_loop`` computes with ``world_size`` workers, in this one process.

    Every worker's ``WorkerData`` part is built here; a step trains on the concatenation of the
    workers' equal-sized batches (the mean loss over it has the mean of the workers' gradients, which
    is what the all-reduce computes). Returns the trained adapter and the statistics of the whole
    split collected in one pass (as ``test_training.py`` does).
    """
    import itertools
    import math

    import torch

    from diki_model import TrainConfig, apply_statistics, collect_statistics, train_task
    from diki_model.data import load_split_tensors, read_manifest
    from services.backbone import create_model
    from services.storage import dataset_location
    from services.training import train_config
    from services.training.worker import WorkerData

    cfg: TrainConfig = train_config(settings, 2)
    fs, root = dataset_location(settings, uri)
    manifest = read_manifest(root, fs)
    model = create_model(settings)
    task = model.add_task(manifest.name, list(manifest.classes), manifest.template, seed=cfg.seed)
    parts = [
        WorkerData(fs, root, r, world_size, model.preprocess, cfg.val_fraction, cfg.seed, 1 << 30)
        for r in range(world_size)
    ]
    stats = [p.scan(model) for p in parts]
    merged = stats[0]
    for s in stats[1:]:
        merged.merge(s)
    apply_statistics(model, task, merged)
    per_worker = max(1, math.ceil(cfg.batch_size / world_size))
    steps = max(1, math.ceil(max(p.num_train for p in parts) / per_worker))
    sources = [p.train_batches(per_worker, steps) for p in parts]

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for group in zip(*(s(epoch) for s in sources), strict=True):
            yield torch.cat([x for x, _ in group]), torch.cat([y for _, y in group])

    def val() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.chain.from_iterable(p.val_batches() for p in parts)

    train_task(model, task, batches, steps, cfg, val if cfg.val_fraction > 0 else None, progress=False)
    images, _ = load_split_tensors(root, "train", model.preprocess, fs)
    full, _, _ = collect_statistics(model, [(images, torch.zeros(len(images)))]).finalize(model.config.shrinkage)
    return model.adapter_state_dict(task), full


def test_a_killed_worker_node_resumes_from_its_checkpoint_on_the_nodes_left_and_registers_once(world: World) -> None:
    import pyarrow.fs as pafs

    from pipelines.learning import learn_dataset
    from services.registry import Registry
    from tests.test_training import QUADS, make_dataset, s3_filesystem

    fs = s3_filesystem(world.s3)
    root = f"{DATA_BUCKET}/incoming/quads"
    make_dataset(root, "quads", QUADS, background=60, seed=0, filesystem=fs)
    settings = world.settings()
    world.clear_records()
    outcome: dict[str, Any] = {}

    def learn() -> None:
        try:
            outcome["value"] = learn_dataset(
                settings, f"s3://{root}", workers=2, epochs=3, heldout=[], epoch_hook=slow_first_epoch, max_failures=2
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=learn)
    thread.start()
    # Both workers finished epoch 1 (its checkpoint is in S3): kill the node of a worker (not the head).
    deadline = time.monotonic() + 240
    while len({r["rank"] for r in world.records() if r["epoch"] == 1}) < 2:
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.1)
    # ... and the Train controller registered its checkpoint (a worker's report alone is not enough:
    # the controller collects the reports of all workers on its next poll, then writes this file).
    runs = f"{STORE_BUCKET}/storage/artifacts/ray-train"
    while not _checkpoint_registered(fs, runs, "train-quads-"):
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.1)
    first = {r["rank"]: r for r in world.records() if r["epoch"] == 1}
    assert {r["epoch"] for r in world.records()} == {1}, "the kill came too late: epoch 2 was done"
    victims = [world.cluster.node_of(r["node_id"]) for r in first.values()]
    victim = next(n for n in victims if not n.head)
    killed_at = world.cluster.kill(victim)
    thread.join(300)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["value"]
    job = result.job
    assert job is not None and job.resumed_from_epoch == 1
    assert [h["epoch"] for h in job.history] == [1, 2, 3]
    assert job.checkpoint_path.startswith(f"s3://{STORE_BUCKET}/storage/artifacts/ray-train/{job.ray_run_id}/")
    checkpoints = fs.get_file_info(pafs.FileSelector(f"{STORE_BUCKET}/storage/artifacts/ray-train/{job.ray_run_id}"))
    assert any(i.base_name.startswith("checkpoint_") for i in checkpoints)

    # After the kill every worker ran on the nodes left; the restarted group went on from epoch 2.
    after = [r for r in world.records() if r["unix"] > killed_at]
    assert after and {r["epoch"] for r in after} == {2, 3}
    assert victim.node_id not in {r["node_id"] for r in after}
    assert len({r["node_id"] for r in after if r["epoch"] == 2}) == 2
    resumed = min(r["unix"] for r in after if r["epoch"] == 2)
    world.figures["kill_train_node"] = {
        "killed": victim.name,
        "before": {f"rank {k}": world.cluster.node_of(r["node_id"]).name for k, r in first.items()},
        "after": {f"rank {r['rank']}": world.cluster.node_of(r["node_id"]).name for r in after if r["epoch"] == 2},
        "kill_to_epoch_2_seconds": round(resumed - killed_at, 1),
    }

    registry = Registry(settings)
    assert [v.version for v in registry.list_versions()] == [1] and result.version == 1
    assert registry.get_alias("production") == 1
    _no_forbidden_reads(world)
    # A fresh node takes the place of the dead one (what the KubeRay autoscaler does).
    world.cluster.start("w3")
    world.cluster.wait_for_nodes()


def _checkpoint_registered(fs: Any, runs: str, prefix: str) -> bool:
    """Whether a run named ``prefix*`` under ``runs`` (in S3) has a checkpoint its controller registered."""
    import pyarrow.fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(runs, allow_not_found=True)):
        if info.base_name.startswith(prefix):
            with contextlib.suppress(OSError, FileNotFoundError):
                with fs.open_input_stream(f"{info.path}/checkpoint_manager_snapshot.json") as f:
                    if b"checkpoint_" in f.read():
                        return True
    return False


# ------------------------------------------------------------------------------ serving
def _client(world: World, **kw: Any) -> Any:
    from services.serving.client import ServingClient, serving_keys

    return ServingClient(f"http://127.0.0.1:{world.http_port}", **{"api_key": serving_keys(world.settings()), **kw})


def _replica_nodes() -> dict[str, str]:
    """Serve replica id -> the id of the node its actor runs on (asked of the actor itself)."""
    import ray

    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if name.startswith(f"SERVE_REPLICA::{APP}#"):
            with contextlib.suppress(Exception):
                handle = ray.get_actor(name, namespace="serve")
                node = ray.get(
                    handle.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()), timeout=10
                )
                out[name.rsplit("#", 1)[-1]] = node
    return out


def _requests_per_replica(world: World, request_ids: set[str]) -> dict[str, int]:
    """How many of ``request_ids`` each replica logged (its log is in its own node's temp folder)."""
    counts: Counter[str] = Counter()
    for replica, (_, path) in world.cluster.replica_logs().items():
        text = path.read_text(errors="replace")
        counts[replica] = sum(1 for rid in request_ids if rid in text)
    return dict(counts)


class Load:
    """Client threads sending classify requests through the proxy without retries; every answer kept."""

    def __init__(self, world: World, image: bytes, threads: int = 4) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{world.http_port}/v1/classify"
        self.body, self.stop = base64.b64encode(image).decode(), threading.Event()
        self.answers: list[tuple[float, float, int, dict[str, Any] | None, str]] = []
        self.not_json: list[str] = []
        self.errors: list[tuple[float, str]] = []
        self._httpx = httpx
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _run(self) -> None:
        with self._httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                start = time.time()
                try:
                    r = http.post(self.url, json={"image_base64": self.body})
                except self._httpx.HTTPError as err:
                    self.errors.append((start, repr(err)))
                    continue
                try:
                    body = r.json()
                except ValueError:
                    self.not_json.append(f"{r.status_code}: {r.text[:200]}")
                    body = None
                self.answers.append((start, time.time(), r.status_code, body, r.headers.get("x-request-id", "")))

    def ok(self) -> list[tuple[float, float, int, dict[str, Any] | None, str]]:
        return [a for a in self.answers if a[2] == 200]


@pytest.fixture(scope="module")
def served(world: World) -> World:
    from ray import serve

    from services.serving.app import build_app

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": world.http_port})
    args = {**SERVE_ARGS, "settings": world.overrides | {"home": str(world.tmp / "home")}}
    serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
    with _client(world) as c:
        c.wait_ready(120, version=1)
    deadline = time.monotonic() + 60
    while len(_replica_nodes()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    return world


def test_two_replicas_on_two_nodes_share_the_requests_and_a_hot_swap_loses_none(served: World) -> None:
    from services.registry import Registry
    from tests.test_training import png_records

    world = served
    replicas = _replica_nodes()
    assert len(replicas) == 2
    nodes = {rid: world.cluster.node_of(node) for rid, node in replicas.items()}
    assert len({n.name for n in nodes.values()}) == 2, f"both replicas on one node: {nodes}"
    logs = world.cluster.replica_logs()
    for rid, node in nodes.items():
        assert logs[rid][0] is node, "a replica's log is in its own node's temp folder"
    world.figures["serve_placement"] = {rid: n.name for rid, n in nodes.items()}

    image = next(png_records(1, 4, 60, seed=5))[0]
    registry = Registry(world.settings())
    # With its dataset recorded, as the flow registers it: the watcher's version is evaluated on it.
    v2 = registry.register_bundle(world.bundles["corners"], datasets=[f"s3://{DATA_BUCKET}/incoming/corners"])
    with Load(world, image) as load:
        time.sleep(3)
        moved_at = time.time()
        registry.set_alias("production", v2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            recent = [a for a in load.ok() if a[0] > time.time() - 1.0]
            if len(recent) >= 8 and all(a[3]["bundle_version"] == v2 for a in recent):
                break
            time.sleep(0.2)
        switched_at = time.time()
        time.sleep(3)
    assert load.errors == [] and load.not_json == []
    assert [a for a in load.answers if a[2] != 200] == [], "a request failed during the hot swap"
    versions = {a[3]["bundle_version"] for a in load.answers}
    assert versions == {1, v2}
    for start, end, _, body, _ in load.answers:
        if end < moved_at:
            assert body["bundle_version"] == 1
        if start > switched_at:
            assert body["bundle_version"] == v2
    ids = {a[4] for a in load.answers}
    assert "" not in ids and len(ids) == len(load.answers)
    time.sleep(1.5)  # replica logs are flushed asynchronously
    per_replica = _requests_per_replica(world, ids)
    assert set(per_replica) >= set(replicas) and all(per_replica[r] > 0 for r in replicas), per_replica
    assert sum(per_replica.values()) == len(ids), "every request is in exactly one replica's log"
    world.figures["hot_swap"] = {
        "requests": len(load.answers),
        "lost": 0,
        "per_replica": {f"{rid} ({nodes[rid].name})": per_replica[rid] for rid in replicas},
        "alias_to_all_v2_seconds": round(switched_at - moved_at, 1),
    }


# ------------------------------------------------------------------------------ the watcher
@pytest.fixture(scope="session")
def prefect_api(request: pytest.FixtureRequest) -> str:
    """Prefect's test harness, one for the session (shared with ``test_pipeline.py``, ``test_watcher.py``)."""
    from tests.test_pipeline import start_prefect_harness

    return start_prefect_harness(request)


def test_the_watcher_takes_a_drop_in_s3_to_served_on_both_replicas_of_the_cluster(
    served: World, prefect_api: str
) -> None:
    """A drop into ``incoming/`` in S3; one pass of the watcher flow (Prefect) trains it on the cluster,
    registers and promotes it, tells Serve to reload; both replicas (two nodes) answer with it."""
    import httpx
    import yaml

    from pipelines.state import Stage, StateStore
    from pipelines.watcher import pending_datasets, watch_incoming
    from services.registry import Registry
    from services.settings import Settings
    from services.storage import open_storage
    from tests.test_pipeline import drop, local_dataset
    from tests.test_training import deep_merge, png_records

    world = served
    # Two replicas on two nodes (half a CPU each); the third node's free CPU takes the training worker.
    replicas = _replica_nodes()
    assert len(set(replicas.values())) == 2, replicas

    # The watcher's settings file: the cluster's settings (what the Prefect worker of infra/k8s gets),
    # one epoch, and the promotion checks off (the random tiny backbone learns nothing measurable;
    # promotion is tested in test_promotion.py).
    data = deep_merge(
        {
            "home": str(world.tmp / "home"),
            "backbone": {"name": "diki-test-tiny"},
            "train": {"epochs": 1, "batch_size": 16, "seed": 0, "workers": 1},
            "pipeline": {"poll_interval_s": 1},
            "promotion": {
                "max_task_drop": 1.0,
                "min_zero_shot_retention": 0.0,
                "require_learned": False,
                "require_new_task_gain": False,
            },
        },
        world.overrides,
    )
    config = world.tmp / "watcher.yaml"
    config.write_text(yaml.safe_dump(data))
    settings = Settings.load(config)
    before = Registry(settings).list_versions()

    src = local_dataset(world.tmp / "src", "shapes", ["circle", "square", "triangle"], seed=5, shard_rows=40)
    drop(settings, src, "shapes")
    assert pending_datasets(settings) == ["shapes"]
    t0 = time.time()
    outcome = watch_incoming(config=str(config))
    world.figures["watcher_drop_to_served_seconds"] = round(time.time() - t0, 1)
    [result] = outcome["results"]
    version = len(before) + 1
    assert (result["name"], result["status"], result["version"]) == ("shapes", "served", version), result
    record = StateStore(open_storage(settings), settings).get("shapes")
    assert record is not None and record.stage == Stage.DONE
    assert record.reload is not None and record.reload["status"] == "reloaded", record.reload
    registry = Registry(settings)
    assert registry.get_alias("production") == version
    assert registry.list_versions()[-1].tasks[-1] == "shapes"
    trained_on = sorted(
        n.name for n in world.cluster.nodes if any((n.root / "ray").glob("session_*/artifacts/train-shapes-*"))
    )
    world.figures["watcher_trained_on"] = trained_on
    _no_forbidden_reads(world)

    # Served on the multi-node cluster: both replicas answer with the new version.
    assert _replica_nodes() == replicas
    image = base64.b64encode(next(png_records(1, 3, 60, seed=77))[0]).decode()
    ids = set()
    with httpx.Client(timeout=30) as http:
        for _ in range(40):
            r = http.post(f"http://127.0.0.1:{world.http_port}/v1/classify", json={"image_base64": image})
            assert r.status_code == 200, r.text
            assert r.json()["bundle_version"] == version
            ids.add(r.headers["x-request-id"])
    time.sleep(1.5)  # replica logs are flushed asynchronously
    per_replica = _requests_per_replica(world, ids)
    assert all(per_replica.get(rid, 0) > 0 for rid in replicas), per_replica
    world.figures["watcher_served"] = {
        f"{rid} ({world.cluster.node_of(node).name})": per_replica.get(rid, 0) for rid, node in replicas.items()
    }


def test_killing_a_replicas_node_loses_at_most_the_requests_in_flight_on_it(served: World) -> None:
    from tests.test_training import png_records

    world = served
    replicas = _replica_nodes()
    nodes = {rid: world.cluster.node_of(node) for rid, node in replicas.items()}
    victim_replica, victim = next((rid, n) for rid, n in nodes.items() if not n.head)
    image = next(png_records(1, 4, 60, seed=6))[0]
    threads = 4
    with Load(world, image, threads=threads) as load:
        time.sleep(2)
        killed_at = world.cluster.kill(victim)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if len([a for a in load.ok() if a[0] > killed_at + 1]) >= 20:
                break
            time.sleep(0.2)
        time.sleep(1)
    failed = [a for a in load.answers if a[2] != 200]
    # At most one request per client thread can have been in flight on the dead replica.
    assert len(failed) + len(load.errors) <= threads, (failed, load.errors)
    assert load.errors == []
    # Every answer of the application is JSON. A request lost with the replica is answered by Ray
    # Serve's proxy itself (Ray 2.60: "500 Internal Server Error" as text/plain, outside the app's
    # reach); `ServingClient` retries it. Those are exactly the failed requests, and only they.
    assert all(body is not None for _, _, status, body, _ in load.answers if status == 200)
    assert len(load.not_json) == len([a for a in failed if a[3] is None])
    assert all(text == "500: Internal Server Error" for text in load.not_json), load.not_json
    for start, _, status, body, _ in failed:
        assert start <= killed_at + 0.5, "a request sent after the kill failed"
        assert (status == 500 and body is None) or (body is not None and "error" in body), (status, body)
    later = [a for a in load.ok() if a[0] > killed_at + 1]
    assert len(later) >= 20
    after = _replica_nodes()
    assert victim_replica not in after and victim.node_id not in after.values()
    world.figures["kill_replica_node"] = {
        "killed": f"{victim.name} (replica {victim_replica})",
        "requests": len(load.answers),
        "lost": len(failed) + len(load.errors),
        "lost_answered_by_proxy_as_text": len(load.not_json),
        "replicas_after": {rid: world.cluster.node_of(n).name for rid, n in after.items()},
    }
