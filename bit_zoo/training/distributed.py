"""Data-parallel setup: msrun, mpirun (native on Ascend/GPU, bridged on CPU), or one process.

msrun sets MindSpore's dynamic-cluster variables (MS_ROLE, MS_WORKER_NUM, MS_SCHED_HOST/PORT,
MS_NODE_ID) and starts the scheduler itself. ``mpirun -n N python train.py`` on Ascend/GPU
initialises through OpenMPI. On CPU there is no MPI backend: init() fails with "Failed to
initialize communication library on device side". :func:`bridge_mpirun_to_dynamic_cluster`
therefore translates OpenMPI's rank variables into the dynamic-cluster ones (MS_NODE_ID from
OMPI_COMM_WORLD_RANK, otherwise ranks come out swapped) and rank 0 starts the scheduler.

Device per process (:func:`choose_device`, a pure function of the environment): MindSpore's
set_device documentation says the device id is negotiated under msrun and is 0 under any other
launcher, while its mpirun tutorial sets none and mindspore.communication copies
OMPI_COMM_WORLD_LOCAL_RANK into the context on import. bit_zoo does not depend on which is
right: under mpirun it sets the device from OMPI_COMM_WORLD_LOCAL_RANK itself, under msrun it
leaves the device to msrun, and every rank logs what was chosen (:func:`log_device`).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import mindspore as ms

from ..errors import ConfigError

__all__ = [
    "DeviceChoice",
    "DistInfo",
    "choose_device",
    "launched_by_mpirun",
    "bridge_mpirun_to_dynamic_cluster",
    "init_distributed",
    "log_device",
]

_logger = logging.getLogger(__name__)
# Its own level, so every rank's device line is logged although ranks > 0 log only warnings.
_device_logger = logging.getLogger(__name__ + ".device")
_device_logger.setLevel(logging.INFO)

DEFAULT_SCHED_PORT = 8118
_SCHEDULER_CODE = "import mindspore as ms; from mindspore.communication import init; ms.set_device('CPU'); init()"


@dataclass(frozen=True)
class DeviceChoice:
    """Which device this process uses and why: ``device_id`` None means bit_zoo did not set one."""

    target: str
    device_id: int | None = None
    source: str = "MindSpore's default"

    def describe(self) -> str:
        where = f"device {self.device_id}" if self.device_id is not None else "device id not set by bit_zoo"
        return f"{self.target} {where} ({self.source})"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: DeviceChoice | None = field(default=None, compare=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device_index(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        index = int(value)
    except ValueError:
        index = -1
    if index < 0:
        raise ConfigError(f"${name}={value!r} is not a device index: unset it or set a number >= 0")
    return index


def choose_device(device_target: str, env: Mapping[str, str]) -> DeviceChoice:
    """The device of this process from its launcher's environment (no side effects).

    * CPU: no device id.
    * msrun (MS_ROLE set): left to msrun, which negotiates it (and exports DEVICE_ID per worker).
    * mpirun (OMPI_COMM_WORLD_LOCAL_RANK): the local rank, whatever DEVICE_ID says: a DEVICE_ID
      exported to every rank with ``mpirun -x`` would put all ranks on one device. With
      ASCEND_RT_VISIBLE_DEVICES the index counts within the visible devices.
    * otherwise DEVICE_ID when set (rank-table launch scripts, a single process), else none
      (MindSpore's default, device 0).
    """
    if device_target == "CPU":
        return DeviceChoice("CPU", None, "CPU: no device id")
    if env.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED"):
        exported = f", which exported DEVICE_ID={env['DEVICE_ID']}" if "DEVICE_ID" in env else ""
        return DeviceChoice(device_target, None, f"left to msrun{exported}")
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        local = _device_index(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        note = ""
        if "DEVICE_ID" in env and env["DEVICE_ID"] != str(local):
            note = f"; DEVICE_ID={env['DEVICE_ID']} ignored"
        return DeviceChoice(device_target, local, f"mpirun: OMPI_COMM_WORLD_LOCAL_RANK={local}{note}")
    if "DEVICE_ID" in env:
        return DeviceChoice(device_target, _device_index(env, "DEVICE_ID"), "DEVICE_ID")
    return DeviceChoice(device_target, None, "MindSpore's default (device 0)")


def set_device(device_target: str, mode: str, *, env: Mapping[str, str] | None = None) -> str:
    """Context for device_target ('auto': what this build runs on) and graph/pynative mode.

    The device id is that of :func:`choose_device`. Without an id the device is set only when
    the target differs from the current one: MindSpore refuses to set it again once its runtime
    is up (a second run in one process, e.g. tests or a notebook). Must run before any kernel
    and before communication init.
    """
    current = ms.get_context("device_target")
    if device_target == "auto":
        device_target = current
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    choice = choose_device(device_target, os.environ if env is None else env)
    if device_target != current or choice.device_id is not None:
        try:
            if choice.device_id is None:
                ms.set_device(device_target)
            else:
                ms.set_device(device_target, choice.device_id)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(
                f"device_target {device_target} ({choice.describe()}) is not usable here ({e}): "
                "pass --device_target CPU or auto, or check the launcher's device variables (docs/ascend.md)"
            ) from e
    return device_target


def log_device(dist: DistInfo) -> None:
    """One line per rank naming its device and why; emitted whatever the root logger's level.

    Call it after logging is configured (train.py logs only warnings on ranks > 0).
    """
    if dist.device is None:
        return
    _device_logger.info("rank %d of %d: %s", dist.rank, dist.world_size, dist.device.describe())


def launched_by_mpirun() -> bool:
    return "OMPI_COMM_WORLD_SIZE" in os.environ and "MS_ROLE" not in os.environ


def launched_by_msrun() -> bool:
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def bridge_mpirun_to_dynamic_cluster(env: dict | None = None) -> subprocess.Popen | None:
    """Set the dynamic-cluster variables from OpenMPI's; on rank 0 start the scheduler process.

    The scheduler address is MS_SCHED_HOST (default 127.0.0.1: one host) and MS_SCHED_PORT
    (default 8118); set both, exported with ``mpirun -x``, for several hosts.
    """
    env = os.environ if env is None else env
    rank = int(env["OMPI_COMM_WORLD_RANK"])
    # OpenMPI binds each rank to one core by default; the cluster's threads (created from here
    # on) and the scheduler then crowd that core and building the cluster took 1.5-2 minutes
    # instead of ~15 s. Let them use every core, as `mpirun --bind-to none` would.
    os.sched_setaffinity(0, range(os.cpu_count()))
    env["MS_WORKER_NUM"] = env["OMPI_COMM_WORLD_SIZE"]
    env.setdefault("MS_SCHED_HOST", "127.0.0.1")
    env.setdefault("MS_SCHED_PORT", str(DEFAULT_SCHED_PORT))
    env["MS_NODE_ID"] = str(rank)
    scheduler = None
    if rank == 0:
        sched_env = dict(env, MS_ROLE="MS_SCHED", MS_NODE_ID="sched")
        for key in [k for k in sched_env if k.startswith(("OMPI_", "PMIX_"))]:
            del sched_env[key]
        # Not waited for: it exits by itself once every worker has unregistered at shutdown
        # (waiting in an atexit hook would run before MindSpore's own finalize and stall it).
        scheduler = subprocess.Popen(
            [sys.executable, "-c", _SCHEDULER_CODE], env=sched_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    env["MS_ROLE"] = "MS_WORKER"
    # A worker whose first registration fails falls into a reconnect back-off that cost rank 0
    # (which has only just started the scheduler) 1-1.5 minutes: wait until the scheduler listens.
    _wait_for_port(env["MS_SCHED_HOST"], int(env["MS_SCHED_PORT"]), timeout=120.0)
    return scheduler


def _wait_for_port(host: str, port: int, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the MindSpore scheduler at {host}:{port} did not start within {timeout:.0f} s: is MS_SCHED_PORT free?")


def init_distributed(device_target: str, *, distribute: str = "auto") -> DistInfo:
    """Initialise communication when launched by msrun/mpirun (or distribute == 'on').

    Sets data-parallel mode with gradient averaging; returns (rank, world size).
    """
    if distribute not in ("auto", "on", "off"):
        raise ValueError(f"distribute must be auto, on or off, got {distribute!r}")
    device = choose_device(device_target, os.environ)  # before the CPU bridge adds MS_ROLE
    launched = launched_by_msrun() or "OMPI_COMM_WORLD_SIZE" in os.environ or "RANK_TABLE_FILE" in os.environ
    if distribute == "off" or (distribute == "auto" and not launched):
        return DistInfo(device=device)
    if distribute == "on" and not launched:
        raise RuntimeError(
            "distribute is on but the process was not started by a launcher: run it with "
            "`msrun --worker_num N --local_worker_num N train.py ...` or `mpirun -n N python train.py ...`, "
            "or set distribute: off"
        )
    if device_target == "CPU" and launched_by_mpirun():
        bridge_mpirun_to_dynamic_cluster()
    from mindspore.communication import get_group_size, get_rank, init

    init()
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        # msrun runs the script once more as the scheduler: init() served the cluster; nothing else to do.
        sys.exit(0)
    rank, world = get_rank(), get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world)
    _logger.info("data parallel: rank %d of %d", rank, world)
    return DistInfo(rank, world, device)
