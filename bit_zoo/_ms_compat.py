"""Narrow workarounds for MindSpore 2.10, applied when bit_zoo is imported.

load_checkpoint refuses a .ckpt larger than the machine's *free* memory (os.sysconf
SC_AVPHYS_PAGES = MemFree), which excludes the reclaimable page cache: after a few large file
reads, a 200 MB checkpoint fails to load on a 24 GiB machine with 23 GiB available. The check
is pointed at MemAvailable instead (free + reclaimable), falling back to MindSpore's own.

Cell.__del__ prints a traceback per live cell at interpreter exit; see `_guard_cell_del`.
A new cell at a freed cell's address is compiled against the old one; see `_unique_class_namespaces`.
"""

from __future__ import annotations

import itertools

from mindspore.train import serialization as _serialization

_original = getattr(_serialization, "_get_available_memory", None)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return _original() if _original else None


if _original is not None:
    _serialization._get_available_memory = _mem_available


def _guard_cell_del() -> None:
    """Silence Cell.__del__ at interpreter exit, only there.

    MindSpore 2.10's Cell.__del__ decrements `Cell.total_instance_count` through the module global
    `Cell`. At interpreter exit Python clears module globals to None before the cells held by user
    globals die, so every live cell prints "Exception ignored in Cell.__del__ ... 'NoneType' object
    has no attribute 'total_instance_count'" (136 tracebacks after creating one R50). The
    bookkeeping it fails to do no longer matters then. The wrapper swallows the error only when
    mindspore.nn.cell's globals are already cleared; at any other time errors propagate as before.
    Everything the wrapper needs is bound as a default argument, since our own globals are cleared too.
    """
    from mindspore.nn import Cell

    original = Cell.__del__
    if getattr(original, "_bit_zoo_guard", False):
        return

    def __del__(self, _original=original, _cell_globals=original.__globals__, _errors=(AttributeError, TypeError)):  # noqa: N807
        try:
            _original(self)
        except _errors:
            if _cell_globals.get("Cell") is not None:
                raise

    __del__._bit_zoo_guard = True
    Cell.__del__ = __del__


_guard_cell_del()


def _unique_class_namespaces() -> None:
    """MindSpore 2.10 labels a cell's graph namespace with ``id(obj)`` and caches what it resolved
    under that label; when a cell is freed and a new one is allocated at the same address, the new
    cell's construct is resolved against the old object's attributes ("'...<ResNetV2::1402...>'
    object has no attribute 'fc'", a method compiled as the wrong function). Seen in processes that
    build one model after another (the test suite, notebooks). The label gets a per-object serial
    number, which no later object reuses."""
    from mindspore.graph._parse import namespace as _namespace

    original_init = _namespace.ClassMemberNamespace.__init__
    serials = itertools.count()

    def __init__(self, obj, _original=original_init):  # noqa: N807
        _original(self, obj)
        try:
            serial = obj.__dict__.setdefault("_bit_zoo_namespace_serial", next(serials))
        except (AttributeError, TypeError):  # objects without a __dict__ keep MindSpore's label
            return
        self.name = f"{self.name}#{serial}"

    _namespace.ClassMemberNamespace.__init__ = __init__


_unique_class_namespaces()
