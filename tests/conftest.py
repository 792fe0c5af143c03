"""Shared fixtures: a temporary working dir and cache, weights files in the exact upstream formats,
and a real HTTP server on 127.0.0.1 to download them from."""

from __future__ import annotations

import http.server
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

import bit_zoo
from bit_zoo.weights.formats import mindcv_name, npz_key_map, to_npz


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's outcome on the test item, for _workdir's cleanup."""
    report = (yield).get_result()
    setattr(item, f"_report_{report.when}", report)


def _clear_passed_test_dir(folder: Path) -> None:
    """Delete what a passed test wrote (checkpoints: a full run wrote ~10 GB and filled a shared disk), except
    every kernels/ folder: this process keeps using the kernel libraries built under whichever test's
    BIT_ZOO_HOME came first."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            if entry.name == "kernels":
                continue
            if any(entry.rglob("kernels")):
                _clear_passed_test_dir(entry)
            else:
                shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _workdir(tmp_path, monkeypatch, request):
    """Run every test in its own directory (graph-mode compiles write ./rank_0 and friends), and in
    PyNative mode: train.py and validate.py switch the process to graph mode, and a later test's
    model would otherwise run as a cached graph (a reset classifier not seen, a method compiled as a cell)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "bit_zoo_home"))
    monkeypatch.delenv("BIT_ZOO_BASE_URL", raising=False)
    monkeypatch.delenv("BIT_ZOO_MINDCV_BASE_URL", raising=False)
    monkeypatch.delenv("BIT_ZOO_WEIGHTS_SOURCE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never the real hub from a test
    # A script's logging.basicConfig in one test binds the root logger to that test's captured stderr,
    # closed once the test ends: later log records would hit a closed file. Each test gets its own.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    if all(getattr(getattr(request.node, f"_report_{when}", None), "passed", False) for when in ("setup", "call")):
        _clear_passed_test_dir(tmp_path)


def onednn_buildable() -> bool:
    """A C++ compiler and a MindSpore that ships oneDNN 3 (2.9 and later): then bit_zoo's oneDNN operators must
    build here, and a failure to build fails the tests that need them rather than skipping them."""
    from bit_zoo.models import cpu_kernels

    try:
        cpu_kernels._mindspore_onednn()
    except RuntimeError:
        return False
    return cpu_kernels._compiler() is not None


def random_params(model_name: str, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random bit_zoo parameters for an architecture, every one non-trivial (GN affine, head too)."""
    with no_init_parameters():
        skeleton = bit_zoo.create_model(model_name, num_classes=num_classes)
    rng = np.random.default_rng(seed)
    out = {}
    for p in skeleton.get_parameters():
        shape = tuple(p.shape)
        if p.name.endswith("gamma"):
            a = 1.0 + 0.2 * rng.standard_normal(shape, dtype=np.float32)
        elif p.name.endswith("beta") or p.name.endswith("bias"):
            a = 0.2 * rng.standard_normal(shape, dtype=np.float32)
        elif p.name == "head.fc.weight":
            a = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])
        else:
            a = rng.standard_normal(shape, dtype=np.float32)
        out[p.name] = a
    return out


def layers_of(model_name: str) -> tuple[int, ...]:
    return bit_zoo.get_weights(model_name).layers


