"""Every registered model and every input create_model accepts, at a tiny size (in the spirit of timm's tests/test_models.py).

Over list_models(): the structure and parameter count of each architecture (BiT_FACTS' table,
stated here independently of the zoo), and a forward (and backward) at 32 px; the widest run
forward only with -m heavy. Over create_model's inputs: a name, name.tag, each weights file format
(upstream .npz, mindcv .ckpt, timm .safetensors, bit_zoo .ckpt / .safetensors), a train.py
checkpoint with meta.json and a custom resnetv2 geometry: each gives the file's model (its
classifier included), and resolve_data_config its preprocessing.
"""

from __future__ import annotations

import logging

import mindspore as ms
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

import bit_zoo
from bit_zoo.data import Preprocess, resolve_data_config
from bit_zoo.weights.formats import to_npz, to_timm
from bit_zoo.weights.loading import load_state, model_state, save_weights

# BIT_FACTS.md section 1: units per stage and width factor of each architecture, and its exact
# parameter count (head included) for 1000 and 21843 classes.
FACTS = {
    "r50x1": ((3, 4, 6, 3), 1, {1000: 25_549_352, 21843: 68_256_659}),
    "r50x3": ((3, 4, 6, 3), 3, {1000: 217_319_080, 21843: 345_399_315}),
    "r101x1": ((3, 4, 23, 3), 1, {1000: 44_541_480, 21843: 87_248_787}),
    "r101x3": ((3, 4, 23, 3), 3, {1000: 387_934_888, 21843: 516_015_123}),
    "r152x2": ((3, 8, 36, 3), 2, {1000: 236_335_208, 21843: 321_728_979}),
    "r152x4": ((3, 8, 36, 3), 4, {1000: 936_533_224, 21843: 1_107_299_923}),
}
TINY = (1, 1, 1, 1)
SIZE = 32  # stride 32: a 1x1 final map, the smallest input every model takes


def _arch(name: str) -> str:
    return name.split(".")[0].split("_")[-1]


def _count(model) -> int:
    return sum(int(np.prod(p.shape)) for p in model.get_parameters())


def _x(batch: int = 2, seed: int = 0, size: int = SIZE) -> ms.Tensor:
    return ms.Tensor(np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32))


