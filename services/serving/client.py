"""A small HTTP client of the serving API, used by ``diki predict``, the demo and the pipeline's reload call.

Transient failures (connection refused or reset, timeouts, 500/502/503/504 while a replica is
replaced, 429 while the replica is busy with another reload) are retried with exponential backoff
until ``retry_for_s`` has passed; other 4xx answers are never retried and raise
:class:`ServingError` with the server's code and message.

Keys: ``api_key`` goes with every call (the classify routes need it when the server has one); the
admin key goes with admin calls only (``reload``). ``ServingClient(url, serving_keys(settings))``
finds both from the settings (the admin key file that ``diki serve`` creates, see
:mod:`services.serving.keys`).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from services.serving.keys import ADMIN_KEY_HEADER, ServingKeys, serving_keys

if TYPE_CHECKING:
    from services.settings import Settings

__all__ = ["DEFAULT_URL", "ServingClient", "ServingError", "ServingKeys", "serving_keys"]

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_HEADER = "X-API-Key"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
ImageInput = bytes | str | Path


class ServingError(RuntimeError):
    """The server answered with an error (or could not be reached in time)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.field = status, code, field


def _read(image: ImageInput) -> tuple[str, bytes]:
    if isinstance(image, bytes | bytearray):
        return "image", bytes(image)
    path = Path(image)
    try:
        return path.name, path.read_bytes()
    except OSError as err:
        raise ServingError(f"cannot read image {path}: {err.strerror or err}") from None


class ServingClient:
    """Talks to one serving endpoint. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | ServingKeys | None = None,
        timeout_s: float = 30.0,
        retry_for_s: float = 30.0,
        backoff_s: float = 0.2,
        transport: httpx.BaseTransport | None = None,
        admin_key: str | None = None,
    ) -> None:
        """``api_key``: the classify routes' key, or a :class:`ServingKeys` with both keys
        (``serving_keys(settings)``); ``admin_key``: the admin routes' key (wins over the one in ``api_key``)."""
        if isinstance(api_key, ServingKeys):
            admin_key = admin_key or api_key.admin_key
            api_key = api_key.api_key
        self.url = url.rstrip("/")
        self.retry_for_s = retry_for_s
        self.backoff_s = backoff_s
        self._admin_headers = {ADMIN_KEY_HEADER: admin_key} if admin_key else {}
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers, transport=transport)
        self.retries = 0  # transient failures retried so far (for tests and diagnostics)

    @staticmethod
    def keys_for(settings: Settings) -> ServingKeys:
        """Both keys of the endpoint ``settings`` describe (:func:`services.serving.keys.serving_keys`)."""
        return serving_keys(settings)

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ transport
    def request(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> httpx.Response:
        """One call with retries of transient failures; raises :class:`ServingError` on an error answer."""
        deadline = time.monotonic() + (self.retry_for_s if retry else 0.0)
        delay = self.backoff_s
        while True:
            wait = delay
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                if time.monotonic() + delay > deadline:
                    raise ServingError(f"{method} {self.url}{path}: cannot reach the server ({err!r})") from None
            else:
                if response.status_code == 429:  # busy with another reload: wait as long as the server says
                    wait = max(delay, _retry_after(response))
                if response.status_code not in RETRY_STATUSES or time.monotonic() + wait > deadline:
                    if response.is_error:
                        raise _error(method, self.url + path, response)
                    return response
            self.retries += 1
            time.sleep(wait)
            delay = min(delay * 2, 2.0)

    # ------------------------------------------------------------------ API
    def classify(
        self,
        image: ImageInput,
        labels: Sequence[str] | None = None,
        task: str | None = None,
        top_k: int = 5,
        template: str | None = None,
    ) -> dict[str, Any]:
        """Classify one image (a path or bytes): label, score, top_k, task, gate, out_of_distribution, bundle_version."""
        _, data = _read(image)
        body = _options(labels, task, top_k, template)
        body["image_base64"] = base64.b64encode(data).decode()
        return self.request("POST", "/v1/classify", json=body).json()

    def classify_batch(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str] | None = None,
        task: str | None = None,
        top_k: int = 5,
        template: str | None = None,
    ) -> dict[str, Any]:
        """Classify several images in one call, all answered by one bundle version."""
        options = _options(labels, task, top_k, template)
        items = [{**options, "image_base64": base64.b64encode(_read(img)[1]).decode()} for img in images]
        return self.request("POST", "/v1/classify/batch", json={"items": items}).json()

    def tasks(self) -> dict[str, Any]:
        return self.request("GET", "/v1/tasks").json()

    def ready(self) -> dict[str, Any]:
        return self.request("GET", "/readyz").json()

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz").is_success
        except httpx.TransportError:
            return False

    def metrics(self) -> str:
        return self.request("GET", "/metrics").text

    def reload(self) -> dict[str, Any]:
        """Ask a replica to load the bundle the registry alias names now (waits for the switch); needs the admin key."""
        return self.request("POST", "/v1/admin/reload", headers=self._admin_headers).json()

    def wait_ready(self, timeout_s: float = 120.0, version: int | None = None) -> dict[str, Any]:
        """Poll ``/readyz`` until the server is ready (and serves ``version`` when given)."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                response = self._http.get("/readyz")
                last = (
                    response.json() if response.headers.get("content-type", "").startswith("application/json") else None
                )
                if response.status_code == 200 and last and (version is None or last.get("bundle_version") == version):
                    return last
            except (httpx.TransportError, ValueError) as err:
                last = repr(err)
            time.sleep(0.25)
        want = f" with bundle version {version}" if version is not None else ""
        raise ServingError(f"{self.url} not ready{want} after {timeout_s:g} s (last answer: {last})")


def _options(labels: Sequence[str] | None, task: str | None, top_k: int, template: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"top_k": top_k}
    if labels is not None:
        body["labels"] = list(labels)
    if task is not None:
        body["task"] = task
    if template is not None:
        body["template"] = template
    return body


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("retry-after", "0")), 0.0), 10.0)
    except ValueError:
        return 0.0


def _error(method: str, url: str, response: httpx.Response) -> ServingError:
    code = field = None
    try:
        err = response.json().get("error", {})
        code, field, message = err.get("code"), err.get("field"), err.get("message")
    except (ValueError, AttributeError):
        message = None
    text = message or response.text[:300] or response.reason_phrase
    return ServingError(f"{method} {url}: HTTP {response.status_code}: {text}", response.status_code, code, field)
