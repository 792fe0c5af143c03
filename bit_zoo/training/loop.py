"""The training loop: optimizer steps, epoch records, evaluation, checkpoints, a non-finite-loss stop.

    loop = TrainLoop(trainer, model, plan=plan, train_data=..., eval_data=..., step=cfg.step,
                     checkpoint=cfg.checkpoint, manager=manager, metrics=metrics)
    result = loop.run(state)

Each optimizer step is one ``trainer.step(micro_batches) -> (loss, finite, grad_norm)``.
SIGTERM or SIGINT stops the run after the step in progress, with a resumable checkpoint
(TrainingInterrupted; see interrupt.py).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import mindspore as ms
import numpy as np
from mindspore import ops

from ..errors import TrainingInterrupted, TrainingStopped
from .checkpoint import CheckpointConfig, CheckpointManager, TrainState
from .distributed import DistInfo
from .interrupt import StopSignals
from .metrics import MetricsLog, Progress, evaluate

__all__ = ["Plan", "TrainLoop", "epoch_label"]

_logger = logging.getLogger("train")


@dataclass(frozen=True)
class Plan:
    """How long and how fast: the per-step lr, total optimizer steps, steps per epoch, global batch."""

    lr: np.ndarray
    total_steps: int
    steps_per_epoch: int
    global_batch: int


def epoch_label(step: int, steps_per_epoch: int) -> str:
    """'epoch 3' at an epoch boundary, '0.25 epochs' for a run that ends inside one (never 'epoch 0')."""
    if step % steps_per_epoch == 0:
        return f"epoch {step // steps_per_epoch}"
    return f"{step / steps_per_epoch:.2f} epochs"


def _stream(dataset, num_epochs: int):
    """One iterator over num_epochs epochs; a MindSpore iterator stops at each epoch's end."""
    iterator = dataset.create_tuple_iterator(num_epochs=num_epochs)
    for _ in range(num_epochs):
        yield from iterator


class _EpochMeter:
    """Running train loss, throughput and overflow count of the current epoch (reset at its end).

    The loss and overflow sums live in the TrainState, so a resumed epoch reports what the
    uninterrupted one would have."""

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self.images, self.seconds = 0, 0.0

    def add(self, loss: float, finite: bool, images: int, seconds: float) -> None:
        if math.isfinite(loss):
            self.state.epoch_loss_sum += loss
            self.state.epoch_loss_steps += 1
        self.state.epoch_overflows += not finite
        self.images += images
        self.seconds += seconds

    def reset(self) -> None:
        self.state.epoch_loss_sum, self.state.epoch_loss_steps, self.state.epoch_overflows = 0.0, 0, 0
        self.images, self.seconds = 0, 0.0

    @property
    def steps(self) -> int:
        return self.state.epoch_loss_steps

    @property
    def overflows(self) -> int:
        return self.state.epoch_overflows

    @property
    def mean_loss(self) -> float:
        return self.state.epoch_loss_sum / self.steps if self.steps else float("nan")


