"""`create_loader`: one call from a dataset name to a batched, sharded MindSpore pipeline."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import sources
from .mixup import BatchMixup
from .sampling import EpochSampler, few_shot_indices, shard_size, val_split_indices
from .transforms import TRANSFORMS, TrainAugment, build_transforms

if TYPE_CHECKING:
    import mindspore.dataset

logger = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "imagenet", "folder", "digits")
SPLITS = ("train", "val", "test")


class StepKeyedBatch:
    """The train pipeline's per_batch_map: per-sample augmentation and MixUp, keyed by the training step.

    The step comes from the batch op's own epoch and batch counters (plus the resumed run's
    `start_step`), so a sample's crop, flip, RandAugment ops and its batch's MixUp lambda are the
    same in a resumed run as in an uninterrupted one, whichever worker thread runs the batch.
    """

    def __init__(self, *, augment: TrainAugment | None, mixup: BatchMixup | None, start_step: int, batches_per_epoch: int):
        self.augment, self.mixup = augment, mixup
        self.start_step, self.batches_per_epoch = start_step, batches_per_epoch

    def step(self, batch_info) -> int:
        return self.start_step + batch_info.get_epoch_num() * self.batches_per_epoch + batch_info.get_batch_num()

    def __call__(self, images: list, labels: list, batch_info):
        step = self.step(batch_info)
        if self.augment is not None:
            batch = self.augment.normalize(
                np.stack([self.augment.for_sample(image, step, position) for position, image in enumerate(images)])
            )
        else:
            batch = np.stack(images)
        labels = np.stack(labels)
        if self.mixup is not None:
            return self.mixup.mix(batch, labels, step)
        return batch, labels.astype(np.int32)


@dataclass
class DataInfo:
    dataset: mindspore.dataset.Dataset  # batched: "image" float32 NCHW, "label" int32 [N] or float32 [N, C]
    num_images: int  # images of this split in this shard, before batching (padding included)
    num_classes: int
    batches_per_epoch: int
    class_names: list[str] | None
    indices: np.ndarray = field(default=None, repr=False)  # the split's records (all shards), in source order
    # Undecodable images met so far (skipped, replaced, warned once each): `len(info.bad_images)` for
    # metrics; with strict_images, `info.bad_images.error` is the clean error behind MindSpore's RuntimeError.
    bad_images: sources.BadImages = field(default_factory=sources.BadImages, repr=False)
    # Image count, per-class counts and a digest of the records: store it with a checkpoint and
    # compare on resume with `bit_zoo.data.describe_change(saved, info.fingerprint, info.class_names)`.
    fingerprint: dict = field(default_factory=dict, repr=False)


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; choose one of {DATASETS}.")


def dataset_num_classes(name: str, data_dir: str | None, classes=None) -> int:
    """Classes of a dataset without building a pipeline: 10 / 100 for CIFAR, 10 for digits, class folders otherwise.

    With `classes` (a subset of label ids, see `create_loader`) the subset's size, after checking it.
    """
    _check_name(name)
    if name in ("cifar10", "digits"):
        total = 10
    elif name == "cifar100":
        total = 100
    else:
        total = len(sources.class_folder_names(sources.resolve_folder_splits(name, data_dir)["train"]))
    return total if classes is None else len(sources.check_classes(classes, total, name))


def check_num_classes(model_classes: int, data_classes: int, *, name: str = "the dataset") -> None:
    """Fail clearly when a classifier head and the data disagree on the class count."""
    if model_classes != data_classes:
        raise ValueError(
            f"the model has {model_classes} output classes but {name} has {data_classes}; "
            f"build the model with num_classes={data_classes} (the head is re-initialised for fine-tuning)."
        )


def _source(name: str, data_dir: str | None, usage: str, *, strict_images: bool = False) -> sources.Source:
    """usage: 'train' or the official held-out split ('val' or 'test')."""
    if name in ("cifar10", "cifar100"):
        return sources.cifar_source(name, data_dir, "train" if usage == "train" else "test")
    if name == "digits":
        return sources.digits_source("train" if usage == "train" else "test")
    splits = sources.resolve_folder_splits(name, data_dir)
    train_classes = sources.class_folder_names(splits["train"])
    if usage == "train":
        return sources.folder_source(splits["train"], train_classes, strict_images=strict_images)
    if usage not in splits:
        raise FileNotFoundError(
            f"{name} data_dir '{data_dir}' has no {usage}/ folder. Add {Path(data_dir) / usage}/<class>/..., "
            "or pass val_split > 0 to hold out part of train as split 'val'."
        )
    return sources.folder_source(splits[usage], train_classes, strict_images=strict_images)


def create_loader(
    name: str,
    data_dir: str | None,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    resize_size: int | None = None,
    transform: str = "hyperrule",
    interpolation: str | None = None,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    randaugment: tuple[int, int] | None = None,
    mixup_alpha: float = 0.0,
    label_smoothing: float = 0.0,
    few_shot: int | None = None,
    val_split: float | int = 0,
    num_samples: int | None = None,
    shuffle: bool | None = None,
    drop_remainder: bool | None = None,
    num_shards: int = 1,
    shard_id: int = 0,
    seed: int = 0,
    num_workers: int = 2,
    start_step: int = 0,
    hflip: bool = True,
    num_classes: int | None = None,
    classes: list[int] | None = None,
    strict_images: bool = False,
    check_content: bool = False,
) -> DataInfo:
    """Build the batched pipeline for one split of one dataset.

    Splits: "train"; "val" is the held-out part of train when `val_split` > 0, else the official
    eval split (CIFAR test_batch, <data_dir>/val, digits' fixed test partition); "test" is always
    the official test split. `few_shot` draws k images per class from the train records left
    after the validation hold-out, so the two never overlap; it applies to split "train" only.

    `transform` is the train split's recipe; "val" and "test" always get the eval transform (resize
    straight to `image_size`, or to `resize_size` then a center crop). `interpolation` defaults to
    bilinear, bicubic for the seed recipe. `hflip=False` turns off the random flip (e.g. for
    digits). `num_classes`, when given, must match the data (see `check_num_classes`).

    `classes` keeps only those label ids (train and eval splits alike) and relabels them
    0..len(classes)-1 in the order given: a class subset becomes a dataset of its own.

    `num_samples` keeps the first records of the split (in file order, after the subsetting above).

    Image folders: an image that cannot be decoded is replaced by the next decodable one in file
    order, named once in a warning and counted in `DataInfo.bad_images`, so batches and the
    schedule hold. `strict_images=True` decodes every image of the split first and raises
    `BadImageError` (a ValueError) naming the bad files before anything trains.
    `check_content=True` adds a digest of the files' sizes and of a sample of their bytes to the
    fingerprint (`sources.content_fingerprint`), so a resume notices images replaced in place.

    Epochs: iterate with one iterator for all epochs (`dataset.create_tuple_iterator(num_epochs=E)`,
    or `Model.train`); epoch e is shuffled with (seed, e). MindSpore gives every new iterator a
    fresh copy of the sampler, so a second iterator starts again at the first epoch.

    Resume: `start_step` continues the batch stream of a run that stopped after that many batches
    (same seed, batch size and shards): the first epoch of the new iterator is steps start_step ..
    start_step + batches_per_epoch - 1. Every random choice (epoch order, crop, flip, RandAugment,
    MixUp lambda) is a function of (seed, shard, step, position), so a resumed pipeline yields
    exactly the batches of the uninterrupted run; mindspore.dataset.config's seed plays no part.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"split='{split}' is not one of {SPLITS}.")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform='{transform}' is not one of {TRANSFORMS}.")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} must lie in [0, num_shards={num_shards}).")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size={batch_size} and image_size={image_size} must be positive.")
    if start_step < 0 or (start_step and drop_remainder is False):
        raise ValueError(
            f"start_step={start_step}: resuming needs start_step >= 0 and drop_remainder (whole batches form the step stream)."
        )
    is_train = split == "train"
    shuffle = is_train if shuffle is None else shuffle
    drop_remainder = is_train if drop_remainder is None else drop_remainder

    held_out = split == "val" and val_split
    source = _source(name, data_dir, "train" if is_train or held_out else split, strict_images=strict_images)
    if classes is not None:
        source = sources.select_classes(source, classes)
    if num_classes is not None:
        check_num_classes(num_classes, source.num_classes, name=source.description)

    indices = np.flatnonzero(source.labels >= 0)  # all records, or those of the selected classes
    if val_split:
        if is_train or held_out:
            train_pos, val_pos = val_split_indices(len(indices), val_split, seed)
            indices = indices[train_pos if is_train else val_pos]
    if few_shot is not None:
        if is_train:
            indices = few_shot_indices(indices, source.labels, few_shot, seed, source.class_names)
        else:
            logger.debug("few_shot applies to the train split only; %s is used whole", split)
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be positive (or None for the whole split).")
        indices = indices[:num_samples]

    pad = drop_remainder and num_shards > 1
    per_shard = shard_size(len(indices), num_shards, shard_id, pad)
    if drop_remainder and per_shard < batch_size:
        raise ValueError(
            f"{split} split of {source.description}: {per_shard} images per shard is less than batch_size={batch_size} with "
            "drop_remainder, so an epoch would be empty; lower batch_size or pass drop_remainder=False."
        )
    batches_per_epoch = per_shard // batch_size if drop_remainder else math.ceil(per_shard / batch_size)
    sampler = EpochSampler(
        indices,
        shuffle=shuffle,
        seed=seed,
        num_shards=num_shards,
        shard_id=shard_id,
        pad=pad,
        batch_size=batch_size,
        drop_remainder=drop_remainder,
        start_step=start_step,
    )

    import mindspore.dataset.transforms as T
    from mindspore import dtype as mstype

    ops, augment = build_transforms(
        transform if is_train else "eval",
        image_size=image_size,
        resize_size=resize_size,
        interpolation=interpolation,
        mean=mean,
        std=std,
        randaugment=randaugment,
        hflip=hflip,
        seed=seed,
        shard_id=shard_id,
    )
    dataset = source.build(sampler, num_workers)
    dataset = dataset.map(operations=ops, input_columns="image", num_parallel_workers=num_workers)
    dataset = dataset.map(operations=T.TypeCast(mstype.int32), input_columns="label")
    mix = None
    if mixup_alpha > 0 or label_smoothing > 0:
        mix = BatchMixup(source.num_classes, alpha=mixup_alpha, label_smoothing=label_smoothing, seed=seed, shard_id=shard_id)
    if augment is not None or mix is not None:
        batch_map = StepKeyedBatch(augment=augment, mixup=mix, start_step=start_step, batches_per_epoch=batches_per_epoch)
        dataset = dataset.batch(
            batch_size,
            drop_remainder=drop_remainder,
            per_batch_map=batch_map,
            input_columns=["image", "label"],
            num_parallel_workers=num_workers,
        )
    else:
        dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    logger.info(
        "%s %s: %d images (shard %d/%d), %d batches of %d per epoch",
        name,
        split,
        per_shard,
        shard_id,
        num_shards,
        batches_per_epoch,
        batch_size,
    )
    fingerprint = sources.fingerprint(source, indices)
    if check_content:
        fingerprint["content"] = sources.content_fingerprint(source, indices)
    return DataInfo(
        dataset,
        per_shard,
        source.num_classes,
        batches_per_epoch,
        source.class_names,
        indices,
        source.bad_images,
        fingerprint,
    )
