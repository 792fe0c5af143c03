"""What a checkpoint written by bit_zoo says about itself: architecture, classes, preprocessing.

A training checkpoint (and every weights file bit_zoo writes from one) carries one extra entry,
``meta.json``: the UTF-8 bytes of a JSON object, stored as a 1-D uint8 array so that every
format that holds arrays (.ckpt, .safetensors, .npz) can carry it unchanged. Keys:

    model          registered name ('bit_m_r50x1') or 'resnetv2' for a custom geometry
    layers         units per stage, e.g. [3, 4, 6, 3]
    width_factor   W of RxxxW
    num_classes    classifier outputs
    in_channels    input channels
    class_names    the training data's class names, index order (or null)
    preprocess     {"image_size", "eval_size", "mean", "std", "interpolation", "crop_pct"}
    bit_zoo_version
    digest         sha256 of meta.json itself (every key but this one, as canonical JSON) and of
                   every other entry (name, dtype, shape, bytes; names sorted): a file cut short
                   (even at an entry boundary), changed, or with an edited meta.json (class names,
                   preprocessing) no longer matches it

bit_zoo writes the entry first, so a truncated file keeps it and fails the digest check. A file
with meta.json but no digest (the key deleted), or with an older bit_zoo's digest that covered the
other entries only, cannot be checked: readers refuse it unless the user passes --allow_unverified.

Readers ignore keys they do not know, so the object can grow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping

import numpy as np

__all__ = [
    "META_KEY",
    "ALLOW_UNVERIFIED",
    "UnverifiedError",
    "encode_meta",
    "decode_meta",
    "content_digest",
    "with_meta",
    "verify_digest",
    "check_meta_values",
    "MAX_IMAGE_SIZE",
]

_logger = logging.getLogger(__name__)

META_KEY = "meta.json"
DIGEST_KEY = "digest"
ALLOW_UNVERIFIED = "--allow_unverified"  # the option, as every script and tool names it


class UnverifiedError(ValueError):
    """A bit_zoo file whose weights and meta.json cannot be checked (no digest, or one that does not cover meta.json)."""


def encode_meta(meta: Mapping) -> np.ndarray:
    """The JSON object as a uint8 array (the value stored under META_KEY)."""
    return np.frombuffer(json.dumps(dict(meta), sort_keys=True).encode("utf-8"), dtype=np.uint8).copy()


def decode_meta(arrays: Mapping[str, np.ndarray]) -> dict | None:
    """The metadata of a file's arrays, or None when it has none (upstream and mindcv files)."""
    if META_KEY not in arrays:
        return None
    raw = np.asarray(arrays[META_KEY])
    try:
        meta = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the {META_KEY} entry is not valid JSON ({e}): the file is corrupt; write it again") from e
    if not isinstance(meta, dict):
        raise ValueError(f"the {META_KEY} entry is {type(meta).__name__}, not a JSON object: the file is corrupt; write it again")
    return meta


def _entries_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over every entry but META_KEY, in name order: name, dtype, shape and bytes (alone, the digest older bit_zoo files carry)."""
    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k != META_KEY):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _covering(entries_digest: str, meta: Mapping) -> str:
    """The digest over the entries' digest and meta.json without its own digest key (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    h = hashlib.sha256(b"bit_zoo meta.json+entries\0")
    h.update(json.dumps(body, sort_keys=True).encode("utf-8"))
    h.update(b"\0" + entries_digest.encode())
    return h.hexdigest()


def content_digest(arrays: Mapping[str, np.ndarray], meta: Mapping) -> str:
    """The digest a file of `arrays` (META_KEY aside) with metadata `meta` carries: it covers both."""
    return _covering(_entries_digest(arrays), meta)


def with_meta(arrays: Mapping[str, np.ndarray], meta: Mapping) -> dict[str, np.ndarray]:
    """META_KEY (first) with the digest of `meta` and `arrays`, then `arrays`: what a bit_zoo file holds.

    A digest already in `meta` (read from another file) is replaced: it described that file.
    """
    arrays = {k: v for k, v in arrays.items() if k != META_KEY}
    meta = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    return {META_KEY: encode_meta({**meta, DIGEST_KEY: content_digest(arrays, meta)}), **arrays}


