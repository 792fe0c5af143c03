"""Device assignment as a pure function of the launcher's environment, and how it is applied and logged."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from bit_zoo.config import ConfigError
from bit_zoo.training import distributed
from bit_zoo.training.distributed import DeviceChoice, DistInfo, choose_device, log_device, set_device
from bit_zoo.training.metrics import EvalPart, combine_parts, evaluate, evaluate_part, join_float64, split_float64

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "11", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
MSRUN = {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "8", "MS_NODE_ID": "5", "DEVICE_ID": "5"}


@pytest.mark.parametrize(
    "target,env,device_id,source",
    [
        ("Ascend", MPIRUN, 3, "OMPI_COMM_WORLD_LOCAL_RANK=3"),  # the local rank, not the global one (11)
        ("Ascend", dict(MPIRUN, DEVICE_ID="0"), 3, "DEVICE_ID=0 ignored"),  # a DEVICE_ID exported to every rank loses
        ("GPU", MPIRUN, 3, "mpirun"),
        ("Ascend", MSRUN, None, "left to msrun"),
        ("Ascend", dict(MSRUN, OMPI_COMM_WORLD_LOCAL_RANK="2"), None, "msrun"),  # msrun wins over stray OpenMPI variables
        ("Ascend", {"DEVICE_ID": "6", "RANK_TABLE_FILE": "/x.json", "RANK_ID": "6"}, 6, "DEVICE_ID"),
        ("Ascend", {}, None, "default"),
        ("CPU", MPIRUN, None, "CPU"),
        ("CPU", MSRUN, None, "CPU"),
    ],
)
def test_choose_device(target, env, device_id, source):
    choice = choose_device(target, env)
    assert choice.target == target
    assert choice.device_id == device_id
    assert source in choice.source
    assert choice.describe().startswith(target)


@pytest.mark.parametrize("name,value", [("OMPI_COMM_WORLD_LOCAL_RANK", "x"), ("OMPI_COMM_WORLD_LOCAL_RANK", "-1"), ("DEVICE_ID", "one")])
def test_bad_device_variable_is_one_clear_error(name, value):
    with pytest.raises(ConfigError, match=name):
        choose_device("Ascend", {name: value})


def test_set_device_applies_the_choice(monkeypatch):
    """Under mpirun the id goes to ms.set_device even when the target is already current (the runtime's default)."""
    calls = []
    monkeypatch.setattr(distributed.ms, "get_context", lambda key: "Ascend")
    monkeypatch.setattr(distributed.ms, "set_context", lambda **kw: None)
    monkeypatch.setattr(distributed.ms, "set_device", lambda *args: calls.append(args))
    assert set_device("auto", "graph", env=MPIRUN) == "Ascend"
    assert calls == [("Ascend", 3)]
    calls.clear()
    set_device("auto", "graph", env=MSRUN)
    assert calls == []  # left to msrun
    set_device("CPU", "graph", env=MPIRUN)
    assert calls == [("CPU",)]


def test_set_device_failure_names_the_choice(monkeypatch):
    def refuse(*args):
        raise RuntimeError("device 3 does not exist")

    monkeypatch.setattr(distributed.ms, "get_context", lambda key: "Ascend")
    monkeypatch.setattr(distributed.ms, "set_context", lambda **kw: None)
    monkeypatch.setattr(distributed.ms, "set_device", refuse)
    with pytest.raises(ConfigError, match="OMPI_COMM_WORLD_LOCAL_RANK=3.*device 3 does not exist"):
        set_device("auto", "graph", env=MPIRUN)


def test_every_rank_logs_its_device():
    """Ranks > 0 log only warnings in train.py (root logger at WARNING); the device line still appears."""
    root = logging.getLogger()
    old = root.level
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        log_device(DistInfo(3, 8, DeviceChoice("Ascend", 3, "mpirun: OMPI_COMM_WORLD_LOCAL_RANK=3")))
        logging.getLogger("bit_zoo.training.distributed").info("an ordinary info line")
    finally:
        root.setLevel(old)
        root.removeHandler(handler)
    assert "rank 3 of 8: Ascend device 3 (mpirun: OMPI_COMM_WORLD_LOCAL_RANK=3)" in stream.getvalue()
    assert "ordinary" not in stream.getvalue()


def test_single_process_carries_its_device():
    dist = distributed.init_distributed(ms.get_context("device_target"), distribute="off")
    assert dist == DistInfo() and dist.device is not None


# ------------------------------------------------------------------ sharded evaluation


def _digits_eval(world: int = 1, rank: int = 0):
    from bit_zoo.data import create_loader

    info = create_loader(
        "digits", None, "test", batch_size=16, image_size=8, shuffle=False, drop_remainder=False, num_shards=world, shard_id=rank,
        num_workers=1,
    )  # fmt: skip
    return info


class _TinyNet(ms.nn.Cell):
    """Flatten + a seeded dense layer: logits that differ per image, the same on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = ms.nn.Dense(3 * 8 * 8, 10)
        rng = np.random.default_rng(0)
        self.fc.weight.set_data(ms.Tensor(rng.standard_normal((10, 192)).astype(np.float32) * 0.3))
        self.fc.bias.set_data(ms.Tensor(rng.standard_normal(10).astype(np.float32)))

    def construct(self, x):
        return self.fc(x.reshape(x.shape[0], -1))


def _without_time(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("seconds", "ranks")}


def assert_same_evaluation(got: dict, expected: dict) -> None:
    """Counts (images, top-1, top-5) exactly; the mean loss within 1e-6 relative.

    A shard runs the network on other batch shapes than one process does, and oneDNN blocks a GEMM or
    convolution per shape and per instruction set, so an image's float32 logits, hence its loss, may
    differ in the last bits (test_distill measured 2.8e-8 relative on an AVX2-only CPU). 1e-6 is ~8
    float32 ulps; an image lost or counted twice moves the mean loss by percents."""
    got, expected = _without_time(got), _without_time(expected)
    assert {k: v for k, v in got.items() if k != "loss"} == {k: v for k, v in expected.items() if k != "loss"}
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_sharded_evaluation_arithmetic_equals_one_process():
    """Every rank's part (ranks run one after the other here), combined, equals the single-process
    result: loader shards (sharded=True) and batch round-robin (sharded=False); see assert_same_evaluation."""
    net = _TinyNet()
    whole = _digits_eval()
    single = evaluate(net, whole.dataset, num_images=len(whole.indices))
    assert single["images"] == len(whole.indices) and 0 < single["top1"] < 100
    for world in (2, 3):
        parts = [evaluate_part(net, _digits_eval(world, r).dataset, rank=r, world_size=world, sharded=True) for r in range(world)]
        assert_same_evaluation(combine_parts(parts, sharded=True, num_images=len(whole.indices)), single)
        parts = [evaluate_part(net, whole.dataset, rank=r, world_size=world, sharded=False) for r in range(world)]
        assert sum(p.images for p in parts) == single["images"]
        assert all(p.images for p in parts)
        assert_same_evaluation(combine_parts(parts, num_images=len(whole.indices)), single)


def _part(rank: int, n: int) -> EvalPart:
    return EvalPart(rank, 0, 0, np.ones(n))


def test_a_padded_or_cut_shard_is_refused():
    with pytest.raises(ValueError, match="disjoint shards of 10 hold"):
        combine_parts([_part(0, 6), _part(1, 4)], sharded=True)
    with pytest.raises(ValueError, match="12 images evaluated over 4 rank.*split has 10"):
        combine_parts([_part(r, 3) for r in range(4)], sharded=True, num_images=10)  # padded shards: 3 each
    assert combine_parts([_part(0, 5), _part(1, 5)], sharded=True, num_images=10)["images"] == 10


def test_float64_losses_travel_exactly_as_float32():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.exponential(2.0, 10000), [0.0, 1e-12, 1.0 / 3.0, 87.5]])
    pieces = split_float64(x)
    assert pieces.dtype == np.float32
    np.testing.assert_array_equal(join_float64(pieces), x)


_EVAL_WORKER = """
import json, logging, sys
import mindspore as ms, numpy as np
from bit_zoo.data import create_loader
from bit_zoo.models.resnetv2 import ResNetV2
from bit_zoo.training.distributed import init_distributed, log_device, set_device
from bit_zoo.training.ema import EMA
from bit_zoo.training.metrics import evaluate

dist = init_distributed(set_device("CPU", "graph"))
logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING, force=True)  # as train.py
log_device(dist)
net = ResNetV2((1, 1, 1, 1), 1, num_classes=10, conv_impl="unfold")
rng = np.random.default_rng(0)
params = net.trainable_params()
for p in params:
    p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * (0.3 if p.name.startswith("head") else 1.0)))
