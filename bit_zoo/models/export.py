"""Inference-only forms of the BiT ResNet-v2 for export: an ONNX graph written directly, and a MINDIR cell.

Why not the training network: its operators do not all export (MindSpore 2.10's exporters have no
GroupNorm, PadV3, Im2Col or Ones, and its reshapes name the batch size). Both forms here standardise
every conv weight once, in float64 on the host, and store the result as the conv's constant weight:
the same numbers the training form computes every call.

* ONNX (`onnx_model`): written node by node with onnx's helpers, in the form onnxruntime's CPU
  provider runs fastest once its NCHWc (blocked layout) transformer has rewritten it: GroupNorm as
  Reshape + InstanceNormalization + Reshape, its affine a depthwise 1x1 Conv that the transformer
  fuses with the ReLU after it, the stem's zero pad a depthwise identity conv (both stay in the
  blocked layout); the head a global average pool and a Gemm.
  ONNX's own GroupNormalization (opset 18 and 21) measured 1.4-1.8x slower in onnxruntime 1.32
  (docs/speed.md, with the A/B against timm's export: `python -m benchmarks.onnx_ab`).
* MINDIR (`ExportResNetV2`, through MindSpore's exporter): GroupNorm from reductions and reshapes
  that never name the batch or the spatial size (per-channel means over H, W, then per-group means
  of those, twice: mean, then variance of the centred input) and a per-channel affine; the stem's
  zero pad a 1x1 identity convolution with padding 1 (a conv pads with zeros, as BiT's stem needs;
  a max pool would pad -inf).

So an exported graph takes any batch size and any input resolution (multiple of 32 or not).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ..utils.atomic import atomic_path, file_mode

__all__ = ["ExportResNetV2", "export_model", "external_data_path", "onnx_model"]

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
    img_size: int | None = None,
    in_channels: int = 3,
    batch_size: int = 1,
) -> Path:
    """Export to .onnx or .mindir with dynamic batch, height and width axes.

    Neither graph depends on an example input: img_size and batch_size are accepted for the callers
    that still pass them and change nothing.
    """
    output = Path(output)
    fmt = {".onnx": "ONNX", ".mindir": "MINDIR"}.get(output.suffix)
    if fmt is None:
        raise ValueError(f"export output {output} must end in .onnx or .mindir")
    if fmt == "ONNX":
        _export_onnx(params, layers, output, in_channels=in_channels)
    else:
        net = ExportResNetV2(params, layers)
        x = ms.Tensor(shape=[None, in_channels, None, None], dtype=ms.float32)  # dynamic batch, height and width
        with atomic_path(output, suffix=output.suffix) as tmp:
            ms.export(net, x, file_name=str(tmp.with_suffix("")), file_format=fmt)  # export appends .mindir
    _logger.info("exported %s (units %s, dynamic batch, height and width) to %s", fmt, ",".join(map(str, layers)), output)
    return output


def _import_onnx():
    try:
        import onnx
    except ImportError as e:
        raise RuntimeError("ONNX export needs the onnx package: pip install 'bit_zoo[onnx]' (onnx, onnxruntime)") from e
    return onnx


def external_data_path(output: str | os.PathLike) -> Path:
    """Where the weights of an ONNX file over protobuf's 2 GB limit go: `<name>.onnx.data` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".data")


ONNX_OPSET = 17  # InstanceNormalization (opset 6) and everything else here; what torch.onnx writes for timm's model


