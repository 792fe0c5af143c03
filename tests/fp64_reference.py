"""How far fp32 maps are from exact: timm in float64 as the reference, on the parity test's inputs.

    PYTHONPATH=$PWD python tests/fp64_reference.py r152x2      # any key of test_parity.TIMM_NAMES

Writes the same random upstream .npz as test_parity_features (seed 3), runs timm's
forward_intermediates in float32 and float64, then bit_zoo on both convolution paths, and prints
per map (stem, stages 1-4) max |a - b| / max |b| against float64 and against timm's float32.
It also prints timm against itself: the same float32 model in channels_last memory format (another
oneDNN kernel, another summation order) and with oneDNN switched off, against timm's default run.
Why: the parity tests decide by this comparison (test_parity.fp32_no_worse_than_timm: bit_zoo's error
against float64 at most twice timm float32's); this script shows the figures behind it, and timm
against itself, for one architecture at a time. Not collected by pytest (a script).
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_upstream_npz  # noqa: E402
from test_parity_features import _timm_model  # noqa: E402

import bit_zoo  # noqa: E402


def _rel(maps, ref) -> list[str]:
    return [f"{np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max():.2e}" for a, b in zip(maps, ref)]


def main(arch: str) -> None:
    ms.set_context(mode=ms.PYNATIVE_MODE)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        npz = str(Path(tmp) / f"{arch}.npz")
        write_upstream_npz(npz, f"bit_s_{arch}", 1000, seed=3)
        x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 80, 80)).astype(np.float32)
        model = _timm_model(arch, npz)
        with torch.no_grad():
            _, r32 = model.forward_intermediates(torch.from_numpy(x))
            with torch.backends.mkldnn.flags(enabled=False):
                _, plain = model.forward_intermediates(torch.from_numpy(x))
            model = model.to(memory_format=torch.channels_last)
            _, last = model.forward_intermediates(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
            model = model.to(memory_format=torch.contiguous_format).double()
            _, r64 = model.forward_intermediates(torch.from_numpy(x).double())
        r32, r64 = [a.numpy() for a in r32], [a.numpy() for a in r64]
        plain, last = [a.numpy() for a in plain], [a.numpy() for a in last]
        del model
        gc.collect()
        print(f"timm fp32 vs fp64: {_rel(r32, r64)}", flush=True)
        print(f"timm fp32 channels_last vs timm fp32: {_rel(last, r32)}", flush=True)
        print(f"timm fp32 without oneDNN vs timm fp32: {_rel(plain, r32)}", flush=True)
        for impl in ("native", "unfold"):
            ours = bit_zoo.create_model(f"bit_s_{arch}", checkpoint_path=npz, conv_impl=impl, eager_jit=False)
            ours.set_train(False)
            _, maps = ours.forward_intermediates(ms.Tensor(x))
            maps = [a.asnumpy() for a in maps]
            print(f"bit_zoo {impl} vs fp64: {_rel(maps, r64)}   vs timm fp32: {_rel(maps, r32)}", flush=True)
            del ours, maps
            gc.collect()
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "r50x1")
