"""Image transforms: BiT-HyperRule, the seed recipe (RandAugment) and evaluation.

All pipelines take HWC uint8 RGB and give CHW float32 normalised with (mean, std) given in
[0, 1] pixel units; BiT's (0.5, 0.5, 0.5) maps pixels to [-1, 1]. BiT resizes straight to a
square (no aspect-preserving resize, no Inception crop), so mindcv's `create_transforms`, which
is built around RandomResizedCrop, is not used; its RandAugment ops are.

Exact resume: the train recipes split into a deterministic per-image part (the resize, run by
MindSpore's C++ map) and `TrainAugment`, the random part (crop, flip, RandAugment), which draws
every choice from a generator keyed by (seed, shard, step, position in the batch). MindSpore's
own random ops draw from one generator per pipeline (and per parallel worker), so a pipeline
restarted mid-epoch would see different crops than the uninterrupted run; ours cannot.
"""

from __future__ import annotations

import mindspore.dataset.vision as vision
import numpy as np
from mindspore.dataset.vision import Inter

from ..hyperrule import hyperrule_resolution

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
_AUGMENT_STREAM = 3  # beside sampling's val / few-shot / epoch streams: augmentation never moves them


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

    Calling the returned object draws from the global `random` / `np.random`; the training
    pipeline applies its ops through `apply_rand_augment` with a keyed generator instead.
    """
    from mindcv.data.auto_augment import rand_augment_transform

    hparams = dict(img_mean=tuple(int(v) for v in fill), interpolation=interpolation, magnitude_std=0)
    return rand_augment_transform(f"randaug-n{int(num_ops)}-m{int(magnitude)}", hparams)


# mindcv's level functions flip the sign of these ops' arguments with the global `random`; the
# sign is redrawn here from the keyed generator (negation is exact, so the global draw cannot leak).
_SIGNED_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
_INCREASING_ENHANCE_OPS = frozenset({"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"})
_UNSEEDABLE_OPS = frozenset({"GaussianBlurRand"})  # draws its sigma from the global `random` inside the op


def apply_rand_augment(augment, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mindcv's RandAugment.__call__ with every random choice drawn from `rng` (same distribution)."""
    from mindcv.data.auto_augment import _LEVEL_DENOM

    picks = rng.choice(len(augment.ops), augment.num_layers, replace=augment.choice_weights is None, p=augment.choice_weights)
    for index in picks:
        op = augment.ops[int(index)]
        if op.name in _UNSEEDABLE_OPS or op.magnitude_std > 0:
            raise ValueError(f"RandAugment op {op.name} (magnitude_std={op.magnitude_std}) cannot be seeded per image.")
        if op.prob < 1.0 and rng.random() > op.prob:
            continue
        magnitude = max(0.0, min(op.magnitude, op.magnitude_max or _LEVEL_DENOM))
        negate = rng.random() > 0.5
        if op.name in _INCREASING_ENHANCE_OPS:
            level = (magnitude / _LEVEL_DENOM) * 0.9
            args = (max(0.1, 1.0 + (-level if negate else level)),)
        else:
            args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
            if op.name in _SIGNED_OPS:
                args = (-abs(args[0]) if negate else abs(args[0]),)
        image = op.aug_fn(image, *args, **op.kwargs)
    return np.asarray(image)


class TrainAugment:
    """The random part of a train recipe: per image random crop, horizontal flip and RandAugment
    (HWC uint8 in and out), then `normalize` over the whole batch (NCHW float32).

    `__call__(image, rng)` takes the resized HWC uint8 image and a generator; `for_sample` keys
    that generator by (seed, shard, step, position), so a sample's augmentation depends on where
    it sits in the batch stream and nothing else.
    """

    def __init__(self, *, image_size: int, hflip: bool, randaugment, mean, std, seed: int = 0, shard_id: int = 0):
        self.image_size, self.hflip, self.randaugment = image_size, hflip, randaugment
        self.mean = np.asarray([255.0 * m for m in mean], np.float32)
        self.std = np.asarray([255.0 * s for s in std], np.float32)
        self.seed, self.shard_id = seed, shard_id

    def rng(self, step: int, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _AUGMENT_STREAM, self.shard_id, step, position])

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = np.asarray(image)
        height, width = image.shape[:2]
        size = self.image_size
        if height < size or width < size:
            raise ValueError(f"image of {height}x{width} px is smaller than the {size} px random crop; resize it first.")
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        image = image[top : top + size, left : left + size]
        if self.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
        if self.randaugment is not None:
            image = apply_rand_augment(self.randaugment, np.ascontiguousarray(image), rng)
        return image

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """[N, H, W, C] uint8 -> [N, C, H, W] float32 with (mean, std); one vectorised pass per batch."""
        out = np.empty((batch.shape[0], batch.shape[3], batch.shape[1], batch.shape[2]), np.float32)
        np.subtract(batch.transpose(0, 3, 1, 2), self.mean[:, None, None], out=out, dtype=np.float32)
        out /= self.std[:, None, None]
        return out

    def for_sample(self, image: np.ndarray, step: int, position: int) -> np.ndarray:
        return self(image, self.rng(step, position))


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
    seed: int = 0,
    shard_id: int = 0,
) -> tuple[list, TrainAugment | None]:
    """(per-image ops for `dataset.map(..., input_columns="image")`, the random part or None).

    "eval" is all per-image ops (resize [+ center crop], normalise). The train recipes give the
    deterministic resize as ops and the rest as a `TrainAugment`, which the loader runs per batch
    where it knows each sample's step and position.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform='{transform}' is not one of {TRANSFORMS}.")
    if transform == "eval":
        mode = interpolation_mode(interpolation or "bilinear")
        if resize_size is None or resize_size == image_size:
            ops = [vision.Resize((image_size, image_size), mode)]
        else:
            ops = [vision.Resize((resize_size, resize_size), mode), vision.CenterCrop(image_size)]
        return ops + _normalize(mean, std), None

    # The seed recipe resizes bicubic; HyperRule bilinear, like the BiT weights' eval preprocessing.
    mode = interpolation_mode(interpolation or ("bicubic" if transform == "seed" else "bilinear"))
    resize = resize_size or default_train_resize(image_size)
    if resize < image_size:
        raise ValueError(f"resize_size={resize} is smaller than image_size={image_size}: the random crop needs resize_size >= image_size.")
    if transform == "seed" and randaugment is None:
        randaugment = SEED_RANDAUGMENT
    augment = None
    if randaugment is not None:
        num_ops, magnitude = randaugment
        augment = rand_augment(num_ops, magnitude, mode, fill=tuple(round(255 * m) for m in mean))
    random_part = TrainAugment(image_size=image_size, hflip=hflip, randaugment=augment, mean=mean, std=std, seed=seed, shard_id=shard_id)
    return [vision.Resize((resize, resize), mode)], random_part
