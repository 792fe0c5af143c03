"""ONNX and dynamic-batch MINDIR export of the export-only network form (bit_zoo/export.py)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from bit_zoo.export import ExportResNetV2, export_model, standardize
from bit_zoo.loading import load_state, model_state
from bit_zoo.resnetv2 import ResNetV2

TINY = (1, 1, 1, 1)


@pytest.fixture(scope="module")
def tiny():
    """A tiny ResNetV2 (width 1, 7 classes) with non-trivial weights, and its parameters."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(3)
    model = ResNetV2(TINY, 1, num_classes=7)
    params = {}
    for k, v in model_state(model).items():
        a = rng.standard_normal(v.shape).astype(np.float32)
        params[k] = 1.0 + 0.2 * a if k.endswith("gamma") else (0.2 * a if v.ndim < 4 else a + 0.5)  # conv means != 0
    load_state(model, params)
    model.set_train(False)
    return model, params


def _x(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got - ref).max() / np.abs(ref).max()
    np.testing.assert_array_equal(np.argsort(-got, axis=1)[:, :5], np.argsort(-ref, axis=1)[:, :5])


def test_standardize_matches_the_definition():
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32) * 3 + 1
    s = standardize(w)
    np.testing.assert_allclose(s.reshape(4, -1).mean(1), 0, atol=1e-6)
    np.testing.assert_allclose(s.reshape(4, -1).std(1), 1, atol=1e-5)


def test_export_form_matches_the_network(tiny):
    model, params = tiny
    x = _x(2, 64, 0)
    _close(ExportResNetV2(params, TINY)(ms.Tensor(x)).asnumpy(), model(ms.Tensor(x)).asnumpy())


def test_onnx_dynamic_batch_and_size(tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, params = tiny
    out = export_model(params, TINY, tmp_path / "tiny.onnx", img_size=64)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape == ["batch", 3, "height", "width"]
    for batch, size, seed in [(1, 64, 1), (4, 64, 2), (2, 96, 3)]:  # two batch sizes, then another resolution
        x = _x(batch, size, seed)
        _close(session.run(None, {"image": x})[0], model(ms.Tensor(x)).asnumpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_mindir_dynamic_batch_and_size(tiny, tmp_path):
    model, params = tiny
    out = export_model(params, TINY, tmp_path / "tiny.mindir", img_size=64)
    net = ms.nn.GraphCell(ms.load(str(out)))
    for batch, size, seed in [(1, 64, 4), (5, 64, 5), (2, 96, 6)]:  # two batch sizes, then another resolution
        x = _x(batch, size, seed)
        _close(net(ms.Tensor(x)).asnumpy(), model(ms.Tensor(x)).asnumpy())


def test_export_refuses_other_suffixes(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.onnx or \.mindir"):
        export_model(tiny[1], TINY, tmp_path / "tiny.pb", img_size=64)
    assert list(tmp_path.iterdir()) == []
