"""Frozen stages for fine-tuning: keep the first parts of the network at their pretrained values.

    freeze(model, "stem+stage1")     # detection-style: stem and stage 1 fixed
    freeze(model, "all-but-head")    # the linear-probe setting: only the classifier trains

A frozen parameter gets requires_grad=False, so `model.trainable_params()` (what an optimizer is
built from) leaves it out. BiT normalises with GroupNorm, which keeps no running statistics, so
freezing the parameters freezes the computation: nothing else needs switching to eval mode.
"""

from __future__ import annotations

import logging

from mindspore import nn

__all__ = ["FREEZE_CHOICES", "freeze", "frozen_prefixes"]

_logger = logging.getLogger(__name__)

# Each spec freezes everything its predecessor does plus one more part; "all-but-head" adds the final norm.
FREEZE_CHOICES = (
    "none",
    "stem",
    "stem+stage1",
    "stem+stage1+stage2",
    "stem+stage1+stage2+stage3",
    "stem+stage1+stage2+stage3+stage4",
    "all-but-head",
)

_PARTS = ("stem.", "stages.0.", "stages.1.", "stages.2.", "stages.3.", "norm.")


def frozen_prefixes(spec: str) -> tuple[str, ...]:
    """The parameter-name prefixes a spec freezes."""
    if spec not in FREEZE_CHOICES:
        raise ValueError(f"freeze={spec!r} is not one of {FREEZE_CHOICES}")
    return _PARTS[: FREEZE_CHOICES.index(spec)]


def freeze(model: nn.Cell, spec: str) -> list[str]:
    """Set requires_grad=False on the parameters `spec` covers and True on all others; return the frozen names.

    Idempotent, and a later call with a smaller spec unfreezes again.
    """
    prefixes = frozen_prefixes(spec)
    frozen = []
    for p in model.get_parameters():
        is_frozen = bool(prefixes) and p.name.startswith(prefixes)
        p.requires_grad = not is_frozen
        if is_frozen:
            frozen.append(p.name)
    if spec != "none" and not frozen:
        raise ValueError(f"freeze={spec!r} matched no parameter of {type(model).__name__}: is it a bit_zoo ResNetV2?")
    _logger.info("freeze=%s: %d parameters frozen, %d trainable", spec, len(frozen), len(model.trainable_params()))
    return frozen
