"""Narrow workarounds for MindSpore 2.10, applied when bit_zoo is imported.

load_checkpoint refuses a .ckpt larger than the machine's *free* memory (os.sysconf
SC_AVPHYS_PAGES = MemFree), which excludes the reclaimable page cache: after a few large file
reads, a 200 MB checkpoint fails to load on a 24 GiB machine with 23 GiB available. The check
is pointed at MemAvailable instead (free + reclaimable), falling back to MindSpore's own.
"""

from __future__ import annotations

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
