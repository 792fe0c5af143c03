"""BiT ResNet-v2 (arXiv 1912.11370): one parameterized model, its weight conversion, its weights.

Reads top to bottom like timm's resnetv2.py: blocks, the model class, weight conversion (pure
functions over name -> array mappings), the builder, the table of weights, and the thin
registered entry points.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.nn.utils import no_init_parameters

from .features import NUM_FEATURES, FeatureInfo, feature_take_indices, stage_strides_and_dilations
from .layers import GroupNormAct, StdConv2d, resolve_conv_impl, zero_pad2d
from .pretrained import GOOGLE_BASE_URL, MINDCV_BASE_URL, Weights
from .registry import get_weights, register_model

_logger = logging.getLogger(__name__)

__all__ = ["ResNetV2", "ARCHS", "NUM_PARAMS", "convert_npz", "convert_mindcv", "to_npz", "build_bit"]


# ----------------------------------------------------------------------------------------------
# Blocks


class DilatedStdConv2d(StdConv2d):
    """StdConv2d with a dilated kernel (stride 1), for output_stride 16 / 8, on both conv paths.

    Padding is `dilation` on every side for the 3x3, as timm's get_padding gives, so the map keeps
    its size. The parameter is the same `weight`, so weights files load unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, dilation: int, conv_impl: str) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size - 1) // 2, conv_impl=conv_impl)
        self.dilation = dilation

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        w = self.standardized_weight(x.dtype)
        if self._unfold:
            n, c, h, wd = x.shape
            k, p, d = self.kernel_size, self.padding, self.dilation
            ho = h + 2 * p - d * (k - 1)
            wo = wd + 2 * p - d * (k - 1)
            cols = ops.unfold(x, k, d, p, 1).reshape(n, c * k * k, ho, wo)
            return ops.conv2d(cols, w.reshape(self.out_channels, c * k * k, 1, 1))
        return ops.conv2d(x, w, pad_mode="pad", padding=self.padding, dilation=self.dilation)

    def extend_repr(self) -> str:
        return super().extend_repr() + f", dilation={self.dilation}"


