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
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import FetchError
from .atomic import write_text_atomic
from .paths import home_dir

__all__ = [
    "RemoteError",
    "UploadError",
    "NOT_STAGED",
    "is_remote",
    "local_cache",
    "stage",
    "fetch",
    "put",
    "upload",
    "make_bucket",
    "Mirror",
]

# A folder staged empty (a class the run does not use): it keeps the class's place in the label order.
NOT_STAGED = ".bit_zoo_not_staged"

_logger = logging.getLogger(__name__)


class RemoteError(FetchError):
    """A remote location could not be read or written; the message names it and the fix."""


class UploadError(RemoteError):
    """A finished local file could not be uploaded after the retries; the local copy is kept."""


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
    protocol, rest = url.split("://", 1)
    root = home_dir() / "remote"
    return _inside(root, f"{protocol}/{rest.strip('/')}", url, what="the staging cache")


def _inside(root: Path, rel: str, name: str, *, what: str = "its staging folder") -> Path:
    """root / rel, refused in one line naming `name` unless it stays inside root.

    rel comes from outside (a bucket's listing, a URL): a '..' part or an absolute name would let whoever
    writes the bucket choose where bit_zoo writes, and so would a symlink already in the cache that leads
    out. The resolved path is what counts; nothing has been written when this raises.
    """
    parts = rel.split("/")
    if rel.startswith("/") or ".." in parts:
        kind = "an absolute name" if rel.startswith("/") else "a '..' part"
        raise RemoteError(
            f"{name}: refused, the name has {kind} and would be written outside {what} {root}; "
            "rename or remove that object (nothing was staged)"
        )
    path = root / rel
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise RemoteError(
            f"{name}: refused, {path} leads outside {what} {root} through a symlink (to {real}); "
            "remove that symlink from the cache (nothing was staged)"
        )
    return path


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


