"""Eval preprocessing, resolved once for train.py, validate.py and every tool (timm's resolve_data_config).

    model = bit_zoo.create_model(checkpoint_path="outputs/run/best.ckpt")
    pp = resolve_data_config(model, eval_size=args.eval_size)     # Preprocess(image_size=..., resize_size=..., ...)
    pp(image_hwc_uint8) -> CHW float32;  pp.ops() -> the per-image ops of validate.py's eval pipeline

Each field comes from the first of these that sets it:

1. an explicit argument (the command line or config): eval_size, else image_size; eval_resize_size
   or crop_pct; interpolation; mean; std. An explicit size is never overridden: it is resized to
   straight (BiT's eval, no crop margin) unless eval_resize_size or crop_pct asks for a crop;
2. the checkpoint's meta.json (train.py writes its eval preprocessing there);
3. the weights record (BiT: resize straight to input_size, [-1, 1]; mindcv: 0.875 center crop, ImageNet mean/std);
4. for the size only, HyperRule's crop for the dataset's source images (with `dataset`); else an error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..hyperrule import hyperrule_resolution
from ..weights.pretrained import BIT_MEAN_STD, Weights
from .transforms import build_transforms

__all__ = ["Preprocess", "resolve_data_config", "SOURCE_IMAGE_SIZE", "hyperrule_sizes", "default_image_size"]

# Source image size (height, width) of the datasets whose size is known without reading them; the
# others (imagenet, folder) are taken as photos of at least 96x96 px.
SOURCE_IMAGE_SIZE = {"cifar10": (32, 32), "cifar100": (32, 32), "digits": (8, 8)}


def hyperrule_sizes(dataset: str) -> tuple[int, int]:
    """HyperRule's (resize, crop) for the dataset's source images."""
    return hyperrule_resolution(*SOURCE_IMAGE_SIZE.get(dataset, (96, 96)))


def default_image_size(dataset: str) -> int:
    """HyperRule's crop for the dataset's source images."""
    return hyperrule_sizes(dataset)[1]


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize (straight to image_size, or to resize_size then center crop), normalise."""

    image_size: int
    resize_size: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = BIT_MEAN_STD
    std: tuple[float, ...] = BIT_MEAN_STD

    @property
    def crop_pct(self) -> float:
        return self.image_size / self.resize_size if self.resize_size else 1.0

    def ops(self) -> list:
        """The per-image ops (HWC uint8 RGB in, CHW float32 out): the very ops validate.py's eval pipeline maps."""
        ops, _ = build_transforms(  # "eval" has no random part
            "eval",
            image_size=self.image_size,
            resize_size=self.resize_size,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            randaugment=None,
        )
        return ops

    @functools.cached_property
    def _ops(self) -> list:
        return self.ops()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        for op in self._ops:
            image = op(image)
        return np.asarray(image, dtype=np.float32)

    def to_meta(self) -> dict:
        """The meta.json "preprocess" entry that resolves back to this (weights.meta)."""
        return {
            "image_size": self.image_size,
            "eval_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }


def _meta_crop_pct(saved: dict) -> float | None:
    if saved.get("eval_resize_size") and (saved.get("eval_size") or saved.get("image_size")):
        return (saved.get("eval_size") or saved["image_size"]) / saved["eval_resize_size"]
    return saved.get("crop_pct")


def resolve_data_config(
    model=None,
    *,
    weights: Weights | None = None,
    meta: dict | None = None,
    image_size: int | None = None,
    eval_size: int | None = None,
    eval_resize_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean=None,
    std=None,
    dataset: str | None = None,
) -> Preprocess:
    """The eval preprocessing of a model (see the module docstring for the order of sources).

    model: what bit_zoo.create_model returned; its weights record (`model.weights`) and its file's
    meta.json (`model.origin.meta`) are used unless weights= / meta= are given.
    """
    if model is not None:
        weights = weights if weights is not None else getattr(model, "weights", None)
        origin = getattr(model, "origin", None)
        meta = meta if meta is not None else getattr(origin, "meta", None)
    saved = (meta or {}).get("preprocess") or {}
    explicit = eval_size or image_size
    if explicit:
        size, source_crop = int(explicit), 1.0  # an explicit size is resized to straight unless a crop is asked for
    elif saved.get("eval_size") or saved.get("image_size"):
        size, source_crop = int(saved.get("eval_size") or saved["image_size"]), _meta_crop_pct(saved)
    elif weights is not None:
        size, source_crop = int(weights.input_size), weights.crop_pct
    elif dataset is not None:
        size, source_crop = default_image_size(dataset), 1.0
    else:
        source = getattr(getattr(model, "origin", None), "source", None) or "the model"
        raise ValueError(
            f"no eval resolution known for {source}: it has no meta.json and no weights record (e.g. resnetv2); pass image_size / eval_size"
        )
    if eval_resize_size:
        resize = int(eval_resize_size)
    else:
        pct = crop_pct if crop_pct is not None else (source_crop or 1.0)
        if not 0 < pct <= 1:
            raise ValueError(f"crop_pct {pct} must be in (0, 1]: the crop is that fraction of the resized image")
        resize = round(size / pct) if pct < 1 else None
    if resize is not None and resize < size:
        raise ValueError(f"eval_resize_size {resize} is smaller than the eval size {size}: the center crop needs resize >= size")
    return Preprocess(
        image_size=size,
        resize_size=resize,
        interpolation=interpolation or saved.get("interpolation") or (weights.interpolation if weights else "bilinear"),
        mean=tuple(mean or saved.get("mean") or (weights.mean if weights else BIT_MEAN_STD)),
        std=tuple(std or saved.get("std") or (weights.std if weights else BIT_MEAN_STD)),
    )
