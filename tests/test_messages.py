"""Messages that name the real cause, in one line: a path the file system cannot hold, a local path where a
bucket URL belongs, a file name that is not UTF-8 (kept, not lost after the table was printed)."""

from __future__ import annotations

import csv
import io
import os
import sys

import numpy as np
import pytest
from conftest import write_train_checkpoint
from PIL import Image

import bit_zoo
from bit_zoo.tools import predict
from bit_zoo.tools import remote as remote_tool
from bit_zoo.utils.atomic import DiskFullError, write_text_atomic
from bit_zoo.utils.runner import one_line


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("target", ["/proc/bit_zoo_preds.csv", "/proc/bit_zoo_out/preds.csv"])
def test_a_path_on_a_pseudo_file_system_is_not_called_a_full_disk(target):
    """/proc reports 0 bytes free (it has no blocks at all): that was reported as 'no space left on device,
    0.0 MiB free'. The real cause is the file system's own answer, for the path the user gave."""
    with pytest.raises(OSError) as caught:
        write_text_atomic(target, "file,label_1\n")
    assert not isinstance(caught.value, DiskFullError), one_line(caught.value)
    line = one_line(caught.value)
    assert "no space" not in line and "No such file or directory" in line, line
    assert target in line or os.path.dirname(target) in line, line
    assert "bit_zoo-tmp" not in line  # the temporary name is ours, not the user's


@pytest.mark.parametrize("argv", [["mb", "notaurl"], ["mb", "/tmp"], ["mb", "s3://"], ["upload", ".", "s3:///key"]])
def test_remote_refuses_a_url_without_a_bucket_in_one_line(argv, capsys):
    """`remote mb notaurl` reached fsspec's local file system and reported a FileExistsError about the cwd."""
    assert remote_tool.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "is not a" in err[0] and "s3://BUCKET" in err[0] and "FileExistsError" not in err[0], err[0]


def test_predict_keeps_a_file_name_that_is_not_utf8(tmp_path, monkeypatch, capsys):
    """A file named with Latin-1 bytes: the CSV is written (the name's own bytes, so it opens the file again)
    and the table is printed on a strict UTF-8 stdout. Before, the CSV write failed with a UnicodeEncodeError
    after the table was printed: exit 2 and no CSV."""
    net = bit_zoo.ResNetV2((1, 1, 1, 1), 1, num_classes=3, eager_jit=False)
    ckpt = write_train_checkpoint(tmp_path / "best.ckpt", net, class_names=["a", "b", "c"], image_size=32)
    images = tmp_path / "images"
    images.mkdir()
    odd = os.fsdecode(bytes(images) + b"/caf\xe9.png")  # how Python hands such a name over: lone surrogates
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(odd)
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(images / "ok.png")
    out = tmp_path / "preds.csv"
    strict = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # a UTF-8 terminal that refuses surrogates
    monkeypatch.setattr(sys, "stdout", strict)
    assert predict.main([str(images), "--checkpoint_path", str(ckpt), "--output_csv", str(out), "--progress", "false"]) == 0
    strict.flush()
    assert "caf\ufffd.png" in strict.buffer.getvalue().decode("utf-8")
    with out.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == [odd, str(images / "ok.png")]
    assert all(os.path.exists(r[0]) for r in rows[1:])


@pytest.mark.parametrize(
    ("yaml_text", "extra", "named"),
    [
        ("model: [unclosed\n", [], "is not valid YAML"),
        ("model: !!python/object/apply:os.system ['echo unsafe']\n", [], "could not determine a constructor"),
        (None, ["--devices", "0"], "devices=0: must be a whole number >= 1"),
        (None, ["--devices", "-2"], "devices=-2: must be a whole number >= 1"),
    ],
)
def test_memory_reports_bad_yaml_and_devices_in_one_line(tmp_path, capsys, yaml_text, extra, named):
    """python -m bit_zoo.memory printed tracebacks for bad YAML and an object tag, divided by zero for
    --devices 0 and accepted --devices -2."""
    from pathlib import Path

    from bit_zoo.tools import memory

    config = tmp_path / "c.yaml"
    if yaml_text is None:
        config = Path(__file__).resolve().parents[1] / "configs" / "quickstart_digits.yaml"
    else:
        config.write_text(yaml_text)
    assert memory.main(["-c", str(config), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and named in err[0], err
