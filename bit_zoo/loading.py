"""Read weights files of every supported format and load them into a model, loudly.

Formats, detected from the file's content (not its extension):
    npz          upstream BiT release: TF names, HWIO kernels
    mindcv_ckpt  mindcv's BiT_resnet* MindSpore checkpoints
    ckpt         bit_zoo's own MindSpore checkpoint (our parameter names; a training
                 checkpoint also holds "ema." weights and "optim."/"state." entries)
    safetensors  bit_zoo's parameters in safetensors

Only the classifier may be left out, and only when the class count differs (it is then zero,
BiT's zero head); a 3-channel stem is adapted to other in_channels. Anything else missing,
extra or of the wrong shape raises an error that names the keys.
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import mindspore as ms
import numpy as np

from .atomic import atomic_path
from .pretrained import Weights, download_weights

__all__ = [
    "detect_format",
    "read_arrays",
    "read_weights_file",
    "load_state",
    "match_state",
    "save_weights",
    "load_checkpoint",
    "load_pretrained",
    "model_state",
    "adapt_input_conv",
]

_logger = logging.getLogger(__name__)

EMA_PREFIX = "ema."
TRAIN_STATE_PREFIXES = ("optim.", "state.", "meta.")  # meta.json: see meta.py


def detect_format(path: str | os.PathLike) -> str:
    """'npz', 'safetensors' or 'ckpt' (MindSpore checkpoint; mindcv's or ours), from the bytes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PK\x03\x04" or zipfile.is_zipfile(path):
        return "npz"
    if len(head) == 8:
        (n,) = struct.unpack("<Q", head)
        if 0 < n < min(path.stat().st_size, 100 << 20):
            with open(path, "rb") as f:
                f.seek(8)
                if f.read(1) == b"{":
                    return "safetensors"
    if len(head) == 0:
        raise ValueError(f"{path} is empty (0 bytes): delete it and download or convert again")
    return "ckpt"


def read_arrays(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """(format, name -> float array) of a weights file; an unreadable file raises with its path."""
    fmt = detect_format(path)
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:
                return fmt, {k: z[k] for k in z.files}
        if fmt == "safetensors":
            from safetensors.numpy import load_file

            return fmt, dict(load_file(str(path)))
        params = ms.load_checkpoint(str(path))
        return fmt, {k: v.asnumpy() for k, v in params.items()}
    except Exception as e:  # noqa: BLE001 - every reader's failure means the same thing to the user
        raise ValueError(f"cannot read {path} as {fmt}: {e}. The file is corrupt or truncated; download or convert it again.") from e


def _is_mindcv(keys) -> bool:
    return "conv1.weight" in keys or any(k.startswith("layer1.") for k in keys)


def read_weights_file(path: str | os.PathLike, layers: tuple[int, ...], *, ema: bool = False) -> dict[str, np.ndarray]:
    """Any supported file -> bit_zoo parameter arrays for the architecture with `layers`."""
    from .resnetv2 import convert_mindcv, convert_npz

    fmt, arrays = read_arrays(path)
    if fmt == "npz":
        return convert_npz(arrays, layers)
    if _is_mindcv(arrays):
        return convert_mindcv(arrays, layers)
    has_ema = any(k.startswith(EMA_PREFIX) for k in arrays)
    if ema and not has_ema:
        raise ValueError(f"{path} holds no EMA weights ('ema.*' keys); load it without ema=True")
    if ema:
        return {k[len(EMA_PREFIX) :]: v for k, v in arrays.items() if k.startswith(EMA_PREFIX)}
    return {k: v for k, v in arrays.items() if not k.startswith((EMA_PREFIX,) + TRAIN_STATE_PREFIXES)}


def adapt_input_conv(weight: np.ndarray, in_channels: int) -> np.ndarray:
    """Adapt a 3-channel stem kernel (OIHW) to in_channels, as timm does.

    1 channel: sum over RGB. Otherwise repeat RGB cyclically and rescale by 3 / in_channels so
    the activation scale is kept.
    """
    c = weight.shape[1]
    if in_channels == c:
        return weight
    if in_channels == 1:
        return weight.sum(axis=1, keepdims=True)
    reps = -(-in_channels // c)
    return np.tile(weight, (1, reps, 1, 1))[:, :in_channels] * (c / in_channels)


def model_state(model: ms.nn.Cell) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in model.get_parameters()}


def match_state(model: ms.nn.Cell, state: Mapping[str, np.ndarray], *, source: str = "weights") -> dict[str, np.ndarray]:
    """Fit converted parameters to model's, or raise naming every key that does not fit.

    Only the classifier may be left out, and only when the class count differs; a stem kernel
    with another channel count is adapted. Needs parameter shapes only, so it also works on a
    model built under mindspore.nn.utils.no_init_parameters().
    """
    shapes = {p.name: tuple(p.shape) for p in model.get_parameters()}
    state = dict(state)
    if getattr(model, "features_only", False):  # a backbone builds no final norm and no classifier
        state = {k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}
    model_classes = getattr(model, "num_classes", None)
    if "head.fc.weight" in state and state["head.fc.weight"].shape[0] != model_classes:
        _logger.info(
            "%s: %d classes, model has %s: classifier left out (zero head)", source, state["head.fc.weight"].shape[0], model_classes
        )
        state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
    stem = "stem.conv.weight"
    if stem in state and stem in shapes and state[stem].shape[1] != shapes[stem][1]:
        state[stem] = adapt_input_conv(state[stem], shapes[stem][1])
    head_left_out = not any(k.startswith("head.fc.") for k in state)
    missing = sorted(k for k in shapes if k not in state and not (head_left_out and k.startswith("head.fc.")))
    unexpected = sorted(k for k in state if k not in shapes)
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {shapes[k]}" for k in state if k in shapes and tuple(state[k].shape) != shapes[k]
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit the model: missing {_head(missing)}; unexpected {_head(unexpected)}; "
            f"shape mismatch {_head(mismatched)}. Check that the file belongs to this architecture."
        )
    return state


def _head(keys: list[str], n: int = 8) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def load_state(model: ms.nn.Cell, state: Mapping[str, np.ndarray], *, source: str = "weights") -> None:
    """Load converted parameters into model; only a differing classifier may be left out."""
    state = match_state(model, state, source=source)
    dtypes = {p.name: p.dtype for p in model.get_parameters()}
    to_load = {k: ms.Parameter(ms.Tensor(np.asarray(v, dtype=np.float32)).astype(dtypes[k]), name=k) for k, v in state.items()}
    head_left_out = not any(k.startswith("head.fc.") for k in state)
    if head_left_out:  # BiT's zero head for a new class count
        for p in model.get_parameters():
            if p.name.startswith("head.fc."):
                p.set_data(ms.Tensor(np.zeros(p.shape, np.float32)).astype(p.dtype))
    not_loaded, _ = ms.load_param_into_net(model, to_load, strict_load=True)
    not_loaded = [k for k in not_loaded if not (head_left_out and k.startswith("head.fc."))]
    if not_loaded:  # load_param_into_net reports instead of raising: look at it
        raise RuntimeError(f"MindSpore did not load {_head(sorted(not_loaded))} from {source}")


def _layers_of(model) -> tuple[int, ...]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} is not a bit_zoo ResNetV2")
    return layers


