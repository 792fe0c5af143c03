"""Read weights files of every supported format and load them into a model, loudly.

Container formats are detected from the file's bytes (not its extension), then the layout from
its names:
    npz          upstream BiT release: TF names, HWIO kernels
    timm         timm's resnetv2_*_bit state_dict (the Hugging Face hub's model.safetensors:
                 PyTorch names, OIHW, 1x1-conv classifier); also as a .ckpt or .npz
    mindcv_ckpt  mindcv's BiT_resnet* MindSpore checkpoints
    ckpt         bit_zoo's own MindSpore checkpoint (our parameter names; a training
                 checkpoint also holds "ema." weights and "optim."/"state."/"meta." entries)
    safetensors  bit_zoo's parameters in safetensors

Loading is lean: arrays are read one at a time from a lazy reader (readers.py), converted and
handed to their parameter without a second copy, largest first, so the peak stays near the size
of the weights (`python -m benchmarks.load_bench` measures it).

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

from ..utils.atomic import atomic_path, save_checkpoint_atomic
from ..errors import FetchError
from .formats import check_keys, converted_shape, is_timm_layout, mindcv_plan, npz_plan, timm_plan
from .hub import HF_ENDPOINT_ENV, SOURCE_ENV, candidates
from .meta import META_KEY, verify_digest
from .pretrained import Weights, download_weights
from .readers import ArrayReader, open_reader

__all__ = [
    "detect_format",
    "detect_layout",
    "read_arrays",
    "read_weights_file",
    "load_state",
    "match_state",
    "save_weights",
    "load_checkpoint",
    "load_lazy_state",
    "load_pretrained",
    "fetch_pretrained",
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


class _LoadedReader(ArrayReader):
    """A whole mapping behind the reader interface (MindSpore's own parser, the fallback for .ckpt)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self._arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arrays[name].shape)


def open_arrays(path: str | os.PathLike) -> tuple[str, ArrayReader]:
    """(container format, lazy reader) of a weights file; an unreadable file raises with its path."""
    fmt = detect_format(path)
    try:
        try:
            return fmt, open_reader(path, fmt)
        except ValueError:
            if fmt != "ckpt":
                raise
            # not the plain protobuf layout (e.g. an encrypted checkpoint): MindSpore's own parser decides
            params = ms.load_checkpoint(str(path))
            return fmt, _LoadedReader({k: v.asnumpy() for k, v in params.items()})
    except Exception as e:  # noqa: BLE001 - every reader's failure means the same thing to the user
        raise ValueError(f"cannot read {path} as {fmt}: {e}. The file is corrupt or truncated; download or convert it again.") from e


def read_arrays(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """(format, name -> array) of a whole weights file; an unreadable file raises with its path."""
    fmt, reader = open_arrays(path)
    with reader:
        try:
            return fmt, {k: reader[k] for k in reader}
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read {path} as {fmt}: {e}. The file is corrupt or truncated; download or convert it again.") from e


def detect_layout(fmt: str, keys) -> str:
    """The naming layout of a file's keys: 'npz' (upstream), 'timm', 'mindcv' or 'bit_zoo'."""
    keys = list(keys)
    if fmt == "npz" and any(k.startswith("resnet/") for k in keys):
        return "npz"
    if is_timm_layout(keys):
        return "timm"
    if _is_mindcv(keys):
        return "mindcv"
    return "bit_zoo"


class _Lazy:
    """One converted array, read from the file only when asked for (np.asarray)."""

    __slots__ = ("_reader", "_src", "_fn", "shape")

    def __init__(self, reader: ArrayReader, src: str, fn) -> None:
        self._reader, self._src, self._fn = reader, src, fn
        self.shape = converted_shape(fn, reader.shape(src))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self._fn(self._reader[self._src])
        return a if dtype is None else a.astype(dtype, copy=False)


def _plan(layout: str, keys, layers: tuple[int, ...], path, *, ema: bool) -> dict:
    """Our name -> (source key, transform) for a file of this layout."""
    if layout == "npz":
        return npz_plan(layers)
    if layout == "timm":
        return timm_plan(layers)
    if layout == "mindcv":
        return mindcv_plan(keys, layers)
    has_ema = any(k.startswith(EMA_PREFIX) for k in keys)
    if ema and not has_ema:
        raise ValueError(f"{path} holds no EMA weights ('ema.*' keys); load it without ema=True")
    if ema:
        return {k[len(EMA_PREFIX) :]: (k, _as_is) for k in keys if k.startswith(EMA_PREFIX)}
    return {k: (k, _as_is) for k in keys if not k.startswith((EMA_PREFIX,) + TRAIN_STATE_PREFIXES)}


def _as_is(a: np.ndarray) -> np.ndarray:
    return a


_as_is.out_shape = tuple


def lazy_weights(reader: ArrayReader, fmt: str, layers: tuple[int, ...], *, path="weights", ema: bool = False) -> dict[str, _Lazy]:
    """Our name -> lazily converted array, checked against the layout's key set (names only, nothing read)."""
    keys = list(reader)
    layout = detect_layout(fmt, keys)
    plan = _plan(layout, keys, layers, path, ema=ema)
    expected = {src for src, _ in plan.values()}
    if layout in ("npz", "timm"):
        check_keys("the .npz" if layout == "npz" else "the timm state_dict", {k: None for k in keys}, expected)
    return {dst: _Lazy(reader, src, fn) for dst, (src, fn) in plan.items()}


def _is_mindcv(keys) -> bool:
    return "conv1.weight" in keys or any(k.startswith("layer1.") for k in keys)


def read_weights_file(path: str | os.PathLike, layers: tuple[int, ...], *, ema: bool = False) -> dict[str, np.ndarray]:
    """Any supported file -> bit_zoo parameter arrays for the architecture with `layers` (all in memory)."""
    fmt, reader = open_arrays(path)
    with reader:
        return {k: np.asarray(v) for k, v in lazy_weights(reader, fmt, layers, path=path, ema=ema).items()}


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
    """Load converted parameters into model; only a differing classifier may be left out.

    Values may be lazy (read on np.asarray): each array is converted and handed to its parameter
    (sharing its memory, no second copy) before the next is read, the largest first, so the
    temporary copies of a transpose happen while little else is resident.
    """
    state = match_state(model, state, source=source)
    params = {p.name: p for p in model.get_parameters()}
    head_left_out = not any(k.startswith("head.fc.") for k in state)
    if head_left_out:  # BiT's zero head for a new class count
        for name, p in params.items():
            if name.startswith("head.fc."):
                p.set_data(ms.Tensor(np.zeros(p.shape, np.float32)).astype(p.dtype))
    for name in sorted(state, key=lambda k: -int(np.prod(state[k].shape))):
        p = params[name]
        a = np.ascontiguousarray(np.asarray(state.pop(name)), dtype=np.float32)
        if not a.flags.writeable:  # a read-only view (e.g. of a mapped file) must not back a parameter
            a = a.copy()
        t = ms.Tensor.from_numpy(a)
        p.set_data(t if p.dtype == ms.float32 else t.astype(p.dtype))
        del a, t


def _layers_of(model) -> tuple[int, ...]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} is not a bit_zoo ResNetV2")
    return layers


def load_checkpoint(model: ms.nn.Cell, path: str | os.PathLike, *, ema: bool = False, allow_unverified: bool = False) -> None:
    """Load a local file of any supported format (detected from its bytes) into model, one array at a time.

    A file bit_zoo wrote (meta.json) is checked against its digest first; allow_unverified accepts one without.
    """
    layers = _layers_of(model)
    fmt, reader = open_arrays(path)
    with reader:
        if META_KEY in reader:
            verify_digest(path, reader, allow_unverified=allow_unverified)
        load_lazy_state(model, lazy_weights(reader, fmt, layers, path=path, ema=ema), path=path, fmt=fmt)


def load_lazy_state(model: ms.nn.Cell, state: dict, *, path, fmt: str) -> None:
    """load_state over the lazy arrays of an open reader (lazy_weights); a read failure names the file."""
    if "stem.conv.weight" in state:  # small, and adapt_input_conv needs the values
        state["stem.conv.weight"] = np.asarray(state["stem.conv.weight"])
    try:
        load_state(model, state, source=str(path))
    except (OSError, KeyError, zipfile.BadZipFile, RuntimeError) as e:
        raise ValueError(f"cannot read {path} as {fmt}: {e}. The file is corrupt or truncated; download or convert it again.") from e


def verify_structure(path: Path, weights: Weights) -> None:
    """Raise unless `path` converts to a complete parameter set of the record's architecture and classes.

    Names and shapes only (the readers check that every array's bytes are in the file): reading a
    2 GB download in full just to look at it would double the memory of pretrained=True.
    """
    fmt, reader = open_arrays(path)
    with reader:
        state = lazy_weights(reader, fmt, weights.layers, path=path)
    if "head.fc.bias" not in state:
        raise ValueError(f"{path.name}: no classifier, the weights record says {weights.num_classes} classes")
    classes = state["head.fc.bias"].shape[0]
    if classes != weights.num_classes:
        raise ValueError(f"{path.name}: head has {classes} classes, the weights record says {weights.num_classes}")


def fetch_pretrained(weights: Weights) -> Path:
    """The cached file of `weights`, downloaded first if needed and checked against its architecture.

    Sources are tried in the order hub.candidates gives ($BIT_ZOO_WEIGHTS_SOURCE); the first that
    yields a verified file wins, and when all fail the error names each source and its failure.
    """
    errors = []
    tries = candidates(weights)
    for source, record in tries:
        try:
            return download_weights(record, verify=lambda p, r=record: verify_structure(p, r))
        except (RuntimeError, ValueError, OSError) as e:
            if len(tries) == 1:  # one source: its own error already names the URL and the mirror variable
                raise
            _logger.warning("weights source %s failed for %s: %s", source, weights.filename, e)
            errors.append(f"[{source}] {e}")
    tried = "\n".join(errors)
    raise FetchError(
        f"could not fetch the weights {weights.filename} from any source:\n{tried}\n"
        f"Choose the sources with ${SOURCE_ENV} (auto, google, hub, or e.g. 'hub,google'), a mirror of Google's bucket "
        f"with $BIT_ZOO_BASE_URL, of the Hugging Face hub with ${HF_ENDPOINT_ENV}; or pass checkpoint_path= a local file."
    )


def load_pretrained(model: ms.nn.Cell, weights: Weights | None = None) -> None:
    """Download (or take from the cache), verify and load the model's weights record."""
    weights = weights or getattr(model, "weights", None)
    if weights is None:
        raise ValueError("pretrained=True but the model has no weights record; pass checkpoint_path= instead")
    load_checkpoint(model, fetch_pretrained(weights))


def save_weights(params: Mapping[str, np.ndarray], path: str | os.PathLike, *, fmt: str | None = None) -> Path:
    """Write parameters as .ckpt or .safetensors (by fmt or suffix), atomically.

    Float arrays are written as float32; other dtypes (the uint8 meta.json entry, integer
    training state) keep theirs.
    """
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".")
    if fmt not in ("ckpt", "safetensors"):
        raise ValueError(f"unsupported output format {fmt!r} for {path}: use a .ckpt or .safetensors name")
    arrays = {k: _storable(v) for k, v in params.items()}
    if fmt == "ckpt":  # space checked first, MindSpore's own .tmp cleaned up, one DiskFullError
        save_checkpoint_atomic([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()], path)
        return path
    from safetensors.numpy import save_file

    with atomic_path(path, suffix=".safetensors", expected_bytes=sum(a.nbytes for a in arrays.values())) as tmp:
        save_file(arrays, str(tmp), metadata={"format": "bit_zoo"})
    return path


def _storable(v) -> np.ndarray:
    a = np.asarray(v)
    return np.ascontiguousarray(a, dtype=np.float32 if np.issubdtype(a.dtype, np.floating) else a.dtype)
