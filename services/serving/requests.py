"""From an HTTP request to model inputs: the API key, the body (JSON or multipart), its checks, the images.

Every refusal is an :class:`ApiError` with a stable code, a message saying what and where, and the
field at fault. :class:`RequestReader` holds the limits of one replica: it checks the key, reads the
body within its size limit, parses it into :class:`RawItem` s (image bytes + options), checks them
against the served snapshot, then decodes and preprocesses each image into an :class:`Item` that the
batcher takes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from services.serving.bundles import ServedModel
from services.serving.config import ReplicaConfig, hash_key
from services.serving.images import ImageInputError, decode_image, is_small
from services.serving.keys import ADMIN_KEY_HEADER
from services.serving.schemas import (
    MAX_LABEL_CHARS,
    MAX_TEMPLATE_CHARS,
    BatchRequest,
    ClassifyOptions,
    ClassifyRequest,
)

__all__ = [
    "ADMIN_KEY_HEADER",
    "API_KEY_HEADER",
    "JSON_TYPE",
    "MULTIPART_TYPE",
    "ApiError",
    "Item",
    "RawItem",
    "RequestReader",
    "body_schema",
    "validation_error",
]

DEFAULT_TEMPLATE = "a photo of a {}."
API_KEY_HEADER = "X-API-Key"
JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
# Multipart form fields besides the image file(s).
FORM_FIELDS = ("labels", "task", "top_k", "template")
FILE_FIELDS = ("file", "files")
# A single image this small (bytes and header pixels) is decoded on the event loop; others in a thread.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 256 * 256


# ------------------------------------------------------------------------------------------ errors
class ApiError(Exception):
    """An answer other than success, with a stable code and a message saying what and where."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"code": self.code, "message": self.message, "field": self.field}}
        headers = dict(self.headers)
        if self.status == 401:
            headers.setdefault("WWW-Authenticate", f'ApiKey header="{API_KEY_HEADER}"')
        return JSONResponse(body, status_code=self.status, headers=headers or None)


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(err: ValidationError | RequestValidationError, prefix: str = "") -> ApiError:
    """The first problem pydantic found, as a 422 naming the field (``items[0].labels``)."""
    errors = err.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [p for p in first.get("loc", ()) if p != "body"]
    field = (prefix + "." + _loc(loc) if prefix and loc else prefix or _loc(loc)) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return ApiError(422, "invalid_request", f"{field or 'request'}: {msg}{more}", field)


# ------------------------------------------------------------------------------------------ items
@dataclass
class RawItem:
    """One image of a request as received: its bytes, what to call it in messages, its options."""

    data: bytes
    where: str
    options: ClassifyOptions


@dataclass
class Item:
    """One image ready for the batcher: preprocessed, with the snapshot that answers its request."""

    state: ServedModel
    image: torch.Tensor
    labels: tuple[str, ...] | None
    task: str | None
    template: str
    top_k: int


async def _replay(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _parse_labels(raw: list[str]) -> list[str] | None:
    """Multipart ``labels``: each field a JSON array or a comma-separated list; fields concatenate."""
    labels: list[str] = []
    for value in raw:
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as err:
                raise ApiError(
                    422, "invalid_request", f"labels: not a valid JSON array ({err.msg})", "labels"
                ) from None
            if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
                raise ApiError(422, "invalid_request", "labels: a JSON value must be an array of strings", "labels")
            labels.extend(parsed)
        else:
            labels.extend(part.strip() for part in text.split(","))
    return labels if raw else None


def _decode_base64(text: str, where: str) -> bytes:
    if text.startswith("data:"):
        head, sep, rest = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(
                400, "invalid_base64", f"{where}: a data URL must look like data:image/png;base64,...", where
            )
        text = rest
    text = "".join(text.split())  # line breaks are common in base64 tools' output
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, "invalid_base64", f"{where}: not valid base64 ({err})", where) from None