class TrainLoop:
    """Runs the steps of `plan` from a TrainState; rank 0 evaluates, logs and saves."""

    def __init__(
        self,
        trainer,
        model,
        *,
        plan: Plan,
        train_data,
        eval_data,
        step,
        checkpoint: CheckpointConfig,
        manager: CheckpointManager,
        metrics: MetricsLog,
        dist: DistInfo | None = None,
        progress: bool = False,
        on_save: Callable[[], object] | None = None,
        eval_observer=None,
    ) -> None:
        """``eval_observer`` adds its numbers to every evaluation (metrics.evaluate's observer, e.g.
        distillation's agreement with the teacher): they go into the epoch record and log line."""
        self.trainer, self.model, self.plan = trainer, model, plan
        self.train_data, self.eval_data = train_data, eval_data
        self.step_cfg, self.ckpt_cfg = step, checkpoint
        self.manager, self.metrics = manager, metrics
        self.dist = dist
        self.on_save = on_save  # e.g. the upload of a remote output_dir (bit_zoo.utils.remote.Mirror.sync)
        self.eval_observer = eval_observer
        self.is_main, self.progress = (dist is None or dist.is_main), progress
        self.last_eval: dict = {}
        self.saved_step: int | None = None
        self.bad_steps: list[int] = []  # the current run of consecutive non-finite steps

    # ---------------------------------------------------------------------------------------
    def run(self, state: TrainState) -> dict:
        plan, accum = self.plan, self.step_cfg.accum_steps
        remaining_micro = (plan.total_steps - state.step) * accum
        num_epochs = max(1, math.ceil(remaining_micro / self.train_data.batches_per_epoch))
        batches = _stream(self.train_data.dataset, num_epochs) if remaining_micro > 0 else iter(())
        start = time.perf_counter()
        meter = _EpochMeter(state)
        progress = Progress(
            range(state.step, plan.total_steps),
            total=plan.total_steps - state.step,
            desc="train",
            enabled=self.is_main and self.progress,
            every=self.ckpt_cfg.log_interval,
        )
        self.trainer.net.set_train(True)
        with StopSignals() as stop:
            try:
                self._steps(state, progress, batches, meter, stop)
            finally:
                self.manager.wait()  # the checkpoint write in flight is on disk (or its error raised) before the run ends
        return {
            "steps": state.step,
            "epochs": state.epoch,
            "train_seconds": time.perf_counter() - start,
            "final": {k: v for k, v in self.last_eval.items() if k != "seconds"},
            "best_top1": state.best_top1,
            "train_state": asdict(state),
        }

    def _steps(self, state: TrainState, progress, batches, meter: _EpochMeter, stop: StopSignals) -> None:
        plan, accum = self.plan, self.step_cfg.accum_steps
        for _ in progress:
            t0 = time.perf_counter()
            loss, finite, grad_norm = self.trainer.step(self._next_batches(batches, accum))
            state.micro_step += accum
            state.step += 1
            meter.add(loss, finite, plan.global_batch, time.perf_counter() - t0)
            self._watch_finite(state, loss, finite)
            # the bar shows the epoch's running mean: the number the epoch line reports at its end
            progress.set_postfix(loss=f"{meter.mean_loss:.4f}", lr=f"{plan.lr[state.step - 1]:.2e}")
            end_of_epoch = state.step % plan.steps_per_epoch == 0 or state.step == plan.total_steps
            periodic = self.ckpt_cfg.save_interval > 0 and state.step % self.ckpt_cfg.save_interval == 0
            if end_of_epoch:
                state.epoch += 1 if state.step % plan.steps_per_epoch == 0 else 0
                best = self._end_epoch(state, meter, grad_norm)
                meter.reset()
                self._save(state, periodic=periodic, best=best)
            elif periodic:
                self._save(state, periodic=True, best=False)
            stop.rearm()
            if self._stop_requested(stop) and state.step < plan.total_steps:
                self._interrupt(state, stop.signum)

    def _stop_requested(self, stop: StopSignals) -> bool:
        """Whether any rank received a stop signal. All ranks must stop after the same step (a rank that
        went on would wait in the next step's AllReduce for ever), so with several they agree every step."""
        if self.dist is None or self.dist.world_size <= 1:
            return stop.requested
        flags = ops.AllGather()(ms.Tensor(np.array([stop.signum or 0], np.float32))).asnumpy()
        if stop.signum is None and flags.any():
            stop.signum = int(flags[flags > 0][0])
        return stop.requested

    def _interrupt(self, state: TrainState, signum: int) -> None:
        """Save a resumable checkpoint at this step (unless this step's save did already) and stop."""
        if self.saved_step != state.step:
            self._save(state, periodic=False, best=False)
        self.manager.wait()  # on disk (and uploaded, with a remote output_dir) before the process ends
        path = self.manager.directory / "last.ckpt"
        if self.saved_step is None:
            where = "no checkpoint was saved (the loss was non-finite)"
        else:
            where = f"step {self.saved_step} is saved in {path}"
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} at step {state.step}/{self.plan.total_steps}: {where}",
            signum=signum,
            step=state.step,
            checkpoint=None if self.saved_step is None else str(path),
        )

    # ---------------------------------------------------------------------------------------
    def _next_batches(self, batches, accum: int) -> list:
        try:
            return [next(batches) for _ in range(accum)]
        except RuntimeError:  # MindSpore wraps a strict_images stop in its own RuntimeError: show the clean one
            if self.train_data.bad_images.error is not None:
                raise self.train_data.bad_images.error from None
            raise

    def _watch_finite(self, state: TrainState, loss: float, finite: bool) -> None:
        """Stop after max_nonfinite_steps consecutive steps whose loss is not finite, or whose
        gradients are not and the loss scale cannot shrink any further to fix them."""
        scaler_can_recover = self.step_cfg.loss_scale == "dynamic" and self.trainer.loss_scale > 1.0
        if math.isfinite(loss) and (finite or scaler_can_recover):
            self.bad_steps = []
            return
        self.bad_steps.append(state.step)
        limit = self.step_cfg.max_nonfinite_steps
        if limit and len(self.bad_steps) >= limit:
            kept = (
                f"the last good checkpoint is {self.manager.directory / 'last.ckpt'} (step {self.saved_step})"
                if self.saved_step is not None
                else "no checkpoint was written"
            )
            raise TrainingStopped(
                f"the loss or its gradients were non-finite for {limit} consecutive steps ({self.bad_steps[0]}-{state.step}, "
                f"lr {self.plan.lr[state.step - 1]:.3g}, loss {loss}): training stopped; {kept}. "
                "Lower lr, set clip_grad_norm, or check the data; max_nonfinite_steps sets the patience"
            )

    def _save(self, state: TrainState, *, periodic: bool, best: bool) -> None:
        if self.bad_steps:  # keep the last good checkpoint rather than one taken inside a non-finite run
            _logger.warning("step %d: loss non-finite for %d step(s): checkpoint not saved", state.step, len(self.bad_steps))
            return
        t = self.trainer
        self.manager.save(
            periodic=periodic,
            best=best,
            then=self.on_save,
            state=state,
            model=self.model,
            optimizer=t.optimizer,
            ema=t.ema,
            scaler=t.scaler,
        )
        self.saved_step = state.step

    def _evaluate(self) -> dict:
        ema = self.trainer.ema if self.step_cfg.ema_eval else None
        if ema is not None:
            ema.swap()
        try:
            # every rank evaluates its shard; the counts are gathered, so all ranks get the same result
            result = evaluate(
                self.trainer.net, self.eval_data.dataset, dist=self.dist, sharded=True, num_images=len(self.eval_data.indices),
                progress=self.progress and self.is_main, desc="eval", observer=self.eval_observer,
            )  # fmt: skip
        finally:
            if ema is not None:
                ema.swap()
            self.trainer.net.set_train(True)
        result["weights"] = "raw" if ema is None else "ema"
        return result

    def _end_epoch(self, state: TrainState, meter: _EpochMeter, grad_norm: float) -> bool:
        """Write the epoch record (evaluating when due); True when this is the best eval so far."""
        plan = self.plan
        record = {
            "kind": "epoch",
            "epoch": state.epoch,
            "step": state.step,
            "train_loss": meter.mean_loss if meter.steps else None,
            "lr": float(plan.lr[state.step - 1]),
            "img_per_s": meter.images / meter.seconds,
            "loss_scale": self.trainer.loss_scale,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # JSON has no NaN
            "overflow_steps": meter.overflows,
            "bad_images": len(self.train_data.bad_images) + len(self.eval_data.bad_images),
        }
        interval = self.ckpt_cfg.eval_interval
        due = state.step == plan.total_steps or (interval > 0 and state.step % plan.steps_per_epoch == 0 and state.epoch % interval == 0)
        best = False
        where = f"{epoch_label(state.step, plan.steps_per_epoch)} step {state.step}/{plan.total_steps}"
        if due:  # on every rank: each evaluates its shard of the eval split
            ev = self.last_eval = self._evaluate()
            record.update(top1=ev["top1"], top5=ev["top5"], eval_loss=ev["loss"], eval_images=ev["images"])
            record.update({k: ev[k] for k in ev.get("extras", ())})
            best = ev["top1"] > state.best_top1
            state.best_top1 = max(state.best_top1, ev["top1"])
        if due and self.is_main:
            extras = "".join(f", {k} {ev[k]:.4g}" for k in ev.get("extras", ()))
            _logger.info(
                "%s: train loss %.4f, eval top-1 %.2f top-5 %.2f loss %.4f%s (%d images, %s weights), %.1f img/s",
                where, meter.mean_loss, ev["top1"], ev["top5"], ev["loss"], extras, ev["images"], ev["weights"], record["img_per_s"],
            )  # fmt: skip
        elif self.is_main:
            _logger.info("%s: train loss %.4f, %.1f img/s", where, meter.mean_loss, record["img_per_s"])
        self.metrics.write(record)
        return best
