"""Weights records and the download cache.

A :class:`Weights` record is the single source of truth for one released file: where it lives,
how to check it, and how its inputs must be prepared. The README's model table is generated
from these records (``python -m bit_zoo.model_table``).

Environment:
    BIT_ZOO_HOME             cache root (default ~/.cache/bit_zoo); files go to $BIT_ZOO_HOME/weights/
    BIT_ZOO_BASE_URL         mirror for Google's bucket https://storage.googleapis.com/bit_models/
    BIT_ZOO_MINDCV_BASE_URL  mirror for mindcv's https://download.mindspore.cn/toolkits/mindcv/bit/
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

__all__ = [
    "Weights",
    "GOOGLE_BASE_URL",
    "MINDCV_BASE_URL",
    "BIT_MEAN_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cache_dir",
    "resolve_url",
    "download_weights",
    "sha256_file",
]

_logger = logging.getLogger(__name__)

GOOGLE_BASE_URL = "https://storage.googleapis.com/bit_models/"
MINDCV_BASE_URL = "https://download.mindspore.cn/toolkits/mindcv/bit/"
_MIRROR_ENV = {GOOGLE_BASE_URL: "BIT_ZOO_BASE_URL", MINDCV_BASE_URL: "BIT_ZOO_MINDCV_BASE_URL"}
BIT_MEAN_STD = (0.5, 0.5, 0.5)  # inputs in [-1, 1]: (x/255 - 0.5) / 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # mindcv's recipe normalises with ImageNet statistics on [0, 1] pixels
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Weights:
    """One released weights file of a BiT architecture."""

    filename: str  # path under base_url, also the path under the cache dir
    base_url: str
    file_format: str  # "npz" (upstream TF names, HWIO) or "mindcv_ckpt"
    layers: tuple[int, int, int, int]  # units per stage of the architecture the file belongs to
    width_factor: int
    num_classes: int
    input_size: int  # evaluation resolution (resize straight to it: BiT uses no crop margin)
    num_params: int
    dataset: str  # what the head was trained on
    description: str
    source: str  # who released it
    license: str = "Apache-2.0"
    top1: float | None = None  # reported top-1 on `dataset`, in percent
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = BIT_MEAN_STD
    std: tuple[float, float, float] = BIT_MEAN_STD
    crop_pct: float = 1.0
    sha256: str | None = None  # full hash, where published
    sha256_prefix: str | None = None  # mindcv names files <name>-<first 8 hex of sha256>.ckpt
    hf_hub_id: str | None = None  # timm's copy on the Hugging Face hub ('timm/resnetv2_50x1_bit.goog_in21k'), where published
    first_conv: str = "stem.conv"
    classifier: str = "head.fc"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def url(self) -> str:
        return self.base_url + self.filename

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.input_size, self.input_size)


def cache_dir() -> Path:
    """Where downloaded weights live: $BIT_ZOO_HOME/weights (default ~/.cache/bit_zoo/weights)."""
    home = os.environ.get("BIT_ZOO_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "bit_zoo")
    return Path(home) / "weights"


def resolve_url(weights: Weights) -> str:
    """The URL to fetch, with the mirror environment variable applied."""
    env = _MIRROR_ENV.get(weights.base_url)
    base = os.environ.get(env) if env else None
    if base:
        return base.rstrip("/") + "/" + weights.filename
    return weights.url


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_hash(weights: Weights, path: Path, url: str) -> None:
    if weights.sha256 is None and weights.sha256_prefix is None:
        return
    actual = sha256_file(path)
    expected = weights.sha256 or weights.sha256_prefix
    if not actual.startswith(expected):
        raise RuntimeError(
            f"sha256 mismatch for {url}: expected {expected}, got {actual}. The file is corrupt or "
            f"the mirror serves a different file; nothing was kept in the cache. Check the mirror "
            f"({_MIRROR_ENV.get(weights.base_url, 'no mirror variable')}) or download again."
        )


def _fetch(url: str, dest: Path, *, timeout: float, progress: bool) -> None:
    """Stream url into dest (a temporary name), failing on HTTP errors and short reads."""
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"download failed: HTTP {e.code} {e.reason} for {url}") from e
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"download failed: cannot reach {url} ({e})") from e
    with response:
        total = int(response.headers.get("Content-Length") or 0) or None
        got = 0
        with (
            open(dest, "wb") as f,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=os.path.basename(dest.name.split(".part")[0]),
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            while block := response.read(1 << 20):
                f.write(block)
                got += len(block)
                bar.update(len(block))
    if total is not None and got != total:
        raise RuntimeError(f"download truncated: got {got} of {total} bytes from {url}")


def download_weights(
    weights: Weights,
    *,
    verify: Callable[[Path], None] | None = None,
    progress: bool | None = None,
    timeout: float = 60.0,
) -> Path:
    """Return the cached file of `weights`, downloading it first if needed.

    The download goes to a temporary name in the cache dir; the hash (where known) and the
    structure (`verify`, which raises on a bad file) are checked before it is renamed into
    place. On any failure the temporary file is removed, so the cache never holds a partial
    or broken file (mindcv 0.3 leaves a 0-byte file that breaks every later call).
    """
    dest = cache_dir() / weights.filename
    if dest.is_file():
        return dest
    url = resolve_url(weights)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part{os.getpid()}")
    if progress is None:
        progress = sys.stderr.isatty()
    _logger.info("downloading %s to %s", url, dest)
    try:
        _fetch(url, tmp, timeout=timeout, progress=progress)
        _check_hash(weights, tmp, url)
        if verify is not None:
            try:
                verify(tmp)
            except ValueError as e:
                raise ValueError(f"the file downloaded from {url} is not what {weights.filename} should be: {e}") from e
        os.replace(tmp, dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError) and "mirror" not in str(e):
            env = _MIRROR_ENV.get(weights.base_url)
            if env:
                raise RuntimeError(f"{e}\nIf the host is unreachable from your network, set {env} to a mirror.") from e
        raise
    return dest