class _OnnxGraph:
    """Nodes and initializers of the lean ONNX graph, with unique names."""

    def __init__(self, onnx) -> None:
        self.onnx, self.nodes, self.inits, self._n, self._shapes = onnx, [], [], 0, set()

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def shape_const(self, name: str, value: list[int]) -> str:
        """A shape operand as a Constant node: kept inline when the weights go to external data (shape inference reads it)."""
        tensor = self.onnx.numpy_helper.from_array(np.array(value, np.int64), name)
        self.nodes.append(self.onnx.helper.make_node("Constant", [], [name], name=name, value=tensor))
        self._shapes.add(name)
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        self._n += 1
        out = f"{op.lower()}_{self._n}"
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(
        self, x: str, name: str, weight: np.ndarray, *, stride: int = 1, padding: int = 0, bias: str | None = None, group: int = 1
    ) -> str:
        k = weight.shape[-1]
        inputs = [x, self.const(name, weight)] + ([bias] if bias else [])
        return self.node("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[padding] * 4, group=group)

    def group_norm_relu(self, x: str, prefix: str, gamma: np.ndarray, beta: np.ndarray, *, groups: int = 32, eps: float = 1e-5) -> str:
        """GroupNorm + ReLU as onnxruntime runs it fastest: InstanceNormalization over (N, G, C/G*H*W), then the
        per-channel affine as a depthwise 1x1 Conv (weight gamma, bias beta: an exact scale and shift), then Relu.

        onnxruntime's NCHWc transformer (its default ORT_ENABLE_ALL on x86) rewrites that Conv into its
        blocked layout and fuses the Relu into it, and the next conv reads its output without a layout
        change: one pass where a BatchNormalization (or timm's Mul + Add) and a Relu are two in NCHW.
        """
        c = gamma.shape[0]
        shape = self.node("Shape", [x])
        grouped = self.node("Reshape", [x, self._grouped_shape(groups)])
        normed = self.node("InstanceNormalization", [grouped, self._ones(groups), self._zeros(groups)], epsilon=eps)
        y = self.node("Reshape", [normed, shape])
        beta = self.const(prefix + "beta", np.asarray(beta, np.float32))
        y = self.conv(y, prefix + "gamma", np.asarray(gamma, np.float32).reshape(c, 1, 1, 1), bias=beta, group=c)
        return self.node("Relu", [y])

    def _grouped_shape(self, groups: int) -> str:
        name = f"grouped_shape_{groups}"
        return name if name in self._shapes else self.shape_const(name, [0, groups, -1])

    def _ones(self, n: int) -> str:
        name = f"ones_{n}"
        return name if any(t.name == name for t in self.inits) else self.const(name, np.ones(n, np.float32))

    def _zeros(self, n: int) -> str:
        name = f"zeros_{n}"
        return name if any(t.name == name for t in self.inits) else self.const(name, np.zeros(n, np.float32))


def onnx_model(params: Mapping[str, np.ndarray], layers: tuple[int, ...], *, in_channels: int = 3, eps: float = 1e-10):
    """The inference network as an ONNX ModelProto, written directly from the parameters (no exporter in between).

    What onnxruntime needs to run it faster than a framework's export of the same network: every weight
    standardised once here (float64) and stored as the conv's constant weight; GroupNorm in the form
    onnxruntime has fast kernels for, its affine and ReLU one blocked-layout conv (_OnnxGraph.group_norm_relu);
    the stem's zero pad a depthwise identity conv with padding 1 (exact: x * 1.0, zeros at the border),
    which stays in the blocked layout where a Pad needs a layout change either side. Batch, height and
    width are symbolic.

    The residual Adds are left as onnxruntime finds them: it runs each as one parallel pass in the
    blocked layout. Declaring their shapes (value_info) lets it fuse them into the conv before instead,
    but that conv then first copies the shortcut into its output buffer, on one thread (onnxruntime
    1.32 gave them separate buffers): measured 1-3 % slower at 2 threads, no faster at 1 (docs/speed.md).
    """
    onnx = _import_onnx()
    helper = onnx.helper
    g = _OnnxGraph(onnx)
    stem = standardize(params["stem.conv.weight"], eps)
    c = stem.shape[0]
    x = g.conv("image", "stem.conv.weight", stem, stride=2, padding=3)
    x = g.conv(x, "stem.pad.weight", np.ones((c, 1, 1, 1), np.float32), padding=1, group=c)  # BiT pads with zeros, then pools
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2])
    for s, depth in enumerate(layers):
        for u in range(depth):
            pre = f"stages.{s}.blocks.{u}."
            stride = (1 if s == 0 else 2) if u == 0 else 1
            p = g.group_norm_relu(x, pre + "norm1.", params[pre + "norm1.gamma"], params[pre + "norm1.beta"])
            if pre + "downsample.weight" in params:
                shortcut = g.conv(p, pre + "downsample.weight", standardize(params[pre + "downsample.weight"], eps), stride=stride)
            else:
                shortcut = x
            y = g.conv(p, pre + "conv1.weight", standardize(params[pre + "conv1.weight"], eps))
            y = g.group_norm_relu(y, pre + "norm2.", params[pre + "norm2.gamma"], params[pre + "norm2.beta"])
            y = g.conv(y, pre + "conv2.weight", standardize(params[pre + "conv2.weight"], eps), stride=stride, padding=1)
            y = g.group_norm_relu(y, pre + "norm3.", params[pre + "norm3.gamma"], params[pre + "norm3.beta"])
            y = g.conv(y, pre + "conv3.weight", standardize(params[pre + "conv3.weight"], eps))
            x = g.node("Add", [y, shortcut])
    x = g.group_norm_relu(x, "norm.", params["norm.gamma"], params["norm.beta"])
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    if "head.fc.weight" in params:
        w = g.const("head.fc.weight", np.asarray(params["head.fc.weight"], np.float32))
        b = g.const("head.fc.bias", np.asarray(params["head.fc.bias"], np.float32))
        x = g.node("Gemm", [x, w, b], transB=1)
        out_dim = int(params["head.fc.weight"].shape[0])
    else:
        out_dim = int(params["norm.gamma"].shape[0])
    g.nodes[-1].output[0] = "logits"
    float_ = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes,
        "bit_zoo_resnetv2",
        [helper.make_tensor_value_info("image", float_, ["batch", in_channels, "height", "width"])],
        [helper.make_tensor_value_info("logits", float_, ["batch", out_dim])],
        g.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="bit_zoo")


