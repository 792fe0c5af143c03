"""Data for BiT fine-tuning: CIFAR, ImageNet-style folders and digits as batched MindSpore pipelines."""

from .loader import DATASETS, DataInfo, check_num_classes, create_loader, dataset_num_classes
from .mixup import BatchMixup
from .sampling import EpochSampler, few_shot_indices, val_split_indices
from .transforms import build_transforms, default_train_resize

__all__ = [
    "DATASETS",
    "BatchMixup",
    "DataInfo",
    "EpochSampler",
    "build_transforms",
    "check_num_classes",
    "create_loader",
    "dataset_num_classes",
    "default_train_resize",
    "few_shot_indices",
    "val_split_indices",
]