def load_checkpoint(model: ms.nn.Cell, path: str | os.PathLike, *, ema: bool = False) -> None:
    """Load a local file of any supported format (detected from its bytes) into model."""
    state = read_weights_file(path, _layers_of(model), ema=ema)
    load_state(model, state, source=str(path))


def verify_structure(path: Path, weights: Weights, layers: tuple[int, ...]) -> None:
    """Raise unless `path` converts to a complete parameter set with the record's class count."""
    state = read_weights_file(path, layers)
    classes = state["head.fc.bias"].shape[0]
    if classes != weights.num_classes:
        raise ValueError(f"{path.name}: head has {classes} classes, the weights record says {weights.num_classes}")


def fetch_pretrained(weights: Weights, layers: tuple[int, ...]) -> Path:
    """The cached file of `weights`, downloaded first if needed and checked against the architecture."""
    return download_weights(weights, verify=lambda p: verify_structure(p, weights, layers))


def load_pretrained(model: ms.nn.Cell, weights: Weights | None = None) -> None:
    """Download (or take from the cache), verify and load the model's weights record."""
    weights = weights or getattr(model, "weights", None)
    if weights is None:
        raise ValueError("pretrained=True but the model has no weights record; pass checkpoint_path= instead")
    load_checkpoint(model, fetch_pretrained(weights, _layers_of(model)))


def save_weights(params: Mapping[str, np.ndarray], path: str | os.PathLike, *, fmt: str | None = None) -> Path:
    """Write parameters as .ckpt or .safetensors (by fmt or suffix), atomically."""
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".")
    if fmt not in ("ckpt", "safetensors"):
        raise ValueError(f"unsupported output format {fmt!r} for {path}: use a .ckpt or .safetensors name")
    # save_checkpoint appends .ckpt to names that lack it: the temporary name keeps the format's suffix
    with atomic_path(path, suffix=f".{fmt}") as tmp:
        if fmt == "safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}, str(tmp), metadata={"format": "bit_zoo"})
        else:
            ms.save_checkpoint([{"name": k, "data": ms.Tensor(np.asarray(v, dtype=np.float32))} for k, v in params.items()], str(tmp))
    return path
