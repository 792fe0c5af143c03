"""The "model" option group: which network, which weights, how it runs (train.py, validate.py and the tools).

Declared with bit_zoo.options (see there); the choices come from the modules that use them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import BOTH, INFERENCE_TOOLS, at_least, each, option
from .freeze import FREEZE_CHOICES
from .layers import CONV_IMPLS

__all__ = ["ModelConfig", "AMP_LEVELS", "CONV_IMPL_CHOICES"]

AMP_LEVELS = ("O0", "O2", "O3")
CONV_IMPL_CHOICES = ("auto",) + CONV_IMPLS
LOADERS = BOTH + INFERENCE_TOOLS  # the scripts that build a model from a name or a weights file
FROM_META = {t: None for t in INFERENCE_TOOLS + ("convert",)}  # unset: the weights file's meta.json decides


@dataclass
class ModelConfig:
    model: str = option(
        "bit_m_r50x1",
        "a registered name (bit_zoo.list_models()), name.tag, or 'resnetv2' with --layers",
        scripts=LOADERS + ("convert", "benchmark", "eager_bench", "load_bench"),
        script_defaults={**FROM_META, "benchmark": "bit_s_r50x1", "eager_bench": "bit_s_r50x1", "load_bench": "bit_m_r101x3"},
        script_help={
            **{t: "NAME[.tag] (bit_zoo.list_models()) or resnetv2; default: the checkpoint's meta.json" for t in INFERENCE_TOOLS},
            "convert": "NAME[.tag] (bit_zoo.list_models()) or resnetv2; default: the input's meta.json",
            "load_bench": "registered name; its default record's classes are used",
        },
    )
    layers: list[int] | None = option(
        [1, 1, 1, 1],
        "units per stage, for --model resnetv2 only",
        check=each(at_least(1)),
        scripts=LOADERS + ("convert",),
        script_defaults=FROM_META,
        script_help={t: "units per stage (e.g. 3,4,6,3), for --model resnetv2 without meta.json" for t in INFERENCE_TOOLS + ("convert",)},
    )
    width_factor: int | None = option(
        1,
        "width factor, for --model resnetv2 only",
        check=at_least(1),
        scripts=LOADERS + ("convert",),
        script_defaults=FROM_META,
        script_help={t: "width factor, for --model resnetv2 without meta.json (default 1)" for t in INFERENCE_TOOLS + ("convert",)},
    )
    num_classes: int | None = option(
        None,
        "classifier outputs; default: the dataset's class count",
        check=at_least(0),
        scripts=BOTH + ("convert", "benchmark"),
        script_defaults={"benchmark": 1000},
        script_help={"convert": "classifier size (default: the input's); another count zeroes the head, 0 removes it"},
    )
    conv_impl: str = option(
        "auto",
        "convolution implementation (auto: by device)",
        choices=CONV_IMPL_CHOICES,
        scripts=LOADERS + ("benchmark", "eager_bench"),
    )
    amp_level: str = option("O0", "O2/O3: fp16 (no bf16 kernels on CPU)", choices=AMP_LEVELS, scripts=BOTH)
    pretrained: bool = option(
        False,
        "download and load the model's weights record",
        scripts=LOADERS,
        script_help={"validate": "evaluate the model's own weights record (downloads)"},
    )
    checkpoint_path: str | None = option(
        None,
        "initial weights file (.npz, mindcv .ckpt, bit_zoo .ckpt or .safetensors; local or a URL)",
        aliases=("ckpt_url",),
        scripts=("train",) + INFERENCE_TOOLS,
        script_help={t: "weights file: train.py checkpoint, upstream .npz, mindcv .ckpt, .safetensors" for t in INFERENCE_TOOLS},
    )
    recompute: bool = option(False, "recompute activations in backward (less memory)", scripts=("train", "benchmark"))
    freeze: str = option(
        "none", "parameters left untrained: the stem, stages up to N, or all-but-head (a linear probe)", choices=FREEZE_CHOICES
    )
    ckpt_path: str | None = option(None, "training checkpoint, upstream .npz or mindcv .ckpt", scripts=("validate",))
    ema: bool | None = option(
        None,
        "use the EMA weights of a training checkpoint (None: when it has them)",
        scripts=("validate", "convert") + INFERENCE_TOOLS,
        script_defaults={"convert": False},
        script_help={"convert": "take the EMA weights of a training checkpoint"},
    )
    allow_unverified: bool = option(
        False,
        "accept a bit_zoo checkpoint whose digest is missing or does not cover its meta.json (used unchecked)",
        scripts=LOADERS + ("convert",),
    )
