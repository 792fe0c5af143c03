"""Backbone outputs against an independent reference: timm's forward_intermediates on the same upstream .npz.

Every map (stem conv, four stages, the final and the normalised last map), on every convolution path:
bit_zoo's float32 error against timm in float64 must be at most twice timm float32's own error
against it (test_parity.fp32_no_worse_than_timm). Dilated backbones (output_stride 16 / 8) are
compared with timm float32 to 1e-4 of each map's largest value (R50x1 only, where that holds with
a margin). R50x1 runs by default, the other architectures carry the `heavy` marker.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

import bit_zoo
from bit_zoo.utils._timm import import_timm

torch = pytest.importorskip("torch")
try:
    timm = import_timm()
except ImportError as e:
    pytest.skip(f"timm not installed ({e}); see README, Tests", allow_module_level=True)
from test_parity import CASES, CONV_IMPLS, TIMM_NAMES, fp32_no_worse_than_timm  # noqa: E402  (one table of timm names, cases, criterion)
from timm.models.resnetv2 import _load_weights  # noqa: E402  (timm's own upstream-npz loader)


def _timm_model(arch: str, npz, **kwargs):
    model = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=1000, **kwargs).eval()
    for m in model.modules():  # BiT's weight-standardisation eps (1e-10, as bit_zoo and the upstream release); timm uses 1e-8
        if hasattr(m, "eps") and type(m).__name__ == "StdConv2d":
            m.eps = 1e-10
    with torch.no_grad():
        _load_weights(model, str(npz))
    return model


def _assert_maps_close(ours, ref, what: str) -> float:
    """Assert every map within 1e-4 of its largest value; return the worst relative difference (for the heavy-run record)."""
    assert len(ours) == len(ref), f"{what}: {len(ours)} maps vs timm's {len(ref)}"
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, ref)):
        a = a.asnumpy() if hasattr(a, "asnumpy") else a
        b = b.numpy()
        assert a.shape == b.shape, f"{what} map {i}: shape {a.shape} vs timm {b.shape}"
        scale = np.abs(b).max()
        diff = np.abs(a - b).max()
        assert diff <= 1e-4 * scale, f"{what} map {i}: max abs diff {diff:.3g}, largest value {scale:.3g}"
        worst = max(worst, float(diff / scale))
    return worst


def _timm_maps(model, x: np.ndarray) -> list[np.ndarray]:
    """timm's maps in the order bit_zoo returns them: forward_intermediates' five, its final features, the normalised
    maps of indices 1 and 4."""
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        normed = model.forward_intermediates(x, indices=[1, 4], norm=True, intermediates_only=True)
    return [t.numpy() for t in (*maps, final, *normed)]


MAP_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "final", "normed stage1", "normed stage4")


@pytest.mark.parametrize("arch", CASES)
@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
def test_intermediates_match_timm(tmp_path, make_upstream_npz, arch, conv_impl):
    npz = tmp_path / "weights.npz"
    make_upstream_npz(npz, f"bit_s_{arch}", 1000, seed=3)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 80, 80)).astype(np.float32)  # maps 40, 20, 10, 5, 3: odd sizes
    ref_model = _timm_model(arch, npz)
    ref_info = [{k: d[k] for k in ("num_chs", "reduction", "module")} for d in ref_model.feature_info]
    r32 = _timm_maps(ref_model, torch.from_numpy(x))
    r64 = _timm_maps(ref_model.double(), torch.from_numpy(x).double())  # converted in place: one copy of the weights
    del ref_model  # R152x4 is 3.7 GB of float32 weights per copy (7.5 in float64): at most one of timm's and one of ours alive

    model = bit_zoo.create_model(f"bit_s_{arch}", checkpoint_path=str(npz), conv_impl=conv_impl, eager_jit=False)
    model.set_train(False)
    final, maps = model.forward_intermediates(ms.Tensor(x))
    normed = model.forward_intermediates(ms.Tensor(x), indices=[1, 4], norm=True, intermediates_only=True)
    ours = [t.asnumpy() for t in (*maps, final, *normed)]
    assert len(ours) == len(r64), f"{len(ours)} maps vs timm's {len(r64)}"
    errors = [fp32_no_worse_than_timm(a, b, c, f"{arch} {conv_impl} {n}") for a, b, c, n in zip(ours, r32, r64, MAP_NAMES)]
    del model, final, maps, normed

    # The backbone (no head, no final norm) loads the same file and returns the same maps.
    backbone = bit_zoo.create_model(f"bit_s_{arch}", checkpoint_path=str(npz), conv_impl=conv_impl, features_only=True, eager_jit=False)
    backbone.set_train(False)
    for i, a in enumerate(backbone(ms.Tensor(x))):
        fp32_no_worse_than_timm(a.asnumpy(), r32[i], r64[i], f"{arch} {conv_impl} features_only {MAP_NAMES[i]}")
    shown = ", ".join(f"{n} {o:.2e}/{t:.2e}" for n, (o, t) in zip(MAP_NAMES, errors))
    print(f"PARITY {arch} {conv_impl} (bit_zoo/timm float32, from float64): {shown}")  # shown with -rP: the heavy-run record
    assert backbone.feature_info.get_dicts(keys=("num_chs", "reduction", "module")) == ref_info
    assert backbone.feature_info.get("index") == [0, 1, 2, 3, 4]


@pytest.mark.parity
@pytest.mark.parametrize(
    ("output_stride", "conv_impl"),
    [
        (16, "unfold"),
        (8, "native"),
        pytest.param(16, "onednn", marks=CONV_IMPLS[-1].marks),  # the dilated 3x3s in channels-last
        pytest.param(8, "onednn", marks=CONV_IMPLS[-1].marks),
        pytest.param(16, "native", marks=pytest.mark.heavy),
        pytest.param(8, "unfold", marks=pytest.mark.heavy),
    ],
)
def test_dilated_backbone_matches_timm(tmp_path, make_upstream_npz, output_stride, conv_impl):
    npz = tmp_path / "weights.npz"
    make_upstream_npz(npz, "bit_s_r50x1", 1000, seed=5)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    ref_model = _timm_model("r50x1", npz, output_stride=output_stride)
    with torch.no_grad():
        ref_maps = ref_model.forward_intermediates(torch.from_numpy(x), intermediates_only=True)
    backbone = bit_zoo.create_model(
        "bit_s_r50x1", checkpoint_path=str(npz), conv_impl=conv_impl, features_only=True, output_stride=output_stride, eager_jit=False
    )
    backbone.set_train(False)
    maps = backbone(ms.Tensor(x))
    _assert_maps_close(maps, ref_maps, f"output_stride={output_stride}")
    assert backbone.feature_info.reduction() == [d["reduction"] for d in ref_model.feature_info]
    assert maps[-1].shape[-1] == 64 // output_stride
