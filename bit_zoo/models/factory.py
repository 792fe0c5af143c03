"""create_model: the one way in, as in timm and mindcv."""

from __future__ import annotations

from . import zoo  # noqa: F401  (registers every name before the registry is asked)
from .registry import model_entrypoint, split_model_name
from .resnetv2 import ResNetV2


def create_model(
    model_name: str,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_channels: int = 3,
    checkpoint_path: str | None = None,
    **kwargs,
) -> ResNetV2:
    """Create a registered model, e.g. ``create_model("bit_m_r101x3", pretrained=True, num_classes=10)``.

    Args:
        model_name: an architecture ('bit_m_r50x1', default weights) or 'name.tag' for other weights.
        pretrained: download (into the cache), verify and load the weights.
        num_classes: classifier size; defaults to the weights' classes. When it differs from the
            weights', the classifier is left out and zero-initialised (BiT's zero head).
        in_channels: input channels; the pretrained stem is adapted when not 3.
        checkpoint_path: load this local file instead (upstream .npz, mindcv .ckpt, bit_zoo
            .ckpt or .safetensors, detected from the file).
        **kwargs: passed to ResNetV2 (conv_impl, recompute).
    """
    if pretrained and checkpoint_path:
        raise ValueError("pass either pretrained=True or checkpoint_path=..., not both")
    entry = model_entrypoint(model_name)
    _, tag = split_model_name(model_name)
    return entry(
        pretrained=pretrained,
        num_classes=num_classes,
        in_channels=in_channels,
        checkpoint_path=checkpoint_path,
        weights_tag=tag,
        **kwargs,
    )
