"""One optimizer step as two compiled cells: accumulate micro-batch gradients, then apply.

    ForwardBackward(x, y)   loss of one micro-batch; adds its loss-scaled gradients to buffers
    ApplyUpdate()           averages the buffers (and across devices), unscales, checks they are
                            finite, clips by global norm, steps the optimizer, updates the EMA,
                            zeroes the buffers; returns (finite, grad norm)

Splitting the step this way is upstream's "batch split": a global batch of 512 becomes
accum_steps micro-batches per device, with one all-reduce per optimizer step.

Loss scaling uses the functional ``ms.amp.DynamicLossScaler``: the cells only read its
``scale_value``; ``adjust`` runs on the host after ApplyUpdate. The wrapped
``nn.TrainOneStepWithLossScaleCell`` needs NPUGetFloatStatusV2 and fails on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from .ema import EMA

__all__ = ["LOSS_SCALES", "StepConfig", "NetWithLoss", "ForwardBackward", "ApplyUpdate", "Trainer", "create_loss_scaler"]

LOSS_SCALES = ("none", "static", "dynamic")

_accumulate = ops.MultitypeFuncGraph("accumulate")
_scale = ops.MultitypeFuncGraph("scale")
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
    return ops.reduce_sum(ops.square(grad.astype(ms.float32)))


@_zero.register("Tensor")
def _zero_buf(buf):
    return ops.assign(buf, ops.zeros_like(buf))


@dataclass(frozen=True)
class StepConfig:
    accum_steps: int = 1
    clip_grad_norm: float = 0.0  # 0 = no clipping
    loss_scale: str = "none"
    loss_scale_value: float = 2.0**24
    loss_scale_factor: int = 2
    loss_scale_window: int = 2000
    ema_decay: float = 0.0  # 0 = no EMA
    ema_warmup: bool = True


def create_loss_scaler(cfg: StepConfig):
    if cfg.loss_scale not in LOSS_SCALES:
        raise ValueError(f"unknown loss_scale {cfg.loss_scale!r}: choose one of {LOSS_SCALES}")
    if cfg.loss_scale == "dynamic":
        return ms.amp.DynamicLossScaler(cfg.loss_scale_value, cfg.loss_scale_factor, cfg.loss_scale_window)
    return ms.amp.StaticLossScaler(cfg.loss_scale_value if cfg.loss_scale == "static" else 1.0)


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


class ForwardBackward(nn.Cell):
    def __init__(
        self, net_with_loss: NetWithLoss, weights: ms.ParameterTuple, buffers: ms.ParameterTuple, scale_value: ms.Parameter
    ) -> None:
        super().__init__(auto_prefix=False)
        self.net_with_loss = net_with_loss
        self.weights = weights
        self.buffers = buffers
        self.scale_value = scale_value
        self.grad_fn = ms.value_and_grad(self.scaled_loss, None, weights)
        self.hyper_map = ops.HyperMap()

    def scaled_loss(self, x, y, scale):
        return self.net_with_loss(x, y) * scale

    def construct(self, x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        scale = ops.stop_gradient(self.scale_value * 1.0)
        loss, grads = self.grad_fn(x, y, scale)
        loss = ops.depend(loss, self.hyper_map(_accumulate, self.buffers, grads))
        return loss / scale


class ApplyUpdate(nn.Cell):
    def __init__(
        self,
        optimizer: nn.Optimizer,
        buffers: ms.ParameterTuple,
        scale_value: ms.Parameter,
        cfg: StepConfig,
        *,
        ema: EMA | None,
        reducer: nn.Cell | None,
    ) -> None:
        super().__init__(auto_prefix=False)
        self.optimizer = optimizer
        self.buffers = buffers
        self.scale_value = scale_value
        self.inv_accum = 1.0 / cfg.accum_steps
        self.clip = cfg.clip_grad_norm > 0
        self.clip_norm = float(cfg.clip_grad_norm)
        self.ema = ema
        self.use_ema = ema is not None
        self.reducer = reducer
        self.use_reducer = reducer is not None
        self.hyper_map = ops.HyperMap()

    def construct(self):
        factor = self.inv_accum / self.scale_value
        grads = self.hyper_map(ops.partial(_scale, factor), self.buffers)
        if self.use_reducer:
            grads = self.reducer(grads)
        finite = ms.amp.all_finite(grads)
        norm = ops.sqrt(ops.addn(self.hyper_map(_square_sum, grads)))
        if self.clip:
            # TF's clip_by_global_norm: g * clip / max(norm, clip)
            grads = self.hyper_map(ops.partial(_scale, self.clip_norm / ops.maximum(norm, self.clip_norm)), grads)
        if finite:
            self.optimizer(grads)
            if self.use_ema:
                self.ema(self.optimizer.global_step)
        else:
            # A skipped step still advances the schedule, as the host's step counter does.
            ops.assign_add(self.optimizer.global_step, ops.ones_like(self.optimizer.global_step))
        finite = ops.depend(finite, self.hyper_map(_zero, self.buffers))
        return finite, norm


class Trainer:
    """Holds the cells and state of training: call ``micro_step`` accum_steps times, then ``apply``."""

    def __init__(self, net: nn.Cell, optimizer: nn.Optimizer, cfg: StepConfig, *, soft_labels: bool, distributed: bool = False) -> None:
        self.net = net
        self.optimizer = optimizer
        self.cfg = cfg
        weights = optimizer.parameters
        self.buffers = ms.ParameterTuple(
            [ms.Parameter(ms.Tensor(np.zeros(p.shape, np.float32)), name=f"accum.{p.name}", requires_grad=False) for p in weights]
        )
        self.scaler = create_loss_scaler(cfg)
        self.ema = EMA(list(weights), decay=cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay > 0 else None
        reducer = nn.DistributedGradReducer(weights, mean=True) if distributed else None
        self.net_with_loss = NetWithLoss(net, soft_labels=soft_labels)
        self.forward_backward = ForwardBackward(self.net_with_loss, weights, self.buffers, self.scaler.scale_value)
        self.apply_update = ApplyUpdate(optimizer, self.buffers, self.scaler.scale_value, cfg, ema=self.ema, reducer=reducer)

    def micro_step(self, x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        return self.forward_backward(x, y)

    def apply(self) -> tuple[bool, float]:
        finite, norm = self.apply_update()
        if isinstance(self.scaler, ms.amp.DynamicLossScaler):
            self.scaler.adjust(finite)
        return bool(finite.asnumpy()), float(norm.asnumpy())

    def step(self, micro_batches) -> tuple[float, bool, float]:
        """One optimizer step over accum_steps (images, labels) micro-batches: (mean loss, finite, grad norm)."""
        losses = [self.micro_step(x, y) for x, y in micro_batches]
        finite, norm = self.apply()
        return float(np.mean([loss.asnumpy() for loss in losses])), finite, norm

    @property
    def loss_scale(self) -> float:
        return float(self.scaler.scale_value.asnumpy())
