"""A registered bundle as an MLflow model: the ``pyfunc`` flavour whose one artifact is the bundle folder.

``mlflow.pyfunc.load_model("models:/diki@production").predict(frame)`` classifies the images of
``frame`` (column ``image``: PNG, JPEG or WebP bytes, or their base64 text) the way the Serve
endpoint does: each image is routed to the task whose statistics fit it best, gated, and answered
in that task's label space, or by the frozen model when it is out of distribution. The model logic
is :mod:`diki_model`'s (``load_bundle`` and ``DikiCLIP.predict``); this module only adapts
tables to tensors and back.

Only :mod:`services.registry` logs these models; it imports the schema from here.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import mlflow.pyfunc

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.models import ModelSignature

    from diki_model import DikiCLIP

__all__ = [
    "BUNDLE_KEY",
    "IMAGE_COLUMN",
    "OUTPUT_COLUMNS",
    "DikiBundleModel",
    "model_signature",
    "pip_requirements",
]

BUNDLE_KEY: Final = "bundle"  # the artifact key, and the folder name under the model's artifacts/
IMAGE_COLUMN: Final = "image"
OUTPUT_COLUMNS: Final = ("label", "score", "task", "gate", "out_of_distribution", "top_k")
IMAGE_FORMATS: Final = ("PNG", "JPEG", "WEBP")
_CHUNK: Final = 32  # images per model call: bounds memory for a large frame


def model_signature() -> ModelSignature:
    """Input: one image per row; output: the answer per row; params: ``top_k`` and a forced ``task``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", IMAGE_COLUMN)])
    outputs = Schema(
        [
            ColSpec("string", "label"),
            ColSpec("double", "score"),
            ColSpec("string", "task", required=False),
            ColSpec("double", "gate"),
            ColSpec("boolean", "out_of_distribution"),
            ColSpec("string", "top_k"),
        ]
    )
    params = ParamSchema([ParamSpec("top_k", "long", 5), ParamSpec("task", "string", "")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pip_requirements() -> list[str]:
    """What loading the model needs beyond this project's own code (pinned as installed here)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "torchvision", "open_clip_torch", "safetensors", "pillow", "pandas", "mlflow"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _image_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        # `mlflow models serve` and JSON callers send binary columns as base64 text.
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"row {row}: column {IMAGE_COLUMN!r} is text but not base64") from None
    raise ValueError(f"row {row}: column {IMAGE_COLUMN!r} must hold image bytes, got {type(value).__name__}")


class DikiBundleModel(mlflow.pyfunc.PythonModel):
    """The pyfunc entry point of a bundle version; ``model_config`` may set ``seed`` and ``device``."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model = self._load(Path(context.artifacts[BUNDLE_KEY]), dict(context.model_config or {}))

    @staticmethod
    def _load(bundle: Path, config: dict[str, Any]) -> DikiCLIP:
        from diki_model import DikiConfig, create_diki_model, load_bundle, read_bundle_manifest

        manifest = read_bundle_manifest(bundle)
        backbone = manifest.backbone
        # A backbone without weights (a test config) is random: the seed it was built from makes it again.
        model = create_diki_model(
            backbone["name"],
            backbone.get("pretrained"),
            DikiConfig.from_dict(manifest.config),
            device=config.get("device", "cpu"),
            seed=config.get("seed"),
        )
        return load_bundle(bundle, model=model)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        import pandas as pd
        import torch

        from diki_model.data import decode_rgb

        params = params or {}
        top_k = int(params.get("top_k") or 5)
        task = params.get("task") or None
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(
                f"the input needs a column {IMAGE_COLUMN!r} (image bytes); got {list(model_input.columns)}"
            )
        images = [
            self.model.preprocess(decode_rgb(_image_bytes(v, i), formats=IMAGE_FORMATS, where=f"row {i}"))
            for i, v in enumerate(model_input[IMAGE_COLUMN].tolist())
        ]
        rows: list[dict[str, Any]] = []
        with torch.no_grad():
            for start in range(0, len(images), _CHUNK):
                batch = torch.stack(images[start : start + _CHUNK])
                rows += self._rows(self.model.predict(batch, task=task, top_k=top_k))
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))

    def _rows(self, pred: Any) -> list[dict[str, Any]]:
        names = [t.name for t in self.model.tasks]
        out = []
        for j, label in enumerate(pred.labels):
            t = int(pred.task_index[j])
            out.append(
                {
                    "label": label,
                    "score": float(pred.confidence[j]),
                    "task": names[t] if t >= 0 else None,
                    "gate": float(pred.gate[j]),
                    "out_of_distribution": bool(pred.ood[j]),
                    "top_k": json.dumps([[lbl, float(p)] for lbl, p in pred.top_k[j]]),
                }
            )
        return out
