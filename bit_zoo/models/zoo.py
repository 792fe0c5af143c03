"""The zoo: each architecture's geometry, the weights records written out, and the registered names.

ARCHITECTURES states the geometry of every registered name once (units per stage, width factor);
the weights records and the entry points take it from there. Every released file is one literal
:class:`~bit_zoo.weights.pretrained.Weights` record (classes, resolution, preprocessing, source),
so a record alone is enough to fetch, convert and preprocess. The first tag of a name is its
default weights. Nothing is parsed from names.

num_params: every parameter, head included, as the arrays of the upstream .npz layout add up
(tests/test_registry.py recomputes them from that layout, independently of the model).

``resnetv2`` is the same network of any geometry (``layers=``, ``width_factor=``), registered
without weights: what train.py builds for ``--model resnetv2`` and what its checkpoints name.
"""

from __future__ import annotations

import functools

from ..weights.pretrained import GOOGLE_BASE_URL, IMAGENET_MEAN, IMAGENET_STD, MINDCV_BASE_URL, Weights
from .registry import get_weights, register_model
from .resnetv2 import ResNetV2

__all__ = ["ARCHITECTURES", "CUSTOM_ARCHITECTURE", "WEIGHTS", "R50", "R101", "R152", "build_bit", "resnetv2"]

# Units per stage (arXiv 1912.11370, table 1 of the ResNet-v2 family).
R50 = (3, 4, 6, 3)
R101 = (3, 4, 23, 3)
R152 = (3, 8, 36, 3)

# Registered name -> (units per stage, width factor): the one statement of each architecture's geometry.
# fmt: off
ARCHITECTURES: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "bit_s_r50x1": (R50, 1), "bit_s_r50x3": (R50, 3), "bit_s_r101x1": (R101, 1), "bit_s_r101x3": (R101, 3),
    "bit_s_r152x2": (R152, 2), "bit_s_r152x4": (R152, 4),
    "bit_m_r50x1": (R50, 1), "bit_m_r50x3": (R50, 3), "bit_m_r101x1": (R101, 1), "bit_m_r101x3": (R101, 3),
    "bit_m_r152x2": (R152, 2), "bit_m_r152x4": (R152, 4),
}
# fmt: on
CUSTOM_ARCHITECTURE = "resnetv2"  # any geometry, no weights record

BIT_S = "BiT-S: trained on ILSVRC-2012"
BIT_M = "BiT-M: trained on ImageNet-21k"
BIT_M_FT_448 = "BiT-M fine-tuned on ILSVRC-2012 at 448 px (resize, no crop)"


def _google(filename: str, **fields) -> functools.partial:
    """A file of Google's BiT release (storage.googleapis.com/bit_models): upstream .npz, BiT's preprocessing.

    A partial record: its name's geometry is added from ARCHITECTURES (see _records)."""
    return functools.partial(
        Weights, filename=filename, base_url=GOOGLE_BASE_URL, file_format="npz", source="google-research/big_transfer", **fields
    )


def _mindcv(filename: str, **fields) -> functools.partial:
    """A mindcv release: trained from scratch on ImageNet-1k at 224 px, ImageNet mean/std, 0.875 center crop."""
    return functools.partial(
        Weights,
        filename=filename,
        base_url=MINDCV_BASE_URL,
        file_format="mindcv_ckpt",
        num_classes=1000,
        input_size=224,
        dataset="imagenet-1k",
        description="mindcv, trained from scratch on ImageNet-1k",
        source="mindspore-lab/mindcv",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_pct=0.875,
        **fields,
    )


def _records(table: dict[str, dict[str, functools.partial]]) -> dict[str, dict[str, Weights]]:
    """Complete every partial record with the geometry of the name it is filed under."""
    out = {}
    for name, tags in table.items():
        layers, width_factor = ARCHITECTURES[name]
        out[name] = {tag: make(layers=layers, width_factor=width_factor) for tag, make in tags.items()}
    return out