ema = EMA(params, decay=0.5, warmup=False)
for p in params:  # the raw weights move on; the averages stay behind
    p.set_data(ms.Tensor(p.asnumpy() + rng.standard_normal(p.shape).astype(np.float32) * 0.5))

def loader(**shard):
    return create_loader("digits", None, "test", batch_size=16, image_size=16, shuffle=False, drop_remainder=False, num_workers=1, **shard)

whole = loader()
mine = loader(num_shards=dist.world_size, shard_id=dist.rank)
out = {"raw": evaluate(net, mine.dataset, dist=dist, sharded=True, num_images=len(whole.indices))}
ema.swap()  # on every rank
try:
    out["ema"] = evaluate(net, mine.dataset, dist=dist, sharded=True, num_images=len(whole.indices))
    out["ema_round_robin"] = evaluate(net, whole.dataset, dist=dist, num_images=len(whole.indices))
finally:
    ema.swap()
out["raw_again"] = evaluate(net, whole.dataset, dist=dist, num_images=len(whole.indices))
with open(sys.argv[1] + f".rank{dist.rank}.json", "w") as f:
    json.dump(out, f)
"""


@pytest.mark.heavy
def test_two_process_evaluation_equals_one_process(tmp_path, two_processes):
    """2 CPU ranks (msrun, and mpirun where installed), graph mode, a small ResNetV2 on the digits test split: raw
    and EMA weights (swapped on both ranks), loader shards and batch round-robin; every number equals the
    single-process run's on both ranks (counts exactly, the loss within 1e-6: assert_same_evaluation)."""
    script = tmp_path / "eval_worker.py"
    script.write_text(_EVAL_WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for key in [k for k in env if k.startswith(("MS_", "OMPI_", "PMIX_"))]:
        del env[key]
    single_dir, dp_dir = tmp_path / "single", tmp_path / "dp"
    single_dir.mkdir()
    dp_dir.mkdir()
    subprocess.run([sys.executable, str(script), str(single_dir / "out")], cwd=single_dir, env=env, check=True, timeout=600)
    code, logs = two_processes(script, dp_dir / "out", cwd=dp_dir, env=env, timeout=600)
    assert code == 0, logs[-3000:]
    single = json.loads((single_dir / "out.rank0.json").read_text())
    assert single["raw"]["top1"] != single["ema"]["top1"] or single["raw"]["loss"] != single["ema"]["loss"]
    for rank in (0, 1):
        dp = json.loads((dp_dir / f"out.rank{rank}.json").read_text())
        for key in single:
            assert dp[key]["ranks"] == 2
            assert_same_evaluation(dp[key], single[key])
    assert "rank 0 of 2: CPU" in logs and "rank 1 of 2: CPU" in logs
