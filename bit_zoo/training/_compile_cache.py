"""A compile cache for the training step, keyed by everything the compiled graph depends on.

MindSpore can save a compiled graph and load it in the next run (``enable_compile_cache``), but
it decides whether a saved graph still fits by hashing the entry script and the files it
imports, plus the order of compilation: a different model, resolution or option from the same
script silently runs the old graph (docs/speed.md), and under ``python -m`` it fails outright.
Measured here too: a tensor constant held by a cell is baked into the saved graph, while
parameters are read from the current network.

So bit_zoo gives every graph a directory of its own, named by the digest of a key that covers:

* the source of bit_zoo (every .py and the C++ kernels) and of any other non-MindSpore module
  that defines a cell in the graph (a user's loss or network);
* MindSpore's and Python's versions, the device, mode and parallel context, MindSpore's and
  bit_zoo's environment switches (``MS_*``, ``BIT_ZOO_*``) and the CPU kernels' build;
* the cell tree: every cell's class, its plain attributes (sizes, strides, eps, conv_impl, AMP
  casts, jit level, optimizer settings), every parameter's name, shape, dtype and trainability,
  and the value of every constant tensor;
* the inputs' shapes and dtypes, and the caller's extras (the step options, the cell's role).

Inside that directory MindSpore's own check can only ever meet the graph it wrote: its
dependency file is a file holding the key. A new entry is compiled into a private directory and
renamed into place when complete, so a concurrent or killed run never leaves half an entry.
``BIT_ZOO_COMPILE_CACHE=0`` turns it off, ``BIT_ZOO_COMPILE_CACHE=/some/dir`` moves it (default
``$BIT_ZOO_HOME/compile_cache``); with MindSpore's own cache switched on by the user, bit_zoo
leaves it alone. Graph mode only.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from functools import cache, lru_cache
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from .._ms_compat import graph_api_module
from ..models import cpu_kernels
from ..utils.paths import home_dir

__all__ = ["ENV", "cache_dir", "compile_cached", "graph_key", "key_digest"]

_logger = logging.getLogger(__name__)

ENV = "BIT_ZOO_COMPILE_CACHE"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# Cell attributes that differ between two constructions of the same network (instance counters,
# creation times, compile phases) and so say nothing about the graph.
_VOLATILE = ("create_time", "instance_count", "phase", "arguments_key", "cell_init_args", "_id", "compile_cache", "_backward_hook")


def cache_dir() -> Path:
    """Where the graphs go (one directory per key): $BIT_ZOO_COMPILE_CACHE if it names a directory, else $BIT_ZOO_HOME/compile_cache."""
    value = os.environ.get(ENV, "")
    return Path(value) if value not in ("", "0", "1") else home_dir() / "compile_cache"


def enabled() -> bool:
    if os.environ.get(ENV) == "0":
        return False
    # MindSpore's own cache, switched on by the user, keys graphs its own way: do not mix the two.
    return not (ms.get_context("enable_compile_cache") or os.environ.get("MS_COMPILER_CACHE_ENABLE") == "1")


@cache
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@lru_cache(maxsize=1)
def _package_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(_PACKAGE_ROOT.rglob("*")):
        if path.suffix in (".py", ".cc", ".h") and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(_PACKAGE_ROOT)).encode() + b"\0" + _file_digest(str(path)).encode())
    return h.hexdigest()


def _describe(value, depth: int = 0):
    """A JSON-able description of an attribute value, as far as it can reach into a graph."""
    if depth > 6:
        return "..."
    if isinstance(value, ms.Parameter):
        return ["Parameter", value.name, list(value.shape), str(value.dtype), bool(value.requires_grad)]
    if isinstance(value, ms.Tensor):
        arr = value.asnumpy()
        return ["Tensor", list(arr.shape), str(arr.dtype), hashlib.sha256(arr.tobytes()).hexdigest()]
    if isinstance(value, np.ndarray):
        return ["ndarray", list(value.shape), str(value.dtype), hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()]
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, enum.Enum):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [type(value).__name__, [_describe(v, depth + 1) for v in value]]
    if isinstance(value, dict):
        return ["dict", sorted((str(k), _describe(v, depth + 1)) for k, v in value.items() if not _is_volatile(str(k)))]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [type(value).__qualname__, _describe(dataclasses.asdict(value), depth + 1)]
    if isinstance(value, nn.Cell):
        return ["Cell", _qualname(type(value))]  # its own entry in the tree carries its contents
    if isinstance(value, ops.Primitive):
        return ["Primitive", value.name, _describe(dict(value.attrs), depth + 1)]
    if isinstance(value, ms.dtype.Type):
        return str(value)
    return ["object", _qualname(type(value)), getattr(value, "__qualname__", None) or getattr(value, "name", None)]


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_volatile(name: str) -> bool:
    return any(v in name for v in _VOLATILE)


def _cell_source(cls) -> list:
    """Source digests of the modules defining a cell class and its bases, outside MindSpore and bit_zoo."""
    out = []
    for base in cls.__mro__:
        module = sys.modules.get(base.__module__)
        name = base.__module__.split(".")[0]
        if module is None or name in ("mindspore", "bit_zoo", "builtins"):
            continue
        try:
            path = inspect.getsourcefile(module)
        except TypeError:
            path = None
        if path and os.path.isfile(path):
            out.append([base.__module__, _file_digest(path)])
    return out


def _cell_tree(cell: nn.Cell) -> list:
    entries = []
    for name, sub in cell.cells_and_names():
        attrs = {k: v for k, v in vars(sub).items() if not _is_volatile(k) and k not in ("_cells", "_params", "_params_list")}
        entries.append(
            [
                name,
                _qualname(type(sub)),
                _cell_source(type(sub)),
                _describe(attrs),
                sorted(_describe(p) for p in sub._params.values() if p is not None),
            ]
        )
    return entries


def _context() -> dict:
    from mindspore import context

    env = {k: v for k, v in os.environ.items() if (k.startswith(("MS_", "BIT_ZOO_")) and not k.startswith("MS_COMPILER_CACHE"))}
    return {
        "mindspore": ms.__version__,
        "python": sys.version,
        "device": ms.get_context("device_target"),
        "mode": ms.get_context("mode"),
        "parallel": str(context.get_auto_parallel_context("parallel_mode")),
        "device_num": context.get_auto_parallel_context("device_num"),
        "env": sorted(env.items()),
        "cpu_kernels": cpu_kernels.status(),
        "onednn_kernels": cpu_kernels.dnnl_status(),
    }


def graph_key(cell: nn.Cell, args: tuple, extra: dict | None = None) -> dict:
    """Everything the graph of `cell` called on `args` depends on (see the module docstring)."""
    return {
        "bit_zoo": _package_digest(),
        "context": _context(),
        "cells": _cell_tree(cell),
        "inputs": [_describe(a) if not isinstance(a, ms.Tensor) else [list(a.shape), str(a.dtype)] for a in args],
        "extra": _describe(extra or {}),
    }


@contextmanager
def _mindspore_cache(path: Path, dep_file: Path):
    """MindSpore's compile cache on, at `path`, with `dep_file` as its entry script, for one compile."""
    api = graph_api_module()
    old_entry, old_path = api.entry_script_path, ms.get_context("compile_cache_path")
    api.entry_script_path = str(dep_file)
    ms.set_context(enable_compile_cache=True, compile_cache_path=str(path))
    try:
        yield
    finally:
        ms.set_context(enable_compile_cache=False, compile_cache_path=old_path or ".")
        api.entry_script_path = old_entry


