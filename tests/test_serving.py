"""The serving app end to end: a real Ray Serve app on loopback, following a real MLflow registry.

One module-scoped world: an MLflow server (sqlite + local artifact store, started here as a
subprocess), Ray in this process, one Serve app on a free 127.0.0.1 port. Tests run in file
order: zero-shot before any bundle exists, then two registered bundles (v1 = one task, v2 = two
tasks), routing, gating, batching, metrics, a hot swap under load, a killed replica, and an
outage of the registry (the MLflow server is stopped for real, then started again).

What is faked, and why: the backbone is the random tiny ``diki-test-tiny`` (no pretrained
weights exist on these machines), its learned domains are synthetic images from
``tests.synthetic.quadrant_domain``, and (as in ``tests/test_model.py``) the adapters' values are
set to random tensors after training so that gating has a visible effect on a random backbone.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import free_ports
from tests.synthetic import quadrant_domain

pytestmark = pytest.mark.slow

CLASSES_A = ["north west", "north east", "south west", "south east"]
CLASSES_B = ["red", "green", "blue"]
TEMPLATE_B = "a {} square."
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
SEED = 0
APP = "diki-test"


# ------------------------------------------------------------------------------ images and models
def to_png(x: torch.Tensor) -> bytes:
    """A normalised (3, H, W) tensor as PNG bytes (inverse of the CLIP normalisation, 8 bits)."""
    pixels = ((x * STD + MEAN).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def preprocess(model, pngs: list[bytes]) -> torch.Tensor:
    """What the server does with each image: decode, RGB, the model's own preprocessing."""
    return torch.stack([model.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs])


def domain_pngs(n: int, classes: int, background: float, seed: int) -> tuple[list[bytes], torch.Tensor]:
    x, y = quadrant_domain(n, classes, background, seed=seed)
    return [to_png(img) for img in x], y


def make_bundles(root: Path, tasks: int = 2, n: int = 60) -> list[Path]:
    """Train tasks on the PNG round trip of the synthetic domains; bundle k holds the first k tasks."""
    from diki_model import TrainConfig, create_diki_model, extend_bundle, learn_task

    model = create_diki_model("diki-test-tiny", seed=SEED)
    cfg = TrainConfig(epochs=1, batch_size=32, seed=SEED)
    specs = [("quadrants", CLASSES_A, 1.0, "a photo of a {}."), ("colours", CLASSES_B, -1.5, TEMPLATE_B)][:tasks]
    for i, (name, classes, background, template) in enumerate(specs):
        pngs, y = domain_pngs(n, len(classes), background, seed=i)
        learn_task(model, name, classes, preprocess(model, pngs), y, template=template, cfg=cfg, progress=False)
    with torch.no_grad():  # visible adapters on a random backbone (see the module docstring)
        for _, _, layer in model.adapter_layers():
            for i, v in enumerate(layer.values):
                v.copy_(torch.randn(v.shape, generator=torch.Generator().manual_seed(10 + i)))
    model.invalidate_caches()
    dirs, base = [], None
    for i in range(len(specs)):
        out = root / f"bundle-v{i + 1}"
        extend_bundle(base, model, i, out)
        dirs.append(out)
        base = out
    return dirs


def reference(bundle: Path | None):
    """The same model, in this process, to compare the server's answers with."""
    from diki_model import create_diki_model, load_bundle

    model = create_diki_model("diki-test-tiny", seed=SEED)
    return load_bundle(bundle, model=model) if bundle is not None else model


