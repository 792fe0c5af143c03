"""The training pieces behind train.py: schedules (incl. BiT-HyperRule), optimizers, EMA, the
loss-scaled and accumulated train step, checkpoints with resume, data parallel, metrics."""

from .checkpoint import CheckpointConfig, CheckpointManager, TrainState, export_weights, load_training_checkpoint, save_training_checkpoint
from .distributed import DistInfo, init_distributed
from .ema import EMA
from .loop import Plan, TrainLoop
from .metrics import MetricsLog, Progress, evaluate, plot_curves
from .optim import OptimConfig, create_optimizer
from .resume import resolve_resume, restore
from .schedules import HyperRule, ScheduleConfig, build_lr_schedule, hyperrule, hyperrule_resolution, resolve_schedule
from .train_step import StepConfig, Trainer

__all__ = [
    "EMA",
    "CheckpointConfig",
    "CheckpointManager",
    "DistInfo",
    "HyperRule",
    "MetricsLog",
    "OptimConfig",
    "Plan",
    "Progress",
    "ScheduleConfig",
    "StepConfig",
    "TrainLoop",
    "TrainState",
    "Trainer",
    "build_lr_schedule",
    "create_optimizer",
    "evaluate",
    "export_weights",
    "hyperrule",
    "hyperrule_resolution",
    "init_distributed",
    "load_training_checkpoint",
    "plot_curves",
    "resolve_resume",
    "resolve_schedule",
    "restore",
    "save_training_checkpoint",
]