def key_digest(cell: nn.Cell, args: tuple, extra: dict | None = None) -> tuple[str, str]:
    """(the key as canonical JSON, the digest that names its directory)."""
    key = json.dumps(graph_key(cell, args, extra), sort_keys=True, default=str)
    return key, hashlib.sha256(key.encode()).hexdigest()[:32]


@contextmanager
def _gc_paused():
    """Python's cyclic collector off while MindSpore compiles: its parser creates Python objects by the
    hundred thousand and the collections they trigger cost a few tenths of a second of the cold compile
    (docs/speed.md). Whatever cycles appear meanwhile are collected later as usual."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def compile_cached(cell: nn.Cell, *args, extra: dict | None = None) -> str:
    """Compile `cell` for `args` (graph mode: cell.compile), through the cache when enabled.

    Returns 'hit' (loaded), 'miss' (compiled and saved), 'off' (compiled, no cache) or 'pynative' (nothing to compile).
    """
    if ms.get_context("mode") != ms.GRAPH_MODE:
        return "pynative"
    with _gc_paused():
        return _compile_cached(cell, args, extra)


def _compile_cached(cell: nn.Cell, args: tuple, extra: dict | None) -> str:
    if not enabled():
        cell.compile(*args)
        return "off"
    key, digest = key_digest(cell, args, extra)
    root = cache_dir()
    entry = root / digest
    root.mkdir(parents=True, exist_ok=True)
    dep_file = root / f"{digest}.key.py"  # MindSpore hashes this "entry script": the key, as a comment
    if not dep_file.exists():
        with tempfile.NamedTemporaryFile("w", dir=root, delete=False, suffix=".tmp") as f:
            f.write("# bit_zoo compile-cache key\n# " + key.replace("\n", " ") + "\n")
        os.replace(f.name, dep_file)
    hit = (entry / "key.json").is_file() and (entry / "key.json").read_text() == key
    if hit:
        with _mindspore_cache(entry, dep_file):
            cell.compile(*args)
        _logger.info("compile cache: %s loaded from %s", type(cell).__name__, entry)
        return "hit"
    staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root))
    try:
        with _mindspore_cache(staging, dep_file):
            cell.compile(*args)
        (staging / "key.json").write_text(key)
        try:
            os.rename(staging, entry)  # atomic; fails if another run published the same entry first
        except OSError:
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _logger.info("compile cache: %s compiled and saved to %s", type(cell).__name__, entry)
    return "miss"
