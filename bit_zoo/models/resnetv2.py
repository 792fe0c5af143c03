"""BiT ResNet-v2 (arXiv 1912.11370): the network, one parameterized model.

Blocks, then the model class. Weight formats live in formats.py; the builder, the weights
records and the registered names in zoo.py.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import TYPE_CHECKING

import mindspore as ms
from mindspore import nn

from .features import NUM_FEATURES, FeatureInfo, feature_take_indices, stage_strides_and_dilations
from . import cpu_kernels
from .layers import GroupNormAct, StdConv2d, resolve_conv_impl, zero_pad2d

if TYPE_CHECKING:
    from ..weights.pretrained import Weights

_logger = logging.getLogger(__name__)

__all__ = ["ResNetV2"]


# ----------------------------------------------------------------------------------------------
# Blocks


class PreActBottleneck(nn.Cell):
    """BiT's unit: p = relu(gn1(x)); shortcut = proj(p) or x; 1x1 -> 3x3 (stride here) -> 1x1; y + shortcut.

    The projection reads the pre-activation p, not x, and there is no ReLU after the add.
    `dilation` > 1 (output_stride 16 / 8) dilates the 3x3 instead of striding.
    """

    # Graph compilation parses and type-infers one unit per distinct set of __init__ arguments and
    # inlines it everywhere else ("front"): the units of a stage share their arguments, so the
    # graph-mode first step of R50x1 compiles ~2.4 s (~16 %) faster, the same graph once inlined.
    # `graph_key` (one per model) keeps units of different models apart: MindSpore keys reuse by
    # the arguments alone, and two models in one graph (distillation) may differ in AMP flags or
    # recompute that are set after construction.
    @ms.lazy_inline(policy="front")
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int,
        conv_impl: str,
        dilation: int = 1,
        graph_key: str = "",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        mid = out_channels // 4
        kw = {"conv_impl": conv_impl, "channels_last": channels_last}
        self.norm1 = GroupNormAct(in_channels, **kw)
        self.has_proj = stride != 1 or in_channels != out_channels
        if self.has_proj:
            self.downsample = StdConv2d(in_channels, out_channels, 1, stride=stride, **kw)
        self.conv1 = StdConv2d(in_channels, mid, 1, **kw)
        self.norm2 = GroupNormAct(mid, **kw)
        if dilation > 1:
            # timm's padding for a dilated 3x3 (dilation on every side): the map keeps its size
            self.conv2 = StdConv2d(mid, mid, 3, padding=dilation, dilation=dilation, **kw)
        else:
            # Padding 1 on every side with the stride on the 3x3 (not TF SAME, not on the 1x1).
            self.conv2 = StdConv2d(mid, mid, 3, stride=stride, padding=1, **kw)
        self.norm3 = GroupNormAct(mid, **kw)
        self.conv3 = StdConv2d(mid, out_channels, 1, **kw)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        p = self.norm1(x)
        shortcut = x
        if self.has_proj:
            shortcut = self.downsample(p)
        y = self.conv1(p)
        y = self.conv2(self.norm2(y))
        return self.conv3(self.norm3(y), shortcut)  # conv3 + shortcut


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
        graph_key: str = "",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        blocks = [
            PreActBottleneck(
                in_channels if i == 0 else out_channels,
                out_channels,
                stride=stride if i == 0 else 1,
                conv_impl=conv_impl,
                dilation=first_dilation if i == 0 else dilation,
                graph_key=graph_key,
                channels_last=channels_last,
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
    channels_last (the oneDNN path): the image is transposed once, the conv runs channels-last
    and the pad + pool is one kernel (cpu_kernels.stem_pool); the output is then (N, H, W, C).
    """

    def __init__(self, in_channels: int, out_channels: int, *, conv_impl: str, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.conv = StdConv2d(in_channels, out_channels, 7, stride=2, padding=3, conv_impl=conv_impl, channels_last=channels_last)
        if channels_last:
            self._pool = cpu_kernels.stem_pool()
        else:
            self.pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.pool_conv_output(self.conv_forward(x))

    def conv_forward(self, x: ms.Tensor) -> ms.Tensor:
        """The stem conv of the NCHW image (backbone feature 0), in the stem's layout."""
        if self.channels_last:
            x = x.transpose(0, 2, 3, 1)
        return self.conv(x)

    def pool_conv_output(self, x: ms.Tensor) -> ms.Tensor:
        """The stem after its conv: backbone feature 0 is the conv output, before this pool."""
        if self.channels_last:  # the kernel is float32 (an AMP float16 map goes through it cast)
            return self._pool(x.astype(ms.float32)).astype(x.dtype)
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
_MODEL_KEYS = itertools.count()  # a fresh graph_key per model (see PreActBottleneck)


class ResNetV2(nn.Cell):
    """Pre-activation ResNet-v2 with weight-standardized convs and GroupNorm, as released with BiT.

    Args:
        layers: units per stage, e.g. (3, 4, 6, 3) for R50.
        width_factor: the W of RxxxW; stage widths are 256W, 512W, 1024W, 2048W.
        num_classes: classifier outputs; 0 drops the classifier (forward returns pooled features).
        in_channels: input channels.
        conv_impl: "auto" (on CPU "onednn" where bit_zoo's oneDNN operators build, else "unfold";
            "native" elsewhere), "native", "unfold" or "onednn"; see layers.py. On "onednn" the
            stages run channels-last (N, H, W, C): oneDNN's convolutions need no reorders then;
            every map the model returns is NCHW.
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
        # Channels-last on the oneDNN path, from the stem's conv on (the image comes in NCHW).
        self.channels_last = conv_impl == "onednn"
        self.stem = Stem(in_channels, 64 * wf, conv_impl=conv_impl, channels_last=self.channels_last)
        widths = [256 * wf, 512 * wf, 1024 * wf, 2048 * wf]
        info = [{"num_chs": 64 * wf, "reduction": 2, "module": "stem.conv", "index": 0}]
        stages = []
        prev, reduction = 64 * wf, 4
        key = f"model{next(_MODEL_KEYS)}"
        for i, (depth, width, (stride, first_dil, dil)) in enumerate(zip(layers, widths, stage_strides_and_dilations(output_stride))):
            stages.append(
                ResNetStage(
                    prev,
                    width,
                    depth,
                    stride=stride,
                    conv_impl=conv_impl,
                    first_dilation=first_dil,
                    dilation=dil,
                    graph_key=key,
                    channels_last=self.channels_last,
                )
            )
            prev, reduction = width, reduction * stride
            info.append({"num_chs": width, "reduction": reduction, "module": f"stages.{i}", "index": i + 1})
        self.stages = nn.SequentialCell(stages)
        self.num_features = prev
        self.drop_rate = drop_rate
        self.weights: Weights | None = None  # set by the builder to the record the model was made for
        self.origin = None  # set by bit_zoo.create_model: a ModelOrigin (name, source, EMA used, the file's meta.json)
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
            self.norm = GroupNormAct(prev, conv_impl=conv_impl, channels_last=self.channels_last)  # pre-head GroupNorm + ReLU
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

    def _to_nchw(self, x: ms.Tensor) -> ms.Tensor:
        """A map of the stages in NCHW, the layout every output has."""
        return x.transpose(0, 3, 1, 2) if self.channels_last else x

    def forward_features(self, x: ms.Tensor) -> ms.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self._to_nchw(self.norm(x))

    def forward_head(self, x: ms.Tensor, pre_logits: bool = False) -> ms.Tensor:
        return self.head(x, pre_logits)

    def forward_feature_list(self, x: ms.Tensor) -> list:
        """The maps at out_indices (the forward of a features_only model); runs no stage past the last."""
        outs = []
        x = self.stem.conv_forward(x)
        if self._take[0]:
            outs.append(self._to_nchw(x))
        x = self.stem.pool_conv_output(x)
        for i in range(self._num_run):
            x = self.stages[i](x)
            if self._take[i + 1]:
                outs.append(self._to_nchw(x))
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
        x = self.stem.conv_forward(x)
        if 0 in take:
            intermediates.append(self._to_nchw(x))
        x = self.stem.pool_conv_output(x)
        last = len(self.stages)
        feat_idx = 0
        for feat_idx in range(1, (max_index if stop_early else last) + 1):
            x = self.stages[feat_idx - 1](x)
            if feat_idx in take:
                intermediates.append(self._to_nchw(self.norm(x) if norm and feat_idx == last else x))
        if intermediates_only:
            return intermediates
        if feat_idx == last and self.norm is not None:
            x = self.norm(x)
        return self._to_nchw(x), intermediates

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