def _random_params(model, seed: int) -> dict[str, np.ndarray]:
    """Non-trivial values for every parameter (GroupNorm affine and classifier too)."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in model.get_parameters():  # shapes only: the model may be built without initialisation
        a = rng.standard_normal(tuple(p.shape)).astype(np.float32)
        out[p.name] = 1.0 + 0.2 * a if p.name.endswith("gamma") else (0.2 * a if len(p.shape) < 4 else a)
    return out


def _logits(model, x=None) -> np.ndarray:
    model.set_train(False)
    return model(_x() if x is None else x).asnumpy()


# ---------------------------------------------------------------------------------------------- the registry


def test_list_models_is_the_bit_zoo():
    names = bit_zoo.list_models()
    assert sorted(names) == sorted(f"bit_{kind}_{arch}" for kind in ("s", "m") for arch in FACTS)
    assert bit_zoo.is_model("resnetv2") and "resnetv2" not in names  # the generic builder: registered, no weights


@pytest.mark.parametrize("name", bit_zoo.list_models())
def test_structure_and_parameter_count(name):
    """Stage depths and widths, stem, feature_info and the exact parameter count of BIT_FACTS, without running it."""
    layers, wf, counts = FACTS[_arch(name)]
    record = bit_zoo.get_weights(name)
    with no_init_parameters():
        model = bit_zoo.create_model(name)
    assert model.weights is record and model.num_classes == record.num_classes
    assert [len(stage.blocks) for stage in model.stages] == list(layers)
    assert model.stem.conv.weight.shape == (64 * wf, 3, 7, 7)
    assert [stage.blocks[0].conv3.weight.shape[0] for stage in model.stages] == [256 * wf, 512 * wf, 1024 * wf, 2048 * wf]
    assert [stage.blocks[0].conv2.weight.shape[0] for stage in model.stages] == [64 * wf, 128 * wf, 256 * wf, 512 * wf]
    assert model.feature_info.channels() == [64 * wf, 256 * wf, 512 * wf, 1024 * wf, 2048 * wf]
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert _count(model) == counts[record.num_classes] == record.num_params


# One R50x1 in the default run (bit_s_r50x1 has the same network with num_classes=7); the others with -m heavy.
FORWARD = [n if n == "bit_m_r50x1" else pytest.param(n, marks=pytest.mark.heavy) for n in bit_zoo.list_models()]


@pytest.mark.parametrize("name", FORWARD)
def test_forward_at_a_tiny_size(name):
    """Every architecture runs: the five feature maps, pre-logits and logits at 32 px, in one eager forward."""
    _, wf, _ = FACTS[_arch(name)]
    model = bit_zoo.create_model(name, num_classes=7, eager_jit=False)
    model.set_train(False)
    final, maps = model.forward_intermediates(_x(batch=1))
    assert [tuple(m.shape[1:]) for m in maps] == [(64 * wf, 16, 16), (256 * wf, 8, 8), (512 * wf, 4, 4), (1024 * wf, 2, 2), (2048 * wf, 1, 1)]
    assert final.shape == (1, 2048 * wf, 1, 1)
    f = final.asnumpy()
    assert np.isfinite(f).all() and f.std() > 0
    assert model.forward_head(final, pre_logits=True).shape == (1, 2048 * wf)
    logits = model.forward_head(final).asnumpy()
    assert logits.shape == (1, 7) and not logits.any()  # BiT's zero head


def test_backward_reaches_every_parameter():
    """One training step's gradients: finite, and non-zero for every parameter (the zero head's inputs flow back through it)."""
    model = bit_zoo.create_model("resnetv2", layers=TINY, num_classes=5, eager_jit=False)
    load_state(model, _random_params(model, 3))
    model.set_train(True)
    loss_fn = ms.nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    labels = ms.Tensor(np.array([1, 3], np.int32))
    grad = ms.value_and_grad(lambda x, y: loss_fn(model(x), y), None, model.trainable_params())
    loss, grads = grad(_x(), labels)
    assert np.isfinite(float(loss))
    for p, g in zip(model.trainable_params(), grads):
        g = g.asnumpy()
        assert np.isfinite(g).all() and np.abs(g).max() > 0, p.name


# ---------------------------------------------------------------------------------------------- create_model's inputs


@pytest.fixture(scope="module")
def six_class_r50(tmp_path_factory):
    """(upstream .npz path, the file's model): an R50x1 with a trained-looking 6-class classifier."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    with no_init_parameters():
        skeleton = bit_zoo.ResNetV2((3, 4, 6, 3), 1, num_classes=6)
    params = _random_params(skeleton, 6)
    path = tmp_path_factory.mktemp("six") / "six_classes.npz"
    np.savez(path, **to_npz(params, (3, 4, 6, 3)))
    with no_init_parameters():
        reference = bit_zoo.ResNetV2((3, 4, 6, 3), 1, num_classes=6, eager_jit=False)
    load_state(reference, params)
    return path, reference


def test_a_named_file_keeps_its_classifier(six_class_r50):
    """create_model("bit_s_r50x1", checkpoint_path=<6-class file>) used to give a zero 1000-class head, every logit 0."""
    path, reference = six_class_r50
    model = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(path), eager_jit=False)
    x = _x(batch=1)
    logits = _logits(model, x)
    assert logits.shape == (1, 6) and np.abs(logits).max() > 1.0
    np.testing.assert_array_equal(logits, _logits(reference, x))  # the same code on the same parameters
    assert model.origin.source == str(path) and model.weights is bit_zoo.get_weights("bit_s_r50x1")


def test_another_class_count_is_a_zero_head_and_a_warning(six_class_r50, caplog):
    path, _ = six_class_r50
    with caplog.at_level(logging.WARNING, logger="bit_zoo.models.factory"):
        model = bit_zoo.create_model("bit_s_r50x1", checkpoint_path=str(path), num_classes=10, eager_jit=False)
    assert "has a 6-class classifier; num_classes=10 replaces it with a zero head" in caplog.text
    head = model.get_classifier()
    assert head.weight.shape == (10, 2048) and not head.weight.asnumpy().any() and not head.bias.asnumpy().any()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, the reference model, its parameters, meta.json of a train.py checkpoint): a 6-class resnetv2 (1, 1, 1, 1) x 1."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    reference = bit_zoo.ResNetV2(TINY, 1, num_classes=6, eager_jit=False)
    params = _random_params(reference, 7)
    load_state(reference, params)
    meta = {
        "model": "resnetv2", "layers": list(TINY), "width_factor": 1, "num_classes": 6, "in_channels": 3,
        "class_names": list("abcdef"),
        "preprocess": {"image_size": 48, "eval_size": 40, "mean": [0.4] * 3, "std": [0.3] * 3, "interpolation": "bicubic", "crop_pct": 0.8},
    }  # fmt: skip
    return tmp_path_factory.mktemp("tiny"), reference, params, meta


