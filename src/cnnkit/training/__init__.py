"""Training: the loop (``fit``, ``resume``, ``train_step``, ``evaluate``), its options and
schedule, checkpoints (safetensors + JSON, atomic) and run folders, and reading runs back."""

from cnnkit.training.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from cnnkit.training.config import TrainConfig, lr_at, make_optimizer
from cnnkit.training.loop import (
    RESUME_OVERRIDES,
    Evaluation,
    NonFiniteLossError,
    TrainingInterrupted,
    epoch_order,
    evaluate,
    fit,
    resume,
    train_step,
)
from cnnkit.training.run import (
    LoadedRun,
    Prediction,
    RunEvaluation,
    evaluate_run,
    load_run,
    predict,
)
from cnnkit.training.run_folder import METRICS_COLUMNS, RunFolder, read_metrics

__all__ = [
    "METRICS_COLUMNS",
    "Checkpoint",
    "CheckpointError",
    "Evaluation",
    "LoadedRun",
    "NonFiniteLossError",
    "RESUME_OVERRIDES",
    "TrainingInterrupted",
    "Prediction",
    "RunEvaluation",
    "RunFolder",
    "TrainConfig",
    "epoch_order",
    "evaluate",
    "evaluate_run",
    "fit",
    "load_run",
    "lr_at",
    "make_optimizer",
    "predict",
    "read_checkpoint",
    "read_metrics",
    "resume",
    "train_step",
]
