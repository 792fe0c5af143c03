"""Register bit_zoo's models in mindcv's registry, so mindcv.create_model and its scripts accept them.

mindcv's registry keys a model by its function name and reads `default_cfgs` of the function's
module, so the wrappers live here, in a module of their own (mindcv already has a "resnetv2").
mindcv passes num_classes=1000 by default; with pretrained=True and 21843-class weights the
classifier is then left out and zero-initialised, as in bit_zoo. Other keyword arguments reach
ResNetV2 unchanged, so ``mindcv.create_model("bit_m_r50x1", features_only=True, out_indices=[1, 2, 3, 4])``
builds the backbone (timm's conventions: a list of maps, ``feature_info``; see features.py).
"""

from __future__ import annotations

from mindcv.models import registry as _mindcv_registry

from . import zoo  # noqa: F401  (registers bit_zoo's models, which are mirrored below)
from .factory import create_model
from .registry import get_weights, list_models, model_entrypoint

default_cfgs: dict[str, dict] = {}


def _wrap(name: str):
    entry = model_entrypoint(name)

    def create(pretrained: bool = False, num_classes: int = 1000, in_channels: int = 3, drop_path_rate: float = 0.0, **kwargs):
        # mindcv's train.py always passes drop_rate and drop_path_rate (0.0 by default).
        if drop_path_rate:
            raise ValueError(f"{name}: drop_path_rate={drop_path_rate} is not supported (BiT has no stochastic depth); set it to 0")
        return create_model(name, pretrained=pretrained, num_classes=num_classes, in_channels=in_channels, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = entry.__doc__
    return create


for _name in list_models():
    if not _mindcv_registry.is_model(_name):
        _w = get_weights(_name)
        default_cfgs[_name] = {"url": _w.url, "num_classes": _w.num_classes, "input_size": _w.input_shape}
        _mindcv_registry.register_model(_wrap(_name))
