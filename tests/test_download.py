"""pretrained=True over a real HTTP server on 127.0.0.1: success, mirror, hash mismatch, truncation, 404."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import bit_zoo
from bit_zoo.loading import model_state
from bit_zoo.pretrained import cache_dir, download_weights, resolve_url, sha256_file


def cache_files():
    root = cache_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def served_r50(weights_server, npz_r50_1000):
    path, params = npz_r50_1000
    weights_server.routes["/mirror/BiT-S-R50x1.npz"] = ("ok", path.read_bytes())
    return params


def test_pretrained_downloads_from_mirror_verifies_and_loads(monkeypatch, weights_server, served_r50):
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/mirror/")
    assert resolve_url(bit_zoo.get_weights("bit_s_r50x1")) == weights_server.base_url + "/mirror/BiT-S-R50x1.npz"
    model = bit_zoo.create_model("bit_s_r50x1", pretrained=True, num_classes=10)
    state = model_state(model)
    np.testing.assert_array_equal(state["stem.conv.weight"], served_r50["stem.conv.weight"])
    assert not state["head.fc.weight"].any()
    assert cache_files() == ["BiT-S-R50x1.npz"]
    # the second call is served from the cache: no new request
    hits = len(weights_server.hits)
    bit_zoo.create_model("bit_s_r50x1", pretrained=True)
    assert len(weights_server.hits) == hits


def test_cache_location_follows_bit_zoo_home(monkeypatch, tmp_path, weights_server, served_r50):
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/mirror")
    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "elsewhere"))
    bit_zoo.create_model("bit_s_r50x1", pretrained=True)
    assert (tmp_path / "elsewhere" / "weights" / "BiT-S-R50x1.npz").is_file()


def test_404_names_the_url_and_the_mirror_setting(monkeypatch, weights_server):
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/empty/")
    with pytest.raises(RuntimeError, match=r"HTTP 404.*/empty/BiT-M-R50x1\.npz(.|\n)*BIT_ZOO_BASE_URL"):
        bit_zoo.create_model("bit_m_r50x1", pretrained=True)
    assert cache_files() == []


def test_truncated_download_leaves_nothing(monkeypatch, weights_server, npz_r50_1000):
    path, _ = npz_r50_1000
    weights_server.routes["/trunc/BiT-S-R50x1.npz"] = ("truncate", path.read_bytes())
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/trunc/")
    with pytest.raises(RuntimeError, match="truncated"):
        bit_zoo.create_model("bit_s_r50x1", pretrained=True)
    assert cache_files() == []


def test_wrong_file_at_the_url_fails_the_structure_check(monkeypatch, weights_server, npz_r50_1000):
    path, _ = npz_r50_1000  # an R50 file where the R101 file should be
    weights_server.routes["/wrong/BiT-S-R101x1.npz"] = ("ok", path.read_bytes())
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/wrong/")
    with pytest.raises(ValueError, match=r"downloaded from http://127\.0\.0\.1:\d+/wrong/BiT-S-R101x1\.npz.*missing keys"):
        bit_zoo.create_model("bit_s_r101x1", pretrained=True)
    assert cache_files() == []


def test_mindcv_hash_prefix_checked(monkeypatch, tmp_path, weights_server, make_mindcv_ckpt):
    src = tmp_path / "src.ckpt"
    make_mindcv_ckpt(src, "bit_s_r50x1")
    weights = bit_zoo.get_weights("bit_s_r50x1.mindcv_in1k")
    weights_server.routes[f"/ms/{weights.filename}"] = ("ok", src.read_bytes())
    monkeypatch.setenv("BIT_ZOO_MINDCV_BASE_URL", weights_server.base_url + "/ms/")
    # the real file's prefix is 1e4795a4; ours hashes differently, so this is a mismatch
    with pytest.raises(RuntimeError, match=r"sha256 mismatch.*expected 1e4795a4"):
        bit_zoo.create_model("bit_s_r50x1.mindcv_in1k", pretrained=True)
    assert cache_files() == []
    matching = dataclasses.replace(weights, sha256_prefix=sha256_file(src)[:8])
    got = download_weights(matching)
    assert got.read_bytes() == src.read_bytes()
    assert cache_files() == [weights.filename]


def test_corrupt_cached_file_is_reported_not_silently_used(monkeypatch, weights_server):
    target = cache_dir() / "BiT-M-R50x1.npz"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")  # what mindcv 0.3 leaves after a failed download
    with pytest.raises(ValueError, match="empty"):
        bit_zoo.create_model("bit_m_r50x1", pretrained=True)