class PreActBottleneck(nn.Cell):
    """BiT's unit: p = relu(gn1(x)); shortcut = proj(p) or x; 1x1 -> 3x3 (stride here) -> 1x1; y + shortcut.

    The projection reads the pre-activation p, not x, and there is no ReLU after the add.
    `dilation` > 1 (output_stride 16 / 8) dilates the 3x3 instead of striding.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, conv_impl: str, dilation: int = 1) -> None:
        super().__init__()
        mid = out_channels // 4
        self.norm1 = GroupNormAct(in_channels, conv_impl=conv_impl)
        self.has_proj = stride != 1 or in_channels != out_channels
        if self.has_proj:
            self.downsample = StdConv2d(in_channels, out_channels, 1, stride=stride, conv_impl=conv_impl)
        self.conv1 = StdConv2d(in_channels, mid, 1, conv_impl=conv_impl)
        self.norm2 = GroupNormAct(mid, conv_impl=conv_impl)
        if dilation > 1:
            self.conv2 = DilatedStdConv2d(mid, mid, 3, dilation=dilation, conv_impl=conv_impl)
        else:
            # Padding 1 on every side with the stride on the 3x3 (not TF SAME, not on the 1x1).
            self.conv2 = StdConv2d(mid, mid, 3, stride=stride, padding=1, conv_impl=conv_impl)
        self.norm3 = GroupNormAct(mid, conv_impl=conv_impl)
        self.conv3 = StdConv2d(mid, out_channels, 1, conv_impl=conv_impl)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        p = self.norm1(x)
        shortcut = x
        if self.has_proj:
            shortcut = self.downsample(p)
        y = self.conv1(p)
        y = self.conv2(self.norm2(y))
        y = self.conv3(self.norm3(y))
        return y + shortcut


class ResNetStage(nn.Cell):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depth: int,
        *,
        stride: int,
        conv_impl: str,
        first_dilation: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        blocks = [
            PreActBottleneck(
                in_channels if i == 0 else out_channels,
                out_channels,
                stride=stride if i == 0 else 1,
                conv_impl=conv_impl,
                dilation=first_dilation if i == 0 else dilation,
            )
            for i in range(depth)
        ]
        self.blocks = nn.SequentialCell(blocks)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.blocks(x)


class Stem(nn.Cell):
    """7x7/2 conv (pad 3) -> zero pad 1 -> 3x3/2 max pool without padding; no norm, no ReLU.

    The explicit zero pad matters: a max pool with its own padding pads -inf, and the stem
    output (no ReLU yet) can be negative, so the border values would differ.
    """

    def __init__(self, in_channels: int, out_channels: int, *, conv_impl: str) -> None:
        super().__init__()
        self.conv = StdConv2d(in_channels, out_channels, 7, stride=2, padding=3, conv_impl=conv_impl)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.pool_conv_output(self.conv(x))

    def pool_conv_output(self, x: ms.Tensor) -> ms.Tensor:
        """The stem after its conv: backbone feature 0 is the conv output, before this pool."""
        x = zero_pad2d(x, 1)  # not ops.pad: its CPU kernel is ~8x slower (see layers.zero_pad2d)
        return self.pool(x)


class ClassifierHead(nn.Cell):
    """Global average pool -> (dropout) -> linear. Equal to upstream's 1x1 conv head on the pooled map."""

    def __init__(self, num_features: int, num_classes: int, *, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.dropout = nn.Dropout(p=drop_rate) if drop_rate > 0 else nn.Identity()
        if num_classes > 0:
            # BiT's zero head: fine-tuning starts from a classifier that outputs all zeros.
            self.fc = nn.Dense(num_features, num_classes, weight_init="zeros", bias_init="zeros")
        else:
            self.fc = nn.Identity()

    def construct(self, x: ms.Tensor, pre_logits: bool = False) -> ms.Tensor:
        x = x.mean(axis=(2, 3))
        if pre_logits:
            return x
        return self.fc(self.dropout(x))


# ----------------------------------------------------------------------------------------------
# Model

EAGER_JIT_ENV = "BIT_ZOO_EAGER_JIT"  # "0" turns the compiled eager inference off for every model


class ResNetV2(nn.Cell):
    """Pre-activation ResNet-v2 with weight-standardized convs and GroupNorm, as released with BiT.

    Args:
        layers: units per stage, e.g. (3, 4, 6, 3) for R50.
        width_factor: the W of RxxxW; stage widths are 256W, 512W, 1024W, 2048W.
        num_classes: classifier outputs; 0 drops the classifier (forward returns pooled features).
        in_channels: input channels.
        conv_impl: "auto" (unfold on CPU, native elsewhere), "native" or "unfold"; see layers.py.
        recompute: recompute each unit's activations in the backward pass to save memory.
        drop_rate: dropout before the classifier (BiT uses none; offered as timm and mindcv do).
        output_stride: 32 (BiT), or 16 / 8: the last stages dilate their 3x3 convs instead of
            striding, as segmentation backbones do (timm's rule, see features.py).
        features_only: build a backbone: no final norm, no head; forward returns the list of
            maps at `out_indices` (0 = stem conv, reduction 2; 1-4 = stages), timm's convention.
        out_indices: which maps a features_only model returns (negative counts from the end).
        eager_jit: in PyNative mode, an inference call (set_train(False)) runs a forward compiled
            with mindspore.jit, once per input shape (graph-mode speed); training calls and graph
            mode are unaffected. $BIT_ZOO_EAGER_JIT=0 turns it off everywhere. A construct the
            compiler cannot parse falls back to eager; code changed after the first call (a
            monkeypatched cell) is not seen by the compiled forward: set eager_jit=False first.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        width_factor: int = 1,
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        conv_impl: str = "auto",
        recompute: bool = False,
        drop_rate: float = 0.0,
        output_stride: int = 32,
        features_only: bool = False,
        out_indices: tuple[int, ...] = (0, 1, 2, 3, 4),
        eager_jit: bool = True,
    ) -> None:
        super().__init__()
        conv_impl = resolve_conv_impl(conv_impl)
        wf = width_factor
        self.layers = tuple(layers)
        self.width_factor = wf
        self.in_channels = in_channels
        self.conv_impl = conv_impl
        self.output_stride = output_stride
        self.features_only = features_only
        self.stem = Stem(in_channels, 64 * wf, conv_impl=conv_impl)
        widths = [256 * wf, 512 * wf, 1024 * wf, 2048 * wf]
        info = [{"num_chs": 64 * wf, "reduction": 2, "module": "stem.conv", "index": 0}]
        stages = []
        prev, reduction = 64 * wf, 4
        for i, (depth, width, (stride, first_dil, dil)) in enumerate(zip(layers, widths, stage_strides_and_dilations(output_stride))):
            stages.append(ResNetStage(prev, width, depth, stride=stride, conv_impl=conv_impl, first_dilation=first_dil, dilation=dil))
            prev, reduction = width, reduction * stride
            info.append({"num_chs": width, "reduction": reduction, "module": f"stages.{i}", "index": i + 1})
        self.stages = nn.SequentialCell(stages)
        self.num_features = prev
        self.drop_rate = drop_rate
        self.weights: Weights | None = None  # set by the builder to the record the model was made for
        if features_only:
            take, _ = feature_take_indices(NUM_FEATURES, tuple(out_indices))
            self.out_indices = tuple(take)
            self.feature_info = FeatureInfo(info[i] for i in take)
            # Constants for construct (no host logic there): which maps to return, how many stages to run.
            self._take = tuple(i in take for i in range(NUM_FEATURES))
            self._num_run = max(take)
            self.norm = None
            self.head = None
            self.num_classes = 0
        else:
            self.feature_info = FeatureInfo(info)
            self.norm = GroupNormAct(prev, conv_impl=conv_impl)  # pre-head GroupNorm + ReLU
            self.num_classes = num_classes
            self.head = ClassifierHead(prev, num_classes, drop_rate=drop_rate)
        self.eager_jit = eager_jit
        self._jit_forward = None
        self._jit_key = None
        if recompute:
            for stage in self.stages:
                for block in stage.blocks:
                    block.recompute()

    @property
    def pretrained_cfg(self) -> dict:
        """timm-style dict view of the weights record (empty when built without one)."""
        if self.weights is None:
            return {}
        w = self.weights
        return {
            "url": w.url,
            "num_classes": w.num_classes,
            "input_size": w.input_shape,
            "interpolation": w.interpolation,
            "mean": w.mean,
            "std": w.std,
            "crop_pct": w.crop_pct,
            "first_conv": w.first_conv,
            "classifier": w.classifier,
        }

    def forward_features(self, x: ms.Tensor) -> ms.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: ms.Tensor, pre_logits: bool = False) -> ms.Tensor:
        return self.head(x, pre_logits)

    def forward_feature_list(self, x: ms.Tensor) -> list:
        """The maps at out_indices (the forward of a features_only model); runs no stage past the last."""
        outs = []
        x = self.stem.conv(x)
        if self._take[0]:
            outs.append(x)
        x = self.stem.pool_conv_output(x)
        for i in range(self._num_run):
            x = self.stages[i](x)
            if self._take[i + 1]:
                outs.append(x)
        return outs

    def construct(self, x: ms.Tensor):
        if self.features_only:
            return self.forward_feature_list(x)
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: ms.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's forward_intermediates: the maps at `indices` (0 = stem conv, 1-4 = stages).

        indices: None -> all five, an int n -> the last n, a sequence -> those. norm: apply the
        final GroupNorm+ReLU to the stage-4 map when it is taken. stop_early: run no stage past
        the last index taken. Returns the list of maps if intermediates_only, else (final
        features, list): the final features are normalised when the last stage ran.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        if norm and self.norm is None:
            raise ValueError("norm=True needs the final norm, which a features_only model does not build")
        take, max_index = feature_take_indices(NUM_FEATURES, indices)
        intermediates = []
        x = self.stem.conv(x)
        if 0 in take:
            intermediates.append(x)
        x = self.stem.pool_conv_output(x)
        last = len(self.stages)
        feat_idx = 0
        for feat_idx in range(1, (max_index if stop_early else last) + 1):
            x = self.stages[feat_idx - 1](x)
            if feat_idx in take:
                intermediates.append(self.norm(x) if norm and feat_idx == last else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last and self.norm is not None:
            x = self.norm(x)
        return x, intermediates

    def get_classifier(self) -> nn.Cell | None:
        return None if self.head is None else self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a zero-initialised one (0 removes it)."""
        if self.features_only:
            raise ValueError("a features_only model has no classifier; build it with features_only=False")
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate=self.drop_rate)
        self.num_classes = num_classes

    # -- compiled eager inference ---------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        if kwargs or self.training or not self.eager_jit or not _eager_jit_enabled():
            return super().__call__(*args, **kwargs)
        forward = self._compiled_forward()
        try:
            return forward(*args)
        except (RuntimeError, TypeError) as error:
            # A construct the graph compiler cannot parse (a user's monkeypatched cell, a Python hook):
            # keep the model usable, eagerly, and say so once. A bad input raises here, eagerly, as before.
            out = super().__call__(*args, **kwargs)
            _logger.warning("compiled eager inference failed (%s); this model runs eagerly from now on", str(error).splitlines()[0])
            self.eager_jit = False
            return out

    def _compiled_forward(self):
        """mindspore.jit over the forward, rebuilt when a parameter's storage is replaced.

        A compiled graph keeps reading the storage it was built with: in-place updates (optimizers,
        ops.assign) reach it, but Parameter.set_data (load_checkpoint, load_param_into_net) swaps
        the storage, so the storage addresses key the compiled function. ms.jit itself compiles
        once per input shape and dtype.
        """
        key = tuple(p.data_ptr() for p in self.get_parameters())
        if self._jit_forward is None or key != self._jit_key:
            net = self

            def forward(*inputs):
                return net.construct(*inputs)

            self._jit_forward = ms.jit(forward)
            self._jit_key = key
        return self._jit_forward


