"""create_model: the one way from a name, a weights tag or a weights file to a model (timm's create_model).

    create_model("bit_m_r50x1", pretrained=True, num_classes=10)      # a name, its default weights
    create_model("bit_m_r50x1.in21k_ft_cifar10", pretrained=True)      # name.tag: other weights
    create_model("bit_s_r50x1", checkpoint_path="BiT-S-R50x1.npz")     # a file of any supported format
    create_model(checkpoint_path="outputs/run/best.ckpt")              # a bit_zoo file names its architecture
    create_model("resnetv2", layers=(1, 1, 1, 1), width_factor=1)      # any geometry, untrained

What each piece comes from, written once here for every script and tool:

* the architecture: the name (its geometry from zoo.ARCHITECTURES), else the file's meta.json
  (train.py's checkpoints: a registered name or ``resnetv2`` with its layers and width);
* the classifier: the file's (or the weights record's) is kept; only an explicit num_classes
  of another count replaces it, with BiT's zero head, and a warning says so;
* in_channels: the file's stem, unless given (a 3-channel stem is then adapted);
* a training checkpoint's EMA weights when it has them (ema=None), as validate.py evaluates;
* a file bit_zoo wrote is checked against its digest first (weights.meta.verify_digest).

The returned model carries ``model.weights`` (its weights record, None for ``resnetv2``) and
``model.origin`` (a :class:`ModelOrigin`: name, source, EMA used, the file's meta.json), from
which bit_zoo.data.resolve_data_config takes the eval preprocessing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from mindspore.nn.utils import no_init_parameters

from ..weights.loading import EMA_PREFIX, fetch_pretrained, lazy_weights, load_lazy_state, open_arrays
from ..weights.meta import META_KEY, verify_digest
from ..weights.pretrained import Weights
from . import zoo
from .registry import get_weights, is_model, model_entrypoint, split_model_name
from .resnetv2 import ResNetV2

__all__ = ["create_model", "resolve_architecture", "Architecture", "ModelOrigin", "CUSTOM_ARCHITECTURE"]

_logger = logging.getLogger(__name__)

CUSTOM_ARCHITECTURE = zoo.CUSTOM_ARCHITECTURE


@dataclass(frozen=True)
class Architecture:
    """A resolved architecture: registered name[.tag] (or 'resnetv2'), geometry, weights record (None for resnetv2)."""

    name: str
    layers: tuple[int, ...]
    width_factor: int
    weights: Weights | None = None

    @property
    def is_custom(self) -> bool:
        return self.weights is None


@dataclass(frozen=True)
class ModelOrigin:
    """Where a model created by create_model comes from."""

    name: str  # registered name[.tag], or 'resnetv2'
    source: str  # the weights file, 'pretrained:<name>', or 'random-init:<name>'
    ema: bool  # a training checkpoint's EMA weights were loaded
    meta: dict | None  # the file's meta.json (files bit_zoo wrote), else None

    @property
    def class_names(self) -> list[str] | None:
        return (self.meta or {}).get("class_names")


def _geometry_error(name: str, layers, width_factor, where: str) -> ValueError:
    own_layers, own_width = zoo.ARCHITECTURES[split_model_name(name)[0]]
    return ValueError(
        f"{name} is layers {list(own_layers)}, width {own_width}, but {where} says layers {list(layers)}, width {width_factor}: "
        f"name the architecture the weights belong to, or {CUSTOM_ARCHITECTURE} with that geometry"
    )


def resolve_architecture(
    model_name: str | None,
    *,
    meta: dict | None = None,
    layers: tuple[int, ...] | None = None,
    width_factor: int | None = None,
    source: str = "the weights file",
) -> Architecture:
    """The architecture of a name (registered name[.tag], or 'resnetv2' with layers / width_factor),
    else of a file's meta.json; any two of them that disagree on the geometry are an error."""
    if model_name is None:
        if meta is None:
            raise ValueError(
                f"{source} carries no meta.json (it was not written by bit_zoo), so its architecture is unknown: name its architecture "
                f"(the model: a registered name from bit_zoo.list_models(), or {CUSTOM_ARCHITECTURE} with layers and width_factor)"
            )
        model_name = meta.get("model") or CUSTOM_ARCHITECTURE
        if not is_model(model_name):  # a name this version does not know: the geometry still says what to build
            model_name = CUSTOM_ARCHITECTURE
    meta_geometry = None
    if meta and meta.get("layers"):
        meta_geometry = (tuple(int(n) for n in meta["layers"]), int(meta.get("width_factor", 1)))
    base, _ = split_model_name(model_name)
    if base == CUSTOM_ARCHITECTURE:
        geometry = meta_geometry or (tuple(layers) if layers else None, int(width_factor or 1))
        if geometry[0] is None:
            raise ValueError(f"{CUSTOM_ARCHITECTURE} needs layers (units per stage, e.g. 3,4,6,3) and width_factor (default 1)")
        if meta_geometry and (layers and tuple(layers) != meta_geometry[0] or width_factor and width_factor != meta_geometry[1]):
            raise ValueError(
                f"layers {list(layers or meta_geometry[0])}, width {width_factor or meta_geometry[1]} given, but {source} holds "
                f"layers {list(meta_geometry[0])}, width {meta_geometry[1]} (its meta.json): leave them out, the file names its geometry"
            )
        if len(geometry[0]) != 4 or min(geometry[0]) < 1 or geometry[1] < 1:
            raise ValueError(f"layers needs four positive units-per-stage counts and width_factor >= 1, got {list(geometry[0])}, {geometry[1]}")
        return Architecture(CUSTOM_ARCHITECTURE, geometry[0], geometry[1])
    weights = get_weights(model_name)  # an unknown name raises, listing close matches
    geometry = zoo.ARCHITECTURES[base]
    if layers and tuple(layers) != geometry[0] or width_factor and width_factor != geometry[1]:
        raise _geometry_error(model_name, layers or geometry[0], width_factor or geometry[1], "layers/width_factor")
    if meta_geometry and meta_geometry != geometry:
        raise _geometry_error(model_name, *meta_geometry, f"{source} (its meta.json: {meta.get('model')})")
    return Architecture(model_name, geometry[0], geometry[1], weights)


