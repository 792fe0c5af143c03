"""jemalloc for bit_zoo's scripts on Linux CPU hosts: train.py, validate.py and the benchmark run
themselves once more with it preloaded when it is installed.

Why: MindSpore's graph compiler allocates and frees millions of small objects; under glibc's
malloc a sixth of the compile went to malloc/free and their consolidation (perf, on the R50x1
training step). With jemalloc preloaded the cold first training step took ~0.6 s less (4.4 s
against 5.0 s, 4 alternated runs each) and the first inference call ~0.3 s less on this project's
2-core machine; steady steps were unchanged (MindSpore keeps tensors in its own memory pool).
mimalloc, tried the same way, changed nothing. docs/speed.md has the measurement.

How: an allocator replaces malloc only if it is loaded before the C libraries that call it, i.e.
via LD_PRELOAD when the process starts. So :func:`preload` re-executes the running script (same
PID, same arguments, interpreter options kept) with LD_PRELOAD set, once, before MindSpore is
imported; PyTorch's CPU launcher (torch.backends.xeon.run_cpu) preloads jemalloc the same way.
It is a module of its own, standard library only, because ``import bit_zoo`` imports MindSpore.

BIT_ZOO_MALLOC chooses: ``auto`` (default: the system's jemalloc, e.g. ``apt install
libjemalloc2``, else the one MindSpore 2.7 / 2.8 ship; nothing on hosts with an Ascend toolkit,
where it was not measured), ``system`` (glibc's, no relaunch), or the path of a shared library
to preload.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import sys
from pathlib import Path

ENV = "BIT_ZOO_MALLOC"
_RELAUNCHED = "BIT_ZOO_MALLOC_PRELOADED"  # the relaunched process's allocator: never relaunch twice


def _jemalloc() -> str | None:
    found = ctypes.util.find_library("jemalloc")  # the system's (e.g. Debian/Ubuntu libjemalloc2)
    if found:
        return found
    spec = importlib.util.find_spec("mindspore")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "lib" / "libjemalloc.so.2"  # MindSpore 2.7 and 2.8 ship one
        if lib.is_file():
            return str(lib)
    return None


def _ascend_host(env) -> bool:
    return bool(env.get("ASCEND_HOME_PATH")) or Path("/usr/local/Ascend").is_dir()


def choose(env=os.environ) -> str | None:
    """The library to preload under BIT_ZOO_MALLOC, or None for glibc's malloc. Raises ValueError on a bad value."""
    choice = env.get(ENV, "auto").strip() or "auto"
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice == "auto":
        return None if _ascend_host(env) else _jemalloc()
    if not Path(choice).is_file():
        raise ValueError(f"{ENV}={choice!r}: no such file. Set it to auto, system, or the path of a malloc library (.so) to preload")
    return choice


def in_use() -> str:
    """What this process's malloc is, for a log line: the preloaded library or glibc's."""
    lib = os.environ.get(_RELAUNCHED)
    return f"{lib} (preloaded; {ENV}=system for glibc's)" if lib else f"glibc's ({ENV}=system, or no jemalloc found: apt install libjemalloc2)"


def without(env: dict[str, str]) -> dict[str, str]:
    """`env` for a child process that should run on glibc's malloc (e.g. another framework's benchmark row)."""
    lib = env.get(_RELAUNCHED)
    rest = [p for p in env.get("LD_PRELOAD", "").split(":") if p and p != lib]
    out = {k: v for k, v in env.items() if k not in (_RELAUNCHED, "LD_PRELOAD")}
    return dict(out, **{ENV: "system"}, **({"LD_PRELOAD": ":".join(rest)} if rest else {}))


def preload() -> None:
    """Re-execute this script with the chosen allocator preloaded; return if there is none or it already is."""
    if os.environ.get(_RELAUNCHED):
        return
    try:
        lib = choose()
    except ValueError as e:
        sys.exit(f"error: {e}")
    current = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    if lib is None or lib in current:
        return
    env = dict(os.environ, LD_PRELOAD=":".join([lib, *current]), **{_RELAUNCHED: lib})
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv keeps interpreter options (-u, -X ...) and the `-m module` form.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


if __name__ == "__main__":
    print(choose() or "system")