def _eager_jit_enabled() -> bool:
    """PyNative mode (graph mode compiles anyway) and not turned off by $BIT_ZOO_EAGER_JIT."""
    return ms.get_context("mode") == ms.PYNATIVE_MODE and os.environ.get(EAGER_JIT_ENV, "1") != "0"


# ----------------------------------------------------------------------------------------------
# Weight conversion: pure functions, name -> array in, name -> array out, checked exhaustively.

ARCHS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "r50x1": ((3, 4, 6, 3), 1),
    "r50x3": ((3, 4, 6, 3), 3),
    "r101x1": ((3, 4, 23, 3), 1),
    "r101x3": ((3, 4, 23, 3), 3),
    "r152x2": ((3, 8, 36, 3), 2),
    "r152x4": ((3, 8, 36, 3), 4),
}

# All parameters, head included (BIT_FACTS section 1); tests check every name against the model.
NUM_PARAMS: dict[str, dict[int, int]] = {
    "r50x1": {1000: 25_549_352, 21843: 68_256_659, 10: 23_520_842, 100: 23_705_252},
    "r50x3": {1000: 217_319_080, 21843: 345_399_315, 10: 211_235_530, 100: 211_788_580},
    "r101x1": {1000: 44_541_480, 21843: 87_248_787, 10: 42_512_970, 100: 42_697_380},
    "r101x3": {1000: 387_934_888, 21843: 516_015_123, 10: 381_851_338, 100: 382_404_388},
    "r152x2": {1000: 236_335_208, 21843: 321_728_979, 10: 232_279_178, 100: 232_647_908},
    "r152x4": {1000: 936_533_224, 21843: 1_107_299_923, 10: 928_422_154, 100: 929_159_524},
}

