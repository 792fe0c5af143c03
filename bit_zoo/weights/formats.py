"""Weight formats: key maps and converters between bit_zoo's parameters and the released files.

Pure functions over name -> array mappings, no MindSpore: the upstream .npz layout (TF names, HWIO
kernels, arXiv 1912.11370's release at storage.googleapis.com/bit_models), timm's state_dict as it
publishes it on the Hugging Face hub (model.safetensors: PyTorch names, OIHW, the classifier a 1x1
conv) and mindcv's BiT_resnet* checkpoints. Every converter checks that every source key was used
(or knowingly skipped) and every parameter produced, and names the keys that were not.

Each format is also described as a *plan*: our parameter name -> (source key, transform). The
converters apply a plan to a whole mapping; the loader applies it one array at a time, so a
2 GB file never needs a second full copy in memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

__all__ = [
    "npz_key_map",
    "npz_plan",
    "convert_npz",
    "to_npz",
    "timm_key_map",
    "timm_plan",
    "is_timm_layout",
    "convert_timm",
    "to_timm",
    "mindcv_name",
    "mindcv_plan",
    "convert_mindcv",
    "apply_plan",
    "check_keys",
    "converted_shape",
]

Plan = dict  # our name -> (source key, transform(np.ndarray) -> np.ndarray)

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


def check_keys(kind: str, source: Mapping, expected) -> None:
    """Raise naming the missing and unexpected keys of `source` against the `expected` names."""
    missing = sorted(set(expected) - set(source))
    extra = sorted(set(source) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{kind} does not match this architecture: {len(missing)} missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, {len(extra)} unexpected keys {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''}. Is it the file of another model (e.g. R50 vs R101)?"
        )


def _float32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)  # no copy when it already is


def _transpose2d(a: np.ndarray, tile: int = 64) -> np.ndarray:
    """a.T as a new contiguous float32 array, copied in cache-sized tiles.

    numpy's plain copy of a transposed view strides through memory: for the 6144 x 21843
    classifier of R101x3 it takes ~3 s, in 64 x 64 tiles ~1.2 s (measured on the 2-core CPU box).
    """
    rows, cols = a.shape
    out = np.empty((cols, rows), np.float32)
    for i in range(0, cols, tile):
        for j in range(0, rows, tile):
            out[i : i + tile, j : j + tile] = a[j : j + tile, i : i + tile].T
    return out


def _hwio_to_oihw(a: np.ndarray) -> np.ndarray:
    if a.ndim != 4:
        return _float32(a)
    h, w, i, o = a.shape
    oki = _transpose2d(a.reshape(h * w * i, o)).reshape(o, h * w, i)  # the big transpose, tiled
    return _float32(oki.transpose(0, 2, 1)).reshape(o, i, h, w) if h * w > 1 else oki.reshape(o, i, h, w)


def _npz_head(a: np.ndarray) -> np.ndarray:  # [1, 1, C, K] -> [K, C]
    return _transpose2d(a.reshape(a.shape[-2], a.shape[-1]))


def _conv_head(a: np.ndarray) -> np.ndarray:  # 1x1 conv classifier [K, C, 1, 1] -> [K, C]
    return _float32(a.reshape(a.shape[0], -1)) if a.ndim == 4 else _float32(a)


# How each transform changes a shape, so the loader can check shapes before reading any array.
_hwio_to_oihw.out_shape = lambda s: (s[3], s[2], s[0], s[1]) if len(s) == 4 else tuple(s)
_npz_head.out_shape = lambda s: (s[-1], s[-2])
_conv_head.out_shape = lambda s: (s[0], int(np.prod(s[1:]))) if len(s) == 4 else tuple(s)
_float32.out_shape = tuple


def converted_shape(transform, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `transform` gives an array of `shape` (without reading the array)."""
    return tuple(int(d) for d in transform.out_shape(tuple(shape)))


