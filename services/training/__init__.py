"""The Ray Train job that learns one task: inputs, driver, worker, collectives, checkpoint format.

- :mod:`.inputs`: what a dataset must be to be learned, checked once (``inspect_dataset``).
- :mod:`.job`: the driver (``run_training_job``), which knows nothing of the registry.
- :mod:`.worker`: what runs in each Ray Train worker.
- :mod:`.collectives`: exact statistics merging and gradient averaging across workers.
- :mod:`.checkpoint`: the resumable checkpoint format (safetensors + JSON).
"""

from services.training.checkpoint import read_checkpoint, write_checkpoint
from services.training.inputs import DatasetCheck, LearnableDataset, check_dataset, inspect_dataset
from services.training.job import run_training_job, train_config
from services.training.result import TrainingError, TrainingInputError, TrainJobResult
from services.training.worker import EpochHook

__all__ = [
    "DatasetCheck",
    "EpochHook",
    "LearnableDataset",
    "TrainJobResult",
    "TrainingError",
    "TrainingInputError",
    "check_dataset",
    "inspect_dataset",
    "read_checkpoint",
    "run_training_job",
    "train_config",
    "write_checkpoint",
]
