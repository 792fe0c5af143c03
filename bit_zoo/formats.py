"""Weight formats: key maps and converters between bit_zoo's parameters and the released files.

Pure functions over name -> array mappings, no MindSpore: the upstream .npz layout (TF names, HWIO
kernels, arXiv 1912.11370's release at storage.googleapis.com/bit_models) and mindcv's BiT_resnet*
checkpoints. Every converter checks that every source key was used (or knowingly skipped) and every
parameter produced, and names the keys that were not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

__all__ = ["npz_key_map", "convert_npz", "to_npz", "mindcv_name", "convert_mindcv"]

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
