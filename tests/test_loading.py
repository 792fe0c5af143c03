"""Loading local files of every format: upstream .npz, mindcv .ckpt, bit_zoo .ckpt / .safetensors."""

from __future__ import annotations

import numpy as np
import pytest

import bit_zoo
from bit_zoo.weights.loading import adapt_input_conv, detect_format, model_state, save_weights


def assert_params_equal(model, params, skip_head=False):
    state = model_state(model)
    for k, v in params.items():
        if skip_head and k.startswith("head."):
            continue
        np.testing.assert_array_equal(state[k], v, err_msg=k)


def test_npz_loads_exactly(npz_r50_1000):
    path, params = npz_r50_1000
    assert detect_format(path) == "npz"
    model = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(path))
    assert_params_equal(model, params)


def test_other_num_classes_leaves_only_the_head_out_and_zero(npz_r50_1000):
    path, params = npz_r50_1000
    model = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(path), num_classes=10)
    assert_params_equal(model, params, skip_head=True)
    state = model_state(model)
    assert state["head.fc.weight"].shape == (10, 2048)
    assert not state["head.fc.weight"].any() and not state["head.fc.bias"].any()


def test_in_channels_adapts_the_stem(npz_r50_1000):
    path, params = npz_r50_1000
    grey = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(path), in_channels=1)
    np.testing.assert_allclose(model_state(grey)["stem.conv.weight"], params["stem.conv.weight"].sum(1, keepdims=True), rtol=1e-6)
    five = adapt_input_conv(params["stem.conv.weight"], 5)
    assert five.shape[1] == 5
    np.testing.assert_allclose(five[:, 3], params["stem.conv.weight"][:, 0] * 3 / 5, rtol=1e-6)


def test_wrong_architecture_is_an_error_naming_keys(npz_r50_1000):
    path, _ = npz_r50_1000
    with pytest.raises(ValueError, match=r"missing keys \['resnet/block3/unit07"):
        bit_zoo.create_model("bit_s_r101x1", checkpoint_path=str(path))
    with pytest.raises(ValueError, match=r"shape mismatch.*norm\.gamma: file \(2048,\) vs model \(6144,\)"):
        bit_zoo.create_model("bit_s_r50x3", checkpoint_path=str(path))


def test_npz_with_an_extra_or_missing_array_is_an_error(tmp_path, npz_r50_1000):
    path, _ = npz_r50_1000
    with np.load(path) as z:
        arrays = dict(z)
    np.savez(tmp_path / "extra.npz", **arrays, **{"resnet/block5/unit01/a/group_norm/gamma": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys \['resnet/block5"):
        bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(tmp_path / "extra.npz"))
    del arrays["resnet/group_norm/beta"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(ValueError, match=r"missing keys \['resnet/group_norm/beta'\]"):
        bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(tmp_path / "missing.npz"))


def test_mindcv_checkpoint_loads(tmp_path, make_mindcv_ckpt):
    path = tmp_path / "BiT_resnet50-1e4795a4.ckpt"
    params = make_mindcv_ckpt(path, "bit_s_r50x1")
    model = bit_zoo.create_model("bit_s_r50x1.mindcv_in1k", checkpoint_path=str(path))
    assert_params_equal(model, params)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_bit_zoo_formats_round_trip(tmp_path, npz_r50_1000, suffix):
    _, params = npz_r50_1000
    out = save_weights(params, tmp_path / f"r50{suffix}")
    assert detect_format(out) == suffix.lstrip(".")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind
    model = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(out))
    assert_params_equal(model, params)


def test_training_checkpoint_ema_selection(tmp_path, npz_r50_1000):
    _, params = npz_r50_1000
    entries = dict(params)
    entries.update({f"ema.{k}": v + 1 for k, v in params.items()})
    entries["state.step"] = np.array([3], np.float32)
    entries["optim.moments.norm.gamma"] = np.zeros(2048, np.float32)
    path = save_weights(entries, tmp_path / "train.ckpt")
    raw = bit_zoo.create_model("bit_s_r50x1")
    bit_zoo.load_checkpoint(raw, path)
    assert_params_equal(raw, params)
    ema = bit_zoo.create_model("bit_s_r50x1")
    bit_zoo.load_checkpoint(ema, path, ema=True)
    np.testing.assert_array_equal(model_state(ema)["norm.gamma"], params["norm.gamma"] + 1)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.ckpt"):
        bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(path))


def test_missing_file_and_both_sources_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(tmp_path / "nope.npz"))
    with pytest.raises(ValueError, match="either pretrained=True or checkpoint_path"):
        bit_zoo.create_model("bit_s_r50x1", pretrained=True, checkpoint_path="x.npz")


def test_checkpoint_size_check_counts_reclaimable_cache(monkeypatch):
    """MindSpore 2.10 compares a .ckpt's size with MemFree; bit_zoo points it at MemAvailable.

    A fixed /proc/meminfo is served to the check, so nothing moves while the test runs.
    """
    import io

    from mindspore.train import serialization

    import bit_zoo._ms_compat as compat

    if "checkpoint_size_check" not in compat.APPLIED:
        pytest.skip("this MindSpore has no checkpoint size check (new in 2.10)")
    meminfo = "MemTotal:       24000000 kB\nMemFree:          100000 kB\nMemAvailable:   20000000 kB\n"

    def fake_open(path, *args, **kwargs):
        assert path == "/proc/meminfo"
        return io.StringIO(meminfo)

    monkeypatch.setattr(compat, "open", fake_open, raising=False)
    assert serialization._get_available_memory is compat._mem_available
    assert serialization._get_available_memory() == 20000000 * 1024  # MemAvailable, not MemFree (100000 kB)


