"""The training step's compile cache (bit_zoo/training/_compile_cache.py): one graph per key, the key covering everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from bit_zoo.models.resnetv2 import ResNetV2
from bit_zoo.training import _compile_cache as cc
from bit_zoo.training.optim import OptimConfig, create_optimizer
from bit_zoo.training.train_step import StepConfig, Trainer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _digest(*, layers=(1, 1, 1, 1), width=1, classes=10, conv_impl="unfold", size=32, batch=2, dtype=ms.float32, amp=None, **step):
    ms.set_seed(0)
    net = ResNetV2(layers, width, num_classes=classes, conv_impl=conv_impl)
    run = ms.amp.auto_mixed_precision(net, amp) if amp else net
    opt = create_optimizer(net.trainable_params(), OptimConfig(opt="sgd", momentum=0.9), np.full(10, 1e-3, np.float32))
    trainer = Trainer(run, opt, StepConfig(**step), soft_labels=False)
    cell = trainer.train_step if trainer.fused else trainer.forward_backward
    x = ms.Tensor(np.zeros((batch, 3, size, size)), dtype)
    y = ms.Tensor(np.zeros(batch, np.int32))
    extra = {"step": StepConfig(**step).__dict__, "jit_level": trainer.jit_level}
    return cc.key_digest(cell, (x, y), extra)[1]


def test_two_configs_differing_in_any_one_thing_never_share_a_graph(monkeypatch):
    base = _digest()
    assert _digest() == base  # the same config built again (other random weights, other cell instances): the same key
    variants = {
        "architecture": _digest(layers=(1, 1, 2, 1)),
        "width": _digest(width=2),
        "classes": _digest(classes=11),
        "conv_impl": _digest(conv_impl="native"),
        "input size": _digest(size=64),
        "batch": _digest(batch=4),
        "input dtype": _digest(dtype=ms.float16),
        "AMP level": _digest(amp="O2"),
        "clip": _digest(clip_grad_norm=1.0),
        "EMA": _digest(ema_decay=0.9),
        "loss scale": _digest(loss_scale="dynamic"),
        "accumulation": _digest(accum_steps=2),
    }
    monkeypatch.setattr(ms, "__version__", "0.0.0")
    variants["MindSpore version"] = _digest()
    monkeypatch.undo()
    monkeypatch.setattr(cc, "_package_digest", lambda: "another bit_zoo source")
    variants["bit_zoo source"] = _digest()
    monkeypatch.undo()
    monkeypatch.setenv("MS_DEV_SOMETHING", "1")
    variants["MindSpore switch"] = _digest()
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants), variants


class _Scaled(nn.Cell):
    """The case MindSpore's own cache gets wrong: a constant tensor is baked into the saved graph."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.dense = nn.Dense(8, 4)
        self.scale = ms.Tensor(np.float32(scale))

    def construct(self, x):
        return self.dense(x) * self.scale


