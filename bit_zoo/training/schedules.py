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
from dataclasses import dataclass

import numpy as np

__all__ = ["SCHEDULERS", "HyperRule", "hyperrule", "hyperrule_resolution", "ScheduleConfig", "build_lr_schedule"]

SCHEDULERS = ("hyperrule", "staircase", "multistep", "cosine", "constant")


@dataclass(frozen=True)
class HyperRule:
    """BiT-HyperRule's step schedule for one training-set size."""

    warmup: int
    decays: tuple[int, ...]
    total: int
    mixup_alpha: float


def hyperrule(num_images: int) -> HyperRule:
    """The schedule by training-set size: < 20k, < 500k, otherwise (upstream bit_hyperrule.py)."""
    if num_images < 20_000:
        return HyperRule(100, (200, 300, 400), 500, 0.0)
    if num_images < 500_000:
        return HyperRule(500, (3000, 6000, 9000), 10_000, 0.1)
    return HyperRule(500, (6000, 12_000, 18_000), 20_000, 0.1)


def hyperrule_resolution(height: int, width: int) -> tuple[int, int]:
    """(resize, crop): images smaller than 96x96 in area train at 160 -> 128, others at 512 -> 480."""
    return (160, 128) if height * width < 96 * 96 else (512, 480)


@dataclass(frozen=True)
class ScheduleConfig:
    scheduler: str = "hyperrule"
    lr: float = 0.003
    warmup_steps: int = 0  # used by hyperrule (and by the others when warmup_epochs is 0)
    warmup_epochs: float = 0.0
    decay_steps: tuple[int, ...] = ()  # hyperrule
    decay_rate: float = 0.1
    decay_epochs: float = 1.0  # staircase: decay every this many epochs
    milestones: tuple[float, ...] = ()  # multistep, in epochs
    min_lr: float = 0.0


def build_lr_schedule(cfg: ScheduleConfig, *, total_steps: int, steps_per_epoch: int) -> np.ndarray:
    """float32 array of length total_steps: the lr used by optimizer step i (0-based)."""
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}: choose one of {SCHEDULERS}")
    if total_steps <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"a schedule needs total_steps > 0 and steps_per_epoch > 0, got {total_steps} and {steps_per_epoch}")
    steps = np.arange(total_steps, dtype=np.float64)
    epochs = steps / steps_per_epoch
    warmup = cfg.warmup_steps if cfg.scheduler == "hyperrule" or not cfg.warmup_epochs else cfg.warmup_epochs * steps_per_epoch
    if cfg.scheduler == "hyperrule":
        # upstream bit_hyperrule.get_lr: base * step / warmup, then /10 for every decay step < step
        lr = cfg.lr * np.power(cfg.decay_rate, np.sum(steps[:, None] > np.asarray(cfg.decay_steps, dtype=np.float64)[None, :], axis=1))
    elif cfg.scheduler == "staircase":
        after = np.maximum(epochs - cfg.warmup_epochs, 0.0)
        lr = cfg.lr * np.power(cfg.decay_rate, np.floor(after / cfg.decay_epochs))
    elif cfg.scheduler == "multistep":
        passed = np.sum(np.floor(epochs)[:, None] >= np.asarray(cfg.milestones, dtype=np.float64)[None, :], axis=1) if cfg.milestones else 0
        lr = cfg.lr * np.power(cfg.decay_rate, passed) * np.ones_like(steps)
    elif cfg.scheduler == "cosine":
        span = max(total_steps - warmup, 1)
        t = np.clip((steps - warmup) / span, 0.0, 1.0)
        lr = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + np.cos(math.pi * t))
    else:
        lr = np.full_like(steps, cfg.lr)
    if warmup > 0:
        lr = np.where(steps < warmup, cfg.lr * steps / warmup, lr)
    return lr.astype(np.float32)
