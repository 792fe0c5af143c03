"""bit_zoo_malloc: the scripts relaunch themselves once with jemalloc (or BIT_ZOO_MALLOC's library) preloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import bit_zoo_malloc

ROOT = Path(__file__).resolve().parents[1]

# What a script sees of itself: the same preamble as train.py's, then its PID, arguments and mapped allocators.
PROBE = """\
import bit_zoo_malloc

if __name__ == "__main__":
    bit_zoo_malloc.preload()

import os, sys
print("argv", sys.argv[1:], "orig", sys.orig_argv[1])
print("in_use", bit_zoo_malloc.in_use())
print("mapped", sorted({line.split()[-1] for line in open("/proc/self/maps") if "malloc" in line or "bzprobe" in line}))
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "BIT_ZOO_MALLOC_PRELOADED", "ASCEND_HOME_PATH")}
    return dict(env, PYTHONPATH=str(ROOT), **extra)


def _probe(tmp_path: Path, env: dict[str, str], *argv: str) -> dict[str, str]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run([sys.executable, "-u", str(script), *argv], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines())


def test_choose_reads_the_setting(tmp_path):
    lib = tmp_path / "libmymalloc.so"
    lib.write_bytes(b"")
    assert bit_zoo_malloc.choose({"BIT_ZOO_MALLOC": "system"}) is None
    if sys.platform.startswith("linux"):
        assert bit_zoo_malloc.choose({"BIT_ZOO_MALLOC": str(lib)}) == str(lib)
        # not measured on Ascend hosts: auto keeps glibc's there
        assert bit_zoo_malloc.choose({"ASCEND_HOME_PATH": "/usr/local/Ascend/ascend-toolkit/latest"}) is None
        with pytest.raises(ValueError, match=r"BIT_ZOO_MALLOC='/no/such/lib.so': no such file\. Set it to auto, system, or"):
            bit_zoo_malloc.choose({"BIT_ZOO_MALLOC": "/no/such/lib.so"})


@pytest.fixture
def probe_lib(tmp_path) -> Path:
    """A real shared library that does nothing: what the relaunch preloads is then visible in /proc/self/maps."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C compiler")
    src = tmp_path / "probe.c"
    src.write_text("int bit_zoo_probe_marker = 1;\n")
    lib = tmp_path / "libbzprobe.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def test_auto_takes_mindspores_own_jemalloc_when_the_system_has_none(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    shipped = tmp_path / "lib" / "libjemalloc.so.2"
    shipped.write_bytes(b"")
    monkeypatch.setattr(bit_zoo_malloc.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(bit_zoo_malloc.importlib.util, "find_spec", lambda name: types.SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    if sys.platform.startswith("linux"):
        assert bit_zoo_malloc.choose({}) == str(shipped)
    shipped.unlink()
    assert bit_zoo_malloc.choose({}) is None  # nothing found: glibc's, no relaunch


@linux_only
def test_the_script_runs_again_with_the_library_mapped(tmp_path, probe_lib):
    out = _probe(tmp_path, _env(BIT_ZOO_MALLOC=str(probe_lib)), "--flag", "a b")
    assert out["argv"] == "['--flag', 'a b'] orig -u"  # arguments and interpreter options (-u) kept
    assert out["in_use"].startswith(f"{probe_lib} (preloaded")
    assert str(probe_lib) in out["mapped"]


@linux_only
def test_jemalloc_when_installed(tmp_path):
    lib = bit_zoo_malloc.choose({})
    if lib is None:
        pytest.skip("no jemalloc here (apt install libjemalloc2)")
    out = _probe(tmp_path, _env())
    assert out["in_use"].startswith(f"{lib} (preloaded")
    assert "libjemalloc.so" in out["mapped"]


@linux_only
def test_system_keeps_glibc_and_the_process(tmp_path):
    out = _probe(tmp_path, _env(BIT_ZOO_MALLOC="system"))
    assert out["in_use"].startswith("glibc's")
    assert out["mapped"] == "[]"


@linux_only
def test_relaunch_keeps_the_pid(tmp_path, probe_lib):
    """mpirun, msrun and the tests' SIGTERM all address the PID they started: exec, not a child process."""
    script = tmp_path / "pid.py"
    script.write_text("import os, sys\nprint(os.getpid(), flush=True)\nimport bit_zoo_malloc\nbit_zoo_malloc.preload()\n")
    proc = subprocess.run([sys.executable, str(script)], env=_env(BIT_ZOO_MALLOC=str(probe_lib)), capture_output=True, text=True, timeout=60)
    pids = proc.stdout.split()
    assert proc.returncode == 0 and len(pids) == 2 and pids[0] == pids[1], (proc.stdout, proc.stderr)


@linux_only
def test_a_bad_setting_is_one_line_before_anything_loads():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "validate.py"), "--help"], env=_env(BIT_ZOO_MALLOC="/no/such/lib.so"), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: BIT_ZOO_MALLOC='/no/such/lib.so': no such file. Set it to auto, system, or the path of a malloc library (.so) to preload"
    ]


def test_without_gives_a_child_glibcs_malloc():
    """The benchmark's other runtimes run on their default malloc: our preload removed, another one kept, no relaunch."""
    env = {"LD_PRELOAD": "libjemalloc.so.2:/opt/other.so", "BIT_ZOO_MALLOC_PRELOADED": "libjemalloc.so.2", "PATH": "/bin"}
    assert bit_zoo_malloc.without(env) == {"LD_PRELOAD": "/opt/other.so", "BIT_ZOO_MALLOC": "system", "PATH": "/bin"}
    env = {"LD_PRELOAD": "libjemalloc.so.2", "BIT_ZOO_MALLOC_PRELOADED": "libjemalloc.so.2"}
    assert bit_zoo_malloc.without(env) == {"BIT_ZOO_MALLOC": "system"}
