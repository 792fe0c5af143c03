"""bit_zoo on the running MindSpore: the supported range is refused below and stated alike in setup.py and
docs/compat.md, the moved modules are found, and each workaround of a MindSpore internal is tested where it
is applied (and shown not to be needed where it is not). scripts/compat.py runs this file on every release."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import pytest

from bit_zoo import _ms_compat as compat

ROOT = Path(__file__).resolve().parents[1]
# ---------------------------------------------------------------------------------------------- the range


@pytest.mark.parametrize("version", ["2.6.0", "2.2.10", "1.10.1"])
def test_refuses_an_older_mindspore_in_one_line(version):
    with pytest.raises(ImportError) as info:
        compat.check_version(version)
    message = str(info.value)
    assert "\n" not in message
    assert f"bit_zoo supports MindSpore >={compat.MINDSPORE_MIN},<{compat.MINDSPORE_BELOW}; this is MindSpore {version}" in message


def test_accepts_the_range_and_warns_above_it(caplog):
    compat.check_version(compat.MINDSPORE_MIN)
    compat.check_version(ms.__version__)
    assert not caplog.records
    compat.check_version(compat.MINDSPORE_BELOW + ".0")
    assert len(caplog.records) == 1 and "newer and untested" in caplog.records[0].getMessage()


def test_refuses_at_import_in_a_fresh_process():
    """The refusal as a user sees it: `import bit_zoo` stops with the one-line message, no other output of ours."""
    code = "import mindspore; mindspore.__version__ = '2.6.0'; import bit_zoo"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("ImportError: bit_zoo supports MindSpore >=")


def test_setup_py_states_the_same_range():
    setup = (ROOT / "setup.py").read_text()
    assert f'"mindspore>={compat.MINDSPORE_MIN},<{compat.MINDSPORE_BELOW}"' in setup
    assert compat._version_key(compat.MINDSPORE_MIN) <= compat._version_key(ms.__version__)


def test_docs_state_the_same_range():
    doc = (ROOT / "docs" / "compat.md").read_text()
    assert f"`mindspore>={compat.MINDSPORE_MIN},<{compat.MINDSPORE_BELOW}`" in doc


# ---------------------------------------------------------------------------------------------- the workarounds


def test_the_graph_api_module_is_found():
    """The compile cache points MindSpore's entry_script_path at its dependency file (mindspore.common.api before 2.9)."""
    api = compat.graph_api_module()
    assert isinstance(api.entry_script_path, str | None)
    assert api.__name__ == ("mindspore.graph.api" if compat._version_key(ms.__version__) >= (2, 9, 0) else "mindspore.common.api")


def test_the_graph_namespace_module_is_found():
    namespace = compat.graph_namespace_module()
    assert hasattr(namespace, "ClassMemberNamespace")


def test_workaround_checkpoint_size_check():
    from mindspore.train import serialization

    if "checkpoint_size_check" not in compat.APPLIED:
        # this MindSpore has no size check to correct
        assert not hasattr(serialization, "_get_available_memory")
        return
    assert serialization._get_available_memory is compat._mem_available
    meminfo = Path("/proc/meminfo").read_text()
    available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    assert abs(serialization._get_available_memory() - available) < 2**28  # MemAvailable now, within 256 MB of drift


def test_workaround_cell_del_guard():
    """Where applied: a script that holds a live model in a global exits without a single traceback."""
    from mindspore.nn import Cell

    if "cell_del_guard" not in compat.APPLIED:
        assert not getattr(Cell.__del__, "_bit_zoo_guard", False)
        return
    assert Cell.__del__._bit_zoo_guard
    script = "import bit_zoo\nmodel = bit_zoo.ResNetV2((1, 1, 1, 1), 1, num_classes=3)\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]


def test_workaround_unique_class_namespaces():
    """Where applied: two objects that live at the same address, one after the other, get different labels."""
    namespace = compat.graph_namespace_module()
    if "unique_class_namespaces" not in compat.APPLIED:
        assert not compat._namespace_labelled_by_id(namespace)
        return
    labels = {}
    for _ in range(10_000):  # CPython hands a freed object's memory to the next object of its size
        obj = compat._Probe()
        label = namespace.ClassMemberNamespace(obj).name
        if id(obj) in labels:
            assert labels[id(obj)] != label
            return
        labels[id(obj)] = label
        del obj
    pytest.fail("no address was reused in 10000 objects")
