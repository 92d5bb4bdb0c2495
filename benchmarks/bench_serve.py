"""Serving benchmark: the Ray Serve app over HTTP on loopback vs the same model called in-process.

    python benchmarks/bench_serve.py                                  # CPU, diki-small (or diki-test-tiny)
    python benchmarks/bench_serve.py --backbone ViT-B-16 --device cuda --max-batch-size 64

Measures, in one run and on one machine:
- in-process: the frozen forward of the image tower and ``DikiCLIP.predict`` (gated, per sample)
  at the server's max batch size, with 0%, 50% and 100% out-of-distribution images;
- over HTTP (multipart PNG to ``/v1/classify``, one request = one image): throughput and
  p50/p99 latency at 1, 4 and 16 concurrent clients, and at 16 clients with 0/50/100% OOD traffic.
Every level is bounded by a request count and a time cap; all traffic goes to 127.0.0.1. Loads
are measured in interleaved rounds and the best round is reported (all rounds are in the JSON),
so a burst from another process on a small shared machine does not decide a ratio.

Targets: throughput at 16 clients >= 3x the one-request-at-a-time rate (dynamic batching);
model-path (in-process predict, in-distribution) >= 0.45x the frozen forward (the two-pass
ceiling is 0.5x). Task adapters get random values and Gaussians fitted on two synthetic image
domains (throughput does not depend on trained values); OOD images are uniform noise.
Both Serve modes are measured, each in a fresh Ray started by a child process: "standard" (the
Python HTTP proxy) and "high-throughput" (HAProxy ingress and Ray's throughput-optimized replica
settings, see docs/serving.md). Writes benchmarks/results/serve.json (or --out) and prints a summary.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RESULTS = Path(__file__).parent / "results"
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------------ data
def domain_pngs(n: int, size: int, background: int, seed: int) -> list[bytes]:
    """Images of one synthetic domain: a flat background level with a bright patch in one quadrant."""
    rng = np.random.default_rng(seed)
    out = []
    half = size // 2
    for _ in range(n):
        img = np.clip(rng.normal(background, 12, (size, size, 3)), 0, 255)
        r, c = divmod(int(rng.integers(0, 4)), 2)
        img[r * half : (r + 1) * half, c * half : (c + 1) * half] = 250
        out.append(_png(img.astype(np.uint8)))
    return out


def noise_pngs(n: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def tensors(model, pngs: list[bytes]) -> torch.Tensor:
    return torch.stack([model.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs])


def mix(ind: list[bytes], ood: list[bytes], ood_share: float, n: int) -> list[bytes]:
    """``n`` images, every k-th one OOD so that the share is exact and spread evenly."""
    out = []
    n_ood = round(n * ood_share)
    for i in range(n):
        is_ood = n_ood and (i * n_ood) // n != ((i + 1) * n_ood) // n
        out.append(ood[i % len(ood)] if is_ood else ind[i % len(ind)])
    return out


# ------------------------------------------------------------------------------------------ model
def build_bundle(args: argparse.Namespace, out: Path):
    """A two-task bundle on the backbone: random adapter values, Gaussians fitted on two domains."""
    from diki_model import apply_statistics, collect_statistics, create_diki_model, save_bundle, tensor_batches

    model = create_diki_model(args.backbone, args.pretrained, device=args.device, seed=0)
    size = model.backbone_info.image_size
    for t, background in enumerate((200, 40)):
        x = tensors(model, domain_pngs(args.fit_images, size, background, seed=t))
        y = torch.zeros(len(x), dtype=torch.long)
        model.add_task(f"domain{t}", [f"class {c}" for c in range(args.classes)])
        apply_statistics(model, t, collect_statistics(model, tensor_batches(x, y, 256, shuffle=False)(0)))
    with torch.no_grad():
        for _, _, layer in model.adapter_layers():
            for v in layer.values:
                v.normal_(0, 0.02)
    model.invalidate_caches()
    save_bundle(model, out)
    return model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(fn: Callable[[], object], items: int, device: str, min_s: float, min_iters: int = 3) -> float:
    for _ in range(2):
        fn()
    sync(device)
    t0, n = time.perf_counter(), 0
    while n < min_iters or time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    sync(device)
    return items * n / (time.perf_counter() - t0)


def in_process(model, ind: list[bytes], ood: list[bytes], args: argparse.Namespace) -> dict:
    """Frozen forward and predict rates, interleaved over ``args.rounds`` rounds; best round reported."""
    batch = args.max_batch_size
    inputs = {
        f"ood_{int(share * 100)}": tensors(model, mix(ind, ood, share, batch)).to(args.device)
        for share in (0.0, 0.5, 1.0)
    }
    x_ind = inputs["ood_0"]
    one = x_ind[:1]
    cases: dict[str, tuple[Callable[[], object], int]] = {"frozen_forward": (lambda: model.encode_image(x_ind), batch)}
    for key, x in inputs.items():
        cases[f"predict_{key}"] = (lambda x=x: model.predict(x), batch)
    cases["predict_batch1"] = (lambda: model.predict(one), 1)
    rounds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (fn, items) in cases.items():
            rounds[name].append(rate(fn, items, args.device, args.min_s / args.rounds))
    best = {name: max(values) for name, values in rounds.items()}
    return {
        "batch": batch,
        "frozen_forward_img_s": best["frozen_forward"],
        "predict_img_s": {key: best[f"predict_{key}"] for key in inputs},
        "predict_batch1_img_s": best["predict_batch1"],
        "ood_share_of_in_distribution_images": float(model.predict(x_ind).ood.float().mean()),
        "rounds_img_s": rounds,
    }


# ------------------------------------------------------------------------------------------ HTTP
def _request_bytes(port: int, image: bytes) -> bytes:
    """One complete multipart POST /v1/classify request (keep-alive), built once per image."""
    boundary = "diki-bench-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: keep-alive\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length"), 0)
    return status, await reader.readexactly(length)


def http_level(port: int, images: list[bytes], concurrency: int, requests: int, max_s: float) -> dict:
    """``requests`` single-image calls from ``concurrency`` keep-alive connections (stopping at ``max_s``).

    A minimal HTTP/1.1 client on asyncio streams: on a 2-core machine the load generator shares the
    CPUs with the server, so it must cost as little as possible per request.
    """
    import asyncio

    payloads = [_request_bytes(port, img) for img in images]
    latencies: list[float] = []
    errors: list[str] = []

    async def client(counter) -> None:
        writer = None
        try:
            for i in counter:
                if time.monotonic() > deadline:
                    return
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                start = time.perf_counter()
                try:
                    writer.write(payloads[i % len(payloads)])
                    status, body = await _read_response(reader)
                except (OSError, asyncio.IncompleteReadError) as err:  # counted; reconnect
                    errors.append(f"connection: {err!r}")
                    writer.close()
                    writer = None
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(f"{status}: {body[:200]!r}")
        finally:
            if writer is not None:
                writer.close()

    async def run() -> float:
        counter = iter(range(requests))  # shared: each request index is taken once
        t0 = time.perf_counter()
        await asyncio.gather(*(client(counter) for _ in range(concurrency)))
        return time.perf_counter() - t0

    deadline = time.monotonic() + max_s
    wall = asyncio.run(run())
    lat = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": wall,
        "throughput_rps": len(lat) / wall if wall else 0.0,
        "p50_ms": 1000 * statistics.median(lat) if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
    }


def batch_stats(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        for key in ("diki_batch_size_sum", "diki_batch_size_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[-1])
    return values.get("diki_batch_size_sum", 0.0), values.get("diki_batch_size_count", 0.0)


def measured(url: str, port: int, images: list[bytes], c: int, requests: int, args: argparse.Namespace) -> dict:
    s0, n0 = batch_stats(url)
    level = http_level(port, images, c, requests, args.max_s / args.rounds)
    s1, n1 = batch_stats(url)
    level["mean_batch_size"] = (s1 - s0) / (n1 - n0) if n1 > n0 else None
    return level


def http_rounds(url: str, port: int, loads: dict[str, tuple[list[bytes], int]], args: argparse.Namespace) -> dict:
    """Each load (images, concurrency) once per round, interleaved; per load the best round plus all rounds."""
    for images, c in loads.values():
        http_level(port, images, c, min(2 * c, 32), 10)  # warm-up
    rounds: dict[str, list[dict]] = {name: [] for name in loads}
    for _ in range(args.rounds):
        for name, (images, c) in loads.items():
            total = args.requests if c > 1 else args.requests_serial
            rounds[name].append(measured(url, port, images, c, max(c, total // args.rounds), args))
    out = {}
    for name, levels in rounds.items():
        best = dict(max(levels, key=lambda lv: lv["throughput_rps"]))
        best["rounds_rps"] = [lv["throughput_rps"] for lv in levels]
        best["errors"] = sum(lv["errors"] for lv in levels)
        out[name] = best
    return out


# ------------------------------------------------------------------------------------------ main
MODES = ("standard", "high-throughput")


def parse_args() -> argparse.Namespace:
    from diki_model.backbone import shipped_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="diki-small" if shipped_checkpoint("diki-small") else "diki-test-tiny")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the replica then takes one GPU)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-s", type=float, default=0.005)
    ap.add_argument("--torch-threads", type=int, default=1, help="intra-op threads, in-process and in the replica")
    ap.add_argument("--replica-cpus", type=float, default=0.5)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--fit-images", type=int, default=128)
    ap.add_argument("--requests", type=int, default=600, help="requests per load at concurrency > 1, all rounds")
    ap.add_argument("--requests-serial", type=int, default=200, help="requests at concurrency 1, all rounds")
    ap.add_argument("--max-s", type=float, default=25.0, help="time cap per load, all rounds")
    ap.add_argument("--min-s", type=float, default=3.0, help="time per in-process measurement, all rounds")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported (noisy neighbours)")
    ap.add_argument(
        "--modes",
        default=",".join(MODES),
        help="Serve modes to measure: standard (Python proxy) and/or high-throughput (HAProxy ingress, "
        "Ray's throughput-optimized replicas; see docs/serving.md)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    # Internal: one Serve mode's HTTP measurements, run in a child process (Ray reads the mode at start).
    ap.add_argument("--http-worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", type=Path, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def http_worker(args: argparse.Namespace) -> None:
    """Serve ``args.bundle`` on a free loopback port and measure every HTTP load; JSON to ``args.http_worker``."""
    from ray import serve

    from services.ray_runtime import ensure_ray, shutdown_ray
    from services.serving.app import build_app
    from services.settings import Settings

    size = json.loads((args.bundle / "bundle.json").read_text())["backbone"]["image_size"]
    ind = domain_pngs(32, size, 200, seed=10) + domain_pngs(32, size, 40, seed=11)
    ood = noise_pngs(64, size, seed=12)
    port = _free_port()
    url = f"http://{HOST}:{port}"
    home = str(args.http_worker.parent / "home")
    ensure_ray(Settings.load(home=home))
    try:
        serve.start(http_options={"host": HOST, "port": port})
        serve.run(
            build_app(
                {
                    "settings": {"home": home},
                    "backbone": args.backbone,
                    "pretrained": args.pretrained,
                    "seed": 0,
                    "device": args.device,
                    "num_gpus": 1 if args.device.startswith("cuda") else 0,
                    "num_cpus": args.replica_cpus,
                    "bundle_dir": str(args.bundle),
                    "bundle_version": 1,
                    "max_batch_size": args.max_batch_size,
                    "batch_wait_timeout_s": args.batch_wait_s,
                    "torch_threads": args.torch_threads,
                }
            ),
            name="bench",
            route_prefix="/",
        )
        _wait_routable(url)
        loads = {f"c{c}": (mix(ind, ood, 0.0, 64), c) for c in (1, 4, 16)}
        loads.update({f"c16_ood_{int(s * 100)}": (mix(ind, ood, s, 64), 16) for s in (0.5, 1.0)})
        measured_loads = http_rounds(url, port, loads, args)
    finally:
        serve.shutdown()
        shutdown_ray()
    args.http_worker.write_text(json.dumps(measured_loads))


def _wait_routable(url: str, timeout_s: float = 60.0) -> None:
    """Until the ingress routes to the app (HAProxy learns its backends shortly after Serve says ready)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    ok = 0
    while time.monotonic() < deadline and ok < 5:
        try:
            ok = ok + 1 if httpx.get(url + "/readyz", timeout=5).status_code == 200 else 0
        except httpx.HTTPError:
            ok = 0
        time.sleep(0.2)
    if ok < 5:
        raise SystemExit(f"{url} does not route to the app after {timeout_s:g} s")


