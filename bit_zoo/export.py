"""An export-only form of the BiT ResNet-v2, built from operators MindSpore's ONNX and MINDIR exporters take.

Why a second form: the training network's operators do not all export. MindSpore 2.10's ONNX
exporter has no GroupNorm, no PadV3 (ops.pad), no Im2Col (the CPU unfold path) and no Ones
(ops.ones in the fused normalisation), and the network's reshapes name the batch size, which
pins an exported graph to one batch. Here, for inference only:

* every weight standardisation is done once, in float64 on the host, and the result is the conv's
  constant weight (a native nn.Conv2d, no bias): the same numbers the training form computes;
* GroupNorm is built from reductions and reshapes that never name the batch or the spatial size:
  per-channel means over H, W, then per-group means of those (equal group sizes make that the
  group mean), twice (mean, then variance of the centred input), and a per-channel affine;
* the stem's zero pad is a 1x1 identity convolution with padding 1 (a conv pads with zeros, as
  BiT's stem needs; a max pool would pad -inf);
* the head is a global mean and a dense layer.

So an exported graph takes any batch size and any input resolution (multiple of 32 or not).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from .atomic import atomic_path

__all__ = ["ExportResNetV2", "export_model"]

_logger = logging.getLogger(__name__)


def standardize(w: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """BiT's weight standardisation (per output channel, biased variance), in float64."""
    w = np.asarray(w, np.float64)
    mean = w.mean(axis=(1, 2, 3), keepdims=True)
    var = ((w - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True)
    return ((w - mean) / np.sqrt(var + eps)).astype(np.float32)


def _conv(weight: np.ndarray, *, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    o, i, k, _ = weight.shape
    conv = nn.Conv2d(i, o, k, stride=stride, pad_mode="pad" if padding else "valid", padding=padding, has_bias=False)
    conv.weight.set_data(ms.Tensor(weight))
    return conv


class _GroupNormReLU(nn.Cell):
    """GroupNorm(32, eps) + ReLU from reductions, with reshapes free of batch and spatial sizes."""

    def __init__(self, gamma: np.ndarray, beta: np.ndarray, *, groups: int = 32, eps: float = 1e-5, act: bool = True) -> None:
        super().__init__()
        c = gamma.shape[0]
        self.c, self.g, self.eps, self.act = c, groups, eps, act
        self.gamma = ms.Parameter(ms.Tensor(gamma.reshape(1, c, 1, 1).astype(np.float32)), name="gamma", requires_grad=False)
        self.beta = ms.Parameter(ms.Tensor(beta.reshape(1, c, 1, 1).astype(np.float32)), name="beta", requires_grad=False)

    def _group_mean(self, per_channel: ms.Tensor) -> ms.Tensor:
        # (N, C, 1, 1) channel means -> each channel gets its group's mean, still (N, C, 1, 1)
        grouped = per_channel.reshape(-1, self.g, self.c // self.g)
        mean = grouped.mean(axis=2, keep_dims=True)
        return (grouped * 0.0 + mean).reshape(-1, self.c, 1, 1)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        mean = self._group_mean(x.mean(axis=(2, 3), keep_dims=True))
        d = x - mean
        var = self._group_mean((d * d).mean(axis=(2, 3), keep_dims=True))
        y = d / ops.sqrt(var + self.eps) * self.gamma + self.beta
        return ops.relu(y) if self.act else y


class _Unit(nn.Cell):
    def __init__(self, p: Mapping[str, np.ndarray], prefix: str, *, stride: int, has_proj: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = _GroupNormReLU(p[prefix + "norm1.gamma"], p[prefix + "norm1.beta"])
        self.has_proj = has_proj
        if has_proj:
            self.downsample = _conv(standardize(p[prefix + "downsample.weight"], eps), stride=stride)
        self.conv1 = _conv(standardize(p[prefix + "conv1.weight"], eps))
        self.norm2 = _GroupNormReLU(p[prefix + "norm2.gamma"], p[prefix + "norm2.beta"])
        self.conv2 = _conv(standardize(p[prefix + "conv2.weight"], eps), stride=stride, padding=1)
        self.norm3 = _GroupNormReLU(p[prefix + "norm3.gamma"], p[prefix + "norm3.beta"])
        self.conv3 = _conv(standardize(p[prefix + "conv3.weight"], eps))

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        p = self.norm1(x)
        shortcut = self.downsample(p) if self.has_proj else x
        y = self.conv1(p)
        y = self.conv2(self.norm2(y))
        y = self.conv3(self.norm3(y))
        return y + shortcut


class ExportResNetV2(nn.Cell):
    """Inference-only BiT ResNet-v2 from a complete parameter mapping (bit_zoo names)."""

    def __init__(self, params: Mapping[str, np.ndarray], layers: tuple[int, ...], *, eps: float = 1e-10) -> None:
        super().__init__()
        stem = np.asarray(params["stem.conv.weight"])
        self.stem_conv = _conv(standardize(stem, eps), stride=2, padding=3)
        c = stem.shape[0]
        self.stem_pad = _conv(np.eye(c, dtype=np.float32).reshape(c, c, 1, 1), padding=1)  # zero pad 1, exactly
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")
        units = []
        for s, depth in enumerate(layers):
            for u in range(depth):
                prefix = f"stages.{s}.blocks.{u}."
                units.append(
                    _Unit(
                        params,
                        prefix,
                        stride=(1 if s == 0 else 2) if u == 0 else 1,
                        has_proj=prefix + "downsample.weight" in params,
                        eps=eps,
                    )
                )
        self.units = nn.SequentialCell(units)
        self.norm = _GroupNormReLU(params["norm.gamma"], params["norm.beta"])
        self.has_head = "head.fc.weight" in params
        if self.has_head:
            w = np.asarray(params["head.fc.weight"], np.float32)
            self.fc = nn.Dense(w.shape[1], w.shape[0])
            self.fc.weight.set_data(ms.Tensor(w))
            self.fc.bias.set_data(ms.Tensor(np.asarray(params["head.fc.bias"], np.float32)))
        self.set_train(False)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        x = self.pool(self.stem_pad(self.stem_conv(x)))
        x = self.norm(self.units(x))
        x = x.mean(axis=(2, 3))
        return self.fc(x) if self.has_head else x


def export_model(
    params: Mapping[str, np.ndarray],
    layers: tuple[int, ...],
    output: str | os.PathLike,
    *,
    img_size: int,
    in_channels: int = 3,
    batch_size: int = 1,
) -> Path:
    """Export to .onnx or .mindir with dynamic batch, height and width axes (img_size: ONNX's example input)."""
    output = Path(output)
    fmt = {".onnx": "ONNX", ".mindir": "MINDIR"}.get(output.suffix)
    if fmt is None:
        raise ValueError(f"export output {output} must end in .onnx or .mindir")
    net = ExportResNetV2(params, layers)
    if fmt == "MINDIR":
        x = ms.Tensor(shape=[None, in_channels, None, None], dtype=ms.float32)  # dynamic batch, height and width
    else:
        x = ms.Tensor(np.zeros((batch_size, in_channels, img_size, img_size), np.float32))
    with atomic_path(output, suffix=output.suffix) as tmp:
        if fmt == "ONNX":
            from mindspore import onnx as ms_onnx  # ms.export(file_format="ONNX") is deprecated in 2.10

            axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
            ms_onnx.export(net, x, file_name=str(tmp), input_names=["image"], output_names=["logits"], dynamic_axes=axes)
            _name_output_batch(tmp)
        else:
            ms.export(net, x, file_name=str(tmp.with_suffix("")), file_format=fmt)  # export appends .mindir
    _logger.info("exported %s (units %s, dynamic batch, height and width) to %s", fmt, ",".join(map(str, layers)), output)
    return output


def _name_output_batch(path: Path) -> None:
    """Declare the output's batch axis symbolic: MindSpore 2.10 applies dynamic_axes to inputs only,
    and onnxruntime then warns on every batch size but the example's."""
    try:
        import onnx
    except ImportError as e:
        raise RuntimeError("ONNX export needs the onnx package: pip install 'bit_zoo[onnx]' (onnx, onnxruntime)") from e
    model = onnx.load(str(path))
    dim = model.graph.output[0].type.tensor_type.shape.dim[0]
    if dim.dim_param != "batch":
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
