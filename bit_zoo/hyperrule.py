"""BiT-HyperRule (arXiv 1912.11370, section 3.3; upstream bit_hyperrule.py): schedule length and
resolution picked from the downstream dataset alone.

Its own module, below both data/ (transforms pick the resolution) and training/ (schedules pick
the steps), so neither package imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HyperRule", "hyperrule", "hyperrule_resolution"]


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
    """HyperRule's (resize, crop) for source images of height x width px (upstream bit_hyperrule.get_resolution).

    Images smaller than 96x96 in area train at 160 -> 128, others at 512 -> 480. The one place
    this rule lives: train.py, validate.py, data/transforms.py and configs/generate.py call it.
    """
    return (160, 128) if height * width < 96 * 96 else (512, 480)
