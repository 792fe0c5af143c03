"""python -m bit_zoo.convert: every input format -> .ckpt / .safetensors / .npz / .onnx / .mindir, keeping the classifier."""

from __future__ import annotations

import logging

import mindspore as ms
import numpy as np
import pytest

import bit_zoo
from bit_zoo.tools.convert import main
from bit_zoo.weights.loading import load_checkpoint, load_state, model_state, read_arrays, save_weights
from bit_zoo.weights.meta import META_KEY, decode_meta, with_meta
from bit_zoo.models.resnetv2 import ResNetV2

TINY = (1, 1, 1, 1)
SIZE = 64


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_npz_to_mindspore_formats(tmp_path, npz_r50_1000, suffix, capsys):
    path, params = npz_r50_1000
    out = tmp_path / f"bit_s_r50x1{suffix}"
    assert main(["--model", "bit_s_r50x1", "--input", str(path), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    fmt, arrays = read_arrays(out)
    assert fmt == suffix.lstrip(".") and set(arrays) == set(params) | {META_KEY}
    for k in params:
        np.testing.assert_array_equal(arrays[k], params[k])
    meta = decode_meta(arrays)
    assert meta["model"] == "bit_s_r50x1" and meta["num_classes"] == 1000 and meta["layers"] == [3, 4, 6, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_mindcv_to_upstream_npz_and_back(tmp_path, make_mindcv_ckpt):
    src = tmp_path / "mindcv.ckpt"
    params = make_mindcv_ckpt(src, "bit_s_r50x1")
    npz = tmp_path / "out.npz"
    assert main(["--model", "bit_s_r50x1", "--input", str(src), "--output", str(npz)]) == 0
    with np.load(npz) as z:
        assert len(z.files) == 153  # R50: root conv + 16 units x 9 + 4 projections + final GN (2) + head (2)
        assert z["resnet/root_block/standardized_conv2d/kernel"].shape == (7, 7, 3, 64)
    model = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(npz))
    np.testing.assert_array_equal(model_state(model)["stages.2.blocks.5.conv2.weight"], params["stages.2.blocks.5.conv2.weight"])


def test_bad_requests_are_clear_and_write_nothing(tmp_path, npz_r50_1000, capsys):
    path, _ = npz_r50_1000
    assert main(["--model", "bit_s_r101x1", "--input", str(path), "--output", str(tmp_path / "x.ckpt")]) == 2
    assert "missing keys" in capsys.readouterr().err
    assert main(["--model", "bit_s_r50x1", "--input", str(path), "--output", str(tmp_path / "x.pt")]) == 2
    assert "must end in one of .ckpt, .safetensors, .npz, .onnx, .mindir" in capsys.readouterr().err
    assert main(["--model", "bit_s_r50x1", "--input", str(tmp_path / "missing.npz"), "--output", str(tmp_path / "x.ckpt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["--input", str(path), "--output", str(tmp_path / "x.ckpt")]) == 2  # an upstream file says nothing of its model
    assert "name its architecture (the model" in capsys.readouterr().err
    assert main(["--model", "resnetv2", "--input", str(path), "--output", str(tmp_path / "x.ckpt")]) == 2
    assert "resnetv2 needs layers" in capsys.readouterr().err
    assert main(["--model", "bit_s_r50x9", "--input", str(path), "--output", str(tmp_path / "x.ckpt")]) == 2
    assert "unknown model 'bit_s_r50x9'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_output_survives_a_failed_conversion(tmp_path, npz_r50_1000):
    path, _ = npz_r50_1000
    out = tmp_path / "keep.ckpt"
    out.write_bytes(b"precious")
    assert main(["--model", "bit_s_r101x1", "--input", str(path), "--output", str(out)]) == 2
    assert out.read_bytes() == b"precious"


# ----------------------------------------------------------------------------------------------
# A fine-tuned 6-class checkpoint, as train.py writes it (parameters + meta.json), to every format.


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """(checkpoint path, original model, parameters) of a tiny 6-class ResNetV2 with non-trivial weights."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(6)
    model = ResNetV2(TINY, 1, num_classes=6)
    params = {}
    for k, v in model_state(model).items():
        a = rng.standard_normal(v.shape).astype(np.float32)
        params[k] = 1.0 + 0.2 * a if k.endswith("gamma") else (0.2 * a if v.ndim < 4 else a)
    load_state(model, params)
    model.set_train(False)
    meta = {
        "model": "resnetv2",
        "layers": list(TINY),
        "width_factor": 1,
        "num_classes": 6,
        "in_channels": 3,
        "class_names": ["a", "b", "c", "d", "e", "f"],
        "preprocess": {"image_size": SIZE, "eval_size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    path = save_weights(with_meta(params, meta), tmp_path_factory.mktemp("ft") / "best.ckpt")
    return path, model, params


def _inputs(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


def assert_logits_match(got: np.ndarray, ref: np.ndarray) -> None:
    """Max difference at most 1e-4 of the largest logit, and the same top-5."""
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got - ref).max()
    np.testing.assert_array_equal(np.argsort(-got, axis=1)[:, :5], np.argsort(-ref, axis=1)[:, :5])


def _run(out, batch_inputs):
    if out.suffix == ".onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        return [session.run(None, {"image": x})[0] for x in batch_inputs]
    if out.suffix == ".mindir":
        net = ms.nn.GraphCell(ms.load(str(out)))
        return [net(ms.Tensor(x)).asnumpy() for x in batch_inputs]
    model = ResNetV2(TINY, 1, num_classes=6)
    load_checkpoint(model, out)
    model.set_train(False)
    return [model(ms.Tensor(x)).asnumpy() for x in batch_inputs]


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors", ".npz", ".onnx", ".mindir"])
def test_finetuned_checkpoint_converts_to_every_format_with_its_head(tmp_path, finetuned, suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
    path, model, _ = finetuned
    out = tmp_path / f"ft{suffix}"
    assert main(["--input", str(path), "--output", str(out)]) == 0  # no --model, no --num_classes
    xs = [_inputs(1, 0), _inputs(3, 1)]  # two batch sizes: the exported graphs' batch axis is dynamic
    for x, got in zip(xs, _run(out, xs)):
        ref = model(ms.Tensor(x)).asnumpy()
        assert np.abs(ref).max() > 1.0  # a zero head would pass a loose check; the input's head is non-trivial
        assert_logits_match(got, ref)
    if suffix in (".ckpt", ".safetensors"):
        meta = decode_meta(read_arrays(out)[1])
        assert meta["class_names"] == ["a", "b", "c", "d", "e", "f"] and meta["layers"] == list(TINY)


def test_explicit_geometry_and_hyphen_aliases(tmp_path, finetuned):
    path, _, params = finetuned
    out = tmp_path / "explicit.safetensors"
    argv = ["--model", "resnetv2", "--layers", "1,1,1,1", "--width-factor", "1", "--input", str(path), "--output", str(out)]
    assert main(argv) == 0
    arrays = read_arrays(out)[1]
    np.testing.assert_array_equal(arrays["head.fc.weight"], params["head.fc.weight"])


def test_other_num_classes_zeroes_the_head_and_says_so(tmp_path, finetuned, caplog):
    path, _, params = finetuned
    out = tmp_path / "ten.ckpt"
    with caplog.at_level(logging.WARNING, logger="bit_zoo.tools.convert"):
        assert main(["--input", str(path), "--output", str(out), "--num_classes", "10"]) == 0
    assert "has 6 classes; --num_classes 10: the classifier is replaced by a zero head" in caplog.text
    arrays = read_arrays(out)[1]
    assert arrays["head.fc.weight"].shape == (10, 2048) and not arrays["head.fc.weight"].any() and not arrays["head.fc.bias"].any()
    np.testing.assert_array_equal(arrays["norm.gamma"], params["norm.gamma"])
    meta = decode_meta(arrays)
    assert meta["num_classes"] == 10 and meta["class_names"] is None
