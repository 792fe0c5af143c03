"""One optimizer step, compiled: the training loop calls only ``Trainer.step(micro_batches)``.

Two paths, chosen by accum_steps:

    accum_steps == 1   TrainStep(x, y): forward, backward, gradient all-reduce (data parallel),
                       overflow check, clipping, optimizer, EMA and loss-scale update in ONE
                       compiled graph, no accumulation buffers. This is nn.TrainOneStepCell's
                       form (GradOperation with the loss scale as sensitivity), plus the options.
    accum_steps > 1    ForwardBackward(x, y) per micro-batch adds its loss-scaled gradients to
                       fp32 buffers; ApplyUpdate() then runs the same update on their mean and
                       zeroes them (upstream's "batch split": one all-reduce per optimizer step).

Both paths share ``_Update`` (unscale, all-reduce, agreed finite flag, clip, optimizer, EMA,
loss scale), so they compute the same step: tests/test_train_step.py checks that.

Overflow is agreed by all ranks: each rank checks its own gradients (on Ascend the check reads
the device's float-status register, cleared at the start of the step), the flags are summed
across ranks, and every rank skips a step any rank overflowed. The dynamic loss scale is
adjusted inside the graph from that agreed flag, so every rank's scale stays identical
(MindSpore's own loss-scale cell does the same; its nn.TrainOneStepWithLossScaleCell and
DynamicLossScaleManager fail on CPU, so the functional ``ms.amp.DynamicLossScaler`` holds the
state: ``scale_value`` and ``counter``, which training/checkpoint.py saves).

Not used, on purpose: a Python function over ``ms.value_and_grad`` wrapped in ``ms.jit``. It
compiles to the same operators but ran at half the speed on CPU (docs/speed.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ..models import cpu_kernels
from ..options import at_least, non_negative, option, positive, unit_interval
from ._compile_cache import compile_cached
from .ema import EMA

__all__ = [
    "LOSS_SCALES",
    "JIT_LEVELS",
    "StepConfig",
    "NetWithLoss",
    "TrainStep",
    "ForwardBackward",
    "ApplyUpdate",
    "Trainer",
    "create_loss_scaler",
    "jit_level_for",
]

_logger = logging.getLogger(__name__)

LOSS_SCALES = ("none", "static", "dynamic")

# The graph jit level per device, chosen explicitly rather than left to MindSpore's default:
#   CPU, GPU: O0 (kernel by kernel). O1 (fusion) gave nothing on CPU and graph-kernel fusion fails there.
#   Ascend:   O0. Ascend 910 otherwise defaults to O2 (whole-graph GE sink), deprecated since
#             MindSpore 2.9; O0 is the supported kernel-by-kernel mode that the all-finite overflow
#             check (AllFinite) is enabled for. Chosen by reading MindSpore's docs, not run on
#             hardware: set BIT_ZOO_JIT_LEVEL=O1 (or O2) to override.
JIT_LEVELS = {"CPU": "O0", "GPU": "O0", "Ascend": "O0"}
JIT_LEVEL_ENV = "BIT_ZOO_JIT_LEVEL"

_scale = ops.MultitypeFuncGraph("scale")
_accumulate = ops.MultitypeFuncGraph("accumulate")
_zero = ops.MultitypeFuncGraph("zero")
_square_sum = ops.MultitypeFuncGraph("square_sum")


@_accumulate.register("Tensor", "Tensor")
def _accumulate_grad(buf, grad):
    return ops.assign_add(buf, grad.astype(buf.dtype))


@_scale.register("Tensor", "Tensor")
def _scale_grad(factor, grad):
    return grad * factor.astype(grad.dtype)


@_square_sum.register("Tensor")
def _square_sum_grad(grad):
    # One LpNorm kernel per tensor: faster on CPU than Square + ReduceSum (MindSpore's CPU reductions are slow).
    norm = ops.norm(grad.astype(ms.float32).reshape(-1))
    return norm * norm


@_zero.register("Tensor")
def _zero_buf(buf):
    return ops.assign(buf, ops.zeros_like(buf))


TRAIN_AND_BENCHMARK = ("train", "benchmark")  # benchmarks/benchmark.py times the Trainer with these


@dataclass
class StepConfig:
    """The "step" option group (see bit_zoo.options): the Trainer reads the first eight fields, the loop the rest."""

    accum_steps: int = option(1, "micro-batches per optimizer step (upstream batch split)", check=at_least(1), scripts=TRAIN_AND_BENCHMARK)
    clip_grad_norm: float = option(0.0, "clip by global norm; 0 = off", check=non_negative, scripts=TRAIN_AND_BENCHMARK)
    loss_scale: str = option("none", "loss scaling (for fp16)", choices=LOSS_SCALES, scripts=TRAIN_AND_BENCHMARK)
    loss_scale_value: float = option(2.0**24, "(initial) loss scale", check=positive, scripts=TRAIN_AND_BENCHMARK)
    loss_scale_factor: int = option(2, "dynamic: divide / multiply the scale by this", check=at_least(2))
    loss_scale_window: int = option(2000, "dynamic: grow the scale after this many finite steps", check=at_least(1))
    ema_decay: float = option(0.0, "EMA decay of the weights; 0 = no EMA", check=unit_interval, scripts=TRAIN_AND_BENCHMARK)
    ema_warmup: bool = option(True, "decay min(d, (1+n)/(10+n)) as TF's num_updates")
    ema_eval: bool = option(True, "evaluate (and pick best) with the EMA weights")
    max_nonfinite_steps: int = option(
        10, "stop after this many consecutive steps with a non-finite loss (or unfixable gradients); 0 = never", check=at_least(0)
    )


def create_loss_scaler(cfg: StepConfig):
    if cfg.loss_scale not in LOSS_SCALES:
        raise ValueError(f"unknown loss_scale {cfg.loss_scale!r}: choose one of {LOSS_SCALES}")
    if cfg.loss_scale == "dynamic":
        return ms.amp.DynamicLossScaler(cfg.loss_scale_value, cfg.loss_scale_factor, cfg.loss_scale_window)
    return ms.amp.StaticLossScaler(cfg.loss_scale_value if cfg.loss_scale == "static" else 1.0)


def jit_level_for(device_target: str) -> str:
    """The jit level bit_zoo compiles its training graphs with on this device (see JIT_LEVELS)."""
    level = os.environ.get(JIT_LEVEL_ENV) or JIT_LEVELS.get(device_target, "O0")
    if level not in ("O0", "O1", "O2"):
        raise ValueError(f"{JIT_LEVEL_ENV}={level!r}: choose O0, O1 or O2 (or unset it for bit_zoo's per-device choice)")
    return level


def _cann_version() -> str:
    """The CANN toolkit version from its install record, or 'unknown' (only meaningful on Ascend)."""
    roots = [os.environ.get("ASCEND_HOME_PATH", ""), "/usr/local/Ascend/ascend-toolkit/latest"]
    for root in filter(None, roots):
        for info in sorted(Path(root).glob("*/ascend_toolkit_install.info")) + sorted(Path(root).glob("ascend_toolkit_install.info")):
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("version="):
                    return line.split("=", 1)[1].strip()
    return "unknown"


def _ascend_status_register() -> bool:
    """Does this device report overflow through the float-status register (which must be cleared)?

    Ascend 910A (always) and 910B in saturation mode: ms.amp.all_finite then reads
    NPUGetFloatStatusV2 instead of the gradients' values, as MindSpore's loss-scale cell does.
    """
    if ms.get_context("device_target") != "Ascend":
        return False
    from mindspore.amp import _ascend_910a_target, _ascend_910b_target

    saturation = os.environ.get("MS_ASCEND_CHECK_OVERFLOW_MODE") == "SATURATION_MODE"
    return bool(_ascend_910a_target()) or (bool(_ascend_910b_target()) and saturation)


class _ClearStatus(nn.Cell):
    """Clears the Ascend float-status register (before a step's first forward pass)."""

    def __init__(self) -> None:
        super().__init__()
        from mindspore.ops.operations.math_ops import NPUClearFloatStatusV2

        self.clear = NPUClearFloatStatusV2()

    def construct(self, x):
        return ops.depend(x, self.clear(ops.zeros((8,), ms.int32)))


class DeviceFinite(nn.Cell):
    """This device's own verdict on its local gradients: True when no overflow happened here.

    ms.amp.all_finite checks the values, except on Ascend 910A (and 910B in saturation mode)
    where it reads the float-status register: there an overflow saturates to a finite value
    that only the register records, so the verdict must be agreed across ranks rather than
    inferred from the all-reduced gradients.
    """

    def construct(self, grads):
        return ms.amp.all_finite(grads)


class NetWithLoss(nn.Cell):
    """Softmax cross-entropy in float32, on int labels or soft (one-hot, mixed, smoothed) labels."""

    def __init__(self, net: nn.Cell, *, soft_labels: bool) -> None:
        super().__init__(auto_prefix=False)
        self.net = net
        self.soft_labels = soft_labels

    def construct(self, x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        logits = self.net(x).astype(ms.float32)
        if self.soft_labels:
            return -(y * ops.log_softmax(logits, -1)).sum(-1).mean()
        return ops.cross_entropy(logits, y)


class _Update(nn.Cell):
    """(summed, loss-scaled, local) gradients -> one optimizer step; returns (finite, grad norm).

    Unscale (1 / (accum_steps * scale)), all-reduce (data parallel), finite flag agreed by all
    ranks, global norm, clip (TF's clip_by_global_norm), optimizer + EMA only when finite,
    dynamic loss-scale update from the agreed flag. Options are Python constants, so a disabled
    one compiles to nothing.
    """

    def __init__(self, optimizer: nn.Optimizer, scaler, cfg: StepConfig, *, ema: EMA | None, distributed: bool, summed: int) -> None:
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.scale_value = scaler.scale_value
        self.dynamic = isinstance(scaler, ms.amp.DynamicLossScaler)
        if self.dynamic:
            self.counter = scaler.counter
            self.scale_factor = float(cfg.loss_scale_factor)
            self.scale_window = int(cfg.loss_scale_window)
        self.unscale = cfg.loss_scale != "none" or summed > 1
        self.inv_summed = 1.0 / summed
        self.clip = cfg.clip_grad_norm > 0
        self.clip_norm = float(cfg.clip_grad_norm)
        self.ema = ema
        self.use_ema = ema is not None
        self.distributed = distributed
        if distributed:
            self.reducer = nn.DistributedGradReducer(optimizer.parameters, mean=True)
            self.allreduce = ops.AllReduce()  # sum of the ranks' overflow flags
        self.device_check = ms.get_context("device_target") == "Ascend"  # status register or AllFinite kernel
        if distributed or self.device_check:
            self.device_finite = DeviceFinite()
        self.hyper_map = ops.HyperMap()
        # On CPU, one bit_zoo kernel sums every gradient's squares (cpu_kernels.sum_squares: multi-threaded,
        # double accumulation) instead of a norm kernel per parameter and their sum, which cost about 3 %
        # of a step: the step's one piece of work beyond nn.TrainOneStepCell (docs/speed.md).
        self.sum_squares = cpu_kernels.sum_squares() if all(p.dtype == ms.float32 for p in optimizer.parameters) else None

    def _square_norm(self, grads):
        if self.sum_squares is not None:
            return self.sum_squares(*grads).reshape(())
        return ops.addn(self.hyper_map(_square_sum, grads))

    def construct(self, grads):
        agreed = ops.ones((), ms.bool_)
        if self.distributed:
            # Each rank's own verdict (what a device status register reports), then any-rank overflow -> all skip.
            local_bad = 1.0 - self.device_finite(grads).astype(ms.float32)
            agreed = self.allreduce(local_bad) < 0.5
            grads = self.reducer(grads)
        elif self.device_check:
            agreed = self.device_finite(grads)
        # The norm of the still-scaled sum, then unscaled as a number: one pass over the gradients
        # serves the norm and the finite check (the norm is finite iff every gradient is; a scaled
        # sum of squares overflowing float32 counts as an overflow, as loss scaling intends), and
        # unscaling and clipping share one multiply. The reduced gradients, hence the norm, are the
        # same on every rank.
        norm = ops.sqrt(self._square_norm(grads))
        inv = self.inv_summed / self.scale_value
        if self.unscale:
            norm = norm * inv
        finite = ops.logical_and(agreed, ops.isfinite(norm))
        if self.clip:
            # TF's clip_by_global_norm: g * clip / max(norm, clip)
            coef = self.clip_norm / ops.maximum(norm, self.clip_norm)
            if self.unscale:
                coef = coef * inv
            grads = self.hyper_map(ops.partial(_scale, coef), grads)
        elif self.unscale:
            grads = self.hyper_map(ops.partial(_scale, inv), grads)
        if finite:
            self.optimizer(grads)
            if self.use_ema:
                self.ema(self.optimizer.global_step)
        else:
            # A skipped step still advances the schedule, as the host's step counter does.
            ops.assign_add(self.optimizer.global_step, ops.ones_like(self.optimizer.global_step))
        if self.dynamic:
            finite = ops.depend(finite, self._adjust_scale(finite))
        return finite, norm

    def _adjust_scale(self, finite):
        # ms.amp.DynamicLossScaler.adjust, in the graph: x factor after `window` finite steps, / factor (>= 1) on overflow.
        grown = self.scale_value * self.scale_factor
        grow = ops.logical_and(self.counter == self.scale_window - 1, ops.isfinite(grown))
        new_scale = ops.select(finite, ops.select(grow, grown, self.scale_value), ops.maximum(self.scale_value / self.scale_factor, 1.0))
        counter = ((self.counter + 1) % self.scale_window) * finite.astype(self.counter.dtype)
        return ops.assign(self.scale_value, new_scale), ops.assign(self.counter, counter)


class TrainStep(nn.Cell):
    """accum_steps == 1: the whole optimizer step in one graph. Returns (loss, finite, grad norm)."""

    def __init__(self, net_with_loss: NetWithLoss, update: _Update, *, clear_status: bool) -> None:
        super().__init__(auto_prefix=False)
        self.net_with_loss = net_with_loss
        self.update = update
        self.weights = update.optimizer.parameters
        self.scale_value = update.scale_value
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.clear_status = clear_status
        if clear_status:
            self.clear = _ClearStatus()

    def construct(self, x: ms.Tensor, y: ms.Tensor):
        if self.clear_status:
            x = self.clear(x)
        loss = self.net_with_loss(x, y)
        sens = ops.ones_like(loss) * self.scale_value.astype(loss.dtype)
        grads = self.grad(self.net_with_loss, self.weights)(x, y, sens)
        finite, norm = self.update(grads)
        return loss, finite, norm


class ForwardBackward(nn.Cell):
    """accum_steps > 1: one micro-batch's loss; adds its loss-scaled gradients to the buffers."""

    def __init__(
        self, net_with_loss: NetWithLoss, weights: ms.ParameterTuple, buffers: ms.ParameterTuple, scale_value: ms.Parameter
    ) -> None:
        super().__init__(auto_prefix=False)
        self.net_with_loss = net_with_loss
        self.weights = weights
        self.buffers = buffers
        self.scale_value = scale_value
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.hyper_map = ops.HyperMap()

    def construct(self, x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        loss = self.net_with_loss(x, y)
        sens = ops.ones_like(loss) * self.scale_value.astype(loss.dtype)
        grads = self.grad(self.net_with_loss, self.weights)(x, y, sens)
        return ops.depend(loss, self.hyper_map(_accumulate, self.buffers, grads))


class ApplyUpdate(nn.Cell):
    """accum_steps > 1: the update on the buffers' mean, then zeroes them. Returns (finite, grad norm)."""

    def __init__(self, update: _Update, buffers: ms.ParameterTuple) -> None:
        super().__init__(auto_prefix=False)
        self.update = update
        self.buffers = buffers
        self.hyper_map = ops.HyperMap()

    def construct(self):
        grads = self.hyper_map(ops.partial(_scale, ops.ones((), ms.float32)), self.buffers)  # a read, before the zeroing
        finite, norm = self.update(grads)
        finite = ops.depend(finite, self.hyper_map(_zero, self.buffers))
        return finite, norm


class Trainer:
    """The compiled training step and its state; the training loop calls ``step`` once per optimizer step.

    ``net``, ``optimizer``, ``ema`` (EMA or None) and ``scaler`` (its ``scale_value`` and, when
    dynamic, ``counter``) are what training/checkpoint.py saves and restores for an exact resume.
    """

    def __init__(
        self,
        net: nn.Cell,
        optimizer: nn.Optimizer,
        cfg: StepConfig,
        *,
        soft_labels: bool,
        distributed: bool = False,
        net_with_loss: nn.Cell | None = None,
    ) -> None:
        """`net_with_loss` replaces the cross-entropy cell (called as (x, y) -> loss), e.g. distillation's."""
        if cfg.accum_steps < 1:
            raise ValueError(f"accum_steps={cfg.accum_steps}: must be >= 1")
        self.net = net
        self.optimizer = optimizer
        self.cfg = cfg
        self.scaler = create_loss_scaler(cfg)
        weights = optimizer.parameters
        self.ema = EMA(list(weights), decay=cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay > 0 else None
        self.net_with_loss = net_with_loss if net_with_loss is not None else NetWithLoss(net, soft_labels=soft_labels)
        device = ms.get_context("device_target")
        self.jit_level = jit_level_for(device)
        clear_status = _ascend_status_register()
        update = _Update(optimizer, self.scaler, cfg, ema=self.ema, distributed=distributed, summed=cfg.accum_steps)
        self.fused = cfg.accum_steps == 1
        if self.fused:
            self.buffers = None
            self.train_step = TrainStep(self.net_with_loss, update, clear_status=clear_status)
            cells = [self.train_step]
        else:
            self.buffers = ms.ParameterTuple(
                [ms.Parameter(ms.Tensor(np.zeros(p.shape, np.float32)), name=f"accum.{p.name}", requires_grad=False) for p in weights]
            )
            self.forward_backward = ForwardBackward(self.net_with_loss, weights, self.buffers, self.scaler.scale_value)
            self.apply_update = ApplyUpdate(update, self.buffers)
            self.clear_status = _ClearStatus() if clear_status else None
            cells = [self.forward_backward, self.apply_update]
        for cell in cells:
            cell.set_jit_config(ms.JitConfig(jit_level=self.jit_level))
        self._last = None  # (finite, norm) of the fused step run by micro_step, for apply()
        self.compile_cache: dict[str, str] = {}  # per graph: 'hit', 'miss', 'off' (see _compile_cache.compile_cached)
        _logger.info(
            "train step: MindSpore %s on %s%s, %s mode, jit_level %s, %s, accum_steps %d, loss scale %s, clip %s, EMA %s%s",
            ms.__version__,
            device,
            f" (CANN {_cann_version()})" if device == "Ascend" else "",
            "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "PyNative",
            self.jit_level,
            "one graph (forward, backward, update)" if self.fused else "accumulation buffers + update graph",
            cfg.accum_steps,
            cfg.loss_scale,
            cfg.clip_grad_norm or "off",
            cfg.ema_decay or "off",
            ", data parallel (all-reduce and overflow flag in the step graph)" if distributed else "",
        )

    def step(self, micro_batches) -> tuple[float, bool, float]:
        """One optimizer step over accum_steps (images, labels) micro-batches: (mean loss, finite, grad norm)."""
        batches = list(micro_batches)
        if len(batches) != self.cfg.accum_steps:
            raise ValueError(f"step() got {len(batches)} micro-batches but accum_steps={self.cfg.accum_steps}: pass exactly accum_steps")
        self._compile(*batches[0])
        if self.fused:
            ((x, y),) = batches
            loss, finite, norm = self.train_step(x, y)
            return float(loss.asnumpy()), bool(finite.asnumpy()), float(norm.asnumpy())
        first_x = batches[0][0]
        if self.clear_status is not None:
            first_x = self.clear_status(first_x)
        losses = [self.forward_backward(first_x if i == 0 else x, y) for i, (x, y) in enumerate(batches)]
        finite, norm = self.apply_update()
        return float(np.mean([loss.asnumpy() for loss in losses])), bool(finite.asnumpy()), float(norm.asnumpy())

    # The earlier two-call interface, kept for loops not yet on step(): micro_step accum_steps times, then apply.
    def micro_step(self, x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        self._compile(x, y)
        if self.fused:
            loss, finite, norm = self.train_step(x, y)
            self._last = (finite, norm)
            return loss
        return self.forward_backward(x, y)

    def apply(self) -> tuple[bool, float]:
        if self.fused:
            if self._last is None:
                raise RuntimeError("apply() before micro_step(): with accum_steps 1 micro_step runs the whole step")
            finite, norm = self._last
            self._last = None
        else:
            finite, norm = self.apply_update()
        return bool(finite.asnumpy()), float(norm.asnumpy())

    def _compile(self, x: ms.Tensor, y: ms.Tensor) -> None:
        """Compile the step's graphs before their first call, through bit_zoo's compile cache (training/_compile_cache.py)."""
        if self.compile_cache:
            return
        extra = {"step": dataclasses.asdict(self.cfg), "jit_level": self.jit_level}
        graphs = [("TrainStep", self.train_step, (x, y))] if self.fused else [
            ("ForwardBackward", self.forward_backward, (x, y)), ("ApplyUpdate", self.apply_update, ())
        ]  # fmt: skip
        for role, cell, args in graphs:
            self.compile_cache[role] = compile_cached(cell, *args, extra={**extra, "role": role})

    @property
    def loss_scale(self) -> float:
        return float(self.scaler.scale_value.asnumpy())