_NPZ_UNIT = {"a": ("norm1", "conv1"), "b": ("norm2", "conv2"), "c": ("norm3", "conv3")}


def _unit_names(layers: tuple[int, ...]):
    """Yield (stage index, unit index, npz prefix, our prefix) for every unit."""
    for s, depth in enumerate(layers):
        for u in range(depth):
            yield s, u, f"resnet/block{s + 1}/unit{u + 1:02d}/", f"stages.{s}.blocks.{u}."


def npz_key_map(layers: tuple[int, ...]) -> dict[str, str]:
    """Upstream .npz key -> bit_zoo parameter name, for every array of the architecture."""
    m = {
        "resnet/root_block/standardized_conv2d/kernel": "stem.conv.weight",
        "resnet/group_norm/gamma": "norm.gamma",
        "resnet/group_norm/beta": "norm.beta",
        "resnet/head/conv2d/kernel": "head.fc.weight",
        "resnet/head/conv2d/bias": "head.fc.bias",
    }
    for _, u, src, dst in _unit_names(layers):
        for part, (norm, conv) in _NPZ_UNIT.items():
            m[f"{src}{part}/group_norm/gamma"] = f"{dst}{norm}.gamma"
            m[f"{src}{part}/group_norm/beta"] = f"{dst}{norm}.beta"
            m[f"{src}{part}/standardized_conv2d/kernel"] = f"{dst}{conv}.weight"
        if u == 0:
            m[f"{src}a/proj/standardized_conv2d/kernel"] = f"{dst}downsample.weight"
    return m


