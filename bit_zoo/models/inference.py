"""A model ready for inference, with its preprocessing and class names, from a name or a weights file.

Shared by ``bit_zoo.tools.predict``, ``bit_zoo.tools.embed`` and ``bit_zoo.tools.fewshot``. A checkpoint that bit_zoo's
train.py wrote carries a ``meta.json`` entry (see meta.py): architecture, class names and eval
preprocessing come from it, so no ``--model`` is needed. Otherwise the architecture is named and the
preprocessing comes from its weights record (BiT: resize straight to the input size, [-1, 1]).
The head size always comes from the file, so a 10-class file never meets a 1000-class head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import mindspore as ms
import numpy as np
from mindspore.nn.utils import no_init_parameters

from ..data.transforms import build_transforms
from .factory import create_model
from .options import ModelConfig
from ..weights.loading import EMA_PREFIX, load_state, read_arrays, read_weights_file
from ..weights.meta import verify_digest
from ..options import SystemConfig
from ..utils.remote import fetch
from ..weights.pretrained import BIT_MEAN_STD, Weights
from .resnetv2 import ResNetV2

__all__ = ["Preprocess", "LoadedModel", "load_model", "model_from_options", "preprocess_overrides"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing: resize (straight to image_size, or to resize_size then center crop), normalise."""

    image_size: int
    resize_size: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = BIT_MEAN_STD
    std: tuple[float, ...] = BIT_MEAN_STD

    @classmethod
    def from_weights(cls, w: Weights) -> Preprocess:
        resize = round(w.input_size / w.crop_pct) if w.crop_pct < 1 else None
        return cls(w.input_size, resize, w.interpolation, tuple(w.mean), tuple(w.std))

    @classmethod
    def from_meta(cls, pp: dict) -> Preprocess:
        size = pp.get("eval_size") or pp.get("image_size")
        if not size:
            raise ValueError(f"the checkpoint's meta.json preprocess entry has no eval_size or image_size: {pp}")
        crop_pct = pp.get("crop_pct") or 1.0
        resize = pp.get("eval_resize_size") or (round(size / crop_pct) if crop_pct < 1 else None)
        return cls(
            int(size),
            int(resize) if resize else None,
            pp.get("interpolation") or "bilinear",
            tuple(pp.get("mean") or BIT_MEAN_STD),
            tuple(pp.get("std") or BIT_MEAN_STD),
        )

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

    def __call__(self, image: np.ndarray) -> np.ndarray:
        for op in self.ops_cached:
            image = op(image)
        return np.asarray(image, dtype=np.float32)

    @property
    def ops_cached(self) -> list:
        ops = self.__dict__.get("_ops")
        if ops is None:
            ops = self.ops()
            object.__setattr__(self, "_ops", ops)
        return ops


@dataclass
class LoadedModel:
    model: ResNetV2
    preprocess: Preprocess
    class_names: list[str] | None  # from the checkpoint; None for ImageNet heads and files without meta
    name: str  # registered name, 'resnetv2', or the checkpoint's
    source: str  # checkpoint path or 'pretrained:<name>'
    weights: str  # 'ema' or 'raw'


def _skeleton_layers(model_name: str) -> tuple[int, ...]:
    with no_init_parameters():
        return create_model(model_name).layers


