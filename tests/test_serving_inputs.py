"""Bad input never gets a 5xx or hangs: every malformed request to a real Serve app gets a clear 4xx.

One module-scoped Serve app on a free 127.0.0.1 port, serving a one-task bundle from a local
folder (no registry), with an API key and small limits (300 kB images, 512 x 512 pixels, 8 labels,
4 images per batch) so each limit is cheap to hit. Ends with schemathesis fuzzing the OpenAPI
schema (a bounded number of examples per operation) and requiring no 5xx.

Faked: the random tiny backbone and its synthetic task (see tests/test_serving.py).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from PIL import Image

from tests.conftest import free_ports
from tests.test_serving import SEED, make_bundles, noise_png, start_serve

pytestmark = pytest.mark.slow

KEY = "test-key-" + "x" * 24
AUTH = {"X-API-Key": KEY}
APP = "diki-inputs"
MAX_BYTES = 300_000
MAX_PIXELS = 512 * 512
MAX_LABELS = 8
MAX_BATCH = 4


@dataclass
class Inputs:
    url: str
    admin_key: str | None = None

    def post(self, path: str = "/v1/classify", headers: dict | None = None, **kw) -> httpx.Response:
        start = time.monotonic()
        r = httpx.post(self.url + path, headers={**AUTH, **(headers or {})}, timeout=30, **kw)
        assert time.monotonic() - start < 20, "the server took too long to refuse bad input"
        return r


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inputs]:
    from ray import serve

    from services.ray_runtime import ensure_ray, shutdown_ray
    from services.settings import Settings

    tmp = tmp_path_factory.mktemp("serving-inputs")
    (bundle,) = make_bundles(tmp, tasks=1, n=40)
    (port,) = free_ports(1)
    overrides = {
        "home": str(tmp / "home"),
        "serve": {
            "api_key": KEY,
            "max_image_bytes": MAX_BYTES,
            "max_image_pixels": MAX_PIXELS,
            "max_labels": MAX_LABELS,
        },
    }
    ensure_ray(Settings.load(home=str(tmp / "home"), ray={"num_cpus": 2}))
    try:
        start_serve(
            port,
            {
                "settings": overrides,
                "backbone": "diki-test-tiny",
                "seed": SEED,
                "bundle_dir": str(bundle),
                "bundle_version": 7,
                "max_batch_images": MAX_BATCH,
                "num_cpus": 0.5,
            },
            name=APP,
        )
        from services.serving.keys import read_admin_key

        yield Inputs(f"http://127.0.0.1:{port}", read_admin_key(Settings.load(**overrides)))
    finally:
        try:
            serve.shutdown()
        finally:
            shutdown_ray()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def small_png() -> bytes:
    return noise_png(3, size=32)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()["error"]
    assert body["code"] == code, body
    assert body["message"], body
    return body


# ------------------------------------------------------------------------------ images
RGB = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
PNG = encode(RGB, "PNG")
JPEG = encode(RGB, "JPEG", quality=90)
IMAGES = {
    "not an image": (b"this is plain text, not an image", 400, "not_an_image"),
    "a PDF": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", 415, "unsupported_image_format"),
    "truncated PNG": (PNG[: len(PNG) // 2], 400, "truncated_image"),
    "truncated JPEG": (JPEG[: len(JPEG) // 2], 400, "truncated_image"),
    "PNG with a broken chunk": (PNG[:60] + b"\x00" * 40 + PNG[100:], 400, "corrupt_image"),
    "GIF": (encode(RGB, "GIF"), 415, "unsupported_image_format"),
    "BMP": (encode(RGB, "BMP"), 415, "unsupported_image_format"),
    "TIFF": (encode(RGB, "TIFF"), 415, "unsupported_image_format"),
    "empty file": (b"", 400, "empty_image"),
    "too many bytes": (
        encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (340, 340, 3), dtype=np.uint8)), "PNG"),
        413,
        "image_too_large",
    ),
    "too many pixels": (encode(Image.new("RGB", (600, 600)), "PNG"), 413, "image_too_many_pixels"),
    # Decompression bombs: tiny files, 10^8 and 4 x 10^8 pixels once decoded.
    "bomb 10000x10000": (encode(Image.new("1", (10_000, 10_000)), "PNG"), 413, "image_too_many_pixels"),
    "bomb 20000x20000": (encode(Image.new("1", (20_000, 20_000)), "PNG"), 413, "image_too_many_pixels"),
    "extreme aspect ratio": (encode(Image.new("RGB", (500, 10)), "PNG"), 422, "image_aspect_ratio"),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_bad_images_get_a_4xx_as_file_and_as_base64(server: Inputs, name: str) -> None:
    data, status, code = IMAGES[name]
    assert len(data) < 2 * MAX_BYTES  # the bombs are small on the wire
    body = error(server.post(files={"file": ("x.png", data, "image/png")}, data={"labels": "a,b"}), status, code)
    assert body["field"] == "file"
    if data:
        body = error(server.post(json={"image_base64": b64(data), "labels": ["a", "b"]}), status, code)
        assert body["field"] == "image_base64"
    batch = server.post(
        "/v1/classify/batch", json={"items": [{"image_base64": b64(small_png())}, {"image_base64": b64(data or b"x")}]}
    )
    assert 400 <= batch.status_code < 500
    if data:
        assert error(batch, status, code)["field"] == "items[1].image_base64"


def test_good_requests_work_both_ways(server: Inputs) -> None:
    for r in (
        server.post(files={"file": ("x.png", PNG, "image/png")}, data={"labels": "cat, dog", "top_k": "1"}),
        server.post(json={"image_base64": b64(JPEG), "labels": ["cat", "dog"], "top_k": 1}),
        server.post(json={"image_base64": "data:image/png;base64," + b64(PNG), "labels": ["cat", "dog"], "top_k": 1}),
        server.post(files={"file": ("x.png", PNG, "image/png")}, data={"labels": '["cat", "dog"]', "top_k": "1"}),
    ):
        assert r.status_code == 200, r.text
        assert r.json()["label"] in ("cat", "dog") and len(r.json()["top_k"]) == 1 and r.json()["bundle_version"] == 7
    routed = server.post(json={"image_base64": b64(PNG)})
    assert routed.status_code == 200 and routed.json()["task"] == "quadrants"
    forced = server.post(json={"image_base64": b64(PNG), "task": "quadrants", "top_k": 2})
    assert forced.status_code == 200 and len(forced.json()["top_k"]) == 2


BAD_REQUESTS = {
    "empty JSON body": ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "empty_body"),
    "empty multipart body": (
        {"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        400,
        "empty_body",
    ),
    "no content type": ({"content": b"abc", "headers": {"content-type": ""}}, 415, "unsupported_media_type"),
    "text/plain": ({"content": PNG, "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    "raw image/png": ({"content": PNG, "headers": {"content-type": "image/png"}}, 415, "unsupported_media_type"),
    "urlencoded form": ({"data": {"labels": "a,b"}}, 415, "unsupported_media_type"),
    "invalid JSON": ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_json"),
    "JSON array": ({"json": [1, 2]}, 422, "invalid_request"),
    "JSON nested too deeply": (
        {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
    ),
    "a hundred thousand labels": (
        {"json": {"image_base64": b64(PNG), "labels": [f"l{i}" for i in range(100_000)]}},
        413,
        "body_too_large",
    ),
    "labels just over the limit in a big list": (
        {"json": {"image_base64": b64(PNG), "labels": [f"l{i}" for i in range(300)]}},
        422,
        "too_many_labels",
    ),
    "JSON null": ({"content": b"null", "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
    "missing image": ({"json": {"labels": ["a", "b"]}}, 422, "invalid_request"),
    "malformed base64": ({"json": {"image_base64": "abc$%^&*"}}, 400, "invalid_base64"),
    "base64 with bad padding": ({"json": {"image_base64": "abcde"}}, 400, "invalid_base64"),
    "bad data URL": ({"json": {"image_base64": "data:image/png,abc"}}, 400, "invalid_base64"),
    "unknown field": ({"json": {"image_base64": b64(PNG), "lables": ["a"]}}, 422, "invalid_request"),
    "unknown task": ({"json": {"image_base64": b64(PNG), "task": "nope"}}, 422, "unknown_task"),
    "empty label list": ({"json": {"image_base64": b64(PNG), "labels": []}}, 422, "invalid_request"),
    "blank label": ({"json": {"image_base64": b64(PNG), "labels": ["a", " "]}}, 422, "invalid_request"),
    "duplicate labels": ({"json": {"image_base64": b64(PNG), "labels": ["a", "a"]}}, 422, "invalid_request"),
    "too many labels": (
        {"json": {"image_base64": b64(PNG), "labels": [f"l{i}" for i in range(MAX_LABELS + 1)]}},
        422,
        "too_many_labels",
    ),
    "label too long": ({"json": {"image_base64": b64(PNG), "labels": ["a", "b" * 201]}}, 422, "invalid_request"),
    "labels not a list": ({"json": {"image_base64": b64(PNG), "labels": "a,b"}}, 422, "invalid_request"),
    "top_k zero": ({"json": {"image_base64": b64(PNG), "labels": ["a", "b"], "top_k": 0}}, 422, "invalid_request"),
    "top_k text": ({"json": {"image_base64": b64(PNG), "top_k": "many"}}, 422, "invalid_request"),
    "template without {}": (
        {"json": {"image_base64": b64(PNG), "labels": ["a", "b"], "template": "a photo"}},
        422,
        "invalid_request",
    ),
    "template with a format field": (
        {"json": {"image_base64": b64(PNG), "labels": ["a", "b"], "template": "{0} {}"}},
        422,
        "invalid_request",
    ),
    "multipart without a file": ({"files": {"labels": (None, "a,b")}}, 422, "missing_image"),
    "multipart with two files": (
        {"files": [("file", ("a.png", PNG, "image/png")), ("file", ("b.png", PNG, "image/png"))]},
        422,
        "too_many_images",
    ),
    "multipart unknown field": (
        {"files": {"file": ("a.png", PNG, "image/png"), "colour": (None, "red")}},
        422,
        "unknown_field",
    ),
    "multipart file as text field": ({"files": {"file": (None, "not a file")}}, 422, "missing_image"),
    "multipart top_k not a number": (
        {"files": {"file": ("a.png", PNG, "image/png"), "top_k": (None, "x")}},
        422,
        "invalid_request",
    ),
    "multipart labels as bad JSON": (
        {"files": {"file": ("a.png", PNG, "image/png"), "labels": (None, "[1, 2]")}},
        422,
        "invalid_request",
    ),
    "multipart without boundary": (
        {"content": b"--x\r\n\r\n", "headers": {"content-type": "multipart/form-data"}},
        400,
        "invalid_multipart",
    ),
    "body over the limit": (
        {"content": b"{" + b" " * 2_000_000 + b"}", "headers": {"content-type": "application/json"}},
        413,
        "body_too_large",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx(server: Inputs, name: str) -> None:
    kwargs, status, code = BAD_REQUESTS[name]
    error(server.post(**kwargs), status, code)


def test_batch_limits(server: Inputs) -> None:
    items = [{"image_base64": b64(small_png()), "labels": ["a", "b"]} for _ in range(MAX_BATCH + 1)]
    body = error(server.post("/v1/classify/batch", json={"items": items}), 413, "batch_too_large")
    assert str(MAX_BATCH) in body["message"]
    files = [("files", (f"{i}.png", small_png(), "image/png")) for i in range(MAX_BATCH + 1)]
    error(server.post("/v1/classify/batch", files=files, data={"labels": "a,b"}), 413, "batch_too_large")
    error(server.post("/v1/classify/batch", json={"items": []}), 422, "invalid_request")
    ok = server.post("/v1/classify/batch", files=files[:MAX_BATCH], data={"labels": "a,b"})
    assert ok.status_code == 200 and len(ok.json()["results"]) == MAX_BATCH
    bad = server.post(
        "/v1/classify/batch",
        json={"items": [{"image_base64": b64(small_png())}, {"image_base64": b64(small_png()), "task": "nope"}]},
    )
    assert error(bad, 422, "unknown_task")["field"] == "items[1].task"


def test_api_key_guards_the_classify_and_admin_routes(server: Inputs) -> None:
    body = {"image_base64": b64(PNG), "labels": ["a", "b"]}
    for path, method in (
        ("/v1/classify", "POST"),
        ("/v1/classify/batch", "POST"),
        ("/v1/tasks", "GET"),
        ("/v1/admin/reload", "POST"),
    ):
        error(httpx.request(method, server.url + path, json=body, timeout=30), 401, "missing_api_key")
        error(
            httpx.request(method, server.url + path, json=body, headers={"X-API-Key": "wrong"}, timeout=30),
            401,
            "invalid_api_key",
        )
    bearer = httpx.post(server.url + "/v1/classify", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert bearer.status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(server.url + path, timeout=30).status_code == 200
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert KEY not in metrics and 'status="401"' in metrics


def test_unknown_routes_and_methods_answer_json(server: Inputs) -> None:
    error(httpx.get(server.url + "/v2/classify", timeout=30), 404, "not_found")
    error(httpx.get(server.url + "/v1/classify", timeout=30), 405, "method_not_allowed")


def test_a_405_names_the_allowed_methods(server: Inputs) -> None:
    for method, path, allowed in (
        ("GET", "/v1/classify", "POST"),
        ("PUT", "/v1/classify/batch", "POST"),
        ("DELETE", "/v1/tasks", "GET"),
        ("GET", "/v1/admin/reload", "POST"),
    ):
        r = httpx.request(method, server.url + path, timeout=30)
        error(r, 405, "method_not_allowed")
        assert r.headers.get("allow") == allowed, (method, path, dict(r.headers))


def test_the_admin_route_takes_the_admin_key_not_the_api_key(server: Inputs) -> None:
    from services.serving.keys import ADMIN_KEY_HEADER

    admin_key = server.admin_key
    assert admin_key and admin_key != KEY
    # The classify routes' key does not open the admin routes.
    error(httpx.post(server.url + "/v1/admin/reload", headers=AUTH, timeout=30), 401, "invalid_api_key")
    ok = httpx.post(server.url + "/v1/admin/reload", headers={ADMIN_KEY_HEADER: admin_key}, timeout=60)
    assert ok.status_code == 200 and ok.json()["bundle_version"] == 7, ok.text
    body = httpx.post(server.url + "/v1/admin/reload", headers={"Authorization": f"Bearer {admin_key}"}, timeout=60)
    assert body.status_code == 200


# ------------------------------------------------------------------------------ schemathesis
FUZZ_EXAMPLES = 15


def test_fuzzing_the_openapi_schema_finds_no_server_error(server: Inputs) -> None:
    """Schema-driven fuzzing of every operation, valid and invalid data, each body media type: no 5xx."""
    from hypothesis import given
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/classify",
        "POST /v1/classify/batch",
        "GET /v1/tasks",
        "POST /v1/admin/reload",
        "GET /readyz",
    }
    calls: list[tuple[str, int]] = []
    for op in operations:
        media_types = (
            ["application/json", "multipart/form-data"]
            if op.method.upper() == "POST" and op.path != "/v1/admin/reload"
            else [None]
        )
        modes = (
            [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if media_types != [None] else [GenerationMode.POSITIVE]
        )
        for media_type in media_types:
            for mode in modes:
                strategy = op.as_strategy(mode, media_type=media_type) if media_type else op.as_strategy(mode)

                @given(case=strategy)
                @settings(
                    max_examples=FUZZ_EXAMPLES,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.generate],
                    derandomize=True,
                    database=None,
                )
                def run(case) -> None:
                    response = case.call(headers=AUTH, timeout=30)
                    calls.append((f"{case.method} {case.path}", response.status_code))
                    assert response.status_code < 500, (
                        case.method,
                        case.path,
                        response.status_code,
                        response.text[:500],
                    )

                run()
    posted = [status for name, status in calls if name.startswith("POST /v1/classify")]
    assert len(posted) >= 4 * FUZZ_EXAMPLES // 2 and any(400 <= s < 500 for s in posted)