# ----------------------------------------------------------------------------------------------
# The lazy readers (readers.py) against the libraries' own parsers


def _pb(number: int, payload: bytes) -> bytes:
    from benchmarks.load_bench import _field

    return _field(number, payload)


def test_ckpt_reader_agrees_with_mindspore(tmp_path):
    """Names, dtypes, shapes and values of a MindSpore-written .ckpt, read in place, equal load_checkpoint's."""
    import mindspore as ms

    from bit_zoo.weights.meta import META_KEY, encode_meta
    from bit_zoo.weights.readers import open_reader

    rng = np.random.default_rng(0)
    entries = {
        "w": rng.standard_normal((5, 3, 3, 3)).astype(np.float32),
        "half": rng.standard_normal((4,)).astype(np.float16),
        "state.step": np.asarray(7, np.int64),
        META_KEY: encode_meta({"model": "resnetv2", "layers": [1, 1, 1, 1]}),
    }
    path = tmp_path / "x.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in entries.items()], str(path))
    theirs = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}
    with open_reader(path, "ckpt") as reader:
        assert list(reader) == list(theirs)
        for k in theirs:
            got = reader[k]
            assert got.dtype == theirs[k].dtype and got.shape == theirs[k].shape == reader.shape(k), k
            np.testing.assert_array_equal(got, theirs[k])


def test_ckpt_reader_joins_the_slices_of_a_big_tensor(tmp_path):
    """MindSpore writes a tensor over 512 MB as consecutive entries with one name; both parsers join them."""
    import mindspore as ms

    from benchmarks.load_bench import _varint
    from bit_zoo.weights.readers import open_reader

    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    dims = b"".join(_varint(1 << 3) + _varint(d) for d in a.shape)
    parts = [a[:4], a[4:]]
    data = b"".join(_pb(1, _pb(1, b"big") + _pb(2, dims + _pb(2, b"Float32") + _pb(3, p.tobytes()))) for p in parts)
    path = tmp_path / "sliced.ckpt"
    path.write_bytes(data)
    np.testing.assert_array_equal(ms.load_checkpoint(str(path))["big"].asnumpy(), a)
    with open_reader(path, "ckpt") as reader:
        assert len(reader) == 1 and reader.shape("big") == (6, 4)
        np.testing.assert_array_equal(reader["big"], a)


def test_truncated_ckpt_is_a_clear_error(tmp_path, npz_r50_1000):
    _, params = npz_r50_1000
    good = save_weights(params, tmp_path / "good.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="bad.ckpt"):
        bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(bad))


@pytest.mark.parametrize("suffix", [".ckpt", ".npz"])
def test_timm_layout_is_read_from_any_container(tmp_path, npz_r50_1000, suffix):
    """timm's names are recognised by their keys, whatever the file type (a .ckpt written by a converter, an .npz)."""
    import mindspore as ms

    from bit_zoo.weights.formats import to_timm

    _, params = npz_r50_1000
    arrays = to_timm(params, (3, 4, 6, 3))
    path = tmp_path / f"timm{suffix}"
    if suffix == ".npz":
        np.savez(path, **arrays)
    else:
        ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()], str(path))
    assert_params_equal(bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(path)), params)


def test_loading_hands_each_array_to_its_parameter_without_a_copy(npz_r50_1000, monkeypatch):
    """Lean loading: the array converted from the file becomes the parameter's memory (no second full copy)."""
    import mindspore as ms

    seen = {}
    real = ms.Tensor.from_numpy

    def spy(a):
        seen[a.shape] = a.ctypes.data
        return real(a)

    monkeypatch.setattr(ms.Tensor, "from_numpy", staticmethod(spy))
    path, params = npz_r50_1000
    model = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(path))
    head = next(p for p in model.get_parameters() if p.name == "head.fc.weight")
    assert head.asnumpy().ctypes.data == seen[(1000, 2048)]
    assert_params_equal(model, params)


def test_truncated_safetensors_is_a_clear_error(tmp_path, npz_r50_1000):
    """The structure check reads names and shapes only; the reader still notices missing bytes."""
    _, params = npz_r50_1000
    good = save_weights(params, tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"bad\.safetensors.*truncated"):
        bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(bad))


def _root(a: np.ndarray):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


def test_safetensors_arrays_view_a_private_map_of_the_file(tmp_path, monkeypatch):
    """No copy: an array read from a .safetensors is a view of a copy-on-write map of the file;
    it stays valid after the reader is closed, is writable, and writing never reaches the file."""
    import gc
    import mmap

    from bit_zoo.weights.loading import open_arrays
    from bit_zoo.weights.readers import MMAP_ENV

    params = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((5,), np.float32)}
    path = save_weights(params, tmp_path / "w.safetensors")
    before = path.read_bytes()
    _, reader = open_arrays(path)
    with reader:
        a = reader["a"]
    del reader
    gc.collect()
    assert isinstance(_root(a), mmap.mmap)
    np.testing.assert_array_equal(a, params["a"])
    a[0, 0] = 99.0  # an optimizer updates parameters in place
    assert a[0, 0] == 99.0 and path.read_bytes() == before

    monkeypatch.setenv(MMAP_ENV, "0")  # the opt-out reads into private memory
    _, reader = open_arrays(path)
    with reader:
        c = reader["a"]
    assert not isinstance(_root(c), mmap.mmap)
    np.testing.assert_array_equal(c, params["a"])