MAX_IMAGE_SIZE = 8192  # pixels a side: 805 MB of float32 per 3-channel image; BiT's largest is 480
_BOUNDS = {  # key -> (low, high) for whole numbers in meta.json; a digest does not vouch for sense, only for integrity
    "num_classes": (0, 1_000_000),
    "in_channels": (1, 64),
    "width_factor": (1, 64),
}


def _whole(v, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _finite_list(v) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= 64 and all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in v)


def check_meta_values(path, meta: Mapping) -> None:
    """Raise ValueError naming the file and the key when a meta.json value is out of range: a crafted or damaged
    file must not make a reader build a model of a million units or resize images to a billion pixels."""

    def bad(key: str, value, rule: str) -> ValueError:
        return ValueError(
            f"{path}: {META_KEY} {key}={value!r} is out of range ({rule}): the file is damaged or was not written by bit_zoo. "
            "Use another checkpoint, or pass --model and --image_size to read its weights without it"
        )

    for key, (low, high) in _BOUNDS.items():
        if key in meta and meta[key] is not None and not _whole(meta[key], low, high):
            raise bad(key, meta[key], f"a whole number in [{low}, {high}]")
    layers = meta.get("layers")
    if layers is not None and not (isinstance(layers, list) and len(layers) == 4 and all(_whole(u, 1, 256) for u in layers)):
        raise bad("layers", layers, "4 whole numbers of units per stage, each in [1, 256]")
    pre = meta.get("preprocess")
    if pre is None:
        return
    if not isinstance(pre, Mapping):
        raise bad("preprocess", pre, "an object")
    for key in ("image_size", "eval_size"):
        if pre.get(key) is not None and not _whole(pre[key], 1, MAX_IMAGE_SIZE):
            raise bad(f"preprocess.{key}", pre[key], f"a whole number of pixels in [1, {MAX_IMAGE_SIZE}]")
    if pre.get("mean") is not None and not _finite_list(pre["mean"]):
        raise bad("preprocess.mean", pre["mean"], "a list of finite numbers, one per channel")
    if pre.get("std") is not None and not (_finite_list(pre["std"]) and all(x > 0 for x in pre["std"])):
        raise bad("preprocess.std", pre["std"], "a list of finite numbers > 0, one per channel")
    crop = pre.get("crop_pct")
    if crop is not None and not (_finite_list([crop]) and 0 < crop <= 1):
        raise bad("preprocess.crop_pct", crop, "a number in (0, 1]")


def verify_digest(path, arrays: Mapping[str, np.ndarray], *, allow_unverified: bool = False) -> dict | None:
    """The file's metadata after checking its digest; None for files without metadata (upstream, mindcv).

    Raises ValueError naming the file when the content or meta.json does not match the digest written
    with it, and UnverifiedError (naming --allow_unverified) for a bit_zoo file that cannot be checked:
    its digest key is missing, or it is an older bit_zoo's digest that does not cover meta.json.
    With allow_unverified such a file is used, with a warning.
    """
    meta = decode_meta(arrays)
    if meta is None:
        return None
    if DIGEST_KEY not in meta:
        problem = "carries no digest"
    else:
        entries = _entries_digest(arrays)
        if meta[DIGEST_KEY] == _covering(entries, meta):
            check_meta_values(path, meta)
            return meta
        if meta[DIGEST_KEY] != entries:
            raise ValueError(
                f"{path} does not match the digest written with it: the file is truncated or corrupted, or its {META_KEY} "
                "was edited. Use another checkpoint (best.ckpt, step_*.ckpt) or write it again."
            )
        problem = f"carries an older bit_zoo's digest, which does not cover its {META_KEY}"
    if not allow_unverified:
        raise UnverifiedError(
            f"{path} {problem}: its weights and {META_KEY} (class names, preprocessing) cannot be checked. "
            f"Pass {ALLOW_UNVERIFIED} true to use it anyway, or write a checked copy with "
            f"python -m bit_zoo.convert --input {path} --output NEW {ALLOW_UNVERIFIED} true"
        )
    _logger.warning("%s %s: used unchecked (%s)", path, problem, ALLOW_UNVERIFIED)
    check_meta_values(path, meta)
    return meta
