"""bit_zoo: Big Transfer (BiT) ResNet-v2 models for MindSpore, with the upstream weights."""

from __future__ import annotations

from . import _ms_compat  # noqa: F401  (MindSpore workarounds, applied before anything else; see the module)
from .models import (
    mindcv_compat,  # noqa: F401  (mirrors the registered models into mindcv's registry)
    zoo,  # noqa: F401  (registers the models and their weights)
)
from .models.factory import create_model
from .weights.loading import load_checkpoint, load_pretrained
from .weights.pretrained import Weights, cache_dir
from .models.registry import get_weights, is_model, list_models, list_pretrained, list_tags
from .models.resnetv2 import ResNetV2

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
