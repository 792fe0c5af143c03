"""Image transforms: BiT-HyperRule, the seed recipe (RandAugment) and evaluation.

All pipelines take HWC uint8 RGB and give CHW float32 normalised with (mean, std) given in
[0, 1] pixel units; BiT's (0.5, 0.5, 0.5) maps pixels to [-1, 1]. BiT resizes straight to a
square (no aspect-preserving resize, no Inception crop), so mindcv's `create_transforms`, which
is built around RandomResizedCrop, is not used; its RandAugment is.
"""

from __future__ import annotations

import mindspore.dataset.vision as vision
from mindspore.dataset.vision import Inter

from ..training.schedules import hyperrule_resolution

TRANSFORMS = ("hyperrule", "seed", "eval")

_INTERPOLATION = {
    "bilinear": Inter.BILINEAR,
    "bicubic": Inter.BICUBIC,
    "nearest": Inter.NEAREST,
    "area": Inter.AREA,
}

# Train resize before the random crop, by crop size: HyperRule's two (160 -> 128, 512 -> 480), the seed's 192 -> 160.
_TRAIN_RESIZE = {crop: resize for resize, crop in (hyperrule_resolution(8, 8), hyperrule_resolution(96, 96))} | {160: 192}
SEED_RANDAUGMENT = (2, 20)


def default_train_resize(image_size: int) -> int:
    """HyperRule's resize for its two crop sizes, the seed's for 160; otherwise crop / 0.875."""
    return _TRAIN_RESIZE.get(image_size, int(round(image_size / 0.875)))


def interpolation_mode(name: str) -> Inter:
    try:
        return _INTERPOLATION[name]
    except KeyError:
        raise ValueError(f"interpolation='{name}' is not supported; choose one of {sorted(_INTERPOLATION)}.") from None


def rand_augment(num_ops: int, magnitude: int, interpolation: Inter, fill=(128, 128, 128)):
    """mindcv's timm-style RandAugment: each image gets `num_ops` ops, each applied with p=0.5.

    The magnitude scale tops out at 10 (timm's _LEVEL_DENOM): larger values, like the seed
    recipe's 20, saturate at 10, as in the timm-derived RandAugment ports. The magnitude is fixed:
    mindcv's rand_augment_transform presets magnitude_std=0.5 before it parses the config string,
    so an "mstd0" section there is silently ignored; we pass magnitude_std=0 in hparams instead.
    One resampling filter (the resize's) is used; mindcv otherwise picks one of four per op.
    """
    from mindcv.data.auto_augment import rand_augment_transform

    hparams = dict(img_mean=tuple(int(v) for v in fill), interpolation=interpolation, magnitude_std=0)
    return rand_augment_transform(f"randaug-n{int(num_ops)}-m{int(magnitude)}", hparams)


def _normalize(mean, std) -> list:
    return [
        vision.Normalize(mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], is_hwc=True),
        vision.HWC2CHW(),
    ]


def build_transforms(
    transform: str,
    *,
    image_size: int,
    resize_size: int | None,
    interpolation: str | None,
    mean,
    std,
    randaugment: tuple[int, int] | None,
    hflip: bool = True,
) -> list:
    """The per-image op list for `dataset.map(..., input_columns="image")`."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform='{transform}' is not one of {TRANSFORMS}.")
    if transform == "eval":
        mode = interpolation_mode(interpolation or "bilinear")
        if resize_size is None or resize_size == image_size:
            ops = [vision.Resize((image_size, image_size), mode)]
        else:
            ops = [vision.Resize((resize_size, resize_size), mode), vision.CenterCrop(image_size)]
        return ops + _normalize(mean, std)

    # The seed recipe resizes bicubic; HyperRule bilinear, like the BiT weights' eval preprocessing.
    mode = interpolation_mode(interpolation or ("bicubic" if transform == "seed" else "bilinear"))
    resize = resize_size or default_train_resize(image_size)
    if resize < image_size:
        raise ValueError(f"resize_size={resize} is smaller than image_size={image_size}: the random crop needs resize_size >= image_size.")
    ops = [vision.Resize((resize, resize), mode), vision.RandomCrop(image_size)]
    if hflip:
        ops.append(vision.RandomHorizontalFlip())
    if transform == "seed" and randaugment is None:
        randaugment = SEED_RANDAUGMENT
    if randaugment is not None:
        num_ops, magnitude = randaugment
        ops.append(rand_augment(num_ops, magnitude, mode, fill=tuple(round(255 * m) for m in mean)))
    return ops + _normalize(mean, std)
