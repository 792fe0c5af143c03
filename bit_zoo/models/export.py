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
import tempfile
from collections.abc import Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ..utils.atomic import atomic_path, file_mode

__all__ = ["ExportResNetV2", "export_model", "external_data_path"]

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
    if fmt == "ONNX":
        _export_onnx(net, x, output)
    else:
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


def _export_onnx(net: nn.Cell, x: ms.Tensor, output: Path) -> None:
    """Export through MindSpore's exporter in a private directory, then move the result beside `output`.

    A protobuf message cannot exceed 2 GiB, so for bigger networks (bit_m_r152x4: 3.7 GB; here from 1.5 GiB
    of weights, see EXTERNAL_DATA_KIB) MindSpore writes each parameter to a file of its own, named after the parameter, in the .onnx's directory:
    hundreds of files that a second export into the same directory would overwrite. Here they are
    written into a temporary directory and gathered into one `<name>.onnx.data` (the layout onnx's
    own `save_as_external_data` writes), tensor by tensor, so no more than one tensor is in memory.
    """
    onnx = _import_onnx()
    from mindspore import onnx as ms_onnx  # ms.export(file_format="ONNX") is deprecated in 2.10

    output.parent.mkdir(parents=True, exist_ok=True)
    data_out = external_data_path(output)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.export-", dir=output.parent) as work:
        work = Path(work)
        axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}
        with _external_data_over(EXTERNAL_DATA_KIB):
            ms_onnx.export(net, x, file_name=str(work / "exported.onnx"), input_names=["image"], output_names=["logits"], dynamic_axes=axes)
        model = onnx.load(str(work / "exported.onnx"), load_external_data=False)
        _name_output_batch(model)
        data_bytes = _gather_external_data(model, work, work / data_out.name)
        staged = work / output.name
        onnx.save(model, str(staged))
        onnx.checker.check_model(str(staged))  # by path: the checker then reads external data beside it
        mode = file_mode()
        if data_bytes:
            os.chmod(work / data_out.name, mode)
            os.replace(work / data_out.name, data_out)
        elif data_out.exists():  # a previous, bigger export's weights: no longer what output.onnx refers to
            data_out.unlink()
            _logger.info("removed %s, the external weights of a previous export to %s", data_out, output)
        os.chmod(staged, mode)
        os.replace(staged, output)
    if data_bytes:
        _logger.warning(
            "%s: the weights (%.2f GB) are too big for one ONNX file (protobuf's limit is 2 GiB; bit_zoo moves weights "
            "over 1.5 GiB out), so they were written to a second file, %s; keep the two files together in one directory "
            "(onnxruntime and onnx.load find the weights by that name)",
            output,
            data_bytes / 1e9,
            data_out.name,
        )


# Weights over 1.5 GiB go to the .onnx.data file. Protobuf's hard limit is 2 GiB for the whole
# message, and MindSpore switches at exactly 2 GiB of weights: bit_m_r101x3 with its 21,843-class
# head (1.92 GiB) would be written as one 2.06 GB message, a few percent under the limit, which
# onnx.load and onnx.checker handle only up to the limit; the margin keeps such files well clear.
EXTERNAL_DATA_KIB = 3 * 1024 * 1024 // 2


@contextmanager
def _external_data_over(kib: int):
    """Lower MindSpore's switch to external data (onnx_export.PROTO_LIMIT_SIZE, in KiB) for one export;
    a lower value already set (a test forcing the path) is kept."""
    from mindspore.onnx import onnx_export

    old = onnx_export.PROTO_LIMIT_SIZE
    onnx_export.PROTO_LIMIT_SIZE = min(old, kib)
    try:
        yield
    finally:
        onnx_export.PROTO_LIMIT_SIZE = old


_ALIGN = 4096  # tensor offsets in the data file on page boundaries, as onnx's own writer does, so readers may mmap them


def _gather_external_data(model, src_dir: Path, data_path: Path) -> int:
    """Copy every externally stored initializer of `model` into one file `data_path`; point the
    initializers at it (relative location, offset, length). Return the bytes written (0: all inline)."""
    from onnx.external_data_helper import uses_external_data

    offset = 0
    with ExitStack() as stack:
        out = None
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor):
                continue
            info = {e.key: e.value for e in tensor.external_data}
            if out is None:
                out = stack.enter_context(open(data_path, "wb"))
            src = src_dir / info["location"]
            start, length = int(info.get("offset", 0)), info.get("length")
            length = int(length) if length is not None else src.stat().st_size - start
            pad = -offset % _ALIGN
            out.write(b"\0" * pad)
            offset += pad
            with open(src, "rb") as f:
                f.seek(start)
                copied = _copy_exact(f, out, length)
            if copied != length:
                raise RuntimeError(f"ONNX export: {src.name} holds {copied} bytes of {tensor.name}, expected {length}")
            del tensor.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += length
            src.unlink()  # the copy is made: do not hold the weights twice on disk
    return offset


def _copy_exact(src, dst, length: int, chunk: int = 64 << 20) -> int:
    copied = 0
    while copied < length:
        buf = src.read(min(chunk, length - copied))
        if not buf:
            break
        dst.write(buf)
        copied += len(buf)
    return copied


def _name_output_batch(model) -> None:
    """Declare the output's batch axis symbolic: MindSpore 2.10 applies dynamic_axes to inputs only,
    and onnxruntime then warns on every batch size but the example's."""
    dim = model.graph.output[0].type.tensor_type.shape.dim[0]
    if dim.dim_param != "batch":
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
