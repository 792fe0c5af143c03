"""The training pieces behind train.py: schedules (incl. BiT-HyperRule), optimizers, EMA, the
loss-scaled and accumulated train step, checkpoints with resume, data parallel, metrics."""

from .checkpoint import CheckpointManager, TrainState, load_training_checkpoint, save_training_checkpoint
from .distributed import DistInfo, init_distributed
from .ema import EMA
from .metrics import MetricsLog, Progress, evaluate, plot_curves
from .optim import OptimConfig, create_optimizer
from .schedules import HyperRule, ScheduleConfig, build_lr_schedule, hyperrule, hyperrule_resolution
from .train_step import StepConfig, Trainer

__all__ = [
    "EMA",
    "CheckpointManager",
    "DistInfo",
    "HyperRule",
    "MetricsLog",
    "OptimConfig",
    "Progress",
    "ScheduleConfig",
    "StepConfig",
    "TrainState",
    "Trainer",
    "build_lr_schedule",
    "create_optimizer",
    "evaluate",
    "hyperrule",
    "hyperrule_resolution",
    "init_distributed",
    "load_training_checkpoint",
    "plot_curves",
    "save_training_checkpoint",
]
