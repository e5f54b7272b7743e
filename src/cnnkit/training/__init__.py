"""Training, one module per job: the seeded order and shifts (``order``), one step for
one or many processes (``step``), ``evaluation``, the ``epochs`` of a run, ``fit``
(``fitting``) and ``resume`` (``resuming``), the ``rules`` of what a run may do, its
options and schedule (``config``), checkpoints (safetensors + JSON, atomic), run folders,
distributed training, and reading runs back (``run``)."""

from cnnkit.training.checkpoint import Checkpoint, CheckpointError, read_checkpoint
from cnnkit.training.config import TrainConfig, lr_at, make_optimizer
from cnnkit.training.epochs import TrainingInterrupted
from cnnkit.training.evaluation import Evaluation, evaluate
from cnnkit.training.fitting import fit
from cnnkit.training.order import epoch_order
from cnnkit.training.resuming import resume
from cnnkit.training.rules import RESUME_OVERRIDES, RuleError
from cnnkit.training.run import (
    LoadedRun,
    Prediction,
    RunEvaluation,
    evaluate_run,
    load_run,
    predict,
)
from cnnkit.training.run_folder import METRICS_COLUMNS, RunFolder, read_metrics
from cnnkit.training.step import NonFiniteLossError, train_step

__all__ = [
    "METRICS_COLUMNS",
    "Checkpoint",
    "CheckpointError",
    "Evaluation",
    "LoadedRun",
    "NonFiniteLossError",
    "RESUME_OVERRIDES",
    "RuleError",
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
