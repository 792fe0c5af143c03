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
    digest         sha256 of every other entry (name, dtype, shape, bytes; names sorted): a file
                   cut short (even at an entry boundary) or changed no longer matches it

bit_zoo writes the entry first, so a truncated file keeps it and fails the digest check.

Readers ignore keys they do not know, so the object can grow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np

__all__ = ["META_KEY", "encode_meta", "decode_meta", "content_digest", "with_meta", "verify_digest"]

META_KEY = "meta.json"


def encode_meta(meta: Mapping) -> np.ndarray:
    """The JSON object as a uint8 array (the value stored under META_KEY)."""
    return np.frombuffer(json.dumps(dict(meta), sort_keys=True).encode("utf-8"), dtype=np.uint8).copy()


def decode_meta(arrays: Mapping[str, np.ndarray]) -> dict | None:
    """The metadata of a file's arrays, or None when it has none (upstream and mindcv files)."""
    if META_KEY not in arrays:
        return None
    raw = np.asarray(arrays[META_KEY])
    try:
        return json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the {META_KEY} entry is not valid JSON ({e}): the file is corrupt; write it again") from e


def content_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over every entry but META_KEY, in name order: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k != META_KEY):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def with_meta(arrays: Mapping[str, np.ndarray], meta: Mapping) -> dict[str, np.ndarray]:
    """META_KEY (first) with the digest of `arrays`, then `arrays`: what a bit_zoo file holds."""
    return {META_KEY: encode_meta({**meta, "digest": content_digest(arrays)}), **arrays}


def verify_digest(path, arrays: Mapping[str, np.ndarray]) -> dict | None:
    """The file's metadata after checking its digest; None for files without metadata (upstream, mindcv, older bit_zoo).

    Raises ValueError naming the file when the content does not match the digest written with it.
    """
    meta = decode_meta(arrays)
    if meta is None or "digest" not in meta:
        return meta
    if content_digest(arrays) != meta["digest"]:
        raise ValueError(
            f"{path} does not match the digest written with it: the file is truncated or corrupted. "
            "Use another checkpoint (best.ckpt, step_*.ckpt) or write it again."
        )
    return meta