# ------------------------------------------------------------------------------ MLflow and Serve
class MlflowServer:
    """A real MLflow tracking + registry server on loopback; ``stop()``/``start()`` make a real outage."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        self.spawn()
        self.wait(timeout_s)

    def spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        log = (self.root / "mlflow.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout_s: float = 90.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'mlflow.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).is_success:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"mlflow server not healthy after {timeout_s} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_serve(port: int, args: dict, name: str = APP) -> None:
    from ray import serve

    from services.serving.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)


@dataclass
class World:
    url: str
    tmp: Path
    mlflow: MlflowServer
    settings: object
    bundles: list[Path]
    registered: dict[int, int] = field(default_factory=dict)

    def registry(self):
        from services.registry import Registry

        return Registry(self.settings)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from ray import serve

    from services.ray_runtime import ensure_ray, shutdown_ray
    from services.settings import Settings

    tmp = tmp_path_factory.mktemp("serving")
    mlflow_port, http_port = free_ports(2)
    mlflow = MlflowServer(tmp, mlflow_port)
    mlflow.spawn()  # starts while the bundles train
    overrides = {"home": str(tmp / "home"), "mlflow": {"tracking_uri": mlflow.url}}
    settings = Settings.load(**overrides, ray={"num_cpus": 2})
    try:
        bundles = make_bundles(tmp)
        mlflow.wait()
        ensure_ray(settings)
    except BaseException:
        mlflow.stop()
        raise
    try:
        start_serve(
            http_port,
            {
                "settings": overrides,
                "backbone": "diki-test-tiny",
                "seed": SEED,
                "poll_interval_s": 0.5,
                "registry_timeout_s": 5,
                "max_batch_size": 8,
                "batch_wait_timeout_s": 0.05,
                "num_cpus": 0.5,
            },
        )
        yield World(f"http://127.0.0.1:{http_port}", tmp, mlflow, settings, bundles)
    finally:
        try:
            serve.shutdown()
        finally:
            shutdown_ray()
            mlflow.stop()


@pytest.fixture(scope="module")
def published(world: World) -> World:
    """v1 (quadrants) and v2 (+ colours) registered; production = v2, and the server serves it."""
    from services.serving.client import ServingClient

    reg = world.registry()
    world.registered[1] = reg.register_bundle(world.bundles[0])
    world.registered[2] = reg.register_bundle(world.bundles[1])
    reg.set_alias("production", world.registered[2])
    with ServingClient(world.url) as client:
        client.wait_ready(60, version=world.registered[2])
    return world


def client(world: World, **kw):
    """A client with the keys of the world's settings (the admin key file that building the app created)."""
    from services.serving.client import ServingClient, serving_keys

    return ServingClient(world.url, **{"api_key": serving_keys(world.settings), **kw})


def admin_headers(world: World) -> dict[str, str]:
    from services.serving.keys import read_admin_key

    key = read_admin_key(world.settings)
    assert key, "building the app creates the admin key file"
    return {"X-Admin-Key": key}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


# ------------------------------------------------------------------------------ tests
def test_zero_shot_before_any_bundle(world: World) -> None:
    img = noise_png(1)
    with client(world) as c:
        ready = c.ready()
        assert ready["mode"] == "zero-shot" and ready["bundle_version"] is None
        assert ready["registry_reachable"] is True and "labels" in ready["message"]
        assert c.tasks()["tasks"] == []
        r = httpx.post(f"{world.url}/v1/classify", files={"file": ("x.png", img, "image/png")})
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "labels_required" and "labels" in r.json()["error"]["message"]
        labels = ["cat", "dog", "bird"]
        got = c.classify(img, labels=labels, top_k=3)
    zero_shot = reference(None)
    want = zero_shot.predict(preprocess(zero_shot, [img]), labels=labels)
    assert got["bundle_version"] is None and got["task"] is None and got["out_of_distribution"] is True
    assert got["label"] == want.labels[0]
    assert got["score"] == pytest.approx(float(want.confidence[0]), abs=1e-5)
    assert [t["label"] for t in got["top_k"]] == [lbl for lbl, _ in want.top_k[0]]


