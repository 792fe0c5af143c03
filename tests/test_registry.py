"""The registry, the weights metadata and the parameter counts, for every registered name."""

from __future__ import annotations

import mindcv
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

import bit_zoo
from bit_zoo.resnetv2 import ARCHS, NUM_PARAMS

ARCH_NAMES = [f"bit_{kind}_{arch}" for kind in ("s", "m") for arch in ARCHS]


def count_params(model) -> int:
    return sum(int(np.prod(p.shape)) for p in model.get_parameters())


def test_every_architecture_is_registered():
    assert sorted(bit_zoo.list_models()) == sorted(ARCH_NAMES)
    assert bit_zoo.list_models()[:3] == ["bit_m_r50x1", "bit_m_r50x3", "bit_m_r101x1"]
    assert sorted(bit_zoo.list_models("bit_m_*")) == sorted(n for n in ARCH_NAMES if n.startswith("bit_m_"))


def test_every_upstream_file_is_reachable_by_name():
    urls = {bit_zoo.get_weights(n).url for n in bit_zoo.list_pretrained()}
    google = "https://storage.googleapis.com/bit_models/"
    expected = set()
    for arch in ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4"):
        expected |= {f"{google}BiT-S-{arch}.npz", f"{google}BiT-M-{arch}.npz", f"{google}BiT-M-{arch}-ILSVRC2012.npz"}
    expected |= {f"{google}BiT-M-R50x1-CIFAR10.npz", f"{google}distill/R50x1_224.npz"}
    expected |= {f"{google}distill/R152x2_T_224.npz", f"{google}distill/R152x2_T_384.npz"}
    mindcv_base = "https://download.mindspore.cn/toolkits/mindcv/bit/"
    expected |= {mindcv_base + f for f in ("BiT_resnet50-1e4795a4.ckpt", "BiT_resnet50x3-a960f91f.ckpt", "BiT_resnet101-2efa9106.ckpt")}
    assert urls == expected
    assert len(bit_zoo.list_models(pretrained=True)) == len(expected) == 25


def test_default_weights_and_tags():
    assert bit_zoo.get_weights("bit_s_r50x1").filename == "BiT-S-R50x1.npz"
    assert bit_zoo.get_weights("bit_m_r101x3").num_classes == 21843
    assert bit_zoo.list_tags("bit_m_r50x1")[0] == "in21k"
    assert "in21k_ft_cifar10" in bit_zoo.list_tags("bit_m_r50x1")
    w = bit_zoo.get_weights("bit_m_r152x4.in21k_ft_in1k")
    assert (w.input_size, w.num_classes, w.filename) == (480, 1000, "BiT-M-R152x4-ILSVRC2012.npz")
    assert bit_zoo.get_weights("bit_m_r101x3.in21k_ft_in1k").input_size == 448
    assert bit_zoo.get_weights("bit_m_r50x1.in21k_ft_cifar10").input_size == 128


@pytest.mark.parametrize("name", bit_zoo.list_pretrained())
def test_weights_record_is_complete_and_consistent(name):
    w = bit_zoo.get_weights(name)
    assert w.url.startswith("https://")
    assert w.num_classes in (10, 1000, 21843)
    assert w.input_size in (128, 224, 384, 448, 480)
    assert w.interpolation == "bilinear"
    if w.file_format == "npz":
        assert w.mean == w.std == (0.5, 0.5, 0.5)  # BiT inputs are in [-1, 1]
        assert w.crop_pct == 1.0  # BiT resizes straight to the crop size
    else:  # mindcv's names carry the first 8 hex digits of the file's sha256
        assert w.sha256_prefix and w.filename.endswith(f"-{w.sha256_prefix}.ckpt")
    arch = name.split(".")[0].split("_")[-1]
    assert w.num_params == NUM_PARAMS[arch][w.num_classes]
    with no_init_parameters():
        model = bit_zoo.create_model(name)
    assert model.num_classes == w.num_classes
    assert count_params(model) == w.num_params
    assert model.weights is w


@pytest.mark.parametrize("name", ARCH_NAMES)
@pytest.mark.parametrize("num_classes", [1000, 21843, 10, 100])
def test_parameter_counts_match_bit_facts(name, num_classes):
    with no_init_parameters():
        model = bit_zoo.create_model(name, num_classes=num_classes)
    assert count_params(model) == NUM_PARAMS[name.split("_")[-1]][num_classes]


def test_unknown_names_list_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'bit_m_r101x2'.*bit_m_r101x3"):
        bit_zoo.create_model("bit_m_r101x2")
    with pytest.raises(ValueError, match=r"bit_m_r50x1\.in21k_ft_cifar10"):
        bit_zoo.get_weights("bit_m_r50x1.in21k_ft_cifar100")


def test_model_interface():
    model = bit_zoo.create_model("bit_s_r50x1", num_classes=10)
    assert (model.num_features, model.num_classes) == (2048, 10)
    head = model.get_classifier()
    assert not head.weight.asnumpy().any() and not head.bias.asnumpy().any()  # zero head
    import mindspore as ms

    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32))
    feats = model.forward_features(x)
    assert feats.shape == (2, 2048, 2, 2)  # overall stride 32
    assert model.forward_head(feats, pre_logits=True).shape == (2, 2048)
    assert model(x).shape == (2, 10)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 2048)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_mindcv_registry_accepts_bit_zoo_names():
    assert set(ARCH_NAMES) <= set(mindcv.list_models("bit_*"))
    with no_init_parameters():
        model = mindcv.create_model("bit_m_r101x3", num_classes=10)
    assert isinstance(model, bit_zoo.ResNetV2)
    assert count_params(model) == NUM_PARAMS["r101x3"][10]
    # the keyword arguments mindcv's own train.py passes
    with no_init_parameters():
        model = mindcv.create_model("bit_s_r50x1", num_classes=10, pretrained=False, drop_rate=0.1, drop_path_rate=0.0, checkpoint_path="")
    assert model.head.drop_rate == 0.1
    with pytest.raises(ValueError, match="drop_path_rate"):
        mindcv.create_model("bit_s_r50x1", drop_path_rate=0.1)
