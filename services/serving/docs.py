"""The API's documentation pages, served by the app itself so they work without internet access.

``GET /docs`` (Swagger UI) and ``GET /redoc`` (ReDoc) load their scripts and styles from
``/docs/assets/``: the files of the pinned PyPI package ``fastapi-offline`` (Swagger UI 5 and
ReDoc 2, byte for byte their npm bundles), whose licences are kept in ``docs_licenses/`` and
served under ``/docs/assets/licenses/``. Nothing on either page comes from another host.

:func:`document_operations` adds to the OpenAPI schema what FastAPI cannot know: each route's
description, an example request and an example answer (and one per error status), and a
``curl`` line (``x-codeSamples``, which ReDoc shows).
"""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path
from typing import Any, Final

from fastapi import FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

__all__ = ["ASSETS_PREFIX", "OPERATIONS", "asset_files", "document_operations", "install_docs"]

ASSETS_PREFIX: Final = "/docs/assets"
_LICENSES: Final = Path(__file__).with_name("docs_licenses")
_STATIC_FILES: Final = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
_MEDIA: Final = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


def asset_files() -> dict[str, Path]:
    """Every file under ``/docs/assets/``: URL path (relative) -> file on disk."""
    static = Path(str(importlib.resources.files("fastapi_offline") / "static"))
    files = {name: static / name for name in _STATIC_FILES}
    for path in sorted(_LICENSES.rglob("*")):
        if path.is_file():
            files[f"licenses/{path.relative_to(_LICENSES).as_posix()}"] = path
    return files


