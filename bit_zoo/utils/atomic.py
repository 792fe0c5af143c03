"""Write files so that a failure never leaves a half-written file or destroys the previous one.

A file is written under a temporary name beside its target, ``.<stem>.bit_zoo-tmp<PID>-<host><suffix>``,
and renamed onto the target only when the write succeeded. Writers that add names of their own are
covered too: MindSpore's save_checkpoint writes ``<name>.tmp`` first (``.<stem>.bit_zoo-tmp<PID>-<host>.tmp``),
ms.export appends ``.mindir``. Every file starting with the temporary prefix is removed when the
write fails; files of that form whose process is no longer alive (a `kill -9` mid-save) are
removed by the next write into the same directory, or by `remove_stale_temps` at a run's start.
Only names with the ``bit_zoo-tmp`` tag and this machine's host are ever judged: an editor's or
another program's ``.NAME.tmp<PID>`` file is the user's, and the host keeps a node from judging
another node's PIDs on a shared file system.

A full disk (ENOSPC / EDQUOT) becomes one `DiskFullError` naming the file, the space needed and
the space free; the target and every other file are left as they were.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DiskFullError", "atomic_path", "file_mode", "pid_alive", "remove_stale_temps", "save_checkpoint_atomic", "write_text_atomic"]

_logger = logging.getLogger(__name__)

_TEMP_TAG = "bit_zoo-tmp"
# the host has no dot (see _host), so the suffixes writers append (.ckpt, .tmp, .mindir) follow it unambiguously
_TEMP_NAME = re.compile(rf"^\.(?P<stem>.+)\.{_TEMP_TAG}(?P<pid>\d+)-(?P<host>[A-Za-z0-9_-]+)(?:\.[^.]*)*$")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left to write a file; the message names the file, the space needed and the space free."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (signal 0 only checks)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def file_mode() -> int:
    """0o666 minus the process umask: the mode `open()` gives a new file, which writers like MindSpore's override."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (restored at once)
    os.umask(mask)
    return 0o666 & ~mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temp_prefix(path: Path, pid: int) -> str:
    return f".{path.stem}.{_TEMP_TAG}{pid}-{_host()}"


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove temporary files in `directory` left by processes that no longer run; return them."""
    directory = Path(directory)
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:  # no directory yet, or unreadable: nothing of ours can be there
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        if match["host"] != _host() or pid == os.getpid() or pid_alive(pid):
            continue
        path = Path(entry.path)
        try:
            path.unlink()
        except FileNotFoundError:  # another process cleaned it first
            continue
        removed.append(path)
        _logger.warning("removed %s, a temporary file left by process %d (no longer running)", path, pid)
    return removed


def _own_temps(path: Path) -> list[Path]:
    prefix = _temp_prefix(path, os.getpid())
    out = []
    for entry in os.scandir(path.parent):
        rest = entry.name[len(prefix) :]
        if entry.name.startswith(prefix) and (not rest or rest.startswith(".")):
            out.append(Path(entry.path))
    return out


def _remove_own_temps(path: Path) -> int:
    """Remove this process's temporary files for `path`; return the bytes they held."""
    size = 0
    for tmp in _own_temps(path):
        try:
            size += tmp.stat().st_size
            tmp.unlink()
        except FileNotFoundError:
            pass
    return size


def _no_space_cause(error: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind `error` (writers re-raise or wrap it), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return error
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return OSError(errno.ENOSPC, str(error))
        error = error.__cause__ or error.__context__
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _disk_full(path: Path, needed: int | None, written: int) -> DiskFullError:
    free = shutil.disk_usage(path.parent).free
    need = f"needs {_mib(needed)}" if needed else f"needs more than the {_mib(written)} written before the disk filled"
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on device to write {path}: it {need}, {_mib(free)} free in {path.parent}. "
        "Nothing was replaced and the temporary file was removed; free space there or write elsewhere (e.g. --output_dir)",
    )


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary name beside `path`; it is renamed onto `path` only if the block succeeds.

    `suffix` is the temporary name's suffix (default: the target's), for writers that insist on one.
    `expected_bytes`, when known, is checked against the free space first, so a write that cannot
    fit fails before it starts. The file gets the umask's mode whatever the writer set.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    if expected_bytes is not None:
        usage = shutil.disk_usage(path.parent)
        # a pseudo file system (/proc, /sys) reports 0 bytes in all: no space figure to judge; the write says why it fails
        if usage.total > 0 and usage.free < expected_bytes:
            raise _disk_full(path, expected_bytes, 0)
    tmp = path.with_name(f"{_temp_prefix(path, os.getpid())}{path.suffix if suffix is None else suffix}")
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as error:
        written = _remove_own_temps(path)
        if _no_space_cause(error) is not None:
            raise _disk_full(path, expected_bytes, written) from error
        if isinstance(error, OSError) and error.strerror and error.filename and Path(error.filename).name.startswith(tmp.name):
            # the error of the temporary name, which the user never gave: name the file they asked for
            raise type(error)(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        _remove_own_temps(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, errors: str = "strict") -> Path:
    """`text` as UTF-8. errors="surrogateescape" writes a file name that is not valid UTF-8 (os.fsdecode'd
    into lone surrogates) back as its original bytes instead of failing."""
    data = text.encode("utf-8", errors)
    with atomic_path(path, expected_bytes=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _checkpoint_bytes(save_obj) -> int:
    """Roughly what ms.save_checkpoint writes: the tensor bytes plus a little protobuf framing."""
    if isinstance(save_obj, list):
        tensors = [entry["data"] for entry in save_obj]
    elif isinstance(save_obj, dict):
        tensors = list(save_obj.values())
    else:  # a Cell
        tensors = list(save_obj.get_parameters())
    return int(sum(getattr(t, "nbytes", 0) for t in tensors) * 1.01) + (64 << 10)


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def _mindspore_save_log_muted() -> Iterator[None]:
    """MindSpore logs a CRITICAL 'Failed to save ... permission ... disk space' line before re-raising;
    the error raised from here says precisely what happened, so that line is held back."""
    from mindspore import log as ms_log

    get_logger = getattr(ms_log, "_get_logger", None)
    logger = get_logger() if get_logger else None
    drop = _DropRecords()
    if logger is not None:
        logger.addFilter(drop)
    try:
        yield
    finally:
        if logger is not None:
            logger.removeFilter(drop)


def save_checkpoint_atomic(save_obj, path: str | os.PathLike, **kwargs) -> Path:
    """`mindspore.save_checkpoint` through `atomic_path`: space checked first, MindSpore's own
    ``.tmp`` file included in the clean-up, one `DiskFullError` when the disk fills."""
    import mindspore as ms

    with _mindspore_save_log_muted(), atomic_path(path, suffix=".ckpt", expected_bytes=_checkpoint_bytes(save_obj)) as tmp:
        ms.save_checkpoint(save_obj, str(tmp), **kwargs)  # it appends .ckpt to other names
    return Path(path)
