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

Readers ignore keys they do not know, so the object can grow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

__all__ = ["META_KEY", "encode_meta", "decode_meta"]

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
