"""One writer per output folder: a lock file naming the host and PID of the run that writes there.

Two runs started into the same output_dir would interleave metrics.jsonl and overwrite each other's
best.ckpt. The first takes ``<folder>/.bit_zoo.lock`` with ``fcntl.flock`` (atomic, and released by
the kernel when the process ends, even by ``kill -9``) and writes its host, PID and start time into
it; a second run finds the lock taken and stops in one line naming the first. A lock file left by a
process that ended without releasing it is not held by anyone: the next run names it and takes it
over. The file is removed at release (a folder the lock alone created is removed with it).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import ConfigError

__all__ = ["LOCK_NAME", "FolderLock", "FolderInUseError"]

_logger = logging.getLogger(__name__)

LOCK_NAME = ".bit_zoo.lock"


class FolderInUseError(ConfigError):
    """Another live process holds the folder's lock; the message names it."""


def _describe(text: str) -> str:
    """'process 123 on host h (python train.py, since ...)' from a lock file's content, or what is known."""
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if "pid" not in fields:
        return "an unknown process"
    since = fields.get("since")
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(since)))}" if since else ""
    return f"process {fields['pid']} on host {fields.get('host', '?')} ({fields.get('prog', '?')}{when})"


class FolderLock:
    """``with FolderLock(folder, prog="train.py"):`` hold the folder for one run; see the module docstring.

    ``name`` is the lock file's (another name locks one output of a folder others share, e.g. an embeddings
    file); ``label`` is what the refusal calls the locked thing; ``option`` the option that moves it.
    ``enabled=False`` (ranks other than 0 of a data-parallel run, which write nothing there) does nothing.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        prog: str,
        name: str = LOCK_NAME,
        label: str | None = None,
        option: str = "--output_dir",
        enabled: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.label = label or f"output_dir {self.folder}"
        self.prog, self.option, self.enabled = prog, option, enabled
        self._fd: int | None = None
        self._made_folder = False

    def acquire(self) -> FolderLock:
        if not self.enabled or self._fd is not None:
            return self
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                os.close(fd)
                self._drop_made_folder()
                raise FolderInUseError(
                    f"{self.label} is in use by another run: {holder} holds {self.path}. "
                    f"Wait for it to end, or choose another {self.option}"
                ) from None
            # the holder we waited on may have removed the file between our open and flock: lock the file now there
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if previous:
            _logger.warning("%s: took over the lock left by %s, no longer running", self.folder, _describe(previous))
        record = f"host={socket.gethostname()} pid={os.getpid()} prog={self.prog.replace(' ', '_')} since={time.time():.0f}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody can be between flock and this
        finally:
            os.close(fd)
        self._drop_made_folder()

    def _drop_made_folder(self) -> None:
        if self._made_folder:
            try:
                self.folder.rmdir()  # only when empty: a run that wrote nothing leaves nothing
            except OSError:
                pass

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
