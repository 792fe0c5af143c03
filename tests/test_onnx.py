"""ONNX and dynamic-batch MINDIR export of the inference-only network forms (bit_zoo/models/export.py)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from bit_zoo.models.export import ExportResNetV2, export_model, standardize
from bit_zoo.weights.loading import load_state, model_state
from bit_zoo.models.resnetv2 import ResNetV2

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
    # two batch sizes, another resolution, then one no stride divides (the stem's pad, the strided convs' rounding)
    for batch, size, seed in [(1, 64, 1), (4, 64, 2), (2, 96, 3), (1, 75, 4)]:
        x = _x(batch, size, seed)
        _close(session.run(None, {"image": x})[0], model(ms.Tensor(x)).asnumpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_onnx_runs_fused_in_onnxruntimes_blocked_layout(tiny, tmp_path):
    """The form export.py writes for onnxruntime's speed (docs/speed.md): after onnxruntime's default
    optimizations every GroupNorm's affine + ReLU is one depthwise conv in its NCHWc (blocked) layout,
    and the stem's pad another: no BatchNormalization, Mul, Relu or Pad pass is left in plain layout."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    out = export_model(tiny[1], TINY, tmp_path / "tiny.onnx")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(opts.optimized_model_filepath).graph.node
    blocked = [n for n in nodes if n.domain == "com.microsoft.nchwc"]
    if not blocked:
        pytest.skip("onnxruntime's NCHWc transformer does not run on this CPU")
    ops = {n.op_type for n in nodes if not n.domain}
    assert not ops & {"BatchNormalization", "Mul", "Relu", "Pad"}, ops
    norms = 3 * sum(TINY) + 1
    depthwise = [n for n in blocked if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert len(depthwise) == norms + 1  # one per GroupNorm, and the stem's pad
    activations = [a.s for n in depthwise for a in n.attribute if a.name == "activation"]
    assert activations == [b"Relu"] * norms  # every GroupNorm's ReLU, in its affine's conv
    assert sum(1 for n in nodes if n.op_type == "InstanceNormalization") == norms


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


def test_onnx_over_the_protobuf_limit_writes_one_data_file(tiny, tmp_path, monkeypatch, caplog):
    """A network over 2 GB: export stores the weights outside the protobuf, in one `<name>.onnx.data`,
    and says so. Here the limit is lowered to 0 so a tiny network takes the same path; the heavy test below exports a real 3.7 GB one."""
    ort = pytest.importorskip("onnxruntime")
    from bit_zoo.models import export

    monkeypatch.setattr(export, "EXTERNAL_DATA_KIB", 0)
    model, params = tiny
    with caplog.at_level("WARNING", logger="bit_zoo.models.export"):
        out = export_model(params, TINY, tmp_path / "tiny.onnx", img_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx.data"]
    assert "tiny.onnx.data" in caplog.text and "2 GiB" in caplog.text
    weight_bytes = sum(a.nbytes for a in params.values())
    assert (tmp_path / "tiny.onnx.data").stat().st_size >= weight_bytes > (tmp_path / "tiny.onnx").stat().st_size
    _run_onnx(ort, out, model, batches=(1, 3))

    monkeypatch.setattr(export, "EXTERNAL_DATA_KIB", 1024 * 1024 * 2)  # 2 GiB: the weights fit inline
    export_model(params, TINY, tmp_path / "tiny.onnx", img_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]  # the stale data file went with the old export
    _run_onnx(ort, out, model, batches=(2,))


def _run_onnx(ort, path, model, *, batches, size: int = 64) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed, batch in enumerate(batches):
        x = _x(batch, size, 10 + seed)
        _close(session.run(None, {"image": x})[0], model(ms.Tensor(x)).asnumpy())


@pytest.mark.heavy
def test_onnx_of_bit_m_r152x4_over_2gb(tmp_path):
    """bit_m_r152x4 with its 21,843-class head (936 M parameters, 3.7 GB): .onnx plus .onnx.data,
    loaded by onnxruntime, equal to the MindSpore model at two batch sizes. Peak RSS about 3 copies of the weights."""
    import gc

    ort = pytest.importorskip("onnxruntime")
    from mindspore.nn.utils import no_init_parameters

    from bit_zoo.models.registry import get_weights

    arch = get_weights("bit_m_r152x4")
    rng = np.random.default_rng(0)
    with no_init_parameters():
        model = ResNetV2(arch.layers, arch.width_factor, num_classes=21843, eager_jit=False)  # no graph compile per batch size
    params = {}
    for p in model.get_parameters():  # names and shapes only: the skeleton holds no data yet
        k, shape = p.name, tuple(p.shape)
        if k.endswith("gamma"):
            params[k] = 1.0 + 0.2 * rng.standard_normal(shape, dtype=np.float32)
        elif len(shape) < 2:
            params[k] = 0.2 * rng.standard_normal(shape, dtype=np.float32)
        else:
            params[k] = rng.standard_normal(shape, dtype=np.float32) / (np.sqrt(shape[1]) if len(shape) == 2 else 1.0)
    assert sum(a.nbytes for a in params.values()) > 2**31  # over protobuf's limit: the point of the test
    out = export_model(params, arch.layers, tmp_path / "r152x4.onnx", img_size=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r152x4.onnx", "r152x4.onnx.data"]
    assert (tmp_path / "r152x4.onnx").stat().st_size < 2**24
    load_state(model, dict(params))  # shares the arrays: no second copy
    del params
    gc.collect()
    model.set_train(False)
    _run_onnx(ort, out, model, batches=(1, 2))
