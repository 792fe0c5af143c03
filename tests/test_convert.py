"""python -m bit_zoo.convert: .npz / mindcv .ckpt -> .ckpt / .safetensors / .npz, and MINDIR export."""

from __future__ import annotations

import numpy as np
import pytest

import bit_zoo
from bit_zoo.convert import main
from bit_zoo.loading import model_state, read_arrays


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_npz_to_mindspore_formats(tmp_path, npz_r50_1000, suffix, capsys):
    path, params = npz_r50_1000
    out = tmp_path / f"bit_s_r50x1{suffix}"
    assert main(["--model", "bit_s_r50x1", "--input", str(path), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    fmt, arrays = read_arrays(out)
    assert fmt == suffix.lstrip(".") and set(arrays) == set(params)
    for k in params:
        np.testing.assert_array_equal(arrays[k], params[k])
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
    assert main(["--model", "bit_s_r50x1", "--input", str(path), "--output", str(tmp_path / "x.onnx")]) == 2
    assert ".ckpt, .safetensors or .npz" in capsys.readouterr().err
    assert main(["--model", "bit_s_r50x1", "--input", str(tmp_path / "missing.npz"), "--output", str(tmp_path / "x.ckpt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_output_survives_a_failed_conversion(tmp_path, npz_r50_1000):
    path, _ = npz_r50_1000
    out = tmp_path / "keep.ckpt"
    out.write_bytes(b"precious")
    assert main(["--model", "bit_s_r101x1", "--input", str(path), "--output", str(out)]) == 2
    assert out.read_bytes() == b"precious"


def test_mindir_export(tmp_path, npz_r50_1000):
    import mindspore as ms

    path, _ = npz_r50_1000
    out = tmp_path / "r50.mindir"
    assert main(["--model", "bit_s_r50x1", "--input", str(path), "--output", str(out), "--img-size", "64", "--num-classes", "10"]) == 0
    assert out.is_file() and out.stat().st_size > 90e6  # the weights travel with the graph
    graph = ms.load(str(out))
    net = ms.nn.GraphCell(graph)
    y = net(ms.Tensor(np.zeros((1, 3, 64, 64), np.float32)))
    assert y.shape == (1, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