def test_a_constant_tensor_or_a_users_source_changes_the_key(tmp_path, monkeypatch):
    x = ms.Tensor(np.ones((2, 8), np.float32))
    assert cc.key_digest(_Scaled(2.0), (x,))[1] == cc.key_digest(_Scaled(2.0), (x,))[1]
    assert cc.key_digest(_Scaled(2.0), (x,))[1] != cc.key_digest(_Scaled(3.0), (x,))[1]
    user = tmp_path / "user_cells.py"
    user.write_text("from mindspore import nn\nclass Head(nn.Cell):\n    def construct(self, x):\n        return x * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_cells

    first = cc.key_digest(user_cells.Head(), (x,))[1]
    user.write_text(user.read_text().replace("x * 2", "x * 3"))
    cc._file_digest.cache_clear()
    assert cc.key_digest(user_cells.Head(), (x,))[1] != first


class _FakeCompile(_Scaled):
    """Stands in for MindSpore's compiler: records where the cache pointed and writes a 'graph' there."""

    calls: list = []

    def compile(self, *args):
        import mindspore.graph.api as api

        path = Path(ms.get_context("compile_cache_path"))
        self.calls.append((path, bool(ms.get_context("enable_compile_cache")), Path(api.entry_script_path).read_text()))
        if getattr(self, "fail", False):
            raise RuntimeError("compile failed")
        if ms.get_context("enable_compile_cache") and not (path / "graph").exists():
            (path / "graph").write_text(str(float(self.scale.asnumpy())))


def test_entries_are_published_whole_and_reused(tmp_path, monkeypatch):
    import mindspore.graph.api as api

    monkeypatch.setenv(cc.ENV, str(tmp_path))
    entry_before = api.entry_script_path
    x = ms.Tensor(np.ones((2, 8), np.float32))
    _FakeCompile.calls = []
    assert cc.compile_cached(_FakeCompile(2.0), x) == "miss"
    assert cc.compile_cached(_FakeCompile(2.0), x) == "hit"
    assert cc.compile_cached(_FakeCompile(3.0), x) == "miss"
    entries = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(entries) == 2 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert sorted((p / "graph").read_text() for p in entries) == ["2.0", "3.0"]
    (miss_dir, on, dep), (hit_dir, _, dep2), _ = _FakeCompile.calls
    assert on and miss_dir.parent == tmp_path and miss_dir.name.startswith(".")  # compiled into a private directory ...
    assert hit_dir in entries and dep == dep2 and '"bit_zoo"' in dep  # ... loaded from the published one, same key file
    assert json.loads((hit_dir / "key.json").read_text())["inputs"] == [[[2, 8], "Float32"]]
    assert not ms.get_context("enable_compile_cache") and api.entry_script_path == entry_before

    failing = _FakeCompile(4.0)
    failing.fail = True
    with pytest.raises(RuntimeError, match="compile failed"):
        cc.compile_cached(failing, x)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # nothing published, nothing half-written
    assert not ms.get_context("enable_compile_cache") and api.entry_script_path == entry_before


def test_off_switch_and_pynative(tmp_path, monkeypatch):
    x = ms.Tensor(np.ones((2, 8), np.float32))
    _FakeCompile.calls = []
    monkeypatch.setenv(cc.ENV, "0")
    assert cc.compile_cached(_FakeCompile(2.0), x) == "off"
    assert _FakeCompile.calls[-1][1] is False  # compiled, with MindSpore's cache off
    monkeypatch.setenv(cc.ENV, str(tmp_path))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    assert cc.compile_cached(_FakeCompile(2.0), x) == "pynative"
    assert len(_FakeCompile.calls) == 1 and list(tmp_path.iterdir()) == []


_STEP = """
import sys, json, numpy as np, mindspore as ms
from bit_zoo.models.resnetv2 import ResNetV2
from bit_zoo.training.optim import OptimConfig, create_optimizer
from bit_zoo.training.train_step import StepConfig, Trainer
ms.set_context(mode=ms.GRAPH_MODE)
size = int(sys.argv[1])
ms.set_seed(0)
net = ResNetV2((1, 1, 1, 1), 1, num_classes=10)
opt = create_optimizer(net.trainable_params(), OptimConfig(opt="sgd", momentum=0.9), np.full(10, 0.1, np.float32))
trainer = Trainer(net, opt, StepConfig(), soft_labels=False)
rng = np.random.default_rng(0)
batch = [(ms.Tensor(rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)), ms.Tensor(np.array([1, 2], np.int32)))]
losses = [trainer.step(batch)[0] for _ in range(2)]
print(json.dumps({"cache": trainer.compile_cache, "losses": losses}))
"""


@pytest.mark.heavy
def test_a_second_run_loads_the_graph_and_trains_alike(tmp_path):
    """Fresh processes: the same config loads the saved graph and gives the same losses; another input size compiles its own."""
    env = {**os.environ, cc.ENV: str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}

    def run(size):
        out = subprocess.run([sys.executable, "-c", _STEP, str(size)], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold, warm, other, cold_no_cache = run(32), run(32), run(64), None
    assert (cold["cache"], warm["cache"], other["cache"]) == ({"TrainStep": "miss"}, {"TrainStep": "hit"}, {"TrainStep": "miss"})
    env[cc.ENV] = "0"
    cold_no_cache = run(32)
    assert warm["losses"] == cold["losses"] == cold_no_cache["losses"]  # same graph, same numbers, bit for bit
    assert other["losses"] != cold["losses"]
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2
