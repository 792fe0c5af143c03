"""A model ready for inference, with its preprocessing and class names, from the model options.

Shared by the inference tools (predict, embed, fewshot); not a tool itself. The model comes from
bit_zoo.create_model (a train.py checkpoint names its architecture in meta.json), the eval
preprocessing from bit_zoo.data.resolve_data_config (the explicit options first), the class names
from the file's meta.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mindspore as ms

from ..data.preprocess import Preprocess, resolve_data_config
from ..models.factory import create_model
from ..models.options import ModelConfig
from ..models.resnetv2 import ResNetV2
from ..options import SystemConfig
from ..utils.remote import fetch

__all__ = ["Preprocess", "LoadedModel", "load_model", "model_from_options"]

_logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: ResNetV2
    preprocess: Preprocess
    class_names: list[str] | None  # from the checkpoint; None for ImageNet heads and files without meta
    name: str  # registered name, 'resnetv2', or the checkpoint's
    source: str  # checkpoint path or 'pretrained:<name>'
    weights: str  # 'ema' or 'raw'


def load_model(
    model_name: str | None = None,
    *,
    checkpoint_path: str | None = None,
    pretrained: bool = False,
    layers: tuple[int, ...] | None = None,
    width_factor: int | None = None,
    conv_impl: str = "auto",
    ema: bool | None = None,
    num_classes: int | None = None,
    allow_unverified: bool = False,
    **preprocess,
) -> LoadedModel:
    """create_model + resolve_data_config for inference (num_classes=0: pre-logits).

    preprocess: resolve_data_config's explicit options (image_size, eval_size, eval_resize_size,
    crop_pct, interpolation, mean, std); allow_unverified: accept a bit_zoo file whose digest is
    missing or does not cover its meta.json.
    """
    if not pretrained and not checkpoint_path and model_name is None:
        raise ValueError("nothing to load: pass --checkpoint_path FILE, or --model NAME[.tag] with --pretrained (or --checkpoint_path)")
    if not pretrained and not checkpoint_path:
        # The untrained baseline of a comparison: deterministic given mindspore.set_seed (model_from_options sets it).
        _logger.warning("%s: no --checkpoint_path and no --pretrained: random initialisation (an untrained baseline)", model_name)
    model = create_model(
        model_name, checkpoint_path=checkpoint_path, pretrained=pretrained, layers=layers, width_factor=width_factor,
        conv_impl=conv_impl, ema=ema, num_classes=num_classes, allow_unverified=allow_unverified,
    )  # fmt: skip
    origin = model.origin
    model.set_train(False)
    pp = resolve_data_config(model, **preprocess)
    return LoadedModel(model, pp, origin.class_names, origin.name, origin.source, "ema" if origin.ema else "raw")


def model_from_options(m: ModelConfig, system: SystemConfig, *, num_classes: int | None = None, **preprocess) -> LoadedModel:
    """load_model from the "model" option group; `preprocess`: the explicit eval options (resolve_data_config's)."""
    ms.set_context(mode=ms.GRAPH_MODE if system.mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_seed(system.seed)  # a random-init baseline is the same network on every run
    return load_model(
        m.model,
        # an s3:// file is staged into the cache (a local file, which the caches' content keys then read), as validate.py does
        checkpoint_path=fetch(m.checkpoint_path),
        pretrained=m.pretrained,
        layers=tuple(m.layers) if m.layers else None,
        width_factor=m.width_factor,
        conv_impl=m.conv_impl,
        ema=m.ema,
        num_classes=num_classes,
        allow_unverified=m.allow_unverified,
        **preprocess,
    )