def install_docs(api: FastAPI) -> None:
    """Add ``/docs``, ``/docs/oauth2-redirect``, ``/redoc`` and ``/docs/assets/...`` to ``api``.

    ``api`` must be built with ``docs_url=None, redoc_url=None`` (FastAPI's own pages use a CDN).
    """
    files = asset_files()
    # Swagger UI's default validator badge calls an online service; this page stays offline.
    parameters = {"validatorUrl": None, "displayRequestDuration": True, "tryItOutEnabled": False}

    @api.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{api.openapi_url}",
            title=f"{api.title} - Swagger UI",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=f"{root}{ASSETS_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PREFIX}/favicon.png",
            swagger_ui_parameters=parameters,
        )

    @api.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @api.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=f"{root}{api.openapi_url}",
            title=f"{api.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PREFIX}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PREFIX}/favicon.png",
            with_google_fonts=False,
        )

    @api.get(ASSETS_PREFIX + "/{name:path}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        path = files.get(name)  # a fixed list: no path from the request reaches the filesystem
        if path is None:
            raise HTTPException(404, f"no documentation asset {name!r}")
        media = _MEDIA.get(path.suffix, "text/plain; charset=utf-8")
        return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=86400"})


# ------------------------------------------------------------------------------------------ examples
# A 1 x 1 PNG: a request that runs as it is against a server with tasks (or with `labels`).
_PNG: Final = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
_BASE: Final = "http://127.0.0.1:8000"

_ANSWER: Final = {
    "label": "tabby cat",
    "score": 0.912,
    "top_k": [{"label": "tabby cat", "score": 0.912}, {"label": "tiger", "score": 0.051}],
    "task": "pets",
    "gate": 0.874,
    "out_of_distribution": False,
    "bundle_version": 3,
}
_ZERO_SHOT_ANSWER: Final = {
    **_ANSWER,
    "label": "dog",
    "score": 0.64,
    "top_k": [{"label": "dog", "score": 0.64}, {"label": "cat", "score": 0.36}],
    "task": "pets",
    "gate": 0.02,
    "out_of_distribution": True,
}

_ERROR_EXAMPLES: Final = {
    "400": ("not_an_image", "file: the data is not a PNG, JPEG or WebP image", "file"),
    "401": ("missing_api_key", "send the API key in the X-API-Key header", None),
    "403": ("admin_disabled", "the server has no admin key: admin routes are closed", None),
    "404": ("not_found", "Not Found", None),
    "413": ("body_too_large", "request body over the 24 MiB limit", None),
    "415": ("unsupported_media_type", "content type text/plain: send application/json or multipart", None),
    "422": ("unknown_task", "task 'birds' is not served; served tasks: ['pets', 'cars']", "task"),
    "429": ("reload_in_progress", "a reload is already running on this replica", None),
    "502": ("reload_failed", "bundle.json missing; still serving version 3", None),
    "503": ("registry_unavailable", "registry unreachable; still serving version 3", None),
}

_METRICS_TEXT: Final = """# HELP diki_predictions_total Images classified
# TYPE diki_predictions_total counter
diki_predictions_total 1024.0
# HELP diki_bundle_version Registry version of the served bundle (0: zero-shot, no bundle)
# TYPE diki_bundle_version gauge
diki_bundle_version 3.0
"""


def _curl(method: str, path: str, extra: str = "") -> list[dict[str, str]]:
    return [{"lang": "Shell", "label": "curl", "source": f"curl -X {method} {_BASE}{path} {extra}".strip()}]


# (method, path) -> description, example request body, example answer, curl line. Every route of
# the schema is here; tests/test_openapi_docs.py checks that none is left without.
OPERATIONS: Final[dict[tuple[str, str], dict[str, Any]]] = {
    ("post", "/v1/classify"): {
        "description": (
            "Classify one image, sent as base64 in JSON or as a multipart file. Without `labels` or "
            "`task`, the image is routed to the learned task whose feature statistics fit it best, the "
            "task's adapter is applied with the gate (how well the image fits that task), and the "
            "answer is one of that task's classes. With `labels`, the classes are the labels given "
            "(open vocabulary); with `task`, that task is used. An image that fits no task "
            "(`out_of_distribution`) is answered by the frozen CLIP model alone. "
            "Needs the API key (header `X-API-Key`) when the server has one."
        ),
        "request": {"image_base64": _PNG, "top_k": 2},
        "request_examples": {
            "routed": {
                "summary": "Route the image to a learned task",
                "value": {"image_base64": _PNG, "top_k": 2},
            },
            "labels": {
                "summary": "Open vocabulary: classify against your own labels",
                "value": {"image_base64": _PNG, "labels": ["cat", "dog"], "template": "a photo of a {}."},
            },
            "forced task": {
                "summary": "Use one task's adapter and classes",
                "value": {"image_base64": _PNG, "task": "pets"},
            },
        },
        "response": _ANSWER,
        "response_examples": {
            "routed": {"summary": "Routed to a task", "value": _ANSWER},
            "out of distribution": {"summary": "Fits no task: the frozen model answered", "value": _ZERO_SHOT_ANSWER},
        },
        "curl": _curl("POST", "/v1/classify", "-H 'X-API-Key: $DIKI_API_KEY' -F file=@cat.jpg -F top_k=2"),
    },
    ("post", "/v1/classify/batch"): {
        "description": (
            "Classify several images in one call, each with its own options (JSON `items`, or multipart "
            "`files` sharing one set of options). Every result of one call comes from the same bundle "
            "version, named in `bundle_version`. The number of images is capped by the server's "
            "batch limit (413 beyond it)."
        ),
        "request": {"items": [{"image_base64": _PNG}, {"image_base64": _PNG, "labels": ["cat", "dog"]}]},
        "response": {"results": [_ANSWER, _ZERO_SHOT_ANSWER], "bundle_version": 3},
        "curl": _curl(
            "POST", "/v1/classify/batch", "-H 'X-API-Key: $DIKI_API_KEY' -F files=@cat.jpg -F files=@dog.jpg"
        ),
    },
    ("get", "/v1/tasks"): {
        "description": (
            "The tasks the served bundle holds, in the order they were learned: each task's classes, "
            "prompt template, training images and dataset fingerprint, with the backbone they share."
        ),
        "response": {
            "bundle_version": 3,
            "mode": "bundle",
            "backbone": {"name": "diki-small", "fingerprint": "5c1f0e2a9b7d4c3e"},
            "tasks": [
                {
                    "index": 0,
                    "name": "pets",
                    "classes": ["tabby cat", "tiger", "dog"],
                    "template": "a photo of a {}.",
                    "num_samples": 480,
                    "dataset_fingerprint": "9f2c6a1d0e4b8c7f",
                    "created_at": "2026-03-01T12:00:00+00:00",
                }
            ],
        },
        "curl": _curl("GET", "/v1/tasks", "-H 'X-API-Key: $DIKI_API_KEY'"),
    },
    ("post", "/v1/admin/reload"): {
        "description": (
            "Load the bundle version the registry alias names now, instead of waiting for the next poll. "
            "The new bundle is loaded next to the served one and switched in at once; requests in flight "
            "finish on the old one. Needs the admin key (header `X-Admin-Key`); no body."
        ),
        "response": {
            "changed": True,
            "bundle_version": 4,
            "previous_version": 3,
            "registry_version": 4,
            "message": "loaded version 4 (production), was 3",
        },
        "curl": _curl("POST", "/v1/admin/reload", "-H 'X-Admin-Key: $DIKI_ADMIN_KEY'"),
    },
    ("get", "/healthz"): {
        "description": "Liveness: the replica's process answers HTTP. Says nothing about the model (see `/readyz`).",
        "response": {"status": "ok"},
        "curl": _curl("GET", "/healthz"),
    },
    ("get", "/readyz"): {
        "description": (
            "Readiness: which bundle version answers, where it came from, and the registry's state (the "
            "version its alias names, whether the last call reached it). A replica keeps serving its last "
            "good bundle while the registry is unreachable."
        ),
        "response": {
            "ready": True,
            "mode": "bundle",
            "bundle_version": 3,
            "source": "registry diki@production",
            "tasks": ["pets", "cars"],
            "loaded_at": 1767225600.0,
            "registry_enabled": True,
            "registry_reachable": True,
            "registry_checked_at": 1767225660.0,
            "registry_version": 3,
            "last_reload_error": None,
            "message": "serving bundle version 3 from registry diki@production",
        },
        "curl": _curl("GET", "/readyz"),
    },
    ("get", "/metrics"): {
        "description": (
            "Prometheus metrics of the replica that answers: requests and latency by route and status, "
            "batch sizes, images per routed task, gate values, out-of-distribution share, the served "
            "bundle version, registry health and reloads."
        ),
        "response_text": _METRICS_TEXT,
        "curl": _curl("GET", "/metrics"),
    },
}


def _error_example(status: str) -> dict[str, Any] | None:
    known = _ERROR_EXAMPLES.get(status)
    if known is None:
        return None
    code, message, field = known
    return {"error": {"code": code, "message": message, "field": field}}


def document_operations(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with every documented operation's description, examples and curl line filled in."""
    schema = copy.deepcopy(schema)
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            doc = OPERATIONS.get((method, path))
            if doc is None:
                continue
            op["description"] = doc["description"]
            op["x-codeSamples"] = doc["curl"]
            _request_examples(op, doc)
            _response_examples(op, doc)
    return schema


def _request_examples(op: dict[str, Any], doc: dict[str, Any]) -> None:
    content = op.get("requestBody", {}).get("content", {})
    body = content.get("application/json")
    if body is None or "request" not in doc:
        return
    body["example"] = doc["request"]
    if "request_examples" in doc:
        body["examples"] = doc["request_examples"]


def _response_examples(op: dict[str, Any], doc: dict[str, Any]) -> None:
    for status, response in op.get("responses", {}).items():
        content = response.setdefault("content", {})
        if status.startswith("2"):
            if "response_text" in doc:
                content.pop("application/json", None)
                content["text/plain"] = {"schema": {"type": "string"}, "example": doc["response_text"]}
            elif "application/json" in content:
                content["application/json"]["example"] = doc["response"]
                if "response_examples" in doc:
                    content["application/json"]["examples"] = doc["response_examples"]
        elif "application/json" in content and (example := _error_example(status)) is not None:
            content["application/json"]["example"] = example