def _write(kind: str, folder, params, meta):
    """A file of `kind` holding params: the formats create_model reads, each as its producer writes it."""
    if kind == "npz":  # Google's release layout (TF names, HWIO)
        path = folder / "upstream.npz"
        np.savez(path, **to_npz(params, TINY))
    elif kind == "mindcv":  # mindcv's names, classifier as a 1x1 conv, with optimizer state
        from bit_zoo.weights.formats import mindcv_name, npz_key_map

        ours = {v: k for k, v in npz_key_map(TINY).items()}  # every parameter name of the geometry
        inverse = {}
        for s, depth in enumerate(TINY):
            for u in range(depth):
                for i in (1, 2, 3):
                    inverse[f"stages.{s}.blocks.{u}.norm{i}.gamma"] = f"layer{s + 1}.{u}.gn{i}.gamma"
                    inverse[f"stages.{s}.blocks.{u}.norm{i}.beta"] = f"layer{s + 1}.{u}.gn{i}.beta"
                    inverse[f"stages.{s}.blocks.{u}.conv{i}.weight"] = f"layer{s + 1}.{u}.conv{i}.weight"
                inverse[f"stages.{s}.blocks.0.downsample.weight"] = f"layer{s + 1}.0.down_sample.0.weight"
        inverse.update({"stem.conv.weight": "conv1.weight", "norm.gamma": "gn.gamma", "norm.beta": "gn.beta",
                        "head.fc.weight": "classifier.weight", "head.fc.bias": "classifier.bias"})  # fmt: skip
        assert set(inverse) == set(ours) and all(mindcv_name(v) == k for k, v in inverse.items())
        entries = [{"name": inverse[k], "data": ms.Tensor(v.reshape(*v.shape, 1, 1) if k == "head.fc.weight" else v)} for k, v in params.items()]
        entries.append({"name": "global_step", "data": ms.Tensor(np.array([10], np.int32))})
        path = folder / "mindcv.ckpt"
        ms.save_checkpoint(entries, str(path))
    elif kind == "timm":  # the Hugging Face hub's model.safetensors layout
        from safetensors.numpy import save_file

        path = folder / "model.safetensors"
        save_file(to_timm(params, TINY), str(path))
    elif kind in ("ckpt", "safetensors"):  # bit_zoo's own names, no meta.json (e.g. save_weights of a state)
        path = save_weights(params, folder / f"plain.{kind}")
    else:  # "train": as train.py writes its checkpoints (meta.json and its digest, EMA weights beside the raw ones)
        from bit_zoo.weights.meta import with_meta

        arrays = {**{f"ema.{k}": v for k, v in params.items()}, **{k: v + 1.0 for k, v in params.items()}}
        arrays["state.step"] = np.array([3], np.float32)
        path = save_weights(with_meta(arrays, meta), folder / "best.ckpt")
    return path


@pytest.mark.parametrize("kind", ["npz", "mindcv", "timm", "ckpt", "safetensors"])
def test_every_file_format_gives_the_files_model(tiny, kind):
    folder, reference, params, meta = tiny
    path = _write(kind, folder, params, meta)
    model = bit_zoo.create_model("resnetv2", layers=TINY, checkpoint_path=str(path), eager_jit=False)
    assert (model.num_classes, model.layers, model.weights, model.origin.meta) == (6, TINY, None, None)
    np.testing.assert_array_equal(_logits(model), _logits(reference))
    with pytest.raises(ValueError, match="no eval resolution known"):  # no record, no meta.json: the caller must say
        resolve_data_config(model)
    assert resolve_data_config(model, image_size=24) == Preprocess(24)


