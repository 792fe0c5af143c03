"""Where pretrained weights come from: Google's bucket, timm's copy on the Hugging Face hub, or a mirror.

Google's bucket (storage.googleapis.com/bit_models) is unreachable from many networks. timm
publishes the same BiT-M weights (every in21k / in21k_ft_in1k file, the distilled R50x1 and both
R152x2 teachers) as `timm/resnetv2_<depth>x<width>_bit.goog_<tag>`, file `model.safetensors`
(PyTorch names, OIHW); bit_zoo reads that layout directly (formats.timm_plan).

Order of sources, chosen by $BIT_ZOO_WEIGHTS_SOURCE (a comma-separated list is tried in order):
    auto (default)  the record's own source (Google's bucket or mindcv's), then the hub
    google          the record's own source only (mirror: $BIT_ZOO_BASE_URL / $BIT_ZOO_MINDCV_BASE_URL)
    hub             the Hugging Face hub only (mirror: $HF_ENDPOINT, default https://huggingface.co)
    hub,google      the hub first, then the record's own source

A file already in the cache from any allowed source is used without touching the network. Each
source is one Weights record handed to pretrained.download_weights, so every source has the
same cache, progress bar, hash check (where known), structure check and atomic rename.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from .pretrained import Weights, cache_dir

__all__ = ["SOURCE_ENV", "HF_ENDPOINT_ENV", "HF_DEFAULT_ENDPOINT", "SOURCES", "hub_endpoint", "hub_weights", "source_order", "candidates"]

_logger = logging.getLogger(__name__)

SOURCE_ENV = "BIT_ZOO_WEIGHTS_SOURCE"
HF_ENDPOINT_ENV = "HF_ENDPOINT"  # the variable huggingface_hub itself reads, so one setting serves both
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
SOURCES = ("google", "hub")
_AUTO = ("google", "hub")


def hub_endpoint() -> str:
    return (os.environ.get(HF_ENDPOINT_ENV) or HF_DEFAULT_ENDPOINT).rstrip("/")


def hub_weights(weights: Weights) -> Weights:
    """The record of the hub copy of `weights`: {endpoint}/{repo_id}/resolve/main/model.safetensors.

    The repository path is part of the filename so that each hub file has its own place in the
    cache (every hub file is called model.safetensors). No hash: the record's sha256 is that of
    Google's .npz, not of timm's file; the structure check still runs.
    """
    if not weights.hf_hub_id:
        raise ValueError(f"{weights.filename} has no copy on the Hugging Face hub (timm publishes only the BiT-M files)")
    return dataclasses.replace(
        weights,
        base_url=hub_endpoint() + "/",
        filename=f"{weights.hf_hub_id}/resolve/main/model.safetensors",
        file_format="timm_safetensors",
        sha256=None,
        sha256_prefix=None,
    )


def source_order() -> tuple[str, ...]:
    """The sources to try, from $BIT_ZOO_WEIGHTS_SOURCE ('auto' when unset)."""
    raw = (os.environ.get(SOURCE_ENV) or "auto").strip().lower()
    if raw == "auto":
        return _AUTO
    order = tuple(s.strip() for s in raw.split(",") if s.strip())
    bad = [s for s in order if s not in SOURCES]
    if bad or not order:
        raise ValueError(f"${SOURCE_ENV}={raw!r}: use auto, google, hub or an ordered list such as 'hub,google'")
    return order


def candidates(weights: Weights) -> list[tuple[str, Weights]]:
    """(source name, record) to try for `weights`, in order; cached files first, then the configured order."""
    records = []
    for source in source_order():
        if source == "google":
            records.append((source, weights))
        elif weights.hf_hub_id:
            records.append((source, hub_weights(weights)))
        elif len(source_order()) == 1:
            raise ValueError(
                f"${SOURCE_ENV}=hub but {weights.filename} is not on the hub (timm publishes only the BiT-M files): "
                f"unset {SOURCE_ENV} or set it to google"
            )
    cached = [r for r in records if (cache_dir() / r[1].filename).is_file()]
    return cached + [r for r in records if r not in cached]