def test_routes_each_learned_domain_to_its_adapter(published: World) -> None:
    a, _ = domain_pngs(4, 4, 1.0, seed=50)
    b, _ = domain_pngs(4, 3, -1.5, seed=51)
    ref = reference(published.bundles[1])
    want = ref.predict(preprocess(ref, a + b))
    with client(published) as c:
        answers = [c.classify(img) for img in a + b]
        tasks = c.tasks()
    assert [x["task"] for x in answers] == ["quadrants"] * 4 + ["colours"] * 4
    assert all(x["gate"] > 0.5 and not x["out_of_distribution"] for x in answers)
    assert all(x["label"] in CLASSES_A for x in answers[:4]) and all(x["label"] in CLASSES_B for x in answers[4:])
    assert all(x["bundle_version"] == published.registered[2] for x in answers)
    assert [x["label"] for x in answers] == want.labels
    for x, conf, gate in zip(answers, want.confidence.tolist(), want.gate.tolist(), strict=True):
        assert x["score"] == pytest.approx(conf, abs=1e-4) and x["gate"] == pytest.approx(gate, abs=1e-5)
    assert tasks["bundle_version"] == published.registered[2] and tasks["mode"] == "bundle"
    assert [(t["name"], t["classes"]) for t in tasks["tasks"]] == [("quadrants", CLASSES_A), ("colours", CLASSES_B)]
    assert tasks["tasks"][1]["template"] == TEMPLATE_B and tasks["tasks"][0]["num_samples"] == 60


def test_unseen_domain_is_gated_off_and_answered_by_the_frozen_model(published: World) -> None:
    noise = [noise_png(100 + i) for i in range(3)]
    zero_shot = reference(None)
    x = preprocess(zero_shot, noise)
    labels = ["apple", "boat", "cloud", "door"]
    with client(published) as c:
        open_vocab = [c.classify(img, labels=labels) for img in noise]
        own_space = [c.classify(img) for img in noise]
    zs = zero_shot.predict(x, labels=labels)
    for got, label, conf in zip(open_vocab, zs.labels, zs.confidence.tolist(), strict=True):
        assert got["gate"] < 1e-3 and got["out_of_distribution"] is True
        assert got["label"] == label and got["score"] == pytest.approx(conf, abs=1e-5)
    # Without labels the label space is the routed task's classes, answered by the frozen towers.
    spaces = {"quadrants": (CLASSES_A, "a photo of a {}."), "colours": (CLASSES_B, TEMPLATE_B)}
    for i, got in enumerate(own_space):
        assert got["out_of_distribution"] is True and got["gate"] < 1e-3
        classes, template = spaces[got["task"]]
        zs_own = zero_shot.predict(x[i : i + 1], labels=classes, template=template)
        assert got["label"] == zs_own.labels[0]
        assert got["score"] == pytest.approx(float(zs_own.confidence[0]), abs=1e-5)


