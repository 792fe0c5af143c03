"""One run per output folder: a second train.py into a folder another live process holds is refused in one line
before it writes anything; a lock file left by a dead process is named and taken over; the lock goes at exit.

The holder is a separate process that takes the lock with flock itself (not through bit_zoo), so the test
states the file's protocol: ``<output_dir>/.bit_zoo.lock``, flock'ed, "host=... pid=... prog=..." inside.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

import train

TINY = [
    "--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "digits", "--image_size", "32", "--eval_size", "32",
    "--hflip", "false", "--opt", "sgd", "--lr", "0.01", "--scheduler", "constant", "--progress", "false",
    "--eval_samples", "16", "--num_workers", "1", "--transform", "eval", "--batch_size", "8", "--steps", "1",
]  # fmt: skip

_HOLDER = """
import fcntl, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"host={socket.gethostname()} pid={os.getpid()} prog=train.py since={time.time():.0f}\\n".encode())
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_held_output_dir_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out / ".bit_zoo.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert train.cli(TINY + ["--output_dir", str(out)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert len(err) == 1 and f"process {holder.pid} on host {socket.gethostname()}" in err[0] and "in use by another run" in err[0]
        assert "--output_dir" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [".bit_zoo.lock"]  # nothing of the refused run
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_is_named_and_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = 3999999  # above Linux's default pid_max (32768) and rarely reached under the 4194304 cap
    assert not os.path.exists(f"/proc/{dead}")
    (out / ".bit_zoo.lock").write_text(f"host={socket.gethostname()} pid={dead} prog=train.py since=0\n")  # a kill -9'ed run's
    summary = train.main(TINY + ["--output_dir", str(out)])  # train.py's logging writes to stderr
    assert summary["steps"] == 1
    assert f"took over the lock left by process {dead} on host {socket.gethostname()}" in capsys.readouterr().err
    assert not (out / ".bit_zoo.lock").exists()  # released at the end of the run
    # released, so the next run into the folder is not refused
    assert train.main(TINY + ["--output_dir", str(out), "--overwrite", "true"])["steps"] == 1


def test_a_refused_bad_run_leaves_no_lock_and_no_new_folder(tmp_path, capsys):
    out = tmp_path / "new_run"
    assert train.cli(TINY + ["--output_dir", str(out), "--num_classes", "3"]) == 2  # digits has 10 classes
    assert not out.exists()


@pytest.mark.parametrize("held", [True, False])
def test_folder_lock_in_process(tmp_path, held):
    from bit_zoo.utils.lock import FolderInUseError, FolderLock

    first = FolderLock(tmp_path / "x", prog="a")
    with first:
        if held:  # another open file description: flock conflicts even inside one process
            with pytest.raises(FolderInUseError, match=f"process {os.getpid()}"):
                FolderLock(tmp_path / "x", prog="b").acquire()
    with FolderLock(tmp_path / "x", prog="b"):
        assert f"pid={os.getpid()} prog=b" in (tmp_path / "x" / ".bit_zoo.lock").read_text()
