"""Learning-rate schedules, computed on the host as one value per optimizer step.

MindSpore optimizers take a per-step lr array and index it with their own ``global_step``, so
a schedule here is a pure function ``(config, steps) -> np.ndarray``; restoring ``global_step``
on resume therefore restores the schedule position too.

Schedules:
    hyperrule  BiT-HyperRule: linear warmup from 0, then /10 at each decay step (BIT_FACTS 3).
    staircase  the seed recipe: linear warmup over epochs, then lr * rate ** floor(epochs / every).
    multistep  mindcv's multi_step_decay: warmup, then lr * rate ** (milestones passed), by epoch.
    cosine     warmup, then cosine from lr to min_lr.
    constant   warmup, then lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..errors import ConfigError
from ..hyperrule import HyperRule, hyperrule, hyperrule_resolution
from ..options import at_least, each, non_negative, option, positive

__all__ = [
    "SCHEDULERS",
    "HyperRule",
    "hyperrule",
    "hyperrule_resolution",
    "ScheduleConfig",
    "build_lr_schedule",
    "resolve_schedule",
]

SCHEDULERS = ("hyperrule", "staircase", "multistep", "cosine", "constant")


@dataclass
class ScheduleConfig:
    """The "schedule" option group (see bit_zoo.options). The peak lr is OptimConfig.lr."""

    scheduler: str = option("hyperrule", "learning-rate schedule", choices=SCHEDULERS)
    epochs: float | None = option(None, "training length in epochs (not with hyperrule's default)", check=positive)
    steps: int | None = option(None, "training length in optimizer steps; hyperrule: by dataset size", check=at_least(1))
    warmup_steps: int | None = option(None, "linear warmup steps; hyperrule: by dataset size", check=at_least(0))
    warmup_epochs: float = option(0.0, "linear warmup in epochs (staircase, multistep, cosine, constant)", check=non_negative)
    decay_steps: list[int] | None = option(None, "hyperrule: the /10 steps; default by dataset size", check=each(at_least(1)))
    decay_rate: float = option(0.1, "lr factor at each decay", check=positive)
    decay_epochs: float = option(1.0, "staircase: decay every this many epochs", check=positive)
    milestones: list[float] = option([], "multistep: epochs", check=each(non_negative))
    min_lr: float = option(0.0, "cosine: final lr", check=non_negative)


def build_lr_schedule(cfg: ScheduleConfig, *, lr: float, total_steps: int, steps_per_epoch: int) -> np.ndarray:
    """float32 array of length total_steps: the lr used by optimizer step i (0-based); warmup_steps None = 0."""
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}: choose one of {SCHEDULERS}")
    if total_steps <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"a schedule needs total_steps > 0 and steps_per_epoch > 0, got {total_steps} and {steps_per_epoch}")
    steps = np.arange(total_steps, dtype=np.float64)
    epochs = steps / steps_per_epoch
    warmup_steps = cfg.warmup_steps or 0
    warmup = warmup_steps if cfg.scheduler == "hyperrule" or not cfg.warmup_epochs else cfg.warmup_epochs * steps_per_epoch
    if cfg.scheduler == "hyperrule":
        # upstream bit_hyperrule.get_lr: base * step / warmup, then /10 for every decay step < step
        decays = np.asarray(cfg.decay_steps or (), dtype=np.float64)
        lr_at = lr * np.power(cfg.decay_rate, np.sum(steps[:, None] > decays[None, :], axis=1))
    elif cfg.scheduler == "staircase":
        after = np.maximum(epochs - cfg.warmup_epochs, 0.0)
        lr_at = lr * np.power(cfg.decay_rate, np.floor(after / cfg.decay_epochs))
    elif cfg.scheduler == "multistep":
        passed = np.sum(np.floor(epochs)[:, None] >= np.asarray(cfg.milestones, dtype=np.float64)[None, :], axis=1) if cfg.milestones else 0
        lr_at = lr * np.power(cfg.decay_rate, passed) * np.ones_like(steps)
    elif cfg.scheduler == "cosine":
        span = max(total_steps - warmup, 1)
        t = np.clip((steps - warmup) / span, 0.0, 1.0)
        lr_at = cfg.min_lr + 0.5 * (lr - cfg.min_lr) * (1.0 + np.cos(math.pi * t))
    else:
        lr_at = np.full_like(steps, lr)
    if warmup > 0:
        lr_at = np.where(steps < warmup, lr * steps / warmup, lr_at)
    return lr_at.astype(np.float32)


def resolve_schedule(cfg: ScheduleConfig, *, lr: float, num_images: int, steps_per_epoch: int) -> tuple[np.ndarray, int]:
    """(per-step lr array, total steps) for a training set of num_images.

    hyperrule: length, warmup and decays by dataset size unless set; a run shortened with
    epochs/steps scales the rule's warmup and decay points with it. Others need epochs or steps.
    """
    if cfg.epochs is not None and cfg.steps is not None:
        raise ConfigError("epochs and steps both set: keep one")
    if cfg.scheduler == "hyperrule":
        rule = hyperrule(num_images)
        total = cfg.steps or (math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs else rule.total)
        scale = total / rule.total
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(rule.warmup * scale)
        decays = list(cfg.decay_steps) if cfg.decay_steps is not None else [round(x * scale) for x in rule.decays]
        cfg = replace(cfg, warmup_steps=warmup, decay_steps=decays)
    elif cfg.epochs is None and cfg.steps is None:
        raise ConfigError(f"scheduler {cfg.scheduler} needs a training length: set epochs or steps")
    else:
        total = cfg.steps or math.ceil(cfg.epochs * steps_per_epoch)
    return build_lr_schedule(cfg, lr=lr, total_steps=total, steps_per_epoch=steps_per_epoch), total