def _build(arch: Architecture, *, num_classes: int, in_channels: int, **kwargs) -> ResNetV2:
    """Through the registered entry point, as mindcv and timm do."""
    entry = model_entrypoint(arch.name)
    if arch.is_custom:
        return entry(layers=arch.layers, width_factor=arch.width_factor, num_classes=num_classes, in_channels=in_channels, **kwargs)
    return entry(num_classes=num_classes, in_channels=in_channels, weights_tag=split_model_name(arch.name)[1], **kwargs)


def _classes_note(source: str, file_classes: int, num_classes: int) -> None:
    if num_classes == 0:
        _logger.info("%s: classifier left out (num_classes=0: the forward returns pre-logits features)", source)
        return
    _logger.warning(
        "%s has a %d-class classifier; num_classes=%d replaces it with a zero head (every logit 0 until fine-tuned)",
        source,
        file_classes,
        num_classes,
    )


def _from_file(arch_of, path, *, source: str, num_classes, in_channels, ema, allow_unverified: bool, kwargs) -> ResNetV2:
    """Build the architecture `arch_of(meta)` resolves, and load `path` into it (one array at a time)."""
    fmt, reader = open_arrays(path)
    with reader:
        meta = verify_digest(path, reader, allow_unverified=allow_unverified) if META_KEY in reader else None
        arch = arch_of(meta)
        has_ema = any(k.startswith(EMA_PREFIX) for k in reader)
        if ema and not has_ema:
            raise ValueError(f"ema=True but {path} holds no EMA weights ('ema.*' entries of a training checkpoint): load it with ema=False")
        use_ema = has_ema if ema is None else bool(ema)
        state = lazy_weights(reader, fmt, arch.layers, path=path, ema=use_ema)
        file_classes = int(state["head.fc.bias"].shape[0]) if "head.fc.bias" in state else 0
        classes = file_classes if num_classes is None else int(num_classes)
        if classes != file_classes and not kwargs.get("features_only"):
            _classes_note(source, file_classes, classes)
        if in_channels is None:
            in_channels = int(state["stem.conv.weight"].shape[1]) if "stem.conv.weight" in state else 3
        # Weights about to be overwritten need no random init (seconds and GBs for R152x4): the loader
        # sets every parameter (the head too, zero when left out) or raises.
        with no_init_parameters():
            model = _build(arch, num_classes=classes, in_channels=in_channels, **kwargs)
        load_lazy_state(model, state, path=path, fmt=fmt)
    model.origin = ModelOrigin(arch.name, source, use_ema, meta)
    return model


