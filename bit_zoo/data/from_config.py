"""The "data" option group and what train.py and validate.py build from it: eval pipeline, preprocessing.

`DataConfig` is declared with bit_zoo.options: the command line, YAML validation and saved
config of both scripts are generated from it (choices come from loader.py and transforms.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hyperrule import hyperrule
from ..errors import ConfigError
from ..options import BOTH, at_least, each, finite, length, non_negative, option, positive, unit_interval
from .loader import DATASETS, DataInfo, create_loader
from .preprocess import Preprocess, default_image_size, hyperrule_sizes, resolve_data_config
from .transforms import _INTERPOLATION, TRANSFORMS

__all__ = [
    "DataConfig",
    "val_split_arg",
    "default_image_size",
    "hyperrule_sizes",
    "train_preprocessing",
    "eval_preprocessing",
    "resolve_data_config",
    "build_train_loader",
    "build_eval_loader",
]

INTERPOLATIONS = tuple(_INTERPOLATION)
EMBEDDERS = ("embed", "fewshot")  # the tools that read a dataset split
DATA = BOTH + EMBEDDERS  # the scripts that read a dataset

def _val_split(v):
    if non_negative(v):
        return non_negative(v)
    return None if v < 1 or float(v).is_integer() else "a fraction in [0, 1) or a whole number of images"


@dataclass
class DataConfig:
    """The "data" option group (see bit_zoo.options)."""

    dataset: str = option("cifar10", "dataset", choices=DATASETS, scripts=DATA, script_defaults={t: "digits" for t in EMBEDDERS})
    data_dir: str | None = option(
        None, "the folder with the data (not needed for digits); a URL (s3://...) is staged into the cache once", scripts=DATA,
        aliases=("data_url",),
    )  # fmt: skip
    classes: list[int] | None = option(
        None, "keep only these label ids, relabelled 0..n-1 in this order", check=each(at_least(0)), scripts=DATA
    )
    image_size: int | None = option(
        None,
        "train crop; default: HyperRule's (128 below 96x96 px source images, else 480)",
        check=at_least(1),
        scripts=DATA + ("predict", "convert", "benchmark", "eager_bench"),
        script_defaults={"benchmark": 128, "eager_bench": 128},
        script_help={
            "validate": "eval resolution when eval_size is unset (a training config's image_size)",
            "predict": "evaluate at this size (resize straight to it); default: the checkpoint's meta.json, else the weights record's",
            "embed": "eval resolution when eval_size is unset (a training config's image_size)",
            "fewshot": "eval resolution when eval_size is unset (a training config's image_size)",
            "convert": "export resolution of the example input (default: the weights' eval size)",
            "benchmark": "input resolution",
            "eager_bench": "input resolution",
        },
        aliases=("img_size",),
    )
    eval_size: int | None = option(
        None,
        "eval resolution; default image_size",
        check=at_least(1),
        scripts=DATA,
        script_help={
            "validate": "eval resolution; default: image_size, else the checkpoint's, else the weights record's",
            "embed": "eval resolution; default: image_size, else the checkpoint's meta.json, else the weights record's",
            "fewshot": "eval resolution; default: image_size, else 224 (big_vision's protocol)",
        },
    )
    eval_resize_size: int | None = option(
        None, "resize before a center crop to eval_size; default none (BiT: resize straight)", check=at_least(1), scripts=DATA,
        script_help={"fewshot": "resize before the center crop to eval_size; default: eval_size / crop_pct"},
    )  # fmt: skip
    interpolation: str | None = option(
        None, "resize filter; default bilinear (seed recipe: bicubic)", choices=(None,) + INTERPOLATIONS, scripts=DATA
    )
    mean: list[float] | None = option(
        None, "per-channel mean in [0, 1] pixel units; default the weights record's ([-1, 1] for BiT)", check=each(finite), scripts=DATA
    )
    std: list[float] | None = option(None, "per-channel std; default the weights record's", check=each(positive), scripts=DATA)
    batch_size: int = option(
        512,
        "GLOBAL batch: all devices, all micro-batches of one optimizer step",
        check=at_least(1),
        scripts=DATA + ("predict", "convert", "benchmark", "eager_bench"),
        script_defaults={"validate": 64, "embed": 64, "fewshot": 64, "predict": 16, "convert": 1, "benchmark": 16, "eager_bench": 16},
        script_help={
            "validate": "images per eval step",
            "embed": "images per step",
            "fewshot": "images per step",
            "predict": "images per step",
            "convert": "batch of the example input (the exported batch axis is dynamic)",
            "benchmark": "images per optimizer step (split into --accum_steps micro-batches)",
            "eager_bench": "images per call",
        },
    )
    num_workers: int = option(2, "data pipeline workers", check=at_least(1), scripts=DATA)
    strict_images: bool = option(
        False, "stop before the first step at an image that cannot be decoded (default: skip it with a warning)", scripts=BOTH
    )
    check_data_content: bool = option(
        True,
        "record the training files' sizes and a digest of a sample of them in checkpoints, and refuse a --resume whose "
        "files changed; false skips it (one stat per file per run)",
    )
    val_split: float = option(0.0, "hold out this fraction (or count) of train as the eval split", check=_val_split, scripts=DATA)
    eval_samples: int | None = option(None, "evaluate on the first N eval images only", check=at_least(1), scripts=BOTH)
    split: str = option(
        "val",
        "val: held-out part of train with val_split, else the test split",
        choices=("val", "test"),
        scripts=("validate",) + EMBEDDERS,
        script_defaults={"embed": "train"},
        script_choices={"embed": ("train", "val", "test")},
        script_help={"embed": "the split to embed (val: the held-out part of train with val_split, else the test split)",
                     "fewshot": "evaluation split (val: the held-out part of train with val_split, else the test split)"},
    )  # fmt: skip
    resize_size: int | None = option(None, "train resize before the random crop (HyperRule 160/512)", check=at_least(1))
    transform: str = option("hyperrule", "train augmentation recipe", choices=TRANSFORMS)
    hflip: bool = option(True, "random horizontal flip in training")
    randaugment: list[int] | None = option(None, "num_ops magnitude, e.g. [2, 20]", check=length(2, at_least(0)))
    mixup_alpha: float | None = option(None, "default: HyperRule's (0.1 from 20k images, else 0)", check=non_negative)
    label_smoothing: float = option(0.0, "label smoothing", check=unit_interval)
    few_shot: int | None = option(None, "k training images per class", check=at_least(1))
    num_samples: int | None = option(
        None, "train on the first N records only", check=at_least(1), scripts=("train",) + EMBEDDERS,
        script_help={t: "only the first N records of each split" for t in EMBEDDERS},
    )  # fmt: skip

    def check_options(self, names: set[str]) -> None:
        """An option the chosen dataset does not read is refused, not silently ignored."""
        if {"dataset", "data_dir"} <= names and self.dataset == "digits" and self.data_dir:
            raise ConfigError(
                f"dataset digits comes with scikit-learn and reads no data_dir, but data_dir is {self.data_dir!r}: "
                "drop data_dir (--data_dir null), or name the dataset that lives there (--dataset folder, imagenet, cifar10 or cifar100)"
            )


def val_split_arg(value: float) -> float | int:
    """The parsed --val_split (always a float) as create_loader wants it: a whole number is a count."""
    return int(value) if float(value).is_integer() else float(value)


def build_eval_loader(
    data: DataConfig,
    *,
    split: str,
    batch_size: int,
    preprocess: Preprocess,
    seed: int,
    num_classes: int,
    shard: tuple[int, int] = (1, 0),
) -> DataInfo:
    """The evaluation pipeline: every image of the split in order (no shuffle, last partial batch kept).

    preprocess: resolve_data_config's. shard = (ranks, rank): this rank's disjoint share, for an
    evaluation every rank takes part in.
    """
    return create_loader(
        data.dataset,
        data.data_dir,
        split,
        batch_size=batch_size,
        image_size=preprocess.image_size,
        resize_size=preprocess.resize_size,
        transform="eval",
        interpolation=preprocess.interpolation,
        mean=preprocess.mean,
        std=preprocess.std,
        val_split=val_split_arg(data.val_split),
        num_samples=data.eval_samples,
        shuffle=False,
        drop_remainder=False,
        seed=seed,
        num_workers=data.num_workers,
        num_classes=num_classes,
        classes=data.classes,
        num_shards=shard[0],
        shard_id=shard[1],
        strict_images=data.strict_images,
    )


def train_preprocessing(data: DataConfig, model) -> dict:
    """Training resolution (the config's, else HyperRule's crop) and the run's eval preprocessing ("eval", a Preprocess at
    eval_size, else the training resolution); training normalises as the evaluation does."""
    image_size = data.image_size or default_image_size(data.dataset)
    evaluation = eval_preprocessing(data, model, eval_size=data.eval_size or image_size)
    return {
        "image_size": image_size,
        "eval_size": evaluation.image_size,
        "mean": evaluation.mean,
        "std": evaluation.std,
        "interpolation": data.interpolation,
        "eval": evaluation,
    }


def eval_preprocessing(data: DataConfig, model, *, eval_size: int | None = None) -> Preprocess:
    """Evaluation preprocessing of `model` (create_model's) under the config: resolve_data_config with the
    config's options as the explicit ones (eval_size, else image_size: validate.py's rule)."""
    return resolve_data_config(
        model,
        eval_size=eval_size or data.eval_size,
        image_size=data.image_size,
        eval_resize_size=data.eval_resize_size,
        interpolation=data.interpolation,
        mean=data.mean,
        std=data.std,
        dataset=data.dataset,
    )


def build_train_loader(data: DataConfig, prep: dict, *, micro_batch: int, shard: tuple[int, int], seed: int, start_step: int,
                       num_classes: int, hyperrule_mixup: bool) -> tuple[DataInfo, float]:  # fmt: skip
    """The training pipeline and its MixUp alpha (unset: HyperRule's by training-set size when hyperrule_mixup, else 0)."""

    def make(mixup_alpha: float) -> DataInfo:
        return create_loader(
            data.dataset,
            data.data_dir,
            "train",
            batch_size=micro_batch,
            image_size=prep["image_size"],
            resize_size=data.resize_size,
            transform=data.transform,
            interpolation=prep["interpolation"],
            mean=prep["mean"],
            std=prep["std"],
            randaugment=tuple(data.randaugment) if data.randaugment else None,
            mixup_alpha=mixup_alpha,
            label_smoothing=data.label_smoothing,
            few_shot=data.few_shot,
            val_split=val_split_arg(data.val_split),
            num_samples=data.num_samples,
            num_shards=shard[0],
            shard_id=shard[1],
            seed=seed,
            num_workers=data.num_workers,
            start_step=start_step,
            hflip=data.hflip,
            num_classes=num_classes,
            classes=data.classes,
            strict_images=data.strict_images,
            check_content=data.check_data_content,
        )

    if data.mixup_alpha is not None:
        return make(data.mixup_alpha), data.mixup_alpha
    info = make(0.0)
    alpha = hyperrule(len(info.indices)).mixup_alpha if hyperrule_mixup else 0.0
    return (make(alpha) if alpha else info), alpha