def load_model(
    model_name: str | None = None,
    *,
    checkpoint_path: str | None = None,
    pretrained: bool = False,
    layers: tuple[int, ...] | None = None,
    width_factor: int = 1,
    conv_impl: str = "auto",
    ema: bool | None = None,
    num_classes: int | None = None,
    image_size: int | None = None,
    allow_unverified: bool = False,
) -> LoadedModel:
    """Build and load a model for inference; see the module docstring for where each piece comes from.

    num_classes=0 builds no classifier (pre-logits embeddings); None keeps the file's head.
    ema: use a training checkpoint's EMA weights (default: when it has them, as validate.py does).
    image_size: evaluate at this size (resize straight to it) instead of the file's / record's.
    allow_unverified: accept a bit_zoo file whose digest is missing or does not cover its meta.json.
    """
    if pretrained and checkpoint_path:
        raise ValueError("pass --pretrained or --checkpoint_path, not both")
    if not pretrained and not checkpoint_path and model_name is None:
        raise ValueError("nothing to load: pass --checkpoint_path FILE, or --model NAME[.tag] with --pretrained (or --checkpoint_path)")
    if model_name == "resnetv2" and not checkpoint_path and not layers:
        raise ValueError("--model resnetv2 needs --layers (units per stage, e.g. 3 4 6 3)")
    meta = None
    arrays = None
    if checkpoint_path:
        _, arrays = read_arrays(checkpoint_path)
        meta = verify_digest(checkpoint_path, arrays, allow_unverified=allow_unverified)
    if model_name is None:
        if meta is None:
            raise ValueError(
                f"{checkpoint_path} carries no meta.json (it was not written by bit_zoo's train.py), so the architecture is "
                "unknown: pass --model NAME[.tag] (bit_zoo.list_models()), or --model resnetv2 --layers ..."
            )
        model_name = meta["model"]
    if model_name == "resnetv2":
        layers = tuple(meta["layers"]) if meta and meta.get("layers") else layers
        width_factor = meta.get("width_factor", width_factor) if meta else width_factor
        if layers is None:
            raise ValueError("--model resnetv2 needs --layers (units per stage, e.g. 3 4 6 3)")
    in_channels = int(meta.get("in_channels", 3)) if meta else 3

    if pretrained:
        model = create_model(model_name, pretrained=True, conv_impl=conv_impl, num_classes=num_classes)
        source, used = f"pretrained:{model_name}", "raw"
    elif not checkpoint_path:
        # The untrained baseline of a comparison: deterministic given mindspore.set_seed (model_from_options sets it).
        _logger.warning("%s: no --checkpoint_path and no --pretrained: random initialisation (an untrained baseline)", model_name)
        classes = 1000 if num_classes is None else num_classes
        if model_name == "resnetv2":
            model = ResNetV2(tuple(layers), width_factor, num_classes=classes, conv_impl=conv_impl)
        else:
            model = create_model(model_name, num_classes=classes, conv_impl=conv_impl)
        source, used = f"random-init:{model_name}", "raw"
    else:
        has_ema = any(k.startswith(EMA_PREFIX) for k in arrays)
        use_ema = has_ema if ema is None else ema
        if use_ema and not has_ema:
            raise ValueError(f"--ema true but {checkpoint_path} holds no EMA weights ('ema.*'): pass --ema false")
        arch_layers = layers if model_name == "resnetv2" else _skeleton_layers(model_name)
        state = read_weights_file(checkpoint_path, arch_layers, ema=use_ema)
        file_classes = int(state["head.fc.bias"].shape[0]) if "head.fc.bias" in state else 0
        classes = file_classes if num_classes is None else num_classes
        with no_init_parameters():
            if model_name == "resnetv2":
                model = ResNetV2(arch_layers, width_factor, num_classes=classes, in_channels=in_channels, conv_impl=conv_impl)
            else:
                model = create_model(model_name, num_classes=classes, in_channels=in_channels, conv_impl=conv_impl)
        load_state(model, state, source=str(checkpoint_path))
        source, used = str(checkpoint_path), "ema" if use_ema else "raw"

    preprocess = None
    if meta and meta.get("preprocess"):
        preprocess = Preprocess.from_meta(meta["preprocess"])
    elif model.weights is not None:
        preprocess = Preprocess.from_weights(model.weights)
    if image_size:
        preprocess = replace(preprocess or Preprocess(image_size), image_size=image_size, resize_size=None)
    if preprocess is None:
        raise ValueError(
            f"no preprocessing known for {source}: it has no meta.json and --model resnetv2 has no weights record; pass --image_size"
        )
    class_names = meta.get("class_names") if meta else None
    model.set_train(False)
    return LoadedModel(model, preprocess, class_names, model_name, source, used)


# ----------------------------------------------------------------------------------------------
# From the options of the inference commands (predict, embed, fewshot): train.py's names, one declaration.


def model_from_options(m: ModelConfig, system: SystemConfig, *, num_classes: int | None = None, image_size: int | None = None) -> LoadedModel:
    """load_model from the "model" option group; `image_size`: the explicit eval resolution, if any."""
    ms.set_context(mode=ms.GRAPH_MODE if system.mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_seed(system.seed)  # a random-init baseline is the same network on every run
    return load_model(
        m.model,
        # an s3:// file is staged into the cache (a local file, which the caches' content keys then read), as validate.py does
        checkpoint_path=fetch(m.checkpoint_path),
        pretrained=m.pretrained,
        layers=tuple(m.layers) if m.layers else None,
        width_factor=m.width_factor or 1,
        conv_impl=m.conv_impl,
        ema=m.ema,
        num_classes=num_classes,
        image_size=image_size,
        allow_unverified=m.allow_unverified,
    )


def preprocess_overrides(
    pp: Preprocess, *, resize_size: int | None = None, interpolation: str | None = None, mean=None, std=None
) -> Preprocess:
    """The explicit eval options over the model's preprocessing (the size is load_model's image_size)."""
    if resize_size:
        pp = replace(pp, resize_size=resize_size)
    if interpolation:
        pp = replace(pp, interpolation=interpolation)
    if mean:
        pp = replace(pp, mean=tuple(mean))
    if std:
        pp = replace(pp, std=tuple(std))
    return pp