def apply_plan(kind: str, plan: Plan, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Convert a whole mapping with a plan, after checking that it holds exactly the plan's keys."""
    check_keys(kind, arrays, {src for src, _ in plan.values()})
    return {dst: fn(np.asarray(arrays[src])) for dst, (src, fn) in plan.items()}


def npz_plan(layers: tuple[int, ...]) -> Plan:
    return {dst: (src, _npz_head if dst == "head.fc.weight" else _hwio_to_oihw) for src, dst in npz_key_map(layers).items()}


def convert_npz(arrays: Mapping[str, np.ndarray], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Upstream BiT .npz arrays (TF names, HWIO kernels) -> bit_zoo parameters (OIHW).

    Every array must be used and every parameter produced; otherwise ValueError names the keys.
    """
    return apply_plan("the .npz", npz_plan(layers), arrays)


def to_npz(params: Mapping[str, np.ndarray], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """bit_zoo parameters -> upstream .npz arrays; the inverse of convert_npz."""
    key_map = npz_key_map(layers)
    inverse = {dst: src for src, dst in key_map.items()}
    check_keys("the parameters", params, inverse)
    out = {}
    for dst, src in inverse.items():
        a = np.asarray(params[dst], dtype=np.float32)
        if dst == "head.fc.weight":
            a = a.T.reshape(1, 1, a.shape[1], a.shape[0])
        elif a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)
        out[src] = np.ascontiguousarray(a)
    return out


def timm_key_map(layers: tuple[int, ...]) -> dict[str, str]:
    """bit_zoo parameter name -> timm's ResNetV2 state_dict name (resnetv2_*_bit, as on the hub)."""
    m = {}
    for dst in npz_key_map(layers).values():
        name = dst.replace(".gamma", ".weight").replace(".beta", ".bias")
        m[dst] = name.replace(".downsample.weight", ".downsample.conv.weight")
    return m


def is_timm_layout(keys) -> bool:
    """timm's names: GroupNorm affine as weight/bias, the projection under downsample.conv."""
    keys = set(keys)
    return "norm.weight" in keys and "stem.conv.weight" in keys


def timm_plan(layers: tuple[int, ...]) -> Plan:
    return {dst: (src, _conv_head if dst == "head.fc.weight" else _float32) for dst, src in timm_key_map(layers).items()}


def convert_timm(arrays: Mapping[str, np.ndarray], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """timm's resnetv2_*_bit state_dict (PyTorch names, OIHW, 1x1-conv classifier) -> bit_zoo parameters."""
    return apply_plan("the timm state_dict", timm_plan(layers), arrays)


def to_timm(params: Mapping[str, np.ndarray], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """bit_zoo parameters -> timm's state_dict layout; the inverse of convert_timm."""
    key_map = timm_key_map(layers)
    check_keys("the parameters", params, key_map)
    out = {}
    for dst, src in key_map.items():
        a = _float32(params[dst])
        out[src] = a.reshape(*a.shape, 1, 1) if dst == "head.fc.weight" else a
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


def mindcv_plan(keys, layers: tuple[int, ...]) -> Plan:
    """The plan for a mindcv checkpoint with these keys (optimizer state skipped knowingly)."""
    plan = {}
    unknown = []
    for key in keys:
        if _MINDCV_SKIP.match(key):
            continue
        name = mindcv_name(key)
        if name is None:
            unknown.append(key)
            continue
        plan[name] = (key, _conv_head if name == "head.fc.weight" else _float32)
    if unknown:
        raise ValueError(f"the mindcv checkpoint has keys that are not BiT parameters: {sorted(unknown)[:8]}")
    check_keys("the mindcv checkpoint", plan, {v: None for v in npz_key_map(layers).values()})
    return plan


def convert_mindcv(params: Mapping[str, np.ndarray], layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """mindcv BiT_resnet* checkpoint -> bit_zoo parameters (optimizer state skipped)."""
    plan = mindcv_plan(params.keys(), layers)
    return {dst: fn(np.asarray(params[src])) for dst, (src, fn) in plan.items()}
