"""`create_loader` arguments from a config's data group: what train.py and validate.py share.

`data` is the "data" namespace of `bit_zoo.config.grouped` (the options of `_data_group`).
"""

from __future__ import annotations

from .loader import DataInfo, create_loader

BIT_MEAN_STD = (0.5, 0.5, 0.5)  # inputs in [-1, 1], as every BiT weights record says


def val_split_arg(value: float) -> float | int:
    """The parsed --val_split (always a float) as create_loader wants it: a whole number is a count."""
    return int(value) if float(value).is_integer() else float(value)


def mean_std(data, weights) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation: the config's, else the weights record's, else BiT's [-1, 1]."""
    mean = tuple(data.mean or (weights.mean if weights else BIT_MEAN_STD))
    std = tuple(data.std or (weights.std if weights else BIT_MEAN_STD))
    return mean, std


def build_eval_loader(
    data,
    *,
    split: str,
    batch_size: int,
    image_size: int,
    interpolation: str | None,
    mean,
    std,
    seed: int,
    num_classes: int,
) -> DataInfo:
    """The evaluation pipeline: every image of the split in order (no shuffle, last partial batch kept)."""
    return create_loader(
        data.dataset,
        data.data_dir,
        split,
        batch_size=batch_size,
        image_size=image_size,
        resize_size=data.eval_resize_size,
        transform="eval",
        interpolation=interpolation,
        mean=mean,
        std=std,
        val_split=val_split_arg(data.val_split),
        num_samples=data.eval_samples,
        shuffle=False,
        drop_remainder=False,
        seed=seed,
        num_workers=data.num_workers,
        num_classes=num_classes,
        classes=data.classes,
    )
