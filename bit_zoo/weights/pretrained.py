"""Weights records and the download cache.

A :class:`Weights` record is the single source of truth for one released file: where it lives,
how to check it, and how its inputs must be prepared. The README's model table is generated
from these records (``python -m bit_zoo.tools.model_table``).

Environment:
    BIT_ZOO_HOME             cache root (default ~/.cache/bit_zoo); files go to $BIT_ZOO_HOME/weights/
    BIT_ZOO_BASE_URL         mirror for Google's bucket https://storage.googleapis.com/bit_models/
    BIT_ZOO_MINDCV_BASE_URL  mirror for mindcv's https://download.mindspore.cn/toolkits/mindcv/bit/
    BIT_ZOO_DOWNLOAD_WAIT    seconds a process waits for another's download of the same file to make
                             progress before it gives up (default 600); see `download_weights`

Distributed runs: every rank may call `download_weights`; a lock file in the cache dir lets one
process download while the others (other local ranks, or other nodes when the cache dir is
shared) wait for the verified file, so a job downloads each file once per cache dir.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..utils.atomic import pid_alive, write_text_atomic
from ..utils.paths import home_dir
from ..errors import FetchError

__all__ = [
    "Weights",
    "GOOGLE_BASE_URL",
    "MINDCV_BASE_URL",
    "BIT_MEAN_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cache_dir",
    "home_dir",
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
_DEFAULT_LOCK_WAIT = 600.0  # seconds a waiting process tolerates another's download making no progress
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


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
    return home_dir() / "weights"


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
        raise FetchError(
            f"sha256 mismatch for {url}: expected {expected}, got {actual}. The file is corrupt or "
            f"the mirror serves a different file; nothing was kept in the cache. Check the mirror "
            f"({_MIRROR_ENV.get(weights.base_url, 'no mirror variable')}) or download again."
        )


class _Interrupted(RuntimeError):
    """The transfer stopped before the announced end; what arrived is kept for the next call to resume."""


def _content_range_total(value: str | None, start: int) -> int | None:
    """The total size from a 206's ``Content-Range: bytes <start>-<end>/<total>``, None if it does not start at `start`."""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (value or "").strip())
    if match is None or int(match[1]) != start:
        return None
    return int(match[3]) if match[3] != "*" else None


def _open(url: str, headers: dict, timeout: float):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # the partial file is no prefix of what the server has now: start again
            return None
        raise _ServerError(f"download failed: HTTP {e.code} {e.reason} for {url}") from e
    except (urllib.error.URLError, OSError) as e:
        raise _ServerError(f"download failed: cannot reach {url} ({e})") from e


class _ServerError(RuntimeError):
    """No file from this host (unreachable, HTTP error): the failures a mirror setting is about."""


def _mirror_hint(weights: Weights) -> str:
    env = _MIRROR_ENV.get(weights.base_url)
    if not env:
        return ""
    if os.environ.get(env):
        return f"\nThe URL comes from {env}={os.environ[env]}: check that the mirror serves {weights.filename}, or unset {env}."
    return f"\nIf the host is unreachable from your network, set {env} to a mirror."