def run_mode(mode: str, bundle: Path, tmp: Path, args: argparse.Namespace) -> dict:
    import subprocess
    import sys

    from services.serving.app import HIGH_THROUGHPUT_ENV

    out = tmp / f"http-{mode}.json"
    env = {k: v for k, v in os.environ.items() if k not in HIGH_THROUGHPUT_ENV}
    if mode == "high-throughput":
        env.update(HIGH_THROUGHPUT_ENV)
    passthrough = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("out", "modes", "http_worker", "bundle") and v is not None
    ]
    cmd = [sys.executable, __file__, *passthrough, f"--http-worker={out}", f"--bundle={bundle}"]
    budget = 5 * args.max_s + 180  # five loads, each capped, plus Ray and Serve start and stop
    proc = subprocess.run(cmd, env=env, timeout=budget, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"the {mode} HTTP measurement failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return json.loads(out.read_text())


def ratios_for(http: dict, local: dict) -> dict:
    # Ratios of measurements taken in the same round (paired), median over rounds: drift in the
    # machine's load between rounds cancels out. The best-of-rounds values are kept beside them.
    rounds = local["rounds_img_s"]
    predict = local["predict_img_s"]["ood_0"]
    c1, c16 = http["c1"], http["c16"]
    return {
        "batching_c16_over_c1": statistics.median(
            a / b for a, b in zip(c16["rounds_rps"], c1["rounds_rps"], strict=True)
        ),
        "model_path_over_frozen": statistics.median(
            a / b for a, b in zip(rounds["predict_ood_0"], rounds["frozen_forward"], strict=True)
        ),
        "batching_c16_over_c1_best_rounds": c16["throughput_rps"] / c1["throughput_rps"],
        "model_path_over_frozen_best_rounds": predict / local["frozen_forward_img_s"],
        "served_c16_over_in_process_predict": c16["throughput_rps"] / predict,
        "served_c16_over_frozen": c16["throughput_rps"] / local["frozen_forward_img_s"],
        "served_c1_over_in_process_batch1": c1["throughput_rps"] / local["predict_batch1_img_s"],
    }


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.torch_threads)
    if args.http_worker is not None:
        http_worker(args)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; choose from {list(MODES)}")

    with tempfile.TemporaryDirectory(prefix="diki-bench-serve-") as tmp:
        bundle = Path(tmp) / "bundle"
        model = build_bundle(args, bundle)
        size = model.backbone_info.image_size
        ind = domain_pngs(32, size, 200, seed=10) + domain_pngs(32, size, 40, seed=11)
        ood = noise_pngs(64, size, seed=12)
        print(
            f"in-process: {args.backbone} on {args.device}, batch {args.max_batch_size}, {args.torch_threads} threads"
        )
        local = in_process(model, ind, ood, args)
        del model
        by_mode = {}
        for mode in modes:
            print(f"HTTP, Serve mode {mode}:")
            by_mode[mode] = run_mode(mode, bundle, Path(tmp), args)
            for key, level in by_mode[mode].items():
                print(f"  {key}: {_fmt(level)}")

    modes_out = {}
    for mode, loads in by_mode.items():
        http = {key: loads[key] for key in ("c1", "c4", "c16")}
        ood_levels = {"ood_0": loads["c16"], "ood_50": loads["c16_ood_50"], "ood_100": loads["c16_ood_100"]}
        ratios = ratios_for(http, local)
        modes_out[mode] = {
            "http": http,
            "http_ood_c16": ood_levels,
            "ratios": ratios,
            "targets": {
                "batching_c16_over_c1 >= 3": ratios["batching_c16_over_c1"] >= 3.0,
                "model_path_over_frozen >= 0.45": ratios["model_path_over_frozen"] >= 0.45,
            },
        }
    result = {
        "backbone": args.backbone,
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu",
        "cpus": os.cpu_count(),
        "torch_threads": args.torch_threads,
        "replica_cpus": args.replica_cpus,
        "max_batch_size": args.max_batch_size,
        "batch_wait_s": args.batch_wait_s,
        "torch": torch.__version__,
        "load_average": _load(),
        "in_process": local,
        "modes": modes_out,
        "note": "the load generator (asyncio, keep-alive) shares the machine with the server; loopback only; "
        "ratios are medians of same-round pairs",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    frozen, predict = local["frozen_forward_img_s"], local["predict_img_s"]["ood_0"]
    print(f"\nin-process (batch {local['batch']}): frozen forward {frozen:.0f} img/s, predict {predict:.0f} img/s")
    print("  predict by OOD share: " + ", ".join(f"{k} {v:.0f}" for k, v in local["predict_img_s"].items()))
    for mode, out in modes_out.items():
        print(f"{mode}:")
        print(
            "  HTTP at 16 clients by OOD share: "
            + ", ".join(f"{k} {v['throughput_rps']:.0f} rps" for k, v in out["http_ood_c16"].items())
        )
        for k, v in out["ratios"].items():
            print(f"  {k}: {v:.2f}")
        for k, ok in out["targets"].items():
            print(f"  target {k}: {'PASS' if ok else 'FAIL'}")
    print(f"wrote {args.out}")


def _fmt(level: dict) -> str:
    return (
        f"{level['throughput_rps']:.1f} rps, p50 {level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms, "
        f"mean batch {level['mean_batch_size'] or 0:.1f}, rounds {[round(r, 1) for r in level['rounds_rps']]}, "
        f"{level['errors']} errors"
    )


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