# One record per released file, every file name written out. A table reads as one: ruff's
# formatter would put each field on its own line, and 25 records of 12 lines bury the names.
# fmt: off
WEIGHTS: dict[str, dict[str, Weights]] = _records({
    "bit_s_r50x1": {
        "in1k": _google("BiT-S-R50x1.npz", num_classes=1000, input_size=224,
                        num_params=25_549_352, dataset="imagenet-1k", description=BIT_S),
        "mindcv_in1k": _mindcv("BiT_resnet50-1e4795a4.ckpt", num_params=25_549_352,
                               top1=76.81, sha256_prefix="1e4795a4"),
    },
    "bit_m_r50x1": {
        "in21k": _google("BiT-M-R50x1.npz", num_classes=21843, input_size=224,
                         num_params=68_256_659, dataset="imagenet-21k", description=BIT_M, hf_hub_id="timm/resnetv2_50x1_bit.goog_in21k"),
        "in21k_ft_in1k": _google("BiT-M-R50x1-ILSVRC2012.npz", num_classes=1000, input_size=448,
                                 num_params=25_549_352, dataset="imagenet-1k", description=BIT_M_FT_448,
                                 hf_hub_id="timm/resnetv2_50x1_bit.goog_in21k_ft_in1k"),
        "in21k_ft_cifar10": _google("BiT-M-R50x1-CIFAR10.npz", num_classes=10, input_size=128,
                                    num_params=23_520_842, dataset="cifar10", description="BiT-M-R50x1 fine-tuned on CIFAR-10"),
        "distilled_in1k": _google("distill/R50x1_224.npz", num_classes=1000, input_size=224,
                                  num_params=25_549_352, dataset="imagenet-1k",
                                  description="R50x1 distilled from the BiT-M-R152x2 teacher", top1=82.8,
                                  hf_hub_id="timm/resnetv2_50x1_bit.goog_distilled_in1k"),
    },
    "bit_s_r50x3": {
        "in1k": _google("BiT-S-R50x3.npz", num_classes=1000, input_size=224,
                        num_params=217_319_080, dataset="imagenet-1k", description=BIT_S),
        "mindcv_in1k": _mindcv("BiT_resnet50x3-a960f91f.ckpt", num_params=217_319_080,
                               top1=80.63, sha256_prefix="a960f91f"),
    },
    "bit_m_r50x3": {
        "in21k": _google("BiT-M-R50x3.npz", num_classes=21843, input_size=224,
                         num_params=345_399_315, dataset="imagenet-21k", description=BIT_M, hf_hub_id="timm/resnetv2_50x3_bit.goog_in21k"),
        "in21k_ft_in1k": _google("BiT-M-R50x3-ILSVRC2012.npz", num_classes=1000, input_size=448,
                                 num_params=217_319_080, dataset="imagenet-1k", description=BIT_M_FT_448,
                                 hf_hub_id="timm/resnetv2_50x3_bit.goog_in21k_ft_in1k"),
    },
    "bit_s_r101x1": {
        "in1k": _google("BiT-S-R101x1.npz", num_classes=1000, input_size=224,
                        num_params=44_541_480, dataset="imagenet-1k", description=BIT_S),
        "mindcv_in1k": _mindcv("BiT_resnet101-2efa9106.ckpt", num_params=44_541_480,
                               top1=77.93, sha256_prefix="2efa9106"),
    },
    "bit_m_r101x1": {
        "in21k": _google("BiT-M-R101x1.npz", num_classes=21843, input_size=224,
                         num_params=87_248_787, dataset="imagenet-21k", description=BIT_M, hf_hub_id="timm/resnetv2_101x1_bit.goog_in21k"),
        "in21k_ft_in1k": _google("BiT-M-R101x1-ILSVRC2012.npz", num_classes=1000, input_size=448,
                                 num_params=44_541_480, dataset="imagenet-1k", description=BIT_M_FT_448,
                                 hf_hub_id="timm/resnetv2_101x1_bit.goog_in21k_ft_in1k"),
    },
    "bit_s_r101x3": {
        "in1k": _google("BiT-S-R101x3.npz", num_classes=1000, input_size=224,
                        num_params=387_934_888, dataset="imagenet-1k", description=BIT_S),
    },
    "bit_m_r101x3": {
        "in21k": _google("BiT-M-R101x3.npz", num_classes=21843, input_size=224,
                         num_params=516_015_123, dataset="imagenet-21k", description=BIT_M, hf_hub_id="timm/resnetv2_101x3_bit.goog_in21k"),
        "in21k_ft_in1k": _google("BiT-M-R101x3-ILSVRC2012.npz", num_classes=1000, input_size=448,
                                 num_params=387_934_888, dataset="imagenet-1k", description=BIT_M_FT_448,
                                 hf_hub_id="timm/resnetv2_101x3_bit.goog_in21k_ft_in1k"),
    },
    "bit_s_r152x2": {
        "in1k": _google("BiT-S-R152x2.npz", num_classes=1000, input_size=224,
                        num_params=236_335_208, dataset="imagenet-1k", description=BIT_S),
    },
    "bit_m_r152x2": {
        "in21k": _google("BiT-M-R152x2.npz", num_classes=21843, input_size=224,
                         num_params=321_728_979, dataset="imagenet-21k", description=BIT_M, hf_hub_id="timm/resnetv2_152x2_bit.goog_in21k"),
        "in21k_ft_in1k": _google("BiT-M-R152x2-ILSVRC2012.npz", num_classes=1000, input_size=448,
                                 num_params=236_335_208, dataset="imagenet-1k", description=BIT_M_FT_448,
                                 hf_hub_id="timm/resnetv2_152x2_bit.goog_in21k_ft_in1k"),
        "teacher_in21k_ft_in1k": _google("distill/R152x2_T_224.npz", num_classes=1000, input_size=224,
                                         num_params=236_335_208, dataset="imagenet-1k",
                                         description="BiT-M-R152x2 distillation teacher at 224 px",
                                         hf_hub_id="timm/resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k"),
        "teacher_in21k_ft_in1k_384": _google("distill/R152x2_T_384.npz", num_classes=1000, input_size=384,
                                             num_params=236_335_208, dataset="imagenet-1k",
                                             description="BiT-M-R152x2 distillation teacher at 384 px",
                                             hf_hub_id="timm/resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384"),
    },
    "bit_s_r152x4": {
        "in1k": _google("BiT-S-R152x4.npz", num_classes=1000, input_size=224,
                        num_params=936_533_224, dataset="imagenet-1k", description=BIT_S),
    },
    "bit_m_r152x4": {
        "in21k": _google("BiT-M-R152x4.npz", num_classes=21843, input_size=224,
                         num_params=1_107_299_923, dataset="imagenet-21k", description=BIT_M,
                         hf_hub_id="timm/resnetv2_152x4_bit.goog_in21k"),
        "in21k_ft_in1k": _google("BiT-M-R152x4-ILSVRC2012.npz", num_classes=1000, input_size=480,
                                 num_params=936_533_224, dataset="imagenet-1k",
                                 description="BiT-M fine-tuned on ILSVRC-2012 at 480 px (resize, no crop)", top1=84.94,
                                 hf_hub_id="timm/resnetv2_152x4_bit.goog_in21k_ft_in1k"),
    },
})
# fmt: on


