"""Data for BiT fine-tuning: CIFAR, ImageNet-style folders and digits as batched MindSpore pipelines.

    from bit_zoo.data import create_loader

    train = create_loader("cifar10", "data/cifar-10-batches-bin", "train", batch_size=128, image_size=128)
    val = create_loader("cifar10", "data/cifar-10-batches-bin", "test", batch_size=256, image_size=128)
    for images, labels in train.dataset.create_tuple_iterator(num_epochs=epochs):
        ...

Modules: `sources` (upstream file layouts, undecodable images, dataset fingerprints), `sampling`
(val hold-out, few-shot, shards, resume), `transforms` (HyperRule, seed recipe, eval; per-sample
keyed augmentation for exact resume), `mixup` (batch MixUp + label smoothing), `loader`,
`preprocess` (resolve_data_config: a model's eval preprocessing, for every script and tool).
"""

from .loader import DATASETS, DataInfo, check_num_classes, create_loader, dataset_num_classes
from .mixup import BatchMixup
from .preprocess import Preprocess, resolve_data_config
from .sampling import EpochSampler, few_shot_indices, val_split_indices
from .sources import BadImageError, BadImages, describe_change, require_same_data
from .transforms import TrainAugment, build_transforms, default_train_resize

__all__ = [
    "DATASETS",
    "BadImageError",
    "BadImages",
    "BatchMixup",
    "DataInfo",
    "EpochSampler",
    "Preprocess",
    "TrainAugment",
    "build_transforms",
    "check_num_classes",
    "create_loader",
    "dataset_num_classes",
    "default_train_resize",
    "describe_change",
    "require_same_data",
    "resolve_data_config",
    "few_shot_indices",
    "val_split_indices",
]
