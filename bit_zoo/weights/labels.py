"""Class names for model outputs: ImageNet-1k, ImageNet-21k (Google's BiT-M head order), or a checkpoint's own.

The synset lists and WordNet lemmas ship as package data (bit_zoo/weights/_data, copied from timm's wheel;
see bit_zoo/weights/_data/SOURCES.md). A label is the lemma string, e.g. "tench, Tinca tinca".
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["imagenet1k_synsets", "imagenet21k_synsets", "synset_lemmas", "imagenet_names", "label_names"]

_IN1K = "imagenet_synsets.txt"
_IN21K = "imagenet21k_goog_synsets.txt"
_LEMMAS = "imagenet_synset_to_lemma.txt"


def _read(name: str) -> list[str]:
    text = resources.files("bit_zoo.weights").joinpath("_data", name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


@functools.cache
def imagenet1k_synsets() -> tuple[str, ...]:
    return tuple(_read(_IN1K))


@functools.cache
def imagenet21k_synsets() -> tuple[str, ...]:
    """The 21,843 wnids in the order of Google's BiT-M heads."""
    return tuple(_read(_IN21K))


@functools.cache
def synset_lemmas() -> dict[str, str]:
    return dict(line.split("\t", 1) for line in _read(_LEMMAS))


def imagenet_names(num_classes: int) -> list[str] | None:
    """Lemmas for a 1000- or 21843-class ImageNet head; None for any other size."""
    if num_classes == 1000:
        synsets = imagenet1k_synsets()
    elif num_classes == 21843:
        synsets = imagenet21k_synsets()
    else:
        return None
    lemmas = synset_lemmas()
    return [lemmas[s] for s in synsets]


def label_names(num_classes: int, class_names: list[str] | None = None) -> list[str]:
    """The names of a head's outputs: the checkpoint's class names, else ImageNet's, else 'class_<i>'."""
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(
                f"the checkpoint lists {len(class_names)} class names for a {num_classes}-class head: the file is inconsistent"
            )
        return list(class_names)
    return imagenet_names(num_classes) or [f"class_{i}" for i in range(num_classes)]
