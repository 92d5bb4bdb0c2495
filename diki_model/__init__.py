"""diki_model: DIKI (distribution-aware interference-free knowledge integration) for open_clip.

A pure PyTorch library: inject per-task residual key/value branches into a frozen CLIP, fit
per-task Gaussian statistics of frozen image features, route and gate each image per sample
(against a reference density of the images to leave undisturbed),
train one task at a time, save tasks as safetensors + JSON, and compute the continual-learning
metrics. Services and pipelines use it only through the names exported here.
"""

from diki_model.adapters import Route, inject_residual_kv
from diki_model.artifacts import ArtifactError, load_task, read_task_metadata, save_task
from diki_model.backbone import (
    Backbone,
    BackboneInfo,
    adapter_lr,
    fingerprint_model,
    load_backbone,
    register_model_configs,
)
from diki_model.bundle import (
    BundleManifest,
    extend_bundle,
    load_bundle,
    read_bundle_manifest,
    replace_bundle_reference,
    save_bundle,
)
from diki_model.calibration import ConstantGate, LikelihoodRatioGate, PaperGate, StandardizedGate, make_gate
from diki_model.config import DikiConfig
from diki_model.evaluate import EvalResult, evaluate
from diki_model.metrics import StreamMetrics, plot_heatmap, stream_metrics
from diki_model.model import DikiCLIP, Prediction, TaskRecord, create_diki_model
from diki_model.probe import (
    Learnability,
    LearnedVerdict,
    frozen_features,
    learned_verdict,
    linear_probe_accuracy,
    task_counts,
)
from diki_model.reference import (
    ReferenceDensity,
    fit_reference,
    fit_reference_from_datasets,
    load_reference,
    read_reference_metadata,
    save_reference,
)
from diki_model.stats import Gaussian, GaussianAccumulator, GaussianScorer, ScoreStats
from diki_model.train import (
    EpochResult,
    TaskStatistics,
    TrainConfig,
    TrainResult,
    TrainState,
    apply_statistics,
    collect_statistics,
    learn_task,
    num_batches,
    split_train_val,
    tensor_batches,
    train_task,
)
from diki_model.version import __version__  # noqa: F401 - the package version

__all__ = [
    "ArtifactError",
    "Backbone",
    "BundleManifest",
    "EvalResult",
    "evaluate",
    "extend_bundle",
    "load_bundle",
    "read_bundle_manifest",
    "replace_bundle_reference",
    "save_bundle",
    "BackboneInfo",
    "ConstantGate",
    "DikiCLIP",
    "DikiConfig",
    "EpochResult",
    "Gaussian",
    "Learnability",
    "LikelihoodRatioGate",
    "ReferenceDensity",
    "fit_reference",
    "fit_reference_from_datasets",
    "load_reference",
    "read_reference_metadata",
    "save_reference",
    "LearnedVerdict",
    "GaussianAccumulator",
    "GaussianScorer",
    "PaperGate",
    "Prediction",
    "Route",
    "ScoreStats",
    "StandardizedGate",
    "StreamMetrics",
    "TaskRecord",
    "TaskStatistics",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "adapter_lr",
    "apply_statistics",
    "collect_statistics",
    "create_diki_model",
    "fingerprint_model",
    "frozen_features",
    "inject_residual_kv",
    "learn_task",
    "learned_verdict",
    "linear_probe_accuracy",
    "load_backbone",
    "load_task",
    "make_gate",
    "num_batches",
    "plot_heatmap",
    "read_task_metadata",
    "register_model_configs",
    "save_task",
    "split_train_val",
    "stream_metrics",
    "task_counts",
    "tensor_batches",
    "train_task",
]
