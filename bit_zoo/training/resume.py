"""Which checkpoint a run continues from, and whether it may: resolved before anything is written."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError
from .checkpoint import TrainState, load_training_checkpoint

__all__ = ["resolve_resume", "restore"]

_logger = logging.getLogger(__name__)


def resolve_resume(resume: str | None, output_dir: str | Path, *, overwrite: bool) -> Path | None:
    """The checkpoint to continue: ``resume`` itself, ``auto`` = <output_dir>/last.ckpt if it exists, else None.

    A fresh run (resume None) refuses an output_dir that holds a previous run unless overwrite is set.
    """
    last = Path(output_dir) / "last.ckpt"
    if resume is None:
        if last.exists() and not overwrite:
            raise ConfigError(
                f"output_dir {output_dir} holds a previous run (last.ckpt): pass --resume auto to continue it, "
                "--output_dir NEW for a new run, or --overwrite true to replace it"
            )
        return None
    if resume == "auto":
        return last if last.exists() else None
    return Path(resume)


def restore(
    path: Path, *, trainer, model, total_steps: int, global_batch: int, accum_steps: int, check_meta=None, allow_unverified: bool = False
) -> TrainState:
    """Load model, optimizer, EMA and loss scale from `path`; refuse a checkpoint of a differently sized
    run, or one that `check_meta(meta)` refuses (see load_training_checkpoint)."""
    state = load_training_checkpoint(
        path,
        model=model,
        optimizer=trainer.optimizer,
        ema=trainer.ema,
        scaler=trainer.scaler,
        check_meta=check_meta,
        allow_unverified=allow_unverified,
    )
    if state.global_batch != global_batch or state.total_steps != total_steps:
        raise ConfigError(
            f"{path} was written by a run with batch_size={state.global_batch} and {state.total_steps} steps; this one has "
            f"batch_size={global_batch} and {total_steps} steps: resume with the original config"
        )
    state.micro_step = state.step * accum_steps
    _logger.info("resumed %s at step %d/%d (epoch %d)", path, state.step, total_steps, state.epoch)
    return state