def write_upstream_npz(path: Path, model_name: str, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Write an .npz in the upstream layout (TF names, HWIO); return the bit_zoo params it holds."""
    params = random_params(model_name, num_classes, seed)
    arrays = to_npz(params, layers_of(model_name))
    assert set(arrays) == set(npz_key_map(layers_of(model_name)))
    np.savez(path, **arrays)
    return params


def write_mindcv_ckpt(path: Path, model_name: str, num_classes: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a MindSpore checkpoint with mindcv's BiT names (classifier as a 1x1 conv, OIHW) and optimizer state."""
    params = random_params(model_name, num_classes, seed)
    ours_to_mindcv = {}
    for s, depth in enumerate(layers_of(model_name)):
        for u in range(depth):
            for i in (1, 2, 3):
                ours_to_mindcv[f"stages.{s}.blocks.{u}.norm{i}.gamma"] = f"layer{s + 1}.{u}.gn{i}.gamma"
                ours_to_mindcv[f"stages.{s}.blocks.{u}.norm{i}.beta"] = f"layer{s + 1}.{u}.gn{i}.beta"
                ours_to_mindcv[f"stages.{s}.blocks.{u}.conv{i}.weight"] = f"layer{s + 1}.{u}.conv{i}.weight"
            if u == 0:
                ours_to_mindcv[f"stages.{s}.blocks.{u}.downsample.weight"] = f"layer{s + 1}.{u}.down_sample.0.weight"
    ours_to_mindcv.update({"stem.conv.weight": "conv1.weight", "norm.gamma": "gn.gamma", "norm.beta": "gn.beta"})
    ours_to_mindcv.update({"head.fc.weight": "classifier.weight", "head.fc.bias": "classifier.bias"})
    entries = []
    for ours, theirs in ours_to_mindcv.items():
        a = params[ours]
        if ours == "head.fc.weight":
            a = a.reshape(*a.shape, 1, 1)
        assert mindcv_name(theirs) == ours
        entries.append({"name": theirs, "data": ms.Tensor(a)})
        if theirs.endswith("weight"):
            entries.append({"name": f"moments.{theirs}", "data": ms.Tensor(np.zeros_like(a))})
    entries.append({"name": "global_step", "data": ms.Tensor(np.array([10], np.int32))})
    ms.save_checkpoint(entries, str(path))
    return params


@pytest.fixture(scope="session")
def npz_r50_1000(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """BiT-S-R50x1.npz in the upstream layout (1000 classes), written once per session."""
    path = tmp_path_factory.mktemp("upstream") / "BiT-S-R50x1.npz"
    params = write_upstream_npz(path, "bit_s_r50x1", 1000, seed=1)
    return path, params


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[str, bytes]] = {}  # path -> (mode, body); mode "ok" | "truncate"
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.hits.append(self.path)
        mode, body = self.routes.get(self.path, ("404", b""))
        if mode == "404":
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "truncate":  # announce the full length, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def weights_server():
    """A real HTTP server on 127.0.0.1. Put files in `server.routes[path] = (mode, bytes)`."""
    _Handler.routes = {}
    _Handler.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    server.routes = _Handler.routes
    server.hits = _Handler.hits
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def make_mindcv_ckpt():
    """write_mindcv_ckpt, as a fixture (tests import nothing from conftest)."""
    return write_mindcv_ckpt


@pytest.fixture
def make_upstream_npz():
    """write_upstream_npz, as a fixture."""
    return write_upstream_npz


@pytest.fixture
def amp_stack_guard():
    """For tests that run amp-flagged cells in PyNative. MindSpore pushes a flagged cell's precision on a stack as
    the cell starts and pops it as the cell returns, in no `finally`: a cell that raises (a failing test) leaves its
    entries, and every later operator of the process is cast to them (one failure became 37). Afterwards, while an
    operator's inputs are still cast, pop one entry (never more: popping the empty stack crashed the process)."""
    yield
    try:
        from mindspore._c_expression import MixedPrecisionType
        from mindspore.graph.api import _pynative_executor
    except ImportError:  # another MindSpore layout: nothing to drain with
        return

    def casting() -> bool:
        return any((ms.Tensor([1.0], dt) + ms.Tensor([1.0], dt)).dtype != dt for dt in (ms.float32, ms.float16))

    for _ in range(64):
        if not casting():
            return
        _pynative_executor.set_mixed_precision_type(MixedPrecisionType.NOTSET, False)


def pytest_unconfigure(config):
    """Free MindSpore cells while their modules still exist: at interpreter teardown, Cell.__del__
    prints 'Exception ignored ... total_instance_count' for every cell still alive, burying pytest's summary."""
    import gc

    gc.collect()


@pytest.fixture
def train_process():
    """start(cwd, *argv) runs `python train.py *argv` of this checkout as a child process (stdout dropped, stderr
    piped), for the tests that kill a run and resume it."""

    def start(cwd, *argv) -> subprocess.Popen:
        root = Path(__file__).resolve().parents[1]
        return subprocess.Popen(
            [sys.executable, str(root / "train.py"), *map(str, argv)],
            cwd=cwd,
            env=dict(os.environ, PYTHONPATH=str(root)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    return start


# ------------------------------------------------------------------ two ranks under msrun or mpirun


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(
    params=["msrun", pytest.param("mpirun", marks=pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI not installed"))]
)
def launcher(request) -> str:
    """The data-parallel launchers train.py supports: msrun, and plain mpirun (where OpenMPI is installed)."""
    return request.param


@pytest.fixture
def two_processes(launcher, tmp_path):
    """run(script, *args, cwd=..., env=...) starts a Python script as 2 ranks under the launcher and returns
    (exit code, the output of both ranks): msrun's worker logs, or mpirun's merged stdout."""

    def run(script, *args, cwd, env=None, timeout=900) -> tuple[int, str]:
        env = dict(os.environ if env is None else env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
        log_dir = tmp_path / f"{launcher}_logs"
        if launcher == "msrun":
            cmd = [shutil.which("msrun") or "msrun", "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(free_port()),
                   "--log_dir", str(log_dir), "--join", "True", str(script), *map(str, args)]  # fmt: skip
        else:  # train.py's init_distributed starts the scheduler from rank 0 on MS_SCHED_PORT
            env.update(MS_SCHED_PORT=str(free_port()), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
            cmd = [
                "mpirun",
                "-n",
                "2",
                "--oversubscribe",
                "-x",
                "MS_SCHED_PORT",
                "-x",
                "PYTHONPATH",
                sys.executable,
                str(script),
                *map(str, args),
            ]
        proc = subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        logs = "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("worker_*.log"))) if log_dir.is_dir() else ""
        return proc.returncode, proc.stdout + logs

    return run


def write_train_checkpoint(path: Path, net, *, class_names: list[str] | None, image_size: int, model: str = "resnetv2") -> Path:
    """A weights file as train.py writes it: the net's parameters with meta.json (architecture, classes, preprocessing)."""
    from bit_zoo.training.checkpoint import export_weights

    meta = {
        "model": model,
        "layers": list(net.layers),
        "width_factor": int(net.width_factor),
        "num_classes": int(net.num_classes),
        "in_channels": 3,
        "class_names": class_names,
        "preprocess": {"image_size": image_size, "eval_size": image_size, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                       "crop_pct": 1.0},
    }  # fmt: skip
    return export_weights(net, path, meta=meta)


def results_rows(name: str) -> list[dict[str, str]]:
    """The rows of benchmarks/results/<name>.csv: measured figures with their machine, versions and command."""
    import csv

    with open(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"{name}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