def test_a_train_checkpoint_names_its_model(tiny):
    """No name: meta.json gives the geometry, classes, class names and preprocessing; its EMA weights are the default."""
    folder, reference, params, meta = tiny
    path = _write("train", folder, params, meta)
    model = bit_zoo.create_model(checkpoint_path=path, eager_jit=False)
    assert (model.origin.name, model.layers, model.width_factor, model.num_classes) == ("resnetv2", TINY, 1, 6)
    assert model.origin.ema and model.origin.class_names == list("abcdef")
    np.testing.assert_array_equal(_logits(model), _logits(reference))  # EMA weights
    raw = bit_zoo.create_model(checkpoint_path=path, ema=False, eager_jit=False)
    assert not raw.origin.ema and np.abs(_logits(raw) - _logits(reference)).max() > 0
    pp = resolve_data_config(model)
    assert pp == Preprocess(image_size=40, resize_size=50, interpolation="bicubic", mean=(0.4,) * 3, std=(0.3,) * 3)
    # an explicit resolution wins, and is resized to straight; eval_size wins over image_size
    assert resolve_data_config(model, image_size=24) == Preprocess(24, None, "bicubic", (0.4,) * 3, (0.3,) * 3)
    assert resolve_data_config(model, image_size=24, eval_size=28, crop_pct=0.875).image_size == 28
    assert resolve_data_config(model, image_size=24, eval_size=28, crop_pct=0.875).resize_size == 32
    with pytest.raises(ValueError, match=r"bit_s_r50x1 is layers \[3, 4, 6, 3\].*says layers \[1, 1, 1, 1\]"):
        bit_zoo.create_model("bit_s_r50x1", checkpoint_path=path)
    with pytest.raises(ValueError, match=r"given, but .*best.ckpt holds layers \[1, 1, 1, 1\]"):
        bit_zoo.create_model("resnetv2", layers=(2, 2, 2, 2), checkpoint_path=path)


def test_custom_geometry_is_a_registered_architecture():
    model = bit_zoo.create_model("resnetv2", layers=(1, 2, 1, 1), width_factor=2, num_classes=3, eager_jit=False)
    assert (model.layers, model.width_factor, model.num_classes, model.weights) == ((1, 2, 1, 1), 2, 3, None)
    assert _logits(model).shape == (2, 3)
    with pytest.raises(ValueError, match="resnetv2 needs layers"):
        bit_zoo.create_model("resnetv2")
    with pytest.raises(ValueError, match="has no pretrained weights"):
        bit_zoo.create_model("resnetv2", layers=TINY, pretrained=True)
    with pytest.raises(ValueError, match=r"bit_m_r50x1 is layers \[3, 4, 6, 3\], width 1, but layers/width_factor says"):
        bit_zoo.create_model("bit_m_r50x1", width_factor=2)
    with pytest.raises(ValueError, match="nothing to create"):
        bit_zoo.create_model()


def test_name_and_tag_choose_the_weights_record(weights_server, monkeypatch, tmp_path):
    """name.tag: its record's classes and preprocessing, and pretrained=True fetches that record's file."""
    with no_init_parameters():
        model = bit_zoo.create_model("bit_m_r50x1.in21k_ft_cifar10")
        mindcv = bit_zoo.create_model("bit_s_r50x1.mindcv_in1k")
    assert model.weights is bit_zoo.get_weights("bit_m_r50x1.in21k_ft_cifar10") and model.num_classes == 10
    assert resolve_data_config(model) == Preprocess(128)  # BiT: resize straight to 128, [-1, 1]
    # mindcv's recipe: resize to 256, center crop 224, ImageNet mean/std
    assert resolve_data_config(mindcv) == Preprocess(224, 256, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    params = _random_params(model, 10)
    weights_server.routes["/bit/BiT-M-R50x1-CIFAR10.npz"] = ("ok", _npz_bytes(tmp_path, params))
    monkeypatch.setenv("BIT_ZOO_BASE_URL", weights_server.base_url + "/bit/")
    monkeypatch.setenv("BIT_ZOO_WEIGHTS_SOURCE", "google")
    fetched = bit_zoo.create_model("bit_m_r50x1.in21k_ft_cifar10", pretrained=True, eager_jit=False)
    assert fetched.origin.source == "pretrained:bit_m_r50x1.in21k_ft_cifar10"
    state = model_state(fetched)
    for k in ("stem.conv.weight", "head.fc.weight", "stages.3.blocks.2.conv3.weight"):
        np.testing.assert_array_equal(state[k], params[k])


def _npz_bytes(tmp_path, params) -> bytes:
    path = tmp_path / "served.npz"
    np.savez(path, **to_npz(params, (3, 4, 6, 3)))
    return path.read_bytes()


def test_meta_key_alone_is_not_a_model(tmp_path):
    """A file whose meta.json names no geometry and a name that is not registered: one clear error each."""
    from bit_zoo.weights.meta import with_meta

    path = save_weights(with_meta({}, {"model": "resnetv2"}), tmp_path / "empty.ckpt")
    with pytest.raises(ValueError, match="resnetv2 needs layers"):
        bit_zoo.create_model(checkpoint_path=path)
    with pytest.raises(ValueError, match="unknown model 'bit_m_r51x1'"):
        bit_zoo.create_model("bit_m_r51x1")
