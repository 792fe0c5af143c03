"""Import timm, the independent PyTorch reference used by the parity tests and the benchmark.

Not a runtime dependency: only tests/test_parity.py and `python -m benchmarks.benchmark --torch-reference` call this.
"""

from __future__ import annotations

import sys

_SHIM_LIBS: list = []  # torch.library.Library objects must stay alive for their definitions to stay registered


def import_timm():
    """Return the timm module, importable beside PyTorch's small CPU-only build.

    The README installs torch 2.13.0+cpu (190 MB) rather than the CUDA build (5.5 GB in a venv, which filled a CI
    machine's disk). PyPI's torchvision 0.28 is built against the CUDA torch: beside the CPU build its compiled ops
    do not load, yet its _meta_registrations registers fake kernels for torchvision::nms and ::qnms unconditionally,
    so `import torchvision` (and with it `import timm`) raises "operator torchvision::nms does not exist". timm's
    ResNetV2 uses no torchvision operator, so defining those two schemas lets the import finish; calling either op
    would still fail loudly (no kernel). With a matching torchvision the first import succeeds and nothing is defined.
    """
    try:
        import timm

        return timm
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    import torch

    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
        del sys.modules[name]  # drop the half-imported modules so the retry runs them again
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM_LIBS.append(lib)
    import timm

    return timm