def _check_keys(kind: str, source: Mapping, expected: Mapping) -> None:
    missing = sorted(set(expected) - set(source))
    extra = sorted(set(source) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{kind} does not match this architecture: {len(missing)} missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, {len(extra)} unexpected keys {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''}. Is it the file of another model (e.g. R50 vs R101)?"
        )


def convert_npz(arrays: Mapping[str, np.ndarray], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Upstream BiT .npz arrays (TF names, HWIO kernels) -> bit_zoo parameters (OIHW).

    Every array must be used and every parameter produced; otherwise ValueError names the keys.
    """
    key_map = npz_key_map(layers)
    _check_keys("the .npz", arrays, key_map)
    out = {}
    for src, dst in key_map.items():
        a = np.asarray(arrays[src], dtype=np.float32)
        if dst == "head.fc.weight":  # [1, 1, C, K] -> [K, C]
            a = a.reshape(a.shape[-2], a.shape[-1]).T
        elif a.ndim == 4:  # HWIO -> OIHW
            a = a.transpose(3, 2, 0, 1)
        out[dst] = np.ascontiguousarray(a)
    return out


def to_npz(params: Mapping[str, np.ndarray], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """bit_zoo parameters -> upstream .npz arrays; the inverse of convert_npz."""
    key_map = npz_key_map(layers)
    inverse = {dst: src for src, dst in key_map.items()}
    _check_keys("the parameters", params, inverse)
    out = {}
    for dst, src in inverse.items():
        a = np.asarray(params[dst], dtype=np.float32)
        if dst == "head.fc.weight":
            a = a.T.reshape(1, 1, a.shape[1], a.shape[0])
        elif a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)
        out[src] = np.ascontiguousarray(a)
    return out


_MINDCV_NAME = [
    (re.compile(r"^conv1\.weight$"), "stem.conv.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.gn(\d)\.(gamma|beta)$"), "stages.{s}.blocks.{1}.norm{2}.{3}"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$"), "stages.{s}.blocks.{1}.conv{2}.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.down_sample\.0\.weight$"), "stages.{s}.blocks.{1}.downsample.weight"),
    (re.compile(r"^gn\.(gamma|beta)$"), "norm.{0}"),
    (re.compile(r"^classifier\.(weight|bias)$"), "head.fc.{0}"),
]
# mindcv training checkpoints may also carry optimizer state; it is skipped knowingly.
_MINDCV_SKIP = re.compile(
    r"^(moments|accum|adam_[mv]|global_step|learning_rate|momentum|scale_sense|current_iterator_step|last_overflow_iterator_step|epoch_num|step_num)"
)


def mindcv_name(key: str) -> str | None:
    """mindcv BiT parameter name -> bit_zoo name (None for a name of no mindcv BiT parameter)."""
    for pattern, template in _MINDCV_NAME:
        m = pattern.match(key)
        if m:
            groups = m.groups()
            s = int(groups[0]) - 1 if template.startswith("stages") else None
            return template.format(*groups, s=s)
    return None


def convert_mindcv(params: Mapping[str, np.ndarray], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """mindcv BiT_resnet* checkpoint -> bit_zoo parameters (optimizer state skipped)."""
    out = {}
    unknown = []
    for key, value in params.items():
        if _MINDCV_SKIP.match(key):
            continue
        name = mindcv_name(key)
        if name is None:
            unknown.append(key)
            continue
        a = np.asarray(value, dtype=np.float32)
        if name == "head.fc.weight" and a.ndim == 4:  # 1x1 conv classifier, OIHW -> [K, C]
            a = a.reshape(a.shape[0], a.shape[1])
        out[name] = a
    if unknown:
        raise ValueError(f"the mindcv checkpoint has keys that are not BiT parameters: {sorted(unknown)[:8]}")
    _check_keys("the mindcv checkpoint", out, {v: None for v in npz_key_map(layers).values()})
    return out


# ----------------------------------------------------------------------------------------------
# Builder


def build_bit(
    variant: str,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_channels: int = 3,
    checkpoint_path: str | None = None,
    weights_tag: str | None = None,
    **kwargs,
) -> ResNetV2:
    """Build `variant` ('bit_m_r50x1'), optionally loading its weights.

    num_classes defaults to the weights' classes. With pretrained=True (or a checkpoint_path)
    and a different num_classes, only the head is left out and it stays zero; in_channels other
    than 3 adapts the stem.
    """
    name = variant if weights_tag is None else f"{variant}.{weights_tag}"
    weights = get_weights(name)
    layers, wf = ARCHS[variant.split("_")[-1]]
    if num_classes is None:
        num_classes = weights.num_classes
    # Weights about to be overwritten need no random init (seconds and GBs for R152x4); the
    # loader sets every parameter or raises.
    lazy = no_init_parameters() if (checkpoint_path or pretrained) else contextlib.nullcontext()
    with lazy:
        model = ResNetV2(layers, wf, num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.weights = weights
    if checkpoint_path:
        from .loading import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    elif pretrained:
        from .loading import load_pretrained

        load_pretrained(model, weights)
    return model
    from .loading import load_checkpoint, load_pretrained

    # Weights that are about to be overwritten need no random init (seconds and GBs for R152x4);
    # the loader sets every parameter or raises.
    with no_init_parameters():
        model = ResNetV2(layers, wf, num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.weights = weights
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path)
    else:
        load_pretrained(model, weights)
    return model


# ----------------------------------------------------------------------------------------------
# Table of weights


def _upstream(filename: str, *, classes: int, size: int, dataset: str, description: str, arch: str, top1=None) -> Weights:
    return Weights(
        filename=filename,
        base_url=GOOGLE_BASE_URL,
        file_format="npz",
        num_classes=classes,
        input_size=size,
        num_params=NUM_PARAMS[arch][classes],
        dataset=dataset,
        description=description,
        source="google-research/big_transfer",
        top1=top1,
    )


def _mindcv(filename: str, sha_prefix: str, *, arch: str, top1: float) -> Weights:
    return Weights(
        filename=filename,
        base_url=MINDCV_BASE_URL,
        file_format="mindcv_ckpt",
        num_classes=1000,
        input_size=224,
        num_params=NUM_PARAMS[arch][1000],
        dataset="imagenet-1k",
        description="mindcv, trained from scratch on ImageNet-1k",
        source="mindspore-lab/mindcv",
        top1=top1,
        sha256_prefix=sha_prefix,
        # mindcv's recipe normalises with ImageNet mean/std on [0, 1] pixels, not [-1, 1].
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_pct=0.875,
    )


def _weights_table() -> dict[str, dict[str, Weights]]:
    table: dict[str, dict[str, Weights]] = {}
    for arch in ARCHS:
        A = "R" + arch[1:]  # upstream spells R50x1 with a lower-case x
        ilsvrc_size = 480 if arch == "r152x4" else 448
        table[f"bit_s_{arch}"] = {
            "in1k": _upstream(
                f"BiT-S-{A}.npz", classes=1000, size=224, dataset="imagenet-1k", description="BiT-S: trained on ILSVRC-2012", arch=arch
            ),
        }
        table[f"bit_m_{arch}"] = {
            "in21k": _upstream(
                f"BiT-M-{A}.npz", classes=21843, size=224, dataset="imagenet-21k", description="BiT-M: trained on ImageNet-21k", arch=arch
            ),
            "in21k_ft_in1k": _upstream(
                f"BiT-M-{A}-ILSVRC2012.npz",
                classes=1000,
                size=ilsvrc_size,
                dataset="imagenet-1k",
                description=f"BiT-M fine-tuned on ILSVRC-2012 at {ilsvrc_size} px (resize, no crop)",
                arch=arch,
                top1=84.94 if arch == "r152x4" else None,
            ),
        }
    m50 = table["bit_m_r50x1"]
    m50["in21k_ft_cifar10"] = _upstream(
        "BiT-M-R50x1-CIFAR10.npz", classes=10, size=128, dataset="cifar10", description="BiT-M-R50x1 fine-tuned on CIFAR-10", arch="r50x1"
    )
    m50["distilled_in1k"] = _upstream(
        "distill/R50x1_224.npz",
        classes=1000,
        size=224,
        dataset="imagenet-1k",
        description="R50x1 distilled from the BiT-M-R152x2 teacher",
        arch="r50x1",
        top1=82.8,
    )
    m152 = table["bit_m_r152x2"]
    for size, tag in ((224, "teacher_in21k_ft_in1k"), (384, "teacher_in21k_ft_in1k_384")):
        m152[tag] = _upstream(
            f"distill/R152x2_T_{size}.npz",
            classes=1000,
            size=size,
            dataset="imagenet-1k",
            description=f"BiT-M-R152x2 distillation teacher at {size} px",
            arch="r152x2",
        )
    table["bit_s_r50x1"]["mindcv_in1k"] = _mindcv("BiT_resnet50-1e4795a4.ckpt", "1e4795a4", arch="r50x1", top1=76.81)
    table["bit_s_r50x3"]["mindcv_in1k"] = _mindcv("BiT_resnet50x3-a960f91f.ckpt", "a960f91f", arch="r50x3", top1=80.63)
    table["bit_s_r101x1"]["mindcv_in1k"] = _mindcv("BiT_resnet101-2efa9106.ckpt", "2efa9106", arch="r101x1", top1=77.93)
    return table


WEIGHTS = _weights_table()
DEFAULT_TAGS = {name: next(iter(tags)) for name, tags in WEIGHTS.items()}


# ----------------------------------------------------------------------------------------------
# Registered entry points: two lines each over the one builder.


def _register(fn):
    return register_model(fn, weights=WEIGHTS[fn.__name__], default_tag=DEFAULT_TAGS[fn.__name__])


@_register
def bit_s_r50x1(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_s_r50x1", pretrained=pretrained, **kwargs)


@_register
def bit_s_r50x3(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_s_r50x3", pretrained=pretrained, **kwargs)


@_register
def bit_s_r101x1(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_s_r101x1", pretrained=pretrained, **kwargs)


@_register
def bit_s_r101x3(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_s_r101x3", pretrained=pretrained, **kwargs)


@_register
def bit_s_r152x2(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_s_r152x2", pretrained=pretrained, **kwargs)


@_register
def bit_s_r152x4(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_s_r152x4", pretrained=pretrained, **kwargs)


@_register
def bit_m_r50x1(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_m_r50x1", pretrained=pretrained, **kwargs)


@_register
def bit_m_r50x3(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_m_r50x3", pretrained=pretrained, **kwargs)


@_register
def bit_m_r101x1(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_m_r101x1", pretrained=pretrained, **kwargs)


@_register
def bit_m_r101x3(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_m_r101x3", pretrained=pretrained, **kwargs)


@_register
def bit_m_r152x2(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_m_r152x2", pretrained=pretrained, **kwargs)


@_register
def bit_m_r152x4(pretrained: bool = False, **kwargs) -> ResNetV2:
    return build_bit("bit_m_r152x4", pretrained=pretrained, **kwargs)
