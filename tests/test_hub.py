"""timm's safetensors layout and the Hugging Face hub as a weights source, over a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

import bit_zoo
from bit_zoo.weights.hub import hub_weights, source_order
from bit_zoo.weights.loading import detect_layout, model_state, read_arrays
from bit_zoo.weights.pretrained import cache_dir

HUB_PATH = "/timm/resnetv2_50x1_bit.goog_in21k_ft_in1k/resolve/main/model.safetensors"  # the hub's URL layout


@pytest.fixture(scope="module")
def timm_safetensors(npz_r50_1000, tmp_path_factory):
    """The upstream-layout .npz loaded by timm itself (its own _load_weights) and saved as timm saves its hub files."""
    from bit_zoo.utils._timm import import_timm

    try:
        timm = import_timm()
    except ImportError:
        pytest.skip("timm (the reference that writes the hub's layout) is not installed: pip install 'bit_zoo[parity]'")
    import torch
    from safetensors.torch import save_file
    from timm.models.resnetv2 import _load_weights

    npz, _ = npz_r50_1000
    model = timm.create_model("resnetv2_50x1_bit", num_classes=1000)
    with torch.no_grad():
        _load_weights(model, str(npz))
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def no_google(monkeypatch, weights_server):
    """Google's bucket answers 404 (its mirror variable points at an empty path); the hub is the local server."""
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/unreachable/")
    monkeypatch.setenv("HF_ENDPOINT", weights_server.base_url)
    monkeypatch.delenv("BIT_ZOO_WEIGHTS_SOURCE", raising=False)
    return weights_server


def _logits(model) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    model.set_train(False)
    return model(ms.Tensor(x)).asnumpy()


@pytest.mark.parity
def test_timm_state_dict_loads_to_the_npz_logits(npz_r50_1000, timm_safetensors):
    npz, params = npz_r50_1000
    fmt, arrays = read_arrays(timm_safetensors)
    assert detect_layout(fmt, arrays) == "timm" and "stages.0.blocks.0.downsample.conv.weight" in arrays
    assert arrays["head.fc.weight"].shape == (1000, 2048, 1, 1)
    from_timm = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(timm_safetensors))
    from_npz = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(npz))
    state = model_state(from_timm)
    for k, v in params.items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    np.testing.assert_array_equal(_logits(from_timm), _logits(from_npz))


@pytest.mark.parity
def test_pretrained_comes_from_the_hub_when_google_is_unreachable(no_google, npz_r50_1000, timm_safetensors):
    server = no_google
    server.routes[HUB_PATH] = ("ok", timm_safetensors.read_bytes())
    npz, params = npz_r50_1000
    model = bit_zoo.create_model("bit_m_r50x1.in21k_ft_in1k", pretrained=True)
    assert "/unreachable/BiT-M-R50x1-ILSVRC2012.npz" in server.hits and HUB_PATH in server.hits  # Google first, then the hub
    np.testing.assert_array_equal(_logits(model), _logits(bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(npz))))
    cached = sorted(str(p.relative_to(cache_dir())) for p in cache_dir().rglob("*") if p.is_file())
    assert cached == [HUB_PATH.lstrip("/")]  # its own place in the cache, no partial file left
    hits = len(server.hits)
    bit_zoo.create_model("bit_m_r50x1.in21k_ft_in1k", pretrained=True)
    assert len(server.hits) == hits  # the cached hub file is used without asking Google again


@pytest.mark.parity
def test_source_variable_orders_and_restricts(monkeypatch, no_google, timm_safetensors):
    server = no_google
    server.routes[HUB_PATH] = ("ok", timm_safetensors.read_bytes())
    monkeypatch.setenv("BIT_ZOO_WEIGHTS_SOURCE", "hub")
    assert source_order() == ("hub",)
    server.hits.clear()
    bit_zoo.create_model("bit_m_r50x1.in21k_ft_in1k", pretrained=True)
    assert server.hits == [HUB_PATH]  # Google never asked
    monkeypatch.setenv("BIT_ZOO_WEIGHTS_SOURCE", "google")
    with pytest.raises(RuntimeError, match=r"HTTP 404.*/unreachable/BiT-M-R50x1-ILSVRC2012\.npz(.|\n)*BIT_ZOO_BASE_URL"):
        bit_zoo.create_model("bit_m_r50x1.in21k_ft_in1k", pretrained=True)
    monkeypatch.setenv("BIT_ZOO_WEIGHTS_SOURCE", "hub,google")
    assert source_order() == ("hub", "google")
    monkeypatch.setenv("BIT_ZOO_WEIGHTS_SOURCE", "gogle")
    with pytest.raises(ValueError, match="use auto, google, hub"):
        bit_zoo.create_model("bit_m_r50x1.in21k_ft_in1k", pretrained=True)


@pytest.mark.parity
def test_every_source_failing_names_each(no_google, timm_safetensors):
    server = no_google
    server.routes[HUB_PATH] = ("truncate", timm_safetensors.read_bytes())
    with pytest.raises(RuntimeError) as err:
        bit_zoo.create_model("bit_m_r50x1.in21k_ft_in1k", pretrained=True)
    msg = str(err.value)
    assert "[google] download failed: HTTP 404" in msg and "[hub] download truncated" in msg and "HF_ENDPOINT" in msg
    # nothing under a final name: only the truncated download's partial file, kept to resume from
    assert not cache_dir().exists() or all(".part" in p.name for p in cache_dir().rglob("*") if p.is_file())


def test_a_wrong_hub_file_fails_the_structure_check(monkeypatch, no_google, tmp_path, make_upstream_npz):
    from safetensors.numpy import save_file

    from bit_zoo.weights.formats import to_timm

    params = make_upstream_npz(tmp_path / "r101.npz", "bit_s_r101x1", 1000)
    save_file(to_timm(params, (3, 4, 23, 3)), str(tmp_path / "r101.safetensors"))
    no_google.routes[HUB_PATH] = ("ok", (tmp_path / "r101.safetensors").read_bytes())
    monkeypatch.setenv("BIT_ZOO_WEIGHTS_SOURCE", "hub")
    with pytest.raises(ValueError, match=r"not what .*model\.safetensors should be.*unexpected keys \[.stages\.2\.blocks\."):
        bit_zoo.create_model("bit_m_r50x1.in21k_ft_in1k", pretrained=True)
    assert not any(p.is_file() for p in cache_dir().rglob("*"))


def test_hub_records(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example/")
    r = hub_weights(bit_zoo.get_weights("bit_m_r152x2.in21k"))
    assert r.url == "https://hf-mirror.example/timm/resnetv2_152x2_bit.goog_in21k/resolve/main/model.safetensors"
    assert r.sha256 is None and r.num_classes == 21843
    published = [n for n in bit_zoo.list_models(pretrained=True) if bit_zoo.get_weights(n).hf_hub_id]
    assert len(published) == 15  # every BiT-M in21k / in21k_ft_in1k file, the distilled R50x1, both R152x2 teachers
    monkeypatch.setenv("BIT_ZOO_WEIGHTS_SOURCE", "hub")
    with pytest.raises(ValueError, match="not on the hub"):
        bit_zoo.create_model("bit_s_r50x1.mindcv_in1k", pretrained=True)
