"""Remote locations (s3://, obs:// via S3, any fsspec protocol): stage inputs locally, mirror outputs back.

Where Ascend is rented (OpenI, ModelArts), a job starts on a fresh node with its data and weights in
object storage, and what it writes locally is gone when it ends. bit_zoo keeps every reader and writer
local and puts this module at the edges:

- inputs (`data_dir`, `checkpoint_path`, `ckpt_path`, `resume`, convert's `--input`) are staged once into
  ``$BIT_ZOO_HOME/remote/<protocol>/<bucket>/<key>``: file by file, each verified by size and renamed
  into place, so a killed staging resumes where it stopped and a second run finds everything there;
  the processes of a node take a file lock, so one of them stages while the others wait;
- outputs (`output_dir`, convert's `--output`) are written locally first, then each finished file is
  uploaded. An object store shows an object only once its upload completed, so a reader never sees half
  a checkpoint; a failed upload is retried, then reported in one line, and the local copy is kept.

Credentials and endpoint come from the usual variables and are never written anywhere by bit_zoo:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or fsspec/botocore's own configuration) and
AWS_ENDPOINT_URL / BIT_ZOO_S3_ENDPOINT for OBS or any S3-compatible store (e.g.
https://obs.cn-north-4.myhuaweicloud.com). fsspec and s3fs are the optional extra ``bit_zoo[cloud]``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import FetchError

__all__ = ["RemoteError", "is_remote", "local_cache", "stage", "fetch", "put", "Mirror"]

_logger = logging.getLogger(__name__)


class RemoteError(FetchError):
    """A remote location could not be read or written; the message names it and the fix."""


def is_remote(path: str | os.PathLike | None) -> bool:
    """True for a URL of a remote protocol ('s3://bucket/key'); False for local paths and file://."""
    if path is None:
        return False
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _filesystem(url: str):
    """(fsspec filesystem, path inside it) for url; an S3 endpoint is taken from the environment."""
    try:
        import fsspec
    except ImportError as e:  # optional extra
        raise RemoteError(f"{url} is a remote location, which needs fsspec: pip install 'bit_zoo[cloud]'") from e
    protocol = url.split("://", 1)[0]
    options = {}
    if protocol in ("s3", "s3a", "obs"):
        endpoint = os.environ.get("BIT_ZOO_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        url = "s3://" + url.split("://", 1)[1]  # OBS speaks the S3 protocol
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        raise RemoteError(f"cannot open {url}: {e}. For s3:// install the extra: pip install 'bit_zoo[cloud]'") from e
    return fs, path


def _explain(url: str, e: Exception) -> RemoteError:
    kind = type(e).__name__
    if isinstance(e, FileNotFoundError):
        hint = "the bucket or key does not exist: check the URL"
    elif isinstance(e, PermissionError):
        hint = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy"
    else:
        hint = "check the URL, the endpoint (AWS_ENDPOINT_URL or BIT_ZOO_S3_ENDPOINT) and the credentials"
    return RemoteError(f"{url}: {kind}: {str(e).splitlines()[0] if str(e) else kind} ({hint})")


def local_cache(url: str) -> Path:
    """Where a remote location is staged: $BIT_ZOO_HOME/remote/<protocol>/<bucket>/<key>."""
    home = os.environ.get("BIT_ZOO_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "bit_zoo")
    protocol, rest = url.split("://", 1)
    return Path(home) / "remote" / protocol / rest.strip("/")


@contextlib.contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock file: one process of a node stages while the others wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _get_file(fs, remote_path: str, local: Path, size: int, url: str) -> bool:
    """Download one object to local (temporary name, size checked, renamed); False when already there."""
    if local.is_file() and local.stat().st_size == size:
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.part{os.getpid()}")
    try:
        fs.get_file(remote_path, str(tmp))
        got = tmp.stat().st_size
        if got != size:
            raise RemoteError(f"{url}: downloaded {got} of {size} bytes; run again to resume")
        os.replace(tmp, local)
    except RemoteError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend's failure is reported the same way
        raise _explain(url, e) from e
    finally:
        tmp.unlink(missing_ok=True)
    return True


def stage(url: str, *, include: Callable[[str], bool] | None = None) -> Path:
    """Copy a remote file or folder into the local cache once; return the local path.

    `include(relative_path)` limits a folder to the files a run needs (a split, some classes).
    Files already staged with the right size are kept, so an interrupted staging resumes.
    """
    fs, root = _filesystem(url)
    local_root = local_cache(url)
    with _node_lock(local_root.parent / f".{local_root.name}.lock"):
        try:
            info = fs.info(root)
        except Exception as e:  # noqa: BLE001
            raise _explain(url, e) from e
        if info.get("type") != "directory":
            _get_file(fs, root, local_root, int(info["size"]), url)
            return local_root
        try:
            listing = fs.find(root, detail=True)
        except Exception as e:  # noqa: BLE001
            raise _explain(url, e) from e
        fetched = 0
        for remote_path, detail in sorted(listing.items()):
            rel = remote_path[len(root.rstrip("/")) + 1 :]
            if not rel or (include is not None and not include(rel)):
                continue
            fetched += _get_file(fs, remote_path, local_root / rel, int(detail["size"]), f"{url.rstrip('/')}/{rel}")
        if fetched:
            _logger.info("staged %d files of %s into %s", fetched, url, local_root)
    local_root.mkdir(parents=True, exist_ok=True)
    return local_root


def fetch(path: str | os.PathLike | None) -> str | None:
    """A local path for `path`: itself when local, its staged copy when remote (None stays None)."""
    if path is None or not is_remote(path):
        return None if path is None else str(path)
    return str(stage(str(path)))


def _put(fs, local: Path, target: str, url: str, *, retries: int, backoff_s: float) -> None:
    """Upload one finished file (an object appears only once complete); retried, then one line."""
    for attempt in range(1, retries + 1):
        try:
            fs.put_file(str(local), target)
            return
        except Exception as e:  # noqa: BLE001
            if attempt == retries:
                raise RemoteError(
                    f"upload of {local} to {url} failed after {attempt} attempts "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the local copy is kept at {local}"
                ) from e
            time.sleep(backoff_s * attempt)


def put(local: str | os.PathLike, url: str, *, retries: int = 3, backoff_s: float = 1.0) -> str:
    """Upload a local file to url (see Mirror for a whole output folder); return url."""
    fs, target = _filesystem(url)
    _put(fs, Path(local), target, url, retries=retries, backoff_s=backoff_s)
    return url


def _digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


class Mirror:
    """A local working directory whose finished files are uploaded to a remote folder.

    ``local`` is where the run writes (under the cache, one directory per remote URL); ``sync()``
    uploads every file that is new or changed since the last sync (temporary and hidden files are
    skipped), ``restore(name)`` brings one remote file back first (``--resume auto`` on a fresh node).
    """

    def __init__(self, url: str, *, retries: int = 3, backoff_s: float = 1.0) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = _filesystem(self.url)
        home = os.environ.get("BIT_ZOO_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "bit_zoo")
        self.local = Path(home) / "outputs" / _digest(self.url)
        self.local.mkdir(parents=True, exist_ok=True)
        self.retries = retries
        self.backoff_s = backoff_s
        self._sent: dict[str, tuple[int, int]] = {}

    def restore(self, name: str) -> Path | None:
        """Download `name` from the remote folder into the local one, if it exists there."""
        remote_path = f"{self.root}/{name}"
        try:
            if not self.fs.exists(remote_path):
                return None
            size = int(self.fs.info(remote_path)["size"])
        except Exception as e:  # noqa: BLE001
            raise _explain(f"{self.url}/{name}", e) from e
        local = self.local / name
        _get_file(self.fs, remote_path, local, size, f"{self.url}/{name}")
        st = local.stat()
        self._sent[name] = (st.st_size, st.st_mtime_ns)
        return local

    def _put(self, local: Path, name: str) -> None:
        _put(self.fs, local, f"{self.root}/{name}", f"{self.url}/{name}", retries=self.retries, backoff_s=self.backoff_s)

    def sync(self) -> list[str]:
        """Upload every finished file that changed since the last sync; return their names."""
        sent = []
        for path in sorted(self.local.rglob("*")):
            rel = path.relative_to(self.local).as_posix()
            if not path.is_file() or any(part.startswith(".") for part in Path(rel).parts) or ".tmp" in path.name:
                continue
            st = path.stat()
            if self._sent.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            self._put(path, rel)
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
            sent.append(rel)
        return sent
