"""Everything bit_zoo does about MindSpore's version, in one place, run when bit_zoo is imported.

The supported range is MINDSPORE_MIN <= version < MINDSPORE_BELOW: the releases the version matrix
(scripts/compat.py, docs/compat.md) passed. An older MindSpore is refused here with one line; a newer
one is let through with a one-line warning. setup.py's install_requires states the same range (a test
holds the two together).

Each workaround of a MindSpore internal is applied only where the running MindSpore has the behaviour it
works around, found by looking at that behaviour rather than at the version number; `APPLIED` lists the
ones in force, and tests/test_ms_compat.py checks each one where it is applied. A MindSpore module that
moved between releases is reached through here only (`graph_namespace_module`, `graph_api_module`).

- checkpoint size check: `load_checkpoint` refuses a .ckpt larger than the *free* memory (MemFree),
  which excludes the reclaimable page cache; pointed at MemAvailable. See `_point_size_check_at_mem_available`.
- `Cell.__del__` prints a traceback per live cell at interpreter exit; see `_guard_cell_del`.
- a new cell at a freed cell's address is compiled against the old one; see `_unique_class_namespaces`.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import re

import mindspore

MINDSPORE_MIN = "2.7.0"
MINDSPORE_BELOW = "2.11"

APPLIED: list[str] = []

_logger = logging.getLogger(__name__)


def _version_key(version: str) -> tuple[int, int, int]:
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def check_version(version: str) -> None:
    """Refuse a MindSpore older than the supported range (ImportError, one line); warn about a newer one."""
    if _version_key(version) < _version_key(MINDSPORE_MIN):
        raise ImportError(
            f"bit_zoo supports MindSpore >={MINDSPORE_MIN},<{MINDSPORE_BELOW}; this is MindSpore {version}: "
            f"pip install 'mindspore>={MINDSPORE_MIN},<{MINDSPORE_BELOW}'"
        )
    if _version_key(version) >= _version_key(MINDSPORE_BELOW):
        _logger.warning(
            "bit_zoo was tested with MindSpore >=%s,<%s; MindSpore %s is newer and untested", MINDSPORE_MIN, MINDSPORE_BELOW, version
        )


check_version(mindspore.__version__)


def graph_namespace_module():
    """MindSpore's graph parser's namespace module: mindspore.graph._parse from 2.9, mindspore._extends.parse before."""
    for name in ("mindspore.graph._parse.namespace", "mindspore._extends.parse.namespace"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise ImportError(f"MindSpore {mindspore.__version__} has no graph namespace module where bit_zoo looks for it")


def graph_api_module():
    """MindSpore's jit/graph-executor module (its `entry_script_path` names the compile cache's dependency
    file): mindspore.graph.api from 2.9, mindspore.common.api before."""
    for name in ("mindspore.graph.api", "mindspore.common.api"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        if hasattr(module, "entry_script_path"):
            return module
    raise ImportError(f"MindSpore {mindspore.__version__} has no graph api module where bit_zoo looks for it")


# ---------------------------------------------------------------------------------------------- checkpoint size


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return _size_check_original() if _size_check_original else None


_size_check_original = None


def _point_size_check_at_mem_available() -> bool:
    """load_checkpoint's size check (new in MindSpore 2.10) reads os.sysconf SC_AVPHYS_PAGES = MemFree: after a few
    large file reads, a 200 MB checkpoint fails to load on a 24 GiB machine with 23 GiB available. Applied where
    the check exists; it then reads MemAvailable (free + reclaimable), falling back to MindSpore's own."""
    global _size_check_original
    from mindspore.train import serialization

    original = getattr(serialization, "_get_available_memory", None)
    if original is None or original is _mem_available:
        return False
    _size_check_original = original
    serialization._get_available_memory = _mem_available
    return True


# ---------------------------------------------------------------------------------------------- Cell.__del__


def _cell_del_uses_module_global(cell_cls) -> bool:
    """Cell.__del__ decrements `Cell.total_instance_count` through the module global `Cell` (2.7 to 2.10)."""
    code = getattr(cell_cls.__del__, "__code__", None)
    return code is not None and "Cell" in code.co_names and "total_instance_count" in code.co_names


def _guard_cell_del() -> bool:
    """Silence Cell.__del__ at interpreter exit, only there.

    At interpreter exit Python clears module globals to None before the cells held by user globals die, so
    every live cell prints "Exception ignored in Cell.__del__ ... 'NoneType' object has no attribute
    'total_instance_count'" (136 tracebacks after creating one R50). The bookkeeping it fails to do no longer
    matters then. The wrapper swallows the error only when mindspore.nn.cell's globals are already cleared; at
    any other time errors propagate as before. Everything the wrapper needs is bound as a default argument,
    since our own globals are cleared too.
    """
    from mindspore.nn import Cell

    original = Cell.__del__
    if getattr(original, "_bit_zoo_guard", False) or not _cell_del_uses_module_global(Cell):
        return False

    def __del__(self, _original=original, _cell_globals=original.__globals__, _errors=(AttributeError, TypeError)):  # noqa: N807
        try:
            _original(self)
        except _errors:
            if _cell_globals.get("Cell") is not None:
                raise

    __del__._bit_zoo_guard = True
    Cell.__del__ = __del__
    return True


# ---------------------------------------------------------------------------------------------- graph namespaces


class _Probe:
    pass


def _namespace_labelled_by_id(namespace) -> bool:
    probe = _Probe()
    return str(id(probe)) in namespace.ClassMemberNamespace(probe).name


def _unique_class_namespaces() -> bool:
    """MindSpore (2.7 to 2.10) labels a cell's graph namespace with ``id(obj)`` and caches what it resolved under
    that label; when a cell is freed and a new one is allocated at the same address, the new cell's construct is
    resolved against the old object's attributes ("'...<ResNetV2::1402...>' object has no attribute 'fc'", a
    method compiled as the wrong function). Seen in processes that build one model after another (the test
    suite, notebooks). Applied where the label holds the id; the label gets a per-object serial number, which
    no later object reuses."""
    namespace = graph_namespace_module()
    init = namespace.ClassMemberNamespace.__init__
    if getattr(init, "_bit_zoo", False) or not _namespace_labelled_by_id(namespace):
        return False
    serials = itertools.count()

    def __init__(self, obj, _original=init):  # noqa: N807
        _original(self, obj)
        try:
            serial = obj.__dict__.setdefault("_bit_zoo_namespace_serial", next(serials))
        except (AttributeError, TypeError):  # objects without a __dict__ keep MindSpore's label
            return
        self.name = f"{self.name}#{serial}"

    __init__._bit_zoo = True
    namespace.ClassMemberNamespace.__init__ = __init__
    return True


for _name, _apply in (
    ("checkpoint_size_check", _point_size_check_at_mem_available),
    ("cell_del_guard", _guard_cell_del),
    ("unique_class_namespaces", _unique_class_namespaces),
):
    if _apply():
        APPLIED.append(_name)