def stage(
    url: str,
    *,
    include: Callable[[str], bool] | None = None,
    select: Callable[[list[str]], tuple[list[str], list[str]]] | None = None,
) -> Path:
    """Copy a remote file or folder into the local cache once; return the local path.

    `include(relative_path)` limits a folder to the files a run needs, one by one. `select(relative_paths)`
    sees the whole listing and returns (files to fetch, folders to create empty): a class folder the run
    does not read is created with a NOT_STAGED marker, so the class keeps its place in the label order.
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
        sizes = {path[len(root.rstrip("/")) + 1 :]: int(detail["size"]) for path, detail in listing.items()}
        sizes.pop("", None)
        if select is not None:
            wanted, empty = select(sorted(sizes))
        else:
            wanted, empty = [rel for rel in sorted(sizes) if include is None or include(rel)], []
        # every local name checked before the first download: a refused listing stages nothing
        base = url.rstrip("/")
        local = {rel: _inside(local_root, rel, f"{base}/{rel}") for rel in [*wanted, *empty]}
        fetched = 0
        for rel in wanted:
            fetched += _get_file(fs, f"{root.rstrip('/')}/{rel}", local[rel], sizes[rel], f"{base}/{rel}")
        staged_dirs = {local[rel].parent for rel in wanted}
        for folder in staged_dirs:  # complete now: a folder an earlier run left empty is staged
            (folder / NOT_STAGED).unlink(missing_ok=True)
        for rel in empty:
            folder = local[rel]
            folder.mkdir(parents=True, exist_ok=True)
            if folder not in staged_dirs and not any(folder.iterdir()):
                (folder / NOT_STAGED).touch()
        if fetched:
            _logger.info("staged %d of %d files of %s into %s", fetched, len(sizes), url, local_root)
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
                raise UploadError(
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
        self.local = home_dir() / "outputs" / _digest(self.url)
        self.local.mkdir(parents=True, exist_ok=True)
        self.retries = retries
        self.backoff_s = backoff_s
        # name -> (size, mtime_ns, remote ETag) of each file as last uploaded or restored; kept on disk, so
        # a later process on this node knows which local files the remote already holds
        self._record = self.local / ".sent.json"
        try:
            self._sent: dict[str, list] = json.loads(self._record.read_text())
        except (OSError, ValueError):
            self._sent = {}

    def _mark_sent(self, name: str, local: Path) -> None:
        st = local.stat()
        try:
            etag = self.fs.info(f"{self.root}/{name}").get("ETag")
        except Exception:  # noqa: BLE001 - the record is an optimisation; without it the file is compared by time
            etag = None
        self._sent[name] = [st.st_size, st.st_mtime_ns, etag]
        write_text_atomic(self._record, json.dumps(self._sent))

    def _unchanged(self, name: str, local: Path) -> bool:
        st = local.stat()
        return (self._sent.get(name) or [None, None])[:2] == [st.st_size, st.st_mtime_ns]

    def check_writable(self) -> None:
        """Write and delete a small probe object: a missing bucket, refused credentials or a read-only
        policy fail here, in one line, before the run computes anything it could not upload."""
        probe = f"{self.root}/.bit_zoo_probe"
        try:
            self.fs.pipe_file(probe, b"bit_zoo write check\n")
            self.fs.rm_file(probe)
        except Exception as e:  # noqa: BLE001
            raise _explain(self.url, e) from e

    def exists(self, name: str) -> bool:
        """Whether the remote folder holds `name` (a previous run's last.ckpt, say)."""
        try:
            return bool(self.fs.exists(f"{self.root}/{name}"))
        except Exception as e:  # noqa: BLE001
            raise _explain(f"{self.url}/{name}", e) from e

    def restore(self, name: str) -> Path | None:
        """Bring `name` from the remote folder into the local one (None when the remote has none).

        A local copy at least as new as the remote object is kept: it is one whose upload failed, and
        the next sync sends it. Otherwise the remote object replaces it (another node continued the run).
        """
        remote_path = f"{self.root}/{name}"
        try:
            if not self.fs.exists(remote_path):
                return None
            info = self.fs.info(remote_path)
        except Exception as e:  # noqa: BLE001
            raise _explain(f"{self.url}/{name}", e) from e
        local = _inside(self.local, name, f"{self.url}/{name}", what="the output folder")
        if local.is_file():
            if not self._unchanged(name, local):
                return local  # written after its last upload (which failed): newer than the remote; the next sync sends it
            if info.get("ETag") == self._sent[name][2]:
                return local  # the remote holds this very file
        local.unlink(missing_ok=True)  # the remote is newer (another node continued the run)
        _get_file(self.fs, remote_path, local, int(info["size"]), f"{self.url}/{name}")
        self._mark_sent(name, local)
        return local

    def _put(self, local: Path, name: str) -> None:
        _put(self.fs, local, f"{self.root}/{name}", f"{self.url}/{name}", retries=self.retries, backoff_s=self.backoff_s)

    def sync(self, *, strict: bool = True) -> list[str]:
        """Upload every finished file that changed since the last sync; return their names.

        A file whose upload fails stays unsent, so the next sync tries it again. strict raises the
        first failure (UploadError, one line); otherwise it is logged as a warning and the run goes on.
        """
        sent = []
        for path in sorted(self.local.rglob("*")):
            rel = path.relative_to(self.local).as_posix()
            if not path.is_file() or any(part.startswith(".") for part in Path(rel).parts) or ".tmp" in path.name:
                continue
            if self._unchanged(rel, path):
                continue
            try:
                self._put(path, rel)
            except UploadError as e:
                if strict:
                    raise
                _logger.warning("%s (tried again at the next checkpoint)", e)
                continue
            self._mark_sent(rel, path)
            sent.append(rel)
        return sent

    def sync_soon(self) -> list[str]:
        """sync() during training: a failed upload is a warning and is retried at the next checkpoint."""
        return self.sync(strict=False)


def _require_bucket_url(url: str, what: str) -> None:
    """Refuse a URL without a remote protocol or a bucket (a local path given by mistake would otherwise
    reach fsspec's local file system, whose error names some other folder)."""
    bucket = str(url).split("://", 1)[1].split("/", 1)[0] if is_remote(url) else ""
    if not bucket:
        raise RemoteError(f"{url!r} is not {what}: give s3://BUCKET{'' if what == 'a bucket URL' else '/PREFIX'} (obs:// too)")


def upload(local: str | os.PathLike, url: str, *, retries: int = 3, backoff_s: float = 1.0) -> int:
    """Upload a local file, or every file of a local folder, under url; return the number of files.

    Each object appears only once its upload completed (see put); hidden files are skipped.
    """
    _require_bucket_url(url, "a remote URL")
    local = Path(local)
    if not local.exists():
        raise FileNotFoundError(f"{local}: no such file or folder to upload")
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    fs, root = _filesystem(url)
    count = 0
    for path in files:
        rel = "" if path == local else path.relative_to(local).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        target, shown = (root, url) if not rel else (f"{root.rstrip('/')}/{rel}", f"{url.rstrip('/')}/{rel}")
        _put(fs, path, target, shown, retries=retries, backoff_s=backoff_s)
        count += 1
    return count


def make_bucket(url: str) -> None:
    """Create the bucket of url (s3://bucket): for a local test server; on OBS, buckets are made in the console."""
    _require_bucket_url(url, "a bucket URL")
    fs, root = _filesystem(url)
    try:
        fs.mkdir(root.split("/", 1)[0])
    except Exception as e:  # noqa: BLE001
        raise _explain(url, e) from e
