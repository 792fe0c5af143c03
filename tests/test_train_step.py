"""Trainer.step: the one-graph path (accum_steps 1) and the accumulation path compute the same
optimizer steps; loss scaling, skipping and EMA in the graph; (heavy) overflow agreed by 2 ranks."""

from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from bit_zoo.training.train_step import JIT_LEVEL_ENV, StepConfig, Trainer, jit_level_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _small_net(seed: int = 0) -> nn.Cell:
    """Conv + ReLU + dense with fixed random weights; no batch statistics, so a batch's mean
    gradient equals the mean of its halves' (the premise of gradient accumulation)."""
    net = nn.SequentialCell([nn.Conv2d(3, 8, 3, pad_mode="same", has_bias=True), nn.ReLU(), nn.Flatten(), nn.Dense(8 * 8 * 8, 10)])
    rng = np.random.default_rng(seed)
    for p in net.get_parameters():
        p.set_data(ms.Tensor((0.3 * rng.standard_normal(p.shape)).astype(np.float32)))
    return net


def _batches(steps: int, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return [(rng.uniform(-1, 1, (batch, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int32)) for _ in range(steps)]


def _trainer(cfg: StepConfig, lr: float = 0.1) -> Trainer:
    net = _small_net()
    opt = nn.Momentum(net.trainable_params(), ms.Tensor(np.full(10, lr, np.float32)), momentum=0.9)
    return Trainer(net, opt, cfg, soft_labels=False)


def _run(trainer: Trainer, batches, accum: int):
    out = []
    for x, y in batches:
        micro = [(ms.Tensor(xs), ms.Tensor(ys)) for xs, ys in zip(np.split(x, accum), np.split(y, accum))]
        out.append(trainer.step(micro))
    params = {p.name: p.asnumpy().copy() for p in trainer.net.get_parameters()}
    ema = {s.name: s.asnumpy().copy() for s in trainer.ema.shadow} if trainer.ema is not None else {}
    return out, params, ema, trainer.loss_scale


OPTIONS = {
    "plain": {},
    "clip-ema-dynamic": {
        "clip_grad_norm": 0.5,
        "ema_decay": 0.9,
        "loss_scale": "dynamic",
        "loss_scale_value": 2.0**10,
        "loss_scale_window": 2,
    },
}


@pytest.mark.parametrize("options", list(OPTIONS), ids=list(OPTIONS))
def test_fast_path_equals_accumulation_path(graph_mode, options):
    batches = _batches(steps=3, batch=8)
    fast = _trainer(StepConfig(accum_steps=1, **OPTIONS[options]))
    accum = _trainer(StepConfig(accum_steps=2, **OPTIONS[options]))
    assert fast.fused and fast.buffers is None and not accum.fused
    out_f, params_f, ema_f, scale_f = _run(fast, batches, 1)
    out_a, params_a, ema_a, scale_a = _run(accum, batches, 2)
    moved = max(np.abs(params_f[k] - _small_net().parameters_dict()[k].asnumpy()).max() for k in params_f)
    assert moved > 1e-3  # the steps did something
    for k in params_f:
        np.testing.assert_allclose(params_f[k], params_a[k], rtol=1e-4, atol=1e-5, err_msg=k)
    for k in ema_f:
        np.testing.assert_allclose(ema_f[k], ema_a[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert scale_f == scale_a
    for (loss_f, fin_f, norm_f), (loss_a, fin_a, norm_a) in zip(out_f, out_a):
        assert fin_f and fin_a
        assert loss_f == pytest.approx(loss_a, rel=1e-5) and norm_f == pytest.approx(norm_a, rel=1e-4)
    if options != "plain":
        assert scale_f == 2.0**11  # window 2: doubled after two finite steps, then counting again
        assert len(ema_f) == len(params_f)


def test_overflow_skips_step_and_halves_scale(graph_mode):
    cfg = StepConfig(loss_scale="dynamic", loss_scale_value=2.0**10, loss_scale_window=2, ema_decay=0.9)
    trainer = _trainer(cfg)
    ((x, y),) = _batches(steps=1, batch=4)
    before = {p.name: p.asnumpy().copy() for p in trainer.net.get_parameters()}
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    loss, finite, norm = trainer.step([(ms.Tensor(bad), ms.Tensor(y))])
    assert not finite and not np.isfinite(norm)
    assert trainer.loss_scale == 2.0**9
    assert trainer.optimizer.global_step.asnumpy().item() == 1  # the schedule still advances
    for p in trainer.net.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), before[p.name])
    for s in trainer.ema.shadow:
        np.testing.assert_array_equal(s.asnumpy(), before[s.name[len("ema.") :]])
    loss, finite, norm = trainer.step([(ms.Tensor(x), ms.Tensor(y))])
    assert finite and np.isfinite(loss) and norm > 0
    assert int(trainer.scaler.counter.asnumpy()) == 1 and trainer.loss_scale == 2.0**9


def test_clipping_bounds_the_update(graph_mode):
    """With momentum 0.9 and lr 0.1, the first step moves the weights by lr * clipped gradient."""
    ((x, y),) = _batches(steps=1, batch=4)
    trainer = _trainer(StepConfig(clip_grad_norm=1e-3))
    before = [p.asnumpy().copy() for p in trainer.net.trainable_params()]
    _, finite, norm = trainer.step([(ms.Tensor(x), ms.Tensor(y))])
    delta = np.sqrt(sum(((p.asnumpy() - b) ** 2).sum() for p, b in zip(trainer.net.trainable_params(), before)))
    assert finite and norm > 1e-2
    assert delta == pytest.approx(0.1 * 1e-3, rel=1e-3)


@pytest.mark.parametrize("kernel", [True, False], ids=["sum-squares-kernel", "per-tensor-norms"])
def test_reported_norm_is_the_global_gradient_norm(graph_mode, kernel):
    """The norm that gates and clips the step is sqrt(sum of every gradient's squares), on either form."""
    from bit_zoo.models import cpu_kernels

    ((x, y),) = _batches(steps=1, batch=4)
    trainer = _trainer(StepConfig())
    update = trainer.train_step.update
    if kernel:
        if cpu_kernels.status().startswith("off"):  # the suite run with BIT_ZOO_CPU_KERNELS=0: that form is not built
            pytest.skip(f"CPU kernels {cpu_kernels.status()}")
        assert update.sum_squares is not None, cpu_kernels.status()
    else:
        update.sum_squares = None
    grads = ms.grad(trainer.net_with_loss, grad_position=None, weights=trainer.optimizer.parameters)(ms.Tensor(x), ms.Tensor(y))
    expected = np.sqrt(sum(float((g.asnumpy().astype(np.float64) ** 2).sum()) for g in grads))
    _, finite, norm = trainer.step([(ms.Tensor(x), ms.Tensor(y))])
    assert finite and norm == pytest.approx(expected, rel=2e-6)


def test_step_wants_accum_steps_micro_batches(graph_mode):
    trainer = _trainer(StepConfig(accum_steps=2))
    ((x, y),) = _batches(steps=1, batch=4)
    with pytest.raises(ValueError, match="accum_steps=2"):
        trainer.step([(ms.Tensor(x), ms.Tensor(y))])


def test_jit_level_per_device(monkeypatch):
    monkeypatch.delenv(JIT_LEVEL_ENV, raising=False)
    assert jit_level_for("CPU") == "O0" and jit_level_for("Ascend") == "O0"
    monkeypatch.setenv(JIT_LEVEL_ENV, "O1")
    assert jit_level_for("Ascend") == "O1"
    monkeypatch.setenv(JIT_LEVEL_ENV, "O3")
    with pytest.raises(ValueError, match=JIT_LEVEL_ENV):
        jit_level_for("CPU")


# ------------------------------------------------------------------ 2 ranks: overflow on one only

_WORKER = """
import sys
import numpy as np
import mindspore as ms
from mindspore import nn
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from mindspore import ops
import bit_zoo.training.train_step as train_step
from bit_zoo.training.distributed import init_distributed
from bit_zoo.training.train_step import StepConfig, Trainer
from test_train_step import _batches, _small_net
DeviceFinite0 = train_step.DeviceFinite


class SaturatingDevice(train_step.DeviceFinite):
    # Rank 1 in the 'register' run: its status register reports an overflow at step 2 while its
    # gradients stay finite (Ascend's saturation mode), so only an agreed flag makes rank 0 skip.

    def __init__(self):
        super().__init__()
        self.calls = ms.Parameter(ms.Tensor(0, ms.int32), name="calls", requires_grad=False)

    def construct(self, grads):
        n = self.calls * 1
        ops.assign_add(self.calls, ops.ones_like(self.calls))
        return ops.logical_and(ms.amp.all_finite(grads), n != 1)


ms.set_context(mode=ms.GRAPH_MODE)
dist = init_distributed("CPU", distribute="on")
results = {{}}
for accum in (1, 2, "register"):
    train_step.DeviceFinite = SaturatingDevice if accum == "register" and dist.rank == 1 else DeviceFinite0
    net = _small_net()
    opt = nn.Momentum(net.trainable_params(), ms.Tensor(np.full(10, 0.1, np.float32)), momentum=0.9)
    n = 1 if accum == "register" else accum
    cfg = StepConfig(accum_steps=n, loss_scale="dynamic", loss_scale_value=2.0**10, loss_scale_window=1000, ema_decay=0.9)
    trainer = Trainer(net, opt, cfg, soft_labels=False, distributed=True)
    flags = []
    for step, (x, y) in enumerate(_batches(steps=3, batch=8, seed=10 + dist.rank)):
        if step == 1 and dist.rank == 1 and accum != "register":
            x[0, 0, 0, 0] = np.inf  # a non-finite gradient on rank 1 only
        micro = [(ms.Tensor(a), ms.Tensor(b)) for a, b in zip(np.split(x, n), np.split(y, n))]
        flags.append(trainer.step(micro)[1])
    for p in list(net.get_parameters()) + list(trainer.ema.shadow):
        results[f"{{accum}}/{{p.name}}"] = p.asnumpy()
    results[f"{{accum}}/flags"] = np.array(flags)
    results[f"{{accum}}/scale"] = np.array(trainer.loss_scale)
    results[f"{{accum}}/global_step"] = trainer.optimizer.global_step.asnumpy()
np.savez({out!r} + f"/rank{{dist.rank}}.npz", **results)
"""


@pytest.mark.heavy
def test_overflow_on_one_rank_skips_on_both(tmp_path, two_processes):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path)))
    code, logs = two_processes(script, cwd=tmp_path, timeout=600)
    assert code == 0, logs[-6000:]
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert set(r0.files) == set(r1.files)
    for accum in (1, 2, "register"):
        np.testing.assert_array_equal(r0[f"{accum}/flags"], [True, False, True])
        np.testing.assert_array_equal(r1[f"{accum}/flags"], [True, False, True])
        assert float(r0[f"{accum}/scale"]) == float(r1[f"{accum}/scale"]) == 2.0**9
    for key in r0.files:
        assert np.all(np.isfinite(r0[key])), key
        np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)  # bit-identical
    # Both paths took the same two steps (within float tolerance).
    for key in (k for k in r0.files if k.startswith("1/") and k not in ("1/flags", "1/scale")):
        np.testing.assert_allclose(r0[key], r0["2/" + key[2:]], rtol=1e-4, atol=1e-5, err_msg=key)
        # A register-reported overflow skips the step like a non-finite gradient does.
        np.testing.assert_array_equal(r0[key], r0["register/" + key[2:]], err_msg=key)
