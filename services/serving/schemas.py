"""Request and response bodies of the serving API (``/v1``); they make its OpenAPI schema.

Limits that depend on settings (image bytes and pixels, labels per request, images per batch) are
checked by the app with a message naming the limit; the fixed ones are part of the schema.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

__all__ = [
    "MAX_LABEL_CHARS",
    "MAX_TASK_CHARS",
    "MAX_TEMPLATE_CHARS",
    "MAX_TOP_K",
    "BatchRequest",
    "BatchResponse",
    "ClassifyRequest",
    "ClassifyResponse",
    "ErrorBody",
    "ErrorResponse",
    "HealthResponse",
    "ReadyResponse",
    "ReloadResponse",
    "ScoredLabel",
    "TaskInfo",
    "TasksResponse",
]

MAX_LABEL_CHARS = 200
MAX_TASK_CHARS = 64
MAX_TEMPLATE_CHARS = 300
MAX_TOP_K = 100

Label = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyOptions(_Strict):
    """What to classify against; shared by the JSON and multipart forms."""

    labels: list[Label] | None = Field(
        default=None,
        description="Open-vocabulary label space (each formatted into `template`). Without it: the classes of "
        "`task`, else the classes of the task each image is routed to.",
        examples=[["cat", "dog"]],
    )
    task: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TASK_CHARS)] | None = Field(
        default=None, description="Force this learned task (its adapter, and its classes unless `labels` is given)."
    )
    top_k: int = Field(default=5, ge=1, le=MAX_TOP_K, description="How many best labels to return.")
    template: Annotated[str, StringConstraints(min_length=2, max_length=MAX_TEMPLATE_CHARS)] | None = Field(
        default=None, description="Prompt template for `labels`, with exactly one `{}`; default `a photo of a {}.`"
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("labels must not be empty; leave the field out to use the task's classes")
        stripped = [v.strip() for v in value]
        if any(not v for v in stripped):
            raise ValueError("labels must not be blank")
        dupes = sorted(label for label, n in Counter(stripped).items() if n > 1)
        if dupes:
            raise ValueError(f"duplicate labels: {dupes[:5]}")
        return stripped

    @field_validator("template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None and value.count("{}") != 1:
            raise ValueError("template must contain exactly one '{}'")
        if value is not None and ("{" in value.replace("{}", "") or "}" in value.replace("{}", "")):
            raise ValueError("template may contain no braces other than one '{}'")
        return value


class ClassifyRequest(ClassifyOptions):
    """One image as base64 in JSON."""

    image_base64: str = Field(
        min_length=1,
        description="The image (PNG, JPEG or WebP), base64-encoded; a `data:image/...;base64,` prefix is accepted.",
    )


class BatchRequest(_Strict):
    """Several images in one call, each with its own options."""

    items: list[ClassifyRequest] = Field(min_length=1, description="The images; at most the server's batch limit.")


class ScoredLabel(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    label: str = Field(description="Best label.")
    score: float = Field(description="Softmax probability of the best label over the label space.")
    top_k: list[ScoredLabel]
    task: str | None = Field(description="The task the image was routed to (or forced); null without tasks.")
    gate: float = Field(description="DIKI gate in [0, 1]: how much the task's adapter was applied.")
    out_of_distribution: bool = Field(
        description="True when the gate fell below the threshold: answered by the frozen model alone."
    )
    bundle_version: int | None = Field(description="Registry version of the bundle that answered; null = zero-shot.")


class BatchResponse(BaseModel):
    results: list[ClassifyResponse]
    bundle_version: int | None = Field(description="Every result of one call comes from this bundle version.")


class TaskInfo(BaseModel):
    index: int
    name: str
    classes: list[str]
    template: str
    num_samples: int
    dataset_fingerprint: str
    created_at: str | None = None


class TasksResponse(BaseModel):
    bundle_version: int | None
    mode: Literal["bundle", "zero-shot"]
    backbone: dict[str, Any]
    tasks: list[TaskInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    mode: Literal["bundle", "zero-shot"] | None
    bundle_version: int | None
    source: str | None = Field(description="Where the bundle came from: registry alias, a local folder, or none.")
    tasks: list[str]
    loaded_at: float | None
    registry_enabled: bool
    registry_reachable: bool | None = Field(description="Result of the last registry call; null before any.")
    registry_checked_at: float | None
    registry_version: int | None = Field(description="Version the alias pointed to at the last check.")
    last_reload_error: str | None
    message: str


class ReloadResponse(BaseModel):
    changed: bool
    bundle_version: int | None
    previous_version: int | None
    registry_version: int | None
    message: str


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. `not_an_image`, `unknown_task`.")
    message: str = Field(description="What was wrong and where.")
    field: str | None = Field(default=None, description="The request field at fault, when there is one.")


class ErrorResponse(BaseModel):
    error: ErrorBody
