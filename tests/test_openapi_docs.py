"""The API's documentation: a complete OpenAPI schema, and ``/docs`` and ``/redoc`` working offline.

The serving app's FastAPI object runs under uvicorn on a free 127.0.0.1 port (the documentation
routes need no model or Ray Serve replica). The pages are rendered by a real headless Chromium
whose resolver refuses every host but 127.0.0.1, so a page that needed a CDN would stay blank.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import free_ports

BROWSERS = ("chromium-headless-shell", "chromium", "google-chrome", "chrome")


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    import uvicorn

    from services.serving.app import api

    port = free_ports(1)[0]
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def operations(schema: dict) -> dict[tuple[str, str], dict]:
    return {(m, p): op for p, methods in schema["paths"].items() for m, op in methods.items()}


def test_every_route_has_a_description_an_example_request_and_an_example_answer(base_url):
    from services.serving.docs import OPERATIONS

    schema = httpx.get(f"{base_url}/openapi.json").json()
    ops = operations(schema)
    assert set(ops) == set(OPERATIONS)  # no route left undocumented, no documentation of a gone route
    for key, op in ops.items():
        assert op["summary"] and len(op["description"]) > 40, key
        assert op["x-codeSamples"][0]["source"].startswith(f"curl -X {key[0].upper()} "), key
        ok = op["responses"]["200"]["content"]
        assert any("example" in media for media in ok.values()), key
        for status, response in op["responses"].items():
            if status != "200" and "application/json" in response.get("content", {}):
                assert response["content"]["application/json"]["example"]["error"]["code"], (key, status)
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            assert body["example"], key
    classify = ops[("post", "/v1/classify")]
    assert set(classify["requestBody"]["content"]["application/json"]["examples"]) == {
        "routed",
        "labels",
        "forced task",
    }
    assert classify["responses"]["200"]["content"]["application/json"]["example"]["task"] == "pets"
    assert ops[("get", "/metrics")]["responses"]["200"]["content"]["text/plain"]["example"].startswith("# HELP")


def test_the_pages_load_every_asset_from_the_app_itself(base_url):
    from services.serving.docs import asset_files

    for page in ("/docs", "/redoc"):
        html = httpx.get(base_url + page).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url:\s*'([^']+)'", html)
        assert urls, page
        assert all(u.startswith("/") and not u.startswith("//") for u in urls), (page, urls)
        for url in urls:
            answer = httpx.get(base_url + url)
            assert answer.status_code == 200 and answer.content, url
    # The bundles' licences are shipped and served with them.
    files = asset_files()
    assert {"licenses/swagger-ui/LICENSE", "licenses/redoc/LICENSE"} <= set(files)
    assert "Apache License" in httpx.get(f"{base_url}/docs/assets/licenses/swagger-ui/LICENSE").text
    assert "MIT" in httpx.get(f"{base_url}/docs/assets/licenses/redoc/LICENSE").text
    assert httpx.get(f"{base_url}/docs/assets/../app.py").status_code == 404
    assert httpx.get(f"{base_url}/docs/assets/missing.js").status_code == 404


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def render(url: str, tmp_path) -> str:
    """The DOM of ``url`` after its scripts ran, in a headless Chromium that can reach 127.0.0.1 only."""
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser: `make setup` installs chromium-headless-shell (infra/apt-packages.txt)")
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # tests run as root in containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=30000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_swagger_ui_renders_every_operation_in_a_headless_browser(base_url, tmp_path):
    dom = render(f"{base_url}/docs", tmp_path)
    assert 'class="swagger-ui"' in dom and "DIKI classifier" in dom
    for method, path in (("post", "/v1/classify"), ("post", "/v1/classify/batch"), ("get", "/v1/tasks")):
        assert re.search(rf'opblock-{method}\b.*?data-path="{re.escape(path)}"', dom, re.S), (method, path)
    assert "Classify one image" in dom and "Failed to load API definition" not in dom


def test_redoc_renders_the_operations_in_a_headless_browser(base_url, tmp_path):
    dom = render(f"{base_url}/redoc", tmp_path)
    assert "DIKI classifier" in dom and "Classify several images in one call" in dom
    assert "Something went wrong" not in dom
    assert "Request samples" in dom and "Response samples" in dom  # the examples pane
