"""BiT ResNet-v2 (arXiv 1912.11370): the network, one parameterized model.

Blocks, then the model class. Weight formats live in formats.py; the builder, the weights
records and the registered names in zoo.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mindspore as ms
from mindspore import nn

from .layers import GroupNormAct, StdConv2d, resolve_conv_impl, zero_pad2d

if TYPE_CHECKING:
    from .pretrained import Weights

__all__ = ["ResNetV2"]


# ----------------------------------------------------------------------------------------------
# Blocks


class PreActBottleneck(nn.Cell):
    """BiT's unit: p = relu(gn1(x)); shortcut = proj(p) or x; 1x1 -> 3x3 (stride here) -> 1x1; y + shortcut.

    The projection reads the pre-activation p, not x, and there is no ReLU after the add.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, conv_impl: str) -> None:
        super().__init__()
        mid = out_channels // 4
        self.norm1 = GroupNormAct(in_channels, conv_impl=conv_impl)
        self.has_proj = stride != 1 or in_channels != out_channels
        if self.has_proj:
            self.downsample = StdConv2d(in_channels, out_channels, 1, stride=stride, conv_impl=conv_impl)
        self.conv1 = StdConv2d(in_channels, mid, 1, conv_impl=conv_impl)
        self.norm2 = GroupNormAct(mid, conv_impl=conv_impl)
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
    def __init__(self, in_channels: int, out_channels: int, depth: int, *, stride: int, conv_impl: str) -> None:
        super().__init__()
        blocks = [
            PreActBottleneck(in_channels if i == 0 else out_channels, out_channels, stride=stride if i == 0 else 1, conv_impl=conv_impl)
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
        x = self.conv(x)
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
    ) -> None:
        super().__init__()
        conv_impl = resolve_conv_impl(conv_impl)
        wf = width_factor
        self.layers = tuple(layers)
        self.width_factor = wf
        self.in_channels = in_channels
        self.conv_impl = conv_impl
        self.stem = Stem(in_channels, 64 * wf, conv_impl=conv_impl)
        widths = [256 * wf, 512 * wf, 1024 * wf, 2048 * wf]
        stages = []
        prev = 64 * wf
        for i, (depth, width) in enumerate(zip(layers, widths)):
            stages.append(ResNetStage(prev, width, depth, stride=1 if i == 0 else 2, conv_impl=conv_impl))
            prev = width
        self.stages = nn.SequentialCell(stages)
        self.norm = GroupNormAct(prev, conv_impl=conv_impl)  # pre-head GroupNorm + ReLU
        self.num_features = prev
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.head = ClassifierHead(prev, num_classes, drop_rate=drop_rate)
        self.weights: Weights | None = None  # set by the builder to the record the model was made for
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

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Cell:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a zero-initialised one (0 removes it)."""
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate=self.drop_rate)
        self.num_classes = num_classes
