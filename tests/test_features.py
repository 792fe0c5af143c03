"""Backbone outputs (features_only, feature_info, forward_intermediates, output_stride), frozen stages and
compiled eager inference, on a small ResNet-v2 (numerical parity with timm: test_parity_features.py)."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import bit_zoo
from bit_zoo.models.freeze import FREEZE_CHOICES, freeze
from bit_zoo.weights.loading import load_state, model_state

LAYERS = (1, 1, 1, 1)


def _random_state(model, seed=0):
    rng = np.random.default_rng(seed)
    state = {}
    for p in model.get_parameters():
        a = rng.standard_normal(tuple(p.shape)).astype(np.float32)
        state[p.name] = (1 + 0.1 * a) if p.name.endswith("gamma") else 0.1 * a if p.name.endswith(("beta", "bias")) else a
    return state


@pytest.fixture(scope="module")
def full_and_state():
    model = bit_zoo.ResNetV2(LAYERS, num_classes=7, eager_jit=False)
    state = _random_state(model)
    load_state(model, state)
    model.set_train(False)
    return model, state


def _x(n=2, size=64, seed=0):
    return ms.Tensor(np.random.default_rng(seed).uniform(-1, 1, (n, 3, size, size)).astype(np.float32))


def test_feature_info_matches_timm_convention():
    model = bit_zoo.ResNetV2(LAYERS, width_factor=2, num_classes=0, eager_jit=False)
    assert model.feature_info.get_dicts() == [
        {"num_chs": 128, "reduction": 2, "module": "stem.conv", "index": 0},
        {"num_chs": 512, "reduction": 4, "module": "stages.0", "index": 1},
        {"num_chs": 1024, "reduction": 8, "module": "stages.1", "index": 2},
        {"num_chs": 2048, "reduction": 16, "module": "stages.2", "index": 3},
        {"num_chs": 4096, "reduction": 32, "module": "stages.3", "index": 4},
    ]
    backbone = bit_zoo.ResNetV2(LAYERS, width_factor=2, features_only=True, out_indices=(1, -1), eager_jit=False)
    assert backbone.feature_info.channels() == [512, 4096]
    assert backbone.feature_info.reduction() == [4, 32]
    assert backbone.feature_info.module_name() == ["stages.0", "stages.3"]
    assert backbone.out_indices == (1, 4)


def test_backbone_loads_full_weights_and_returns_the_intermediates(full_and_state):
    model, state = full_and_state
    backbone = bit_zoo.ResNetV2(LAYERS, features_only=True, eager_jit=False)
    names = {p.name for p in backbone.get_parameters()}
    assert not any(n.startswith(("head.", "norm.")) for n in names)  # no head, no final norm built
    load_state(backbone, state)  # a full model's weights (head and final norm included) load into the backbone
    backbone.set_train(False)
    x = _x()
    maps = backbone(x)
    _, ref = model.forward_intermediates(x)
    assert len(maps) == 5
    for i, (a, b) in enumerate(zip(maps, ref)):
        assert a.shape == b.shape
        assert a.shape[-1] == 64 // backbone.feature_info[i]["reduction"]
        assert a.shape[1] == backbone.feature_info[i]["num_chs"]
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-5)


def test_forward_intermediates_semantics(full_and_state):
    model, _ = full_and_state
    x = _x()
    final, maps = model.forward_intermediates(x)
    np.testing.assert_allclose(final.asnumpy(), model.forward_features(x).asnumpy(), rtol=1e-5, atol=1e-5)
    last_n = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [m.shape[1] for m in last_n] == [1024, 2048]
    normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
    # norm=True gives the stage-4 map through the final GroupNorm+ReLU, i.e. the model's features (compared with
    # `final`, not model.norm(maps[4]): on "onednn" the norm takes channels-last maps, the returned ones are NCHW).
    np.testing.assert_allclose(normed.asnumpy(), final.asnumpy(), rtol=1e-5, atol=1e-5)
    assert normed.asnumpy().min() >= 0 and maps[4].asnumpy().min() < 0  # norm=True applied the GN+ReLU, False did not
    x_early, early = model.forward_intermediates(x, indices=[0, 1], stop_early=True)
    assert len(early) == 2
    np.testing.assert_allclose(x_early.asnumpy(), maps[1].asnumpy(), rtol=1e-5, atol=1e-5)  # stopped after stage 1, no norm


@pytest.mark.parametrize("conv_impl", ["native", "unfold"])
def test_output_stride_dilates_with_the_same_weights(conv_impl):
    x = _x(n=1, size=64)
    for output_stride, reductions in ((16, [2, 4, 8, 16, 16]), (8, [2, 4, 8, 8, 8])):
        backbone = bit_zoo.ResNetV2(LAYERS, features_only=True, output_stride=output_stride, conv_impl=conv_impl, eager_jit=False)
        assert backbone.feature_info.reduction() == reductions
        plain = bit_zoo.ResNetV2(LAYERS, features_only=True, conv_impl=conv_impl, eager_jit=False)
        assert {p.name: p.shape for p in backbone.get_parameters()} == {p.name: p.shape for p in plain.get_parameters()}
        backbone.set_train(False)
        maps = backbone(x)
        assert [64 // m.shape[-1] for m in maps] == reductions


def test_dilated_conv_paths_agree():
    """The unfold path's dilated 3x3 equals the native dilated convolution (same weights)."""
    x = _x(n=1, size=48, seed=3)
    out = {}
    for impl in ("native", "unfold"):
        backbone = bit_zoo.ResNetV2(LAYERS, features_only=True, output_stride=8, conv_impl=impl, eager_jit=False)
        load_state(backbone, _random_state(backbone, seed=4))
        backbone.set_train(False)
        out[impl] = [m.asnumpy() for m in backbone(x)]
    for a, b in zip(out["native"], out["unfold"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_bad_backbone_options_fail_clearly():
    with pytest.raises(ValueError, match="output_stride=4"):
        bit_zoo.ResNetV2(LAYERS, output_stride=4)
    with pytest.raises(ValueError, match="feature index 5"):
        bit_zoo.ResNetV2(LAYERS, features_only=True, out_indices=(1, 5))
    backbone = bit_zoo.ResNetV2(LAYERS, features_only=True, eager_jit=False)
    with pytest.raises(ValueError, match="norm=True"):
        backbone.forward_intermediates(_x(n=1, size=32), norm=True)


def test_mindcv_create_model_passes_features_only():
    import mindcv
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        backbone = mindcv.create_model("bit_m_r50x1", features_only=True, out_indices=[2, 3, 4])
    assert isinstance(backbone, bit_zoo.ResNetV2) and backbone.features_only
    assert backbone.feature_info.channels() == [512, 1024, 2048]
    assert backbone.head is None


# ------------------------------------------------------------------------------------------ freeze


def _train_step(model, seed=0, lr=0.5):
    model.set_train(True)
    loss_net = nn.WithLossCell(model, nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean"))
    step = nn.TrainOneStepCell(loss_net, nn.SGD(model.trainable_params(), learning_rate=lr))
    step.set_train(True)
    labels = ms.Tensor(np.array([1, 2], np.int32))
    return float(step(_x(n=2, size=32, seed=seed), labels).asnumpy())


@pytest.mark.parametrize("spec", ["stem+stage1", "all-but-head"])
def test_freeze_keeps_frozen_parameters_fixed(spec):
    model = bit_zoo.ResNetV2(LAYERS, num_classes=3, eager_jit=False)
    load_state(model, _random_state(model, seed=1))  # non-zero head, so every part gets a gradient
    frozen = set(freeze(model, spec))
    if spec == "all-but-head":
        assert {p.name for p in model.trainable_params()} == {"head.fc.weight", "head.fc.bias"}
    else:
        assert "stem.conv.weight" in frozen and "stages.0.blocks.0.conv1.weight" in frozen
        assert "stages.1.blocks.0.conv1.weight" not in frozen
    before = {k: v.copy() for k, v in model_state(model).items()}  # asnumpy shares the parameter's memory
    _train_step(model)
    after = model_state(model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed, "the training step changed nothing"
    assert not changed & frozen, f"frozen parameters changed: {sorted(changed & frozen)[:4]}"
    assert changed == set(before) - frozen  # every trainable parameter moved


def test_freeze_specs_nest_and_unfreeze():
    model = bit_zoo.ResNetV2(LAYERS, num_classes=3, eager_jit=False)
    counts = [len(freeze(model, spec)) for spec in FREEZE_CHOICES]
    assert counts[0] == 0 and counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[-1] == len(list(model.get_parameters())) - 2  # all but head.fc.weight and .bias
    freeze(model, "none")
    assert len(model.trainable_params()) == len(list(model.get_parameters()))
    with pytest.raises(ValueError, match="not one of"):
        freeze(model, "stage2")


# ------------------------------------------------------------------------------- eager inference


def _compiled_and_eager(*, num_classes: int, seed: int):
    """The same random weights in a model with compiled eager inference and in one without, both in eval mode."""
    model = bit_zoo.ResNetV2(LAYERS, num_classes=num_classes)
    reference = bit_zoo.ResNetV2(LAYERS, num_classes=num_classes, eager_jit=False)
    state = _random_state(model, seed=seed)
    for m in (model, reference):
        load_state(m, state)
        m.set_train(False)
    return model, reference


def test_eager_inference_is_compiled_and_sees_new_weights():
    model, reference = _compiled_and_eager(num_classes=5, seed=2)
    x = _x(n=2, size=32)
    np.testing.assert_allclose(model(x).asnumpy(), reference(x).asnumpy(), rtol=1e-5, atol=1e-5)
    assert model._jit_forward is not None and reference._jit_forward is None
    compiled = model._jit_forward
    model(x)
    assert model._jit_forward is compiled  # reused, not rebuilt
    new = _random_state(model, seed=3)  # load_state swaps the parameters' storage: the compiled forward must follow
    load_state(model, new)
    load_state(reference, new)
    np.testing.assert_allclose(model(x).asnumpy(), reference(x).asnumpy(), rtol=1e-5, atol=1e-5)


def test_pynative_training_is_not_compiled_and_learns():
    model = bit_zoo.ResNetV2(LAYERS, num_classes=3)  # zero head: the first loss is ln 3
    losses = [_train_step(model, seed=0, lr=0.05) for _ in range(3)]
    assert model._jit_forward is None  # training calls run eagerly
    assert losses[-1] < losses[0]


def test_eager_inference_falls_back_when_the_graph_compiler_cannot_parse(caplog):
    """A user's monkeypatched sub-cell (a closure the compiler rejects) still runs, eagerly."""
    model, reference = _compiled_and_eager(num_classes=4, seed=6)
    x = _x(n=1, size=32)
    expected = reference(x).asnumpy()
    head = model.head
    calls = []

    def patched(inp, pre_logits=False):
        calls.append(1)
        return head.fc(inp.mean(axis=(2, 3))) * 2.0

    head.construct = patched
    out = model(x).asnumpy()
    assert calls and not model.eager_jit
    np.testing.assert_allclose(out, 2 * expected, rtol=1e-5, atol=1e-5)
    assert "runs eagerly" in caplog.text
