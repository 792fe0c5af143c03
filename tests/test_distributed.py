"""Device assignment as a pure function of the launcher's environment, and how it is applied and logged."""

from __future__ import annotations

import io
import logging

import mindspore as ms
import pytest

from bit_zoo.config import ConfigError
from bit_zoo.training import distributed
from bit_zoo.training.distributed import DeviceChoice, DistInfo, choose_device, log_device, set_device

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