def _export_onnx(params: Mapping[str, np.ndarray], layers: tuple[int, ...], output: Path, *, in_channels: int) -> None:
    """Write the lean ONNX graph; weights over EXTERNAL_DATA_KIB go to one `<name>.onnx.data` beside it.

    A protobuf message cannot exceed 2 GiB (bit_m_r152x4: 3.7 GB), so the weights of a big network are
    stored outside it, in onnx's own external-data layout (one file, offsets on page boundaries). Both
    files are written in a private directory and renamed into place, the .onnx last.
    """
    onnx = _import_onnx()
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx_model(params, layers, in_channels=in_channels)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_KIB * 1024
    output.parent.mkdir(parents=True, exist_ok=True)
    data_out = external_data_path(output)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.export-", dir=output.parent) as work:
        work = Path(work)
        staged = work / output.name
        if external:
            convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data_out.name, size_threshold=0)
        onnx.save(model, str(staged))
        del model
        onnx.checker.check_model(str(staged))  # by path: the checker then reads external data beside it
        mode = file_mode()
        if external:
            os.chmod(work / data_out.name, mode)
            os.replace(work / data_out.name, data_out)
        elif data_out.exists():  # a previous, bigger export's weights: no longer what output.onnx refers to
            data_out.unlink()
            _logger.info("removed %s, the external weights of a previous export to %s", data_out, output)
        os.chmod(staged, mode)
        os.replace(staged, output)
    if external:
        _logger.warning(
            "%s: the weights (%.2f GB) are too big for one ONNX file (protobuf's limit is 2 GiB; bit_zoo moves weights "
            "over 1.5 GiB out), so they were written to a second file, %s; keep the two files together in one directory "
            "(onnxruntime and onnx.load find the weights by that name)",
            output,
            weight_bytes / 1e9,
            data_out.name,
        )


# Weights over 1.5 GiB go to the .onnx.data file. Protobuf's hard limit is 2 GiB for the whole
# message: bit_m_r101x3 with its 21,843-class head (1.92 GiB) would be one 2.06 GB message, a few
# percent under the limit, which onnx.load and onnx.checker handle only up to the limit; the
# margin keeps such files well clear.
EXTERNAL_DATA_KIB = 3 * 1024 * 1024 // 2
