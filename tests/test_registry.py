"""The registry, the weights metadata and the parameter counts, for every registered name."""

from __future__ import annotations

import mindcv
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

import bit_zoo
from bit_zoo.weights.formats import npz_key_map

# The six architectures released with BiT (arXiv 1912.11370, table of units per stage): the test's own
# statement of the geometry, independent of the zoo's records.
GEOMETRY = {
    "r50x1": ((3, 4, 6, 3), 1),
    "r50x3": ((3, 4, 6, 3), 3),
    "r101x1": ((3, 4, 23, 3), 1),
    "r101x3": ((3, 4, 23, 3), 3),
    "r152x2": ((3, 8, 36, 3), 2),
    "r152x4": ((3, 8, 36, 3), 4),
}
ARCH_NAMES = [f"bit_{kind}_{arch}" for kind in ("s", "m") for arch in GEOMETRY]


def count_params(model) -> int:
    return sum(int(np.prod(p.shape)) for p in model.get_parameters())


def upstream_npz_shapes(layers, wf: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every array of an upstream BiT .npz (TF names, HWIO kernels), from the architecture rules alone:
    root 7x7 conv to 64W; unit a/b/c = GN + 1x1 / 3x3 / 1x1 conv with bottleneck width out/4, a 1x1
    projection in unit 1 of each stage; stage outputs 256W * 2^s; final GN; 1x1 conv head with bias."""
    shapes = {"resnet/root_block/standardized_conv2d/kernel": (7, 7, 3, 64 * wf)}
    prev = 64 * wf
    for s, depth in enumerate(layers):
        out = 256 * wf * 2**s
        mid = out // 4
        for u in range(depth):
            unit = f"resnet/block{s + 1}/unit{u + 1:02d}/"
            cin = prev if u == 0 else out
            for part, c, k, cout in (("a", cin, 1, mid), ("b", mid, 3, mid), ("c", mid, 1, out)):
                shapes[f"{unit}{part}/group_norm/gamma"] = (c,)
                shapes[f"{unit}{part}/group_norm/beta"] = (c,)
                shapes[f"{unit}{part}/standardized_conv2d/kernel"] = (k, k, c, cout)
            if u == 0:
                shapes[f"{unit}a/proj/standardized_conv2d/kernel"] = (1, 1, cin, out)
        prev = out
    shapes["resnet/group_norm/gamma"] = shapes["resnet/group_norm/beta"] = (prev,)
    shapes["resnet/head/conv2d/kernel"] = (1, 1, prev, num_classes)
    shapes["resnet/head/conv2d/bias"] = (num_classes,)
    return shapes


def layout_count(arch: str, num_classes: int) -> int:
    layers, wf = GEOMETRY[arch]
    return sum(int(np.prod(s)) for s in upstream_npz_shapes(layers, wf, num_classes).values())


def test_layout_count_reproduces_published_counts():
    """Two counts from an independent implementation: sum(p.numel()) of timm 1.0.31's
    resnetv2_50x1_bit with 1000 and 21843 classes."""
    assert layout_count("r50x1", 1000) == 25_549_352
    assert layout_count("r50x1", 21843) == 68_256_659


@pytest.mark.parametrize("arch", GEOMETRY)
def test_npz_key_map_names_every_upstream_array(arch):
    layers, wf = GEOMETRY[arch]
    assert set(npz_key_map(layers)) == set(upstream_npz_shapes(layers, wf, 1000))


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
    assert w.num_params == layout_count(arch, w.num_classes)
    with no_init_parameters():
        model = bit_zoo.create_model(name)
    assert model.num_classes == w.num_classes
    assert count_params(model) == w.num_params
    assert model.weights is w


@pytest.mark.parametrize("name", ARCH_NAMES)
@pytest.mark.parametrize("num_classes", [1000, 21843, 10, 100])
def test_parameter_counts_match_the_upstream_layout(name, num_classes):
    with no_init_parameters():
        model = bit_zoo.create_model(name, num_classes=num_classes)
    assert count_params(model) == layout_count(name.split("_")[-1], num_classes)


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
    assert count_params(model) == layout_count("r101x3", 10)
    # the keyword arguments mindcv's own train.py passes
    with no_init_parameters():
        model = mindcv.create_model("bit_s_r50x1", num_classes=10, pretrained=False, drop_rate=0.1, drop_path_rate=0.0, checkpoint_path="")
    assert model.head.drop_rate == 0.1
    with pytest.raises(ValueError, match="drop_path_rate"):
        mindcv.create_model("bit_s_r50x1", drop_path_rate=0.1)