def expected_key_hash(cfg: ReplicaConfig) -> str | None:
    """The key's hash from the driver, else from this replica's own environment (e.g. a Kubernetes Secret)."""
    if cfg.api_key_sha256 is None:
        from services.settings import Settings

        key = Settings.load(**cfg.settings).serve.api_key
        value = key.get_secret_value() if key is not None else ""
        return hash_key(value) if value else None
    return cfg.api_key_sha256


def expected_admin_hash(cfg: ReplicaConfig) -> str | None:
    """The admin key's hash from the driver, else ``serve.admin_key`` of this replica's own environment."""
    if cfg.admin_key_sha256 is None and not cfg.admin_open:
        from services.settings import Settings

        key = Settings.load(**cfg.settings).serve.admin_key
        value = key.get_secret_value() if key is not None else ""
        return hash_key(value) if value else None
    return cfg.admin_key_sha256


def _given_key(request: Request, *headers: str) -> str | None:
    for header in headers:
        value = request.headers.get(header)
        if value:
            return value
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return None


# ------------------------------------------------------------------------------------------ reader
class RequestReader:
    """Checks, reads and prepares the requests of one replica, within its configured limits."""

    def __init__(self, cfg: ReplicaConfig) -> None:
        self.cfg = cfg
        self._key_hash = expected_key_hash(cfg)
        self._admin_hash = expected_admin_hash(cfg)

    # ---------------------------------------------------------------------------- auth
    def check_key(self, request: Request) -> None:
        """Refuse (401) a request without the API key, when the server has one."""
        expected = self._key_hash
        if expected is None:
            return
        given = _given_key(request, API_KEY_HEADER)
        if not given:
            raise ApiError(401, "missing_api_key", f"this server needs an API key in the {API_KEY_HEADER} header")
        if not hmac.compare_digest(hash_key(given), expected):
            raise ApiError(401, "invalid_api_key", f"the {API_KEY_HEADER} header does not hold a valid key")

    def check_admin(self, request: Request) -> None:
        """Refuse an admin call without the admin key (401), or every admin call when there is no key (403).

        The key is read from ``X-Admin-Key``, else ``X-API-Key``, else a bearer token. Open only with
        ``serve.admin_open`` (development).
        """
        if self.cfg.admin_open:
            return
        expected = self._admin_hash
        if expected is None:
            raise ApiError(
                403,
                "admin_disabled",
                "the admin routes are closed: this server has no admin key (set serve.admin_key, or let "
                "`diki serve` create its key file)",
            )
        challenge = {"WWW-Authenticate": f'ApiKey header="{ADMIN_KEY_HEADER}"'}
        given = _given_key(request, ADMIN_KEY_HEADER, API_KEY_HEADER)
        if not given:
            raise ApiError(
                401,
                "missing_api_key",
                f"this route needs the admin key in the {ADMIN_KEY_HEADER} header",
                headers=challenge,
            )
        if not hmac.compare_digest(hash_key(given), expected):
            raise ApiError(
                401, "invalid_api_key", f"the {ADMIN_KEY_HEADER} header does not hold the admin key", headers=challenge
            )

    # ---------------------------------------------------------------------------- body
    def _body_limit(self, images: int) -> int:
        per_image = self.cfg.max_image_bytes * 4 // 3 + 16
        per_options = self.cfg.max_labels * (MAX_LABEL_CHARS * 4 + 8) + MAX_TEMPLATE_CHARS * 4 + 4096
        return images * (per_image + per_options) + 65536

    def body_limit(self, images: int) -> int:
        """The most bytes a body with ``images`` images may hold: what they and their options need, at most
        ``serve.max_request_bytes``."""
        return min(self._body_limit(images), self.cfg.max_request_bytes)

    async def _read_body(self, request: Request, images: int) -> bytes:
        """The body, refused (413) from its Content-Length, else as soon as the bytes read pass the limit."""
        limit = self.body_limit(images)
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise ApiError(400, "bad_content_length", "the Content-Length header is not a number") from None
            if size > limit:
                raise ApiError(
                    413, "body_too_large", f"the request body has {size} bytes, more than the limit of {limit}"
                )
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            request.state.body_bytes = total  # the app frees memory after large bodies (see app.py)
            if total > limit:
                chunks.clear()  # not kept alive by the exception's traceback until the next garbage collection
                raise ApiError(413, "body_too_large", f"the request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
        if not total:
            raise ApiError(400, "empty_body", "the request body is empty: send an image (JSON or multipart)")
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()  # one copy of the body from here on
        return body

    async def read(self, request: Request, batch: bool) -> list[RawItem]:
        """The images of the request with their options (one, or up to the batch limit)."""
        media = _media_type(request)
        if media not in (JSON_TYPE, MULTIPART_TYPE):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {media or '(none)'!r} is not accepted: send {JSON_TYPE} or {MULTIPART_TYPE}",
            )
        max_images = self.cfg.max_batch_images if batch else 1
        body = await self._read_body(request, max_images)
        if media == JSON_TYPE:
            return self._parse_json(body, batch, max_images)
        return await self._parse_multipart(request, body, batch, max_images)

    def _parse_json(self, body: bytes, batch: bool, max_images: int) -> list[RawItem]:
        try:
            data = json.loads(body)
        except ValueError as err:  # also UnicodeDecodeError
            raise ApiError(400, "invalid_json", f"the body is not valid JSON ({err})") from None
        except RecursionError:
            raise ApiError(400, "invalid_json", "the body is not valid JSON (nested too deeply)") from None
        if batch and isinstance(data, dict) and isinstance(data.get("items"), list):
            if len(data["items"]) > max_images:
                raise ApiError(
                    413,
                    "batch_too_large",
                    f"items: {len(data['items'])} images in one call, more than the limit of {max_images}",
                    "items",
                )
        try:
            parsed = BatchRequest.model_validate(data) if batch else ClassifyRequest.model_validate(data)
        except ValidationError as err:
            raise validation_error(err) from None
        requests = parsed.items if isinstance(parsed, BatchRequest) else [parsed]
        items = []
        for i, req in enumerate(requests):
            where = f"items[{i}].image_base64" if batch else "image_base64"
            options = ClassifyOptions.model_validate(req.model_dump(exclude={"image_base64"}))
            items.append(RawItem(_decode_base64(req.image_base64, where), where, options))
        return items

    async def _parse_multipart(self, request: Request, body: bytes, batch: bool, max_images: int) -> list[RawItem]:
        parser = MultiPartParser(
            request.headers, _replay(body), max_files=max_images, max_fields=32, max_part_size=self._body_limit(0)
        )
        try:
            form = await parser.parse()
        except MultiPartException as err:
            if "too many files" in err.message.lower():
                if batch:
                    raise ApiError(
                        413,
                        "batch_too_large",
                        f"files: more than the limit of {max_images} images in one call",
                        "files",
                    ) from None
                raise ApiError(
                    422, "too_many_images", "file: /v1/classify takes one image; use /v1/classify/batch", "file"
                ) from None
            raise ApiError(400, "invalid_multipart", f"the multipart body cannot be parsed: {err.message}") from None
        try:
            unknown = sorted({k for k in form.keys() if k not in FORM_FIELDS + FILE_FIELDS})
            if unknown:
                raise ApiError(
                    422,
                    "unknown_field",
                    f"unknown form fields {unknown}; expected {list(FILE_FIELDS)} and {list(FORM_FIELDS)}",
                    unknown[0],
                )
            files = [v for k in FILE_FIELDS for v in form.getlist(k)]
            if not files:
                raise ApiError(422, "missing_image", "no image: send it as the form field 'file'", "file")
            fields: dict[str, Any] = {}
            for name in ("task", "top_k", "template"):
                values = form.getlist(name)
                if len(values) > 1:
                    raise ApiError(422, "invalid_request", f"{name}: given {len(values)} times", name)
                if values:
                    if not isinstance(values[0], str):
                        raise ApiError(422, "invalid_request", f"{name}: must be a text field, not a file", name)
                    fields[name] = values[0]
            labels_raw = form.getlist("labels")
            if any(not isinstance(v, str) for v in labels_raw):
                raise ApiError(422, "invalid_request", "labels: must be a text field, not a file", "labels")
            labels = _parse_labels([str(v) for v in labels_raw])
            if labels is not None:
                fields["labels"] = labels
            try:
                options = ClassifyOptions.model_validate(fields)
            except ValidationError as err:
                raise validation_error(err) from None
            items = []
            for i, f in enumerate(files):
                where = f"files[{i}]" if batch else "file"
                if not isinstance(f, UploadFile):
                    raise ApiError(422, "missing_image", f"{where}: must be a file part (with a filename)", where)
                items.append(RawItem(await f.read(), where, options))
            return items
        finally:
            await form.close()

    # ---------------------------------------------------------------------------- against the snapshot
    def validate(self, items: list[RawItem], state: ServedModel) -> None:
        """Refuse options the served snapshot cannot answer: too many labels, an unknown task, no labels without tasks."""
        for item in items:
            o, prefix = item.options, item.where.rsplit(".", 1)[0] if "." in item.where else ""
            field = f"{prefix}.labels" if prefix else "labels"
            if o.labels is not None and len(o.labels) > self.cfg.max_labels:
                raise ApiError(
                    422,
                    "too_many_labels",
                    f"{field}: {len(o.labels)} labels, more than the limit of {self.cfg.max_labels}",
                    field,
                )
            if o.task is not None and o.task not in state.task_names:
                tfield = f"{prefix}.task" if prefix else "task"
                known = list(state.task_names) or "none: the server has no bundle"
                raise ApiError(
                    422, "unknown_task", f"{tfield}: unknown task {o.task!r}; the served tasks are {known}", tfield
                )
            if o.labels is None and o.task is None and not state.task_names:
                raise ApiError(
                    422,
                    "labels_required",
                    f"{field}: no bundle is loaded (zero-shot mode), so the request must give `labels` to classify "
                    "against",
                    field,
                )

    async def prepare(self, items: list[RawItem], state: ServedModel) -> list[Item]:
        """Decode and preprocess: one small image on the event loop (faster than a thread hop), else in a thread."""
        if len(items) == 1 and is_small(items[0].data, INLINE_DECODE_BYTES, INLINE_DECODE_PIXELS):
            return self._prepare(items, state)
        return await asyncio.to_thread(self._prepare, items, state)

    def _prepare(self, items: list[RawItem], state: ServedModel) -> list[Item]:
        out = []
        for item in items:
            try:
                img = decode_image(
                    item.data,
                    max_bytes=self.cfg.max_image_bytes,
                    max_pixels=self.cfg.max_image_pixels,
                    where=item.where,
                )
            except ImageInputError as err:
                raise ApiError(err.status, err.code, err.message, item.where) from None
            o = item.options
            out.append(
                Item(
                    state=state,
                    image=state.model.preprocess(img),
                    labels=tuple(o.labels) if o.labels is not None else None,
                    task=o.task,
                    template=o.template or DEFAULT_TEMPLATE,
                    top_k=o.top_k,
                )
            )
        return out


# ------------------------------------------------------------------------------------------ OpenAPI
def body_schema(batch: bool) -> dict[str, Any]:
    """The OpenAPI request bodies this module reads: JSON (the pydantic model) or multipart (file(s) + fields)."""
    ref = "#/components/schemas/" + ("BatchRequest" if batch else "ClassifyRequest")
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    form = {
        "type": "object",
        "properties": {
            ("files" if batch else "file"): {"type": "array", "items": file_schema} if batch else file_schema,
            "labels": {
                "type": "string",
                "description": "Comma-separated labels, or a JSON array of strings",
                "maxLength": 65536,
            },
            "task": {"type": "string", "maxLength": 64},
            "top_k": {"type": "integer", "minimum": 1, "maximum": 100},
            "template": {"type": "string", "maxLength": MAX_TEMPLATE_CHARS},
        },
        "required": ["files" if batch else "file"],
    }
    return {
        "requestBody": {
            "required": True,
            "content": {JSON_TYPE: {"schema": {"$ref": ref}}, MULTIPART_TYPE: {"schema": form}},
        }
    }