def test_answers_are_batch_invariant_over_http(published: World) -> None:
    a, _ = domain_pngs(2, 4, 1.0, seed=60)
    b, _ = domain_pngs(2, 3, -1.5, seed=61)
    images = [a[0], b[0], noise_png(7), a[1], b[1]]
    with client(published) as c:
        alone = [c.classify(img) for img in images]
        alone_labels = c.classify(images[1], labels=["cat", "dog"])
        batch = c.request(
            "POST",
            "/v1/classify/batch",
            json={
                "items": [
                    *({"image_base64": _b64(img)} for img in images),
                    {"image_base64": _b64(images[1]), "labels": ["cat", "dog"]},
                ]
            },
        ).json()
        # Concurrent single requests end up in shared batches of the dynamic batcher.
        before = c.metrics()
        results: list[dict | None] = [None] * 16

        def worker(k: int) -> None:
            with client(published) as own:
                results[k] = own.classify(images[k % len(images)])

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        after = c.metrics()
    assert batch["bundle_version"] == published.registered[2]
    for got, want in zip(batch["results"], [*alone, alone_labels], strict=True):
        assert (got["label"], got["task"], got["out_of_distribution"]) == (
            want["label"],
            want["task"],
            want["out_of_distribution"],
        )
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert got["gate"] == pytest.approx(want["gate"], abs=1e-5)
    for k, got in enumerate(results):
        want = alone[k % len(images)]
        assert got is not None and got["label"] == want["label"] and got["task"] == want["task"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    calls = metric(after, "diki_batch_size_count") - metric(before, "diki_batch_size_count")
    singles = metric(after, "diki_batch_size_bucket", le="1.0") - metric(before, "diki_batch_size_bucket", le="1.0")
    assert calls < 16 and singles < calls, "16 concurrent requests were never batched together"


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_metrics_describe_traffic_routing_and_the_bundle(published: World) -> None:
    with client(published) as c:
        httpx.post(f"{published.url}/v1/classify", json={"image_base64": "%%%"})  # one 400
        text = c.metrics()
    assert metric(text, "diki_bundle_version") == published.registered[2]
    assert metric(text, "diki_tasks") == 2
    assert metric(text, "diki_routed_task_total", task="quadrants") >= 4
    assert metric(text, "diki_routed_task_total", task="colours") >= 4
    assert metric(text, "diki_http_requests_total", route="/v1/classify", status="200") >= 10
    assert metric(text, "diki_http_requests_total", route="/v1/classify", status="400") >= 1
    assert metric(text, "diki_http_requests_total", route="/v1/classify", status="422") >= 1
    assert metric(text, "diki_http_request_duration_seconds_count", route="/v1/classify", status="200") >= 10
    assert metric(text, "diki_gate_count") == metric(text, "diki_predictions_total") > 0
    assert metric(text, "diki_gate_bucket", le="0.001") >= metric(text, "diki_out_of_distribution_total") >= 3
    assert 0 < metric(text, "diki_out_of_distribution_ratio") < 1
    assert metric(text, "diki_registry_up") == 1


def test_hot_swap_under_load_never_fails_or_mixes_versions(published: World) -> None:
    v1, v2 = published.registered[1], published.registered[2]
    reg = published.registry()
    reg.set_alias("production", v1)
    with client(published) as c:
        assert c.reload()["bundle_version"] == v1
    b, _ = domain_pngs(2, 3, -1.5, seed=70)  # colours images: task "quadrants" under v1, "colours" under v2
    stop = threading.Event()
    failures: list[str] = []
    seen: list[list[tuple[float, float, int, list[str]]]] = [[] for _ in range(4)]

    def load(k: int) -> None:
        with client(published, retry_for_s=0) as c:  # no retries: any failure counts
            while not stop.is_set():
                start = time.monotonic()
                try:
                    if k % 2:
                        r = c.classify_batch([b[0], b[1], noise_png(k)])
                        versions = {x["bundle_version"] for x in r["results"]} | {r["bundle_version"]}
                        if len(versions) != 1:
                            failures.append(f"mixed versions in one batch response: {versions}")
                        tasks = [x["task"] for x in r["results"][:2]]
                        version = r["bundle_version"]
                    else:
                        r = c.classify(b[k // 2 % 2])
                        tasks, version = [r["task"]], r["bundle_version"]
                except Exception as err:  # noqa: BLE001 - recorded and asserted below
                    failures.append(repr(err))
                    continue
                seen[k].append((start, time.monotonic(), version, tasks))

    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    moved_at = time.monotonic()
    reg.set_alias("production", v2)  # the background poll (0.5 s) picks it up
    with client(published) as c:
        c.wait_ready(30, version=v2)
    switched_at = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert failures == []
    everything = [r for rows in seen for r in rows]
    assert {r[2] for r in everything} == {v1, v2}
    for rows in seen:
        versions = [r[2] for r in rows]
        assert versions == sorted(versions), "a client saw v1 again after v2"
    for start, end, version, tasks in everything:
        if end < moved_at:
            assert version == v1
        if start > switched_at:
            assert version == v2
        # Each answer is wholly from its version: v1 knows only quadrants, v2 routes these to colours.
        assert set(tasks) == ({"quadrants"} if version == v1 else {"colours"})


def _replica_actors(app: str = APP) -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    )


def test_killed_replica_is_replaced_while_a_retrying_client_sees_no_failure(published: World) -> None:
    import ray

    before = _replica_actors()
    assert len(before) == 1
    img = domain_pngs(1, 4, 1.0, seed=80)[0][0]
    stop = threading.Event()
    answers: list[dict] = []
    failures: list[str] = []

    def load() -> None:
        with client(published, retry_for_s=90) as c:
            while not stop.is_set():
                try:
                    answers.append(c.classify(img))
                except Exception as err:  # noqa: BLE001
                    failures.append(repr(err))

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(0.5)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    killed_at = len(answers)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (_replica_actors() in ([], before) or len(answers) < killed_at + 5):
        time.sleep(0.2)
    stop.set()
    thread.join(120)
    after = _replica_actors()
    assert failures == []
    assert after and after != before
    assert len(answers) >= killed_at + 5
    assert {a["bundle_version"] for a in answers} == {published.registered[2]}
    assert {a["task"] for a in answers} == {"quadrants"}


def test_registry_outage_keeps_the_last_good_bundle(published: World) -> None:
    img = domain_pngs(1, 3, -1.5, seed=90)[0][0]
    v2 = published.registered[2]
    published.mlflow.stop()
    try:
        with client(published) as c:
            deadline = time.monotonic() + 60
            ready = c.ready()
            while ready["registry_reachable"] is not False and time.monotonic() < deadline:
                time.sleep(0.3)
                ready = c.ready()
            assert ready["registry_reachable"] is False and ready["bundle_version"] == v2
            assert ready["ready"] is True and "unreachable" in ready["message"]
            assert ready["last_reload_error"] and "registry" in ready["last_reload_error"]
            answer = c.classify(img)
            assert answer["bundle_version"] == v2 and answer["task"] == "colours"
            r = httpx.post(f"{published.url}/v1/admin/reload", headers=admin_headers(published), timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable"
            text = c.metrics()
            assert metric(text, "diki_registry_up") == 0
            assert metric(text, "diki_registry_errors_total", operation="get_alias") >= 1
            assert metric(text, "diki_bundle_version") == v2
    finally:
        published.mlflow.start()
    with client(published) as c:
        deadline = time.monotonic() + 60
        while c.ready()["registry_reachable"] is not True and time.monotonic() < deadline:
            time.sleep(0.3)
        ready = c.ready()
    assert ready["registry_reachable"] is True and ready["last_reload_error"] is None and ready["bundle_version"] == v2


# ------------------------------------------------------------------------------ hardening (issue 13)
def test_the_admin_route_needs_the_admin_key_which_is_kept_owner_only(published: World) -> None:
    import stat

    from services.serving.keys import admin_key_path

    path = admin_key_path(published.settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    url = f"{published.url}/v1/admin/reload"
    # No API key is configured for the classify routes (the default): they stay open, the admin route does not.
    missing = httpx.post(url, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert "X-Admin-Key" in missing.json()["error"]["message"]
    wrong = httpx.post(url, headers={"X-Admin-Key": "not-the-key"}, timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.post(url, headers=admin_headers(published), timeout=60)
    assert ok.status_code == 200 and ok.json()["bundle_version"] == published.registered[2]
    with client(published) as c:  # the client finds the key from the settings alone
        assert c.reload()["bundle_version"] == published.registered[2]
        assert c.classify(noise_png(5), labels=["a", "b"])["bundle_version"] == published.registered[2]


def large_png(seed: int, size: int = 400) -> bytes:
    """Noise does not compress: a 400 x 400 PNG is about 480 kB (decoded off the event loop)."""
    return noise_png(seed, size=size)


def test_reloads_during_a_registry_hang_never_starve_classify_requests(published: World) -> None:
    """The registry hangs for real (MLflow stopped with SIGSTOP). Eight admin reloads at once: one waits
    on the registry on the admin thread, the others are told 429 at once; classify calls stay fast."""
    proc = published.mlflow.proc
    assert proc is not None and proc.poll() is None
    image = large_png(1)
    assert len(image) > 400_000
    headers = admin_headers(published)
    statuses: list[int] = []
    with client(published) as c:
        c.classify(image)  # warm the path
    os.killpg(proc.pid, signal.SIGSTOP)
    try:

        def reload() -> None:
            r = httpx.post(f"{published.url}/v1/admin/reload", headers=headers, timeout=120)
            statuses.append(r.status_code)

        threads = [threading.Thread(target=reload) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        timings = []
        with client(published, retry_for_s=0) as c:
            for _ in range(3):
                start = time.monotonic()
                answer = c.classify(image)
                timings.append(time.monotonic() - start)
                assert answer["bundle_version"] == published.registered[2]
        for t in threads:
            t.join(120)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    assert max(timings) < 2.0, f"classify took {timings} s while reloads waited on a hung registry"
    assert sorted(statuses).count(429) >= 6 and all(s in (200, 429, 503) for s in statuses), statuses
    with client(published) as c:
        deadline = time.monotonic() + 60
        while c.ready()["registry_reachable"] is not True and time.monotonic() < deadline:
            time.sleep(0.3)
        assert c.reload()["bundle_version"] == published.registered[2]


def _memory(world: World) -> tuple[float, float]:
    """The replica's resident memory and its anonymous (own) part, in bytes, from /metrics."""
    with client(world) as c:
        text = c.metrics()
    return metric(text, "process_resident_memory_bytes"), metric(text, "diki_process_anonymous_memory_bytes")


def send_until_answered(url: str, head: dict[str, str], chunks: Iterator[bytes]) -> tuple[int, bytes, int]:
    """POST over a raw socket, sending ``chunks`` until the server answers: (status, body, bytes sent).

    A real client that keeps uploading while the server has already refused the request.
    """
    import select
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    try:
        lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in head.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        chunked = "Transfer-Encoding" in head
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        else:
            select.select([sock], [], [], 60)
        data = b""
        while True:
            try:
                part = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not part:
                break
            data += part
            if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1].rstrip().endswith(b"}"):
                break
    finally:
        sock.close()
    head_text, _, body = data.partition(b"\r\n\r\n")
    status = int(head_text.split(b" ", 2)[1]) if head_text.startswith(b"HTTP/") else 0
    return status, body, sent


def test_an_oversized_batch_body_is_refused_before_it_is_read_and_memory_returns(published: World) -> None:
    """Eight 10 MiB images (~112 MB of JSON): within the images and batch limits, over the body limit.

    Refused from its Content-Length with nothing read; sent without a length (chunked), refused once the
    body limit is passed. The replica's own memory comes back to where it was.
    """
    import base64
    import json

    image = base64.b64encode(os.urandom(10 * 1024 * 1024)).decode()
    body = json.dumps({"items": [{"image_base64": image, "labels": ["a", "b"]} for _ in range(8)]}).encode()
    del image
    assert 100e6 < len(body) < 115e6
    url = f"{published.url}/v1/classify/batch"
    step = 1024 * 1024

    def chunked() -> None:
        status, answer, _ = send_until_answered(
            url,
            {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            (body[i : i + step] for i in range(0, len(body), step)),
        )
        assert status == 413 and json.loads(answer)["error"]["code"] == "body_too_large", (status, answer[:300])

    # The first large body maps pages of Ray's object store into the replica (they stay mapped, shared).
    chunked()
    time.sleep(2.0)
    rss_before, own_before = _memory(published)

    start = time.monotonic()
    status, answer, sent = send_until_answered(
        url, {"Content-Type": "application/json", "Content-Length": str(len(body))}, iter([body[:65536]])
    )
    assert status == 413 and json.loads(answer)["error"]["code"] == "body_too_large", (status, answer[:300])
    assert time.monotonic() - start < 5.0 and sent <= 65536  # refused from the header: the body was never read
    for _ in range(2):
        chunked()  # (Serve's HTTP proxy takes the whole upload off the socket; the replica reads at most its limit)
    time.sleep(3.0)  # the replica gives the freed memory back shortly after such a request
    rss_after, own_after = _memory(published)
    print(
        f"replica memory: resident {rss_before / 1e6:.0f} -> {rss_after / 1e6:.0f} MB, "
        f"own (anonymous) {own_before / 1e6:.0f} -> {own_after / 1e6:.0f} MB"
    )
    assert own_after - own_before < 48e6, "the replica kept the memory of refused bodies"
    # Resident memory also counts pages of Ray's shared object store the bodies passed through (bounded
    # by the store, reused): far below the 336 MB of bodies sent, which the replica no longer holds.
    assert rss_after - rss_before < 150e6
    with client(published) as c:  # and it still serves
        assert c.classify(noise_png(9), labels=["a", "b"])["bundle_version"] == published.registered[2]
