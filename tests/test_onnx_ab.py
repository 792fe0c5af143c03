"""benchmarks/onnx_ab.py: the A/B of bit_zoo's and timm's ONNX exports in one process."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import onnx_ab


class _Session:
    """Records which session ran, in order."""

    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    def get_inputs(self):
        return [type("Input", (), {"name": "image"})]

    def run(self, outputs, feed):
        self.calls.append(self.name)
        return [feed["image"]]


def test_blocks_alternate_and_flip_order():
    """A drift in the machine's load must hit both files alike: A B, then B A, then A B."""
    calls: list[str] = []
    speed = onnx_ab._alternate({k: _Session(k, calls) for k in "ab"}, np.zeros((4, 3, 8, 8), np.float32), blocks=3, steps=2)
    assert calls == list("aabb" + "bbaa" + "aabb")
    assert [len(v) for v in speed.values()] == [3, 3] and all(s > 0 for v in speed.values() for s in v)


def test_refuses_zero_blocks(capsys):
    with pytest.raises(SystemExit) as e:
        onnx_ab.main(["--blocks", "0"])
    assert e.value.code == 2 and "--blocks must be at least 1" in capsys.readouterr().err


@pytest.mark.heavy
def test_tiny_run_prints_the_ratio_the_load_and_the_profile(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    argv = ["--image_size", "32", "--batch_size", "2", "--blocks", "2", "--steps", "1", "--warmup", "1"]
    argv += ["--dir", str(tmp_path), "--profile"]
    assert onnx_ab.main(argv) == 0
    out = capsys.readouterr().out
    assert "bit_zoo / timm: x" in out and "other processes used" in out and "load average" in out
    assert "Conv with the residual Add fused" in out and "InstanceNormalization" in out
    assert {"bit_zoo.onnx", "timm.onnx"} <= {p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*profile*.json"))  # the profiler's traces are read, then removed