def _fetch(url: str, part: Path, *, timeout: float, progress: bool, desc: str) -> None:
    """Download url into `part`, continuing an existing partial file with an HTTP Range request.

    A server that ignores Range (status 200) or rejects it (416) gets the file from the start. A
    transfer that stops early keeps what arrived (`_Interrupted`), so the next call resumes it.
    """
    start = part.stat().st_size if part.is_file() else 0
    response = _open(url, {"Range": f"bytes={start}-"} if start else {}, timeout)
    if response is None:
        part.unlink(missing_ok=True)
        start = 0
        response = _open(url, {}, timeout)
    with response:
        total = None
        if start and response.status == 206:
            total = _content_range_total(response.headers.get("Content-Range"), start)
            if total is None:
                raise FetchError(f"download failed: {url} answered the range request from byte {start} with a different range")
            _logger.info("resuming %s at %.1f of %.1f MiB", url, start / 2**20, total / 2**20)
        else:
            if start:
                _logger.info("%s does not serve byte ranges: downloading it from the start", url)
            start = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
        got = start
        with (
            open(part, "ab" if start else "wb") as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            try:
                while block := response.read(1 << 20):
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:
                raise _Interrupted(f"download interrupted after {got} of {total or '?'} bytes from {url} ({e})") from e
    if total is not None and got < total:
        raise _Interrupted(f"download truncated: got {got} of {total} bytes from {url}")
    if total is not None and got > total:
        raise FetchError(f"download failed: {url} sent {got} bytes where it announced {total}")


def _lock_wait() -> float:
    value = os.environ.get("BIT_ZOO_DOWNLOAD_WAIT", "")
    try:
        return float(value) if value else _DEFAULT_LOCK_WAIT
    except ValueError:
        raise ValueError(f"BIT_ZOO_DOWNLOAD_WAIT={value!r}: give a number of seconds, e.g. 600.") from None


def _same_file(f, path: Path) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def _download_lock(dest: Path, part: Path) -> Iterator[None]:
    """One downloader per file across processes (ranks, nodes sharing the cache dir): a POSIX lock
    on ``.<name>.lock`` beside it. The others wait while the holder's partial file grows; after
    BIT_ZOO_DOWNLOAD_WAIT seconds without progress they stop with an error naming the holder. The
    kernel drops the lock when its holder dies, so a killed download never blocks anyone. The
    holder removes the lock file when done; a waiter that then finds it locked a removed file
    locks the current one instead."""
    lock_path = dest.with_name(f".{dest.name}.lock")
    wait = _lock_wait()
    with _THREAD_LOCKS_GUARD:
        in_process = _THREAD_LOCKS.setdefault(str(dest), threading.Lock())
    with in_process:  # POSIX locks belong to a process: threads of one process queue here
        with _file_lock(lock_path, part, dest, wait):
            yield


@contextmanager
def _file_lock(lock_path: Path, part: Path, dest: Path, wait: float) -> Iterator[None]:
    last_size, last_change = -1, time.monotonic()
    while True:
        lock = open(lock_path, "a+")
        try:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                lock.close()
                raise
            size = part.stat().st_size if part.is_file() else 0
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change > wait:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                lock.close()
                raise FetchError(
                    f"waited {wait:.0f} s for {holder} to download {dest.name} into {dest.parent} with no progress. "
                    f"If that process is stuck, stop it (the next call resumes its partial file), or raise BIT_ZOO_DOWNLOAD_WAIT."
                ) from None
            lock.close()
            time.sleep(0.2)
            continue
        if _same_file(lock, lock_path):
            break
        lock.close()  # locked a lock file its holder had just removed
    with lock:
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()} on {socket.gethostname()}")
        lock.flush()
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            fcntl.lockf(lock, fcntl.LOCK_UN)


def _remove_dead_partials(dest: Path) -> None:
    """Partial files of the pre-resume naming (``<name>.part<PID>``) whose process is gone."""
    for stale in dest.parent.glob(f"{dest.name}.part*"):
        pid = stale.name[len(dest.name) + 5 :]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
            _logger.warning("removed %s, a partial download left by process %s (no longer running)", stale, pid)


def _fetch_and_verify(weights: Weights, url: str, part: Path, *, verify, timeout: float, progress: bool, desc: str) -> None:
    """Complete `part` from url, then check it; a complete file that fails a check is removed."""
    try:
        _fetch(url, part, timeout=timeout, progress=progress, desc=desc)
    except _Interrupted as e:
        raise FetchError(f"{e}. {part.stat().st_size if part.exists() else 0} bytes are kept in {part}: call again to resume.") from e
    except _ServerError as e:
        raise FetchError(f"{e}{_mirror_hint(weights)}") from e
    try:
        _check_hash(weights, part, url)
        if verify is not None:
            try:
                verify(part)
            except ValueError as e:
                raise ValueError(f"the file downloaded from {url} is not what {weights.filename} should be: {e}") from e
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def download_weights(
    weights: Weights,
    *,
    verify: Callable[[Path], None] | None = None,
    progress: bool | None = None,
    timeout: float = 60.0,
) -> Path:
    """Return the cached file of `weights`, downloading it first if needed.

    The download goes to ``<name>.part`` in the cache dir, beside a note of its URL; an
    interrupted or killed download is continued from where it stopped (HTTP Range, same URL
    only). The size, the hash (where known) and the structure (`verify`, which raises on a bad
    file) are checked before the file is renamed into place; a file that fails them is removed,
    so the cache never holds a broken file under the final name (mindcv 0.3 leaves a 0-byte file
    that breaks every later call). One process downloads, the others wait (see `_download_lock`).
    """
    dest = cache_dir() / weights.filename
    if dest.is_file():
        return dest
    url = resolve_url(weights)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.part")
    note = dest.with_name(f".{dest.name}.part.url")
    if progress is None:
        progress = sys.stderr.isatty()
    _remove_dead_partials(dest)
    with _download_lock(dest, part):
        if dest.is_file():  # another process finished it while this one waited
            return dest
        if part.exists() and (not note.is_file() or note.read_text().strip() != url):
            part.unlink()  # a partial file from another URL is no prefix of this one
        write_text_atomic(note, url + "\n")
        _logger.info("downloading %s to %s", url, dest)
        try:
            _fetch_and_verify(weights, url, part, verify=verify, timeout=timeout, progress=progress, desc=dest.name)
        finally:
            if not part.exists():
                note.unlink(missing_ok=True)
        os.replace(part, dest)
        note.unlink(missing_ok=True)
    return dest
