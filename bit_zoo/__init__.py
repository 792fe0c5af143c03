"""bit_zoo: Big Transfer (BiT) ResNet-v2 models for MindSpore, with the upstream weights."""

from __future__ import annotations

from . import (
    _ms_compat,  # noqa: F401  (MindSpore 2.10 checkpoint-size check, see the module)
    mindcv_compat,  # noqa: F401  (mirrors the registered models into mindcv's registry)
    zoo,  # noqa: F401  (registers the models and their weights)
)
from .factory import create_model
from .loading import load_checkpoint, load_pretrained
from .pretrained import Weights, cache_dir
from .registry import get_weights, is_model, list_models, list_pretrained, list_tags
from .resnetv2 import ResNetV2

__version__ = "0.1.0"

__all__ = [
    "ResNetV2",
    "Weights",
    "cache_dir",
    "create_model",
    "get_weights",
    "is_model",
    "list_models",
    "list_pretrained",
    "list_tags",
    "load_checkpoint",
    "load_pretrained",
]
