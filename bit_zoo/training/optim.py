"""Optimizers: SGD momentum (HyperRule), RMSProp as the seed recipe uses it, AdamW.

Weight decay is applied to a chosen subset only: ``none`` (HyperRule), ``conv`` (conv kernels
only: the seed's 4e-5), ``no_norm_bias`` (everything but GroupNorm and biases) or ``all``
(mindcv's filter_bias_and_bn: False).
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn

from ..options import length, non_negative, option, positive, unit_interval

__all__ = ["OPTIMIZERS", "DECAY_FILTERS", "OptimConfig", "create_optimizer", "decay_filter"]

OPTIMIZERS = ("sgd", "rmsprop", "adamw")
DECAY_FILTERS = ("none", "conv", "no_norm_bias", "all")


@dataclass
class OptimConfig:
    """The "optim" option group (see bit_zoo.options): train.py's command line is generated from it."""

    opt: str = option("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = option(0.003, "base learning rate (the schedule's peak)", check=positive)
    momentum: float = option(0.9, "SGD / RMSProp momentum", check=unit_interval)
    nesterov: bool = option(False, "Nesterov momentum (sgd)")
    weight_decay: float = option(0.0, "weight decay on the parameters weight_decay_filter picks", check=non_negative)
    weight_decay_filter: str = option("none", "which parameters decay", choices=DECAY_FILTERS)
    rmsprop_decay: float = option(0.9, "RMSProp decay of the squared-gradient average", check=unit_interval)
    rmsprop_eps: float = option(1.0, "RMSProp epsilon (TF: inside the sqrt)", check=positive)
    adam_betas: list[float] = option([0.9, 0.999], "AdamW beta1 beta2", check=length(2, unit_interval))
    adam_eps: float = option(1e-8, "AdamW epsilon", check=positive)


def decay_filter(kind: str):
    """Predicate over parameters: does weight decay apply to this one?"""
    if kind not in DECAY_FILTERS:
        raise ValueError(f"unknown weight_decay_filter {kind!r}: choose one of {DECAY_FILTERS}")
    if kind == "none":
        return lambda p: False
    if kind == "conv":
        return lambda p: p.name.endswith(".weight") and len(p.shape) == 4
    if kind == "no_norm_bias":
        return lambda p: p.name.endswith(".weight")
    return lambda p: True


def create_optimizer(params: list[ms.Parameter], cfg: OptimConfig, lr: np.ndarray) -> nn.Optimizer:
    """An optimizer over params with the per-step lr array (indexed by the optimizer's global_step; cfg.lr is its peak)."""
    if cfg.opt not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.opt!r}: choose one of {OPTIMIZERS}")
    learning_rate = ms.Tensor(np.asarray(lr, dtype=np.float32))
    wanted = decay_filter(cfg.weight_decay_filter)
    decay = [p for p in params if wanted(p)]
    rest = [p for p in params if not wanted(p)]
    if cfg.weight_decay and decay:
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0})
        groups.append({"order_params": params})
    else:
        groups = params
    if cfg.opt == "sgd":
        return nn.Momentum(groups, learning_rate, momentum=cfg.momentum, use_nesterov=cfg.nesterov)
    if cfg.opt == "rmsprop":
        # TF semantics as in the seed: epsilon inside the sqrt, momentum on the scaled update.
        return nn.RMSProp(groups, learning_rate, decay=cfg.rmsprop_decay, momentum=cfg.momentum, epsilon=cfg.rmsprop_eps)
    return nn.AdamWeightDecay(groups, learning_rate, beta1=cfg.adam_betas[0], beta2=cfg.adam_betas[1], eps=cfg.adam_eps)
