"""Nothing lost, nothing silent: full disks, killed saves, stale temporary files, clean interpreter exits.

The disk-full tests run twice over: on a real 3 MiB tmpfs where the machine lets the test mount one
(root in a container with CAP_SYS_ADMIN), and with ENOSPC injected into the writer everywhere.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from bit_zoo.utils.atomic import DiskFullError, _host, atomic_path, file_mode, remove_stale_temps, save_checkpoint_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def _entries(n: int) -> list[dict]:
    return [{"name": "w", "data": ms.Tensor(np.arange(n, dtype=np.float32))}]


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs, or skip where mounting is not permitted."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected-ENOSPC tests cover the logic")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_on_a_real_small_file_system(small_fs, capfd, monkeypatch):
    target = small_fs / "last.ckpt"
    save_checkpoint_atomic(_entries(250_000), target)  # 1 MiB
    before = target.read_bytes()
    with pytest.raises(DiskFullError) as error:  # 4 MiB cannot fit: refused before writing
        save_checkpoint_atomic(_entries(1_000_000), target)
    assert error.value.errno == errno.ENOSPC
    assert f"no space left on device to write {target}: it needs 3.9 MiB, " in str(error.value)
    capfd.readouterr()
    monkeypatch.setattr("bit_zoo.utils.atomic._checkpoint_bytes", lambda obj: None)  # no estimate: MindSpore fills the disk, then fails
    with pytest.raises(DiskFullError, match=r"needs more than the \d\.\d MiB written before the disk filled") as error:
        save_checkpoint_atomic(_entries(700_000), target)
    assert target.read_bytes() == before and _hidden(small_fs) == []  # MindSpore's own .tmp removed too
    assert "\n" not in str(error.value) and "Failed to save" not in capfd.readouterr().err  # MindSpore's CRITICAL line held back
    save_checkpoint_atomic(_entries(250_000), target)  # the space is free again


def test_injected_enospc_names_the_file_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "out" / "last.ckpt"
    write_text_atomic(target, "earlier checkpoint")

    def writer_filling_the_disk(tmp: Path) -> None:
        ms_tmp = tmp.with_suffix(".tmp")  # what MindSpore writes before its own rename
        ms_tmp.write_bytes(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=rf"to write {target}: it needs more than the 0\.0 MiB written.*free in {target.parent}"):
        with atomic_path(target, suffix=".ckpt") as tmp:
            writer_filling_the_disk(tmp)
    monkeypatch.setattr("shutil.disk_usage", lambda path: type("U", (), {"free": 1000, "total": 10**9})())
    with pytest.raises(DiskFullError, match=r"needs 0\.0 MiB, 0\.0 MiB free"):
        write_text_atomic(target, "y" * 5000)  # refused before anything is written
    assert target.read_text() == "earlier checkpoint" and _hidden(target.parent) == []


def test_other_errors_pass_through_and_clean_up(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


_KILLED_SAVE = """
import os, signal, sys
from bit_zoo.utils.atomic import atomic_path
with atomic_path(sys.argv[1], suffix=".ckpt") as tmp:
    tmp.write_bytes(b"half a checkpoint")
    tmp.with_suffix(".tmp").write_bytes(b"mindspore's own temporary")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_temporary_files_of_a_killed_save_are_removed_at_the_next_write(tmp_path):
    target = tmp_path / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(target)], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == -signal.SIGKILL
    host = _host()
    left = _hidden(tmp_path)  # the dead writer's file and MindSpore-style .tmp sibling, named by PID and host
    dead_pid = int(left[0].removeprefix(".last.bit_zoo-tmp").split("-")[0])
    assert left == [f".last.bit_zoo-tmp{dead_pid}-{host}.ckpt", f".last.bit_zoo-tmp{dead_pid}-{host}.tmp"]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [tmp_path / f".best.bit_zoo-tmp{alive.pid}-{host}.ckpt", tmp_path / f".best.bit_zoo-tmp{dead_pid}-otherhost.ckpt"]
        for path in keep:  # a live process's write, and another node's (its PIDs mean nothing here)
            path.write_bytes(b"in progress")
        write_text_atomic(tmp_path / "summary.json", "{}")
        assert _hidden(tmp_path) == sorted(p.name for p in keep)
        assert remove_stale_temps(tmp_path) == []
    finally:
        alive.kill()
        alive.wait()
    assert remove_stale_temps(tmp_path) == [keep[0]]


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint_atomic(_entries(10), tmp_path / "a.ckpt")  # MindSpore alone would leave 0400
        write_text_atomic(tmp_path / "b.txt", "x")
        assert file_mode() == 0o640
    finally:
        os.umask(old)
    assert {(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {0o640}


def test_a_script_with_a_live_model_exits_without_tracebacks(tmp_path, make_upstream_npz):
    """MindSpore 2.10 prints 'Exception ignored in Cell.__del__' for every live cell at exit; bit_zoo silences exactly that."""
    npz = tmp_path / "BiT-S-R50x1.npz"
    make_upstream_npz(npz, "bit_s_r50x1", 1000)
    script = f"""
import numpy as np, mindspore as ms, mindcv
import bit_zoo
print(len(bit_zoo.list_models()), len(bit_zoo.list_models(pretrained=True)))
model = bit_zoo.create_model("bit_s_r50x1", checkpoint_path={str(npz)!r}, num_classes=10)
other = mindcv.create_model("bit_m_r50x1")
print(model(ms.Tensor(np.zeros((1, 3, 32, 32), np.float32))).shape, model.weights.input_size)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(1, 10)" in done.stdout
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr[-3000:]


@pytest.mark.heavy
def test_training_skips_a_corrupt_image(tmp_path):
    """Random bytes named .jpg in a class folder: train.py warns once naming the file and finishes (exit 0)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "data" / "train" / cls / f"{i}.jpg")
    bad = tmp_path / "data" / "train" / "b" / "3.jpg"
    bad.write_bytes(rng.bytes(2000))
    argv = [
        "--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "folder", "--data_dir", str(tmp_path / "data"),
        "--val_split", "4", "--image_size", "32", "--eval_size", "32", "--batch_size", "4", "--steps", "6",
        "--opt", "sgd", "--lr", "0.01", "--scheduler", "constant", "--progress", "false", "--num_workers", "1",
        "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "undecodable image" in line]
    assert len(warnings) == 1 and str(bad) in warnings[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "module, argv",
    [
        ("benchmarks.benchmark", ["--steps", "abc"]),
        ("bit_zoo.convert", ["--output", "x.npz", "--bogus"]),
        ("bit_zoo.embed", ["--model", "bit_s_r50x1"]),  # --output missing
        ("bit_zoo.fewshot", ["--shots", "one"]),
        ("bit_zoo.predict", ["--topk", "two"]),
        ("bit_zoo.memory", []),  # -c missing
        ("bit_zoo.remote", ["copy", "a", "b"]),
        ("benchmarks.eager_bench", ["--batch_size", "-"]),
    ],
)
def test_every_tool_reports_a_bad_argument_in_one_line(module, argv, capsys):
    """The python -m bit_zoo.<tool> commands (and the benchmarks) answer a bad argument as train.py does: one line naming
    the argument and --help, exit 2, no usage dump."""
    import importlib

    main = importlib.import_module(module).main
    try:
        code = main(argv)  # the tools return run_cli's exit status
    except SystemExit as stop:  # a parser that exits itself
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"python -m {module}: error: ") and "--help" in err


def test_stale_temp_cleanup_leaves_other_programs_files_alone(tmp_path):
    """Only bit_zoo's own temporary names (bit_zoo tag, PID and host) are judged stale; an editor's or another
    program's `.NAME.tmp<PID>` file of a dead process is the user's and survives every write into its folder."""
    dead = 3999999  # above Linux's default pid_max (32768) and rarely reached under the 4194304 cap
    assert not os.path.exists(f"/proc/{dead}")
    theirs = [f".thesis.tmp{dead}.tex", f".thesis.tmp{dead}-{_host()}.tex", f".notes.tmp{dead}"]
    for name in theirs:
        (tmp_path / name).write_text("a user's file")
    write_text_atomic(tmp_path / "preds.csv", "file\n")
    assert remove_stale_temps(tmp_path) == []
    assert _hidden(tmp_path) == sorted(theirs)