def create_model(
    model_name: str | None = None,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    ema: bool | None = None,
    allow_unverified: bool = False,
    layers: tuple[int, ...] | None = None,
    width_factor: int | None = None,
    **kwargs,
) -> ResNetV2:
    """Create a model from a name, a name.tag, a weights file, or a training checkpoint (see the module docstring).

    Args:
        model_name: a registered architecture ('bit_m_r50x1', default weights), 'name.tag' for other
            weights, or 'resnetv2' (with layers and width_factor). None: the checkpoint's meta.json names it.
        pretrained: download (into the cache), verify and load the name's weights record.
        checkpoint_path: load this local file (upstream .npz, timm .safetensors, mindcv .ckpt, bit_zoo
            .ckpt or .safetensors with or without meta.json; the format is detected from the bytes).
        num_classes: classifier size; default the file's (or the record's). Another count gets a zero
            head (BiT's fine-tuning start) and a warning; 0 builds no classifier.
        in_channels: input channels; default the file's (3 without a file). A 3-channel stem is adapted.
        ema: a training checkpoint's EMA weights (None: when it has them).
        allow_unverified: accept a bit_zoo file whose digest is missing or does not cover its meta.json
            (weights.meta.verify_digest; a file that contradicts its digest is always refused).
        layers, width_factor: the geometry of 'resnetv2' (a registered name has its own; a
            contradicting value is an error).
        **kwargs: passed to ResNetV2 (conv_impl, recompute, drop_rate, output_stride, features_only, ...).
    """
    if pretrained and checkpoint_path:
        raise ValueError("pass either pretrained=True or checkpoint_path=..., not both")
    if checkpoint_path:
        path = os.fspath(checkpoint_path)
        return _from_file(
            lambda meta: resolve_architecture(model_name, meta=meta, layers=layers, width_factor=width_factor, source=path),
            path,
            source=path,
            num_classes=num_classes,
            in_channels=in_channels,
            ema=ema,
            allow_unverified=allow_unverified,
            kwargs=kwargs,
        )
    if model_name is None:
        raise ValueError("nothing to create: name a model (bit_zoo.list_models()) or pass checkpoint_path=")
    arch = resolve_architecture(model_name, layers=layers, width_factor=width_factor)
    if pretrained:
        if arch.weights is None:
            raise ValueError(f"{CUSTOM_ARCHITECTURE} (a custom geometry) has no pretrained weights: use a registered name, or pass checkpoint_path=")
        return _from_file(
            lambda meta: arch,
            fetch_pretrained(arch.weights),
            source=f"pretrained:{arch.name}",
            num_classes=num_classes,
            in_channels=in_channels,
            ema=None,
            allow_unverified=False,
            kwargs=kwargs,
        )
    classes = num_classes if num_classes is not None else (arch.weights.num_classes if arch.weights else 1000)
    model = _build(arch, num_classes=classes, in_channels=3 if in_channels is None else in_channels, **kwargs)
    model.origin = ModelOrigin(arch.name, f"random-init:{arch.name}", False, None)
    return model