def build_bit(variant: str, *, num_classes: int | None = None, weights_tag: str | None = None, **kwargs) -> ResNetV2:
    """The network of registered name `variant` (its geometry from ARCHITECTURES), untrained.

    num_classes defaults to its weights record's; `model.weights` is the record of `weights_tag`
    (default: the name's first). Loading weights is bit_zoo.create_model's job.
    """
    weights = get_weights(variant if weights_tag is None else f"{variant}.{weights_tag}")
    layers, width_factor = ARCHITECTURES[variant]
    model = ResNetV2(layers, width_factor, num_classes=weights.num_classes if num_classes is None else num_classes, **kwargs)
    model.weights = weights
    return model


def _register(fn):
    tags = WEIGHTS[fn.__name__]
    return register_model(fn, weights=tags, default_tag=next(iter(tags)))


@_register
def bit_s_r50x1(**kwargs) -> ResNetV2:
    return build_bit("bit_s_r50x1", **kwargs)


@_register
def bit_s_r50x3(**kwargs) -> ResNetV2:
    return build_bit("bit_s_r50x3", **kwargs)


@_register
def bit_s_r101x1(**kwargs) -> ResNetV2:
    return build_bit("bit_s_r101x1", **kwargs)


@_register
def bit_s_r101x3(**kwargs) -> ResNetV2:
    return build_bit("bit_s_r101x3", **kwargs)


@_register
def bit_s_r152x2(**kwargs) -> ResNetV2:
    return build_bit("bit_s_r152x2", **kwargs)


@_register
def bit_s_r152x4(**kwargs) -> ResNetV2:
    return build_bit("bit_s_r152x4", **kwargs)


@_register
def bit_m_r50x1(**kwargs) -> ResNetV2:
    return build_bit("bit_m_r50x1", **kwargs)


@_register
def bit_m_r50x3(**kwargs) -> ResNetV2:
    return build_bit("bit_m_r50x3", **kwargs)


@_register
def bit_m_r101x1(**kwargs) -> ResNetV2:
    return build_bit("bit_m_r101x1", **kwargs)


@_register
def bit_m_r101x3(**kwargs) -> ResNetV2:
    return build_bit("bit_m_r101x3", **kwargs)


@_register
def bit_m_r152x2(**kwargs) -> ResNetV2:
    return build_bit("bit_m_r152x2", **kwargs)


@_register
def bit_m_r152x4(**kwargs) -> ResNetV2:
    return build_bit("bit_m_r152x4", **kwargs)


def resnetv2(*, layers: tuple[int, ...], width_factor: int = 1, num_classes: int = 1000, weights_tag: str | None = None, **kwargs) -> ResNetV2:
    """ResNetV2 of any geometry (units per stage `layers`, width factor), untrained; it has no weights record."""
    if weights_tag is not None:
        raise ValueError(f"{CUSTOM_ARCHITECTURE} has no weights records, so no tag {weights_tag!r}")
    return ResNetV2(tuple(layers), width_factor, num_classes=num_classes, **kwargs)


register_model(resnetv2, weights={}, default_tag=None)
