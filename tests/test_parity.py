"""Numerical parity with an independent reference: timm's resnetv2_*_bit loaded with timm's own npz loader.

The same upstream-layout .npz goes into both; logits must agree to 1e-4 of the largest logit with
identical top-5. torch and timm are test-only dependencies (see README); R50x1 runs by default,
the bigger architectures carry the `heavy` marker (several GB of weights each).
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
except ImportError as e:  # .ci/run checks the import first, so CI never skips here
    pytest.skip(f"timm not installed ({e}); see README, Tests", allow_module_level=True)
from timm.models.resnetv2 import _load_weights  # noqa: E402  (timm's own upstream-npz loader)

TIMM_NAMES = {
    "r50x1": "resnetv2_50x1_bit",
    "r50x3": "resnetv2_50x3_bit",
    "r101x1": "resnetv2_101x1_bit",
    "r101x3": "resnetv2_101x3_bit",
    "r152x2": "resnetv2_152x2_bit",
    "r152x4": "resnetv2_152x4_bit",
}
CASES = [pytest.param(a, marks=[pytest.mark.parity] + ([] if a == "r50x1" else [pytest.mark.heavy])) for a in TIMM_NAMES]


def timm_logits(arch: str, npz_path, x: np.ndarray, num_classes: int) -> np.ndarray:
    model = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=num_classes).eval()
    with torch.no_grad():
        _load_weights(model, str(npz_path))
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("arch", CASES)
@pytest.mark.parametrize("conv_impl", ["native", "unfold"])
def test_logits_match_timm(tmp_path, make_upstream_npz, arch, conv_impl):
    num_classes = 1000
    npz = tmp_path / "weights.npz"
    make_upstream_npz(npz, f"bit_s_{arch}", num_classes, seed=7)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 96, 96)).astype(np.float32)  # odd-sized maps: 48, 24, 12, 6, 3
    ref = timm_logits(arch, npz, x, num_classes)
    model = bit_zoo.create_model(f"bit_s_{arch}", checkpoint_path=str(npz), conv_impl=conv_impl)
    model.set_train(False)
    ours = model(ms.Tensor(x)).asnumpy()
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 1e-4 * scale, f"max abs diff {np.abs(ours - ref).max():.3g}, largest logit {scale:.3g}"
    top5 = lambda a: np.argsort(-a, axis=1)[:, :5]  # noqa: E731
    np.testing.assert_array_equal(top5(ours), top5(ref))


@pytest.mark.parity
def test_same_padding_port_would_fail(tmp_path, make_upstream_npz):
    """The check has teeth: a TF-SAME-padded stride-2 3x3 (the bug of two public ports) breaks parity."""
    npz = tmp_path / "weights.npz"
    make_upstream_npz(npz, "bit_s_r50x1", 1000, seed=7)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
    ref = timm_logits("r50x1", npz, x, 1000)
    model = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(npz), conv_impl="native")
    conv = model.stages[1].blocks[0].conv2

    def same_padded(inp):  # pad 0 before / 1 after, as TF "SAME" does for stride 2 on even inputs
        w = conv.standardized_weight(inp.dtype)
        inp = ms.ops.pad(inp, (0, 1, 0, 1))
        return ms.ops.conv2d(inp, w, stride=2)

    conv.construct = same_padded
    model.set_train(False)
    ours = model(ms.Tensor(x)).asnumpy()
    assert np.abs(ours - ref).max() > 1e-2 * np.abs(ref).max()
