"""conv_impl "onednn": bit_zoo's oneDNN convolutions (cpu_kernels.conv2d) and the channels-last stages built on them.

Checked against MindSpore's own convolution (every geometry the network uses, both layouts, both modes), the
GroupNorm kernels against float64, a small ResNetV2 against the unfold path (forward and every gradient), the
layout of every map the model returns; and when "auto" picks the path, and what happens when it cannot.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from bit_zoo.models import cpu_kernels
from bit_zoo.models.layers import CONV_IMPL_ENV, GroupNormAct, StdConv2d, _Conv, resolve_conv_impl
from bit_zoo.models.resnetv2 import ResNetV2
from test_cpu_kernels import _reset, kernels_switched_on  # one way to forget the process-wide choices (each cached once per process)
from conftest import onednn_buildable


needs_onednn = pytest.mark.skipif(not onednn_buildable(), reason="no C++ compiler, or a MindSpore without oneDNN 3")
needs_compiler = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler on this machine")




@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    """These tests are about the kernels: a suite run with BIT_ZOO_CPU_KERNELS=0 or BIT_ZOO_CONV_IMPL set (every
    other test then takes another path) does not apply to them. Only such a run pays for forgetting the cached choice."""
    monkeypatch.delenv(CONV_IMPL_ENV, raising=False)
    yield from kernels_switched_on(monkeypatch)


@pytest.fixture
def forget_choices():
    """For tests that change what the kernels see (environment, monkeypatched loader): a fresh choice before and after."""
    _reset()
    yield
    _reset()


def _mode(mode: str):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)


class _Weighted(nn.Cell):
    """sum(f(x) * t): a loss whose gradient with respect to f(x) is t, so every output element is checked."""

    def __init__(self, net: nn.Cell, features: bool = False) -> None:
        super().__init__()
        self.net = net
        self.features = features

    def construct(self, x, t):
        y = self.net.forward_features(x) if self.features else self.net(x)
        return (y * t).sum()


def _forward_and_grads(net: nn.Cell, x: np.ndarray, t: np.ndarray, mode: str, features: bool = False):
    """(output, d/dx, [d/dparam ...]) as numpy; graph mode compiles the whole value_and_grad."""
    grad_fn = ms.value_and_grad(_Weighted(net, features), 0, net.trainable_params())
    _mode(mode)
    try:
        if mode == "graph":
            grad_fn = ms.jit(grad_fn)
        _, (gx, gparams) = grad_fn(ms.Tensor(x), ms.Tensor(t))
        y = (net.forward_features if features else net)(ms.Tensor(x))
        return y.asnumpy(), gx.asnumpy(), [g.asnumpy() for g in gparams]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def _assert_close(actual, expected, rel, what=""):
    """max |actual - expected| <= rel * max |expected| (a tolerance on the tensor's scale, as float32 sums err)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = float(np.abs(actual.astype(np.float64) - expected).max())
    scale = float(np.abs(expected).max())
    assert err <= rel * scale, f"{what}: max error {err:.3g} = {err / scale:.3g} of the scale {scale:.3g} (allowed {rel:g})"


def _nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _nchw(a):
    return np.ascontiguousarray(a.transpose(0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------
# One convolution against MindSpore's own


# (in, out, kernel, stride, padding, dilation, (H, W)): every convolution the network has. H != W everywhere, so
# a height/width mix-up in a layout conversion shows; odd and even sizes under stride 2 (the output size rounds).
CONV_GEOMETRIES = [
    pytest.param(3, 64, 7, 2, 3, 1, (20, 17), id="stem7x7s2"),
    pytest.param(64, 64, 3, 1, 1, 1, (9, 10), id="3x3s1"),
    pytest.param(64, 64, 3, 2, 1, 1, (10, 12), id="3x3s2-even"),
    pytest.param(64, 64, 3, 2, 1, 1, (9, 11), id="3x3s2-odd"),
    pytest.param(64, 128, 1, 1, 0, 1, (8, 7), id="1x1s1"),
    pytest.param(64, 128, 1, 2, 0, 1, (10, 9), id="1x1s2"),
    pytest.param(64, 128, 1, 2, 0, 1, (9, 7), id="1x1s2-odd"),
    pytest.param(64, 64, 3, 1, 2, 2, (9, 10), id="3x3d2"),  # output_stride 16
    pytest.param(64, 64, 3, 1, 4, 4, (11, 12), id="3x3d4"),  # output_stride 8
]

# float32 sums of up to 64*3*3 = 576 products (forward, backward-data) or 2*10*12 = 240 (backward-weights), in
# another order on each side (oneDNN's blocking differs between AVX2 and AVX-512; MindSpore's convolution is
# oneDNN's reference code): each side errs by ~sqrt(K) * 2^-24 of the scale, ~1e-6; measured <= 1.2e-6 here.
# 2e-5 leaves room for any CPU; a wrong tap, pad, stride or layout errs by O(1) of the scale.
CONV_TOL = 2e-5


@needs_onednn
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("cin,cout,k,s,p,d,hw", CONV_GEOMETRIES)
def test_onednn_conv_matches_native(cin, cout, k, s, p, d, hw, layout, mode):
    """Forward and both gradients (input, weight: through the weight standardisation) of an onednn StdConv2d
    equal the native one's, in NCHW and channels-last (N, H, W, C) memory, PyNative and graph mode."""
    last = layout == "channels_last"
    native = StdConv2d(cin, cout, k, stride=s, padding=p, dilation=d, conv_impl="native")
    dnnl = StdConv2d(cin, cout, k, stride=s, padding=p, dilation=d, conv_impl="onednn", channels_last=last)
    assert dnnl.conv._dnnl is not None, cpu_kernels.dnnl_status()  # the operator itself, not the unfold fallback
    dnnl.weight.set_data(native.weight.data.copy())
    rng = np.random.default_rng(k * 100 + s * 10 + d)
    x = rng.standard_normal((2, cin, *hw)).astype(np.float32)
    ho, wo = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n in hw)
    t = rng.standard_normal((2, cout, ho, wo)).astype(np.float32)
    y0, gx0, (gw0,) = _forward_and_grads(native, x, t, mode)
    if last:
        y1, gx1, (gw1,) = _forward_and_grads(dnnl, _nhwc(x), _nhwc(t), mode)
        y1, gx1 = _nchw(y1), _nchw(gx1)
    else:
        y1, gx1, (gw1,) = _forward_and_grads(dnnl, x, t, mode)
    assert y0.shape == (2, cout, ho, wo)
    _assert_close(y1, y0, CONV_TOL, "forward")
    _assert_close(gx1, gx0, CONV_TOL, "input gradient")
    _assert_close(gw1, gw0, CONV_TOL, "weight gradient")


@needs_onednn
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fp16_input_falls_back_to_the_unfold_rewrite(layout):
    """float16 activations (amp O2/O3) are not oneDNN-operator inputs: the unfold rewrite runs them, transposed
    around it in channels-last, and gives the float32 result up to float16 rounding."""
    last = layout == "channels_last"
    conv = StdConv2d(64, 64, 3, stride=2, padding=1, conv_impl="onednn", channels_last=last)
    assert conv.conv._dnnl is not None, cpu_kernels.dnnl_status()
    x = np.random.default_rng(4).standard_normal((2, 64, 9, 11)).astype(np.float32)
    if last:
        x = _nhwc(x)
    y32 = conv(ms.Tensor(x)).asnumpy()
    y16 = conv(ms.Tensor(x, ms.float16))
    assert y16.dtype == ms.float16 and y16.shape == y32.shape
    # Input and weight rounded to float16 (2^-11 relative each) over 576-term sums of random signs, then the
    # output rounded: ~3e-3 of the scale at worst (measured 5.5e-4). A layout mix-up errs by O(1).
    _assert_close(y16.asnumpy(), y32, 5e-3, "float16 against float32")


def test_channels_last_needs_onednn():
    with pytest.raises(ValueError, match="channels_last activations need conv_impl 'onednn'"):
        StdConv2d(8, 8, 3, padding=1, conv_impl="unfold", channels_last=True)


# ----------------------------------------------------------------------------------------------
# GroupNorm (+ ReLU) on channels-last tensors


def _group_norm_ref(x, gamma, beta, t, groups, eps, relu):
    """Float64 GroupNorm(+ReLU) of an NCHW x: (y, dx, dgamma, dbeta) for the loss sum(y * t)."""
    n, c = x.shape[:2]
    a = x.astype(np.float64).reshape(n, groups, -1)
    mean = a.mean(2, keepdims=True)
    rstd = 1 / np.sqrt(a.var(2, keepdims=True) + eps)
    xhat = ((a - mean) * rstd).reshape(x.shape)
    g4 = gamma.astype(np.float64).reshape(1, c, 1, 1)
    pre = xhat * g4 + beta.astype(np.float64).reshape(1, c, 1, 1)
    d = t * (pre > 0) if relu else t.astype(np.float64)
    dxhat = (d * g4).reshape(n, groups, -1)
    xh = xhat.reshape(n, groups, -1)
    dx = rstd * (dxhat - dxhat.mean(2, keepdims=True) - xh * (dxhat * xh).mean(2, keepdims=True))
    y = np.maximum(pre, 0) if relu else pre
    return pre, y, dx.reshape(x.shape), (d * xhat).sum((0, 2, 3)), d.sum((0, 2, 3))


@needs_compiler
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("act", [True, False], ids=["relu", "no-act"])
def test_group_norm_channels_last_matches_nchw_and_float64(act, mode):
    """GroupNormAct(channels_last=True) on (N, H, W, C) gives the NCHW kernel's output and gradients (x, gamma,
    beta), transposed; both against float64. 128 channels in 32 groups: a group is 4 neighbouring channels, so
    a channels-last kernel that grouped channels any other way (strided, or per position) would show."""
    rng = np.random.default_rng(6)
    n, c, h, w = 3, 128, 5, 7
    x = (rng.standard_normal((n, c, h, w)) * 2 + 3).astype(np.float32)  # shifted: a one-pass variance would lose digits
    gamma = (1 + 0.3 * rng.standard_normal(c)).astype(np.float32)
    beta = (0.3 * rng.standard_normal(c)).astype(np.float32)
    t = rng.standard_normal((n, c, h, w)).astype(np.float32)
    pre, y_ref, dx_ref, dg_ref, db_ref = _group_norm_ref(x, gamma, beta, t, 32, 1e-5, act)
    # Where a pre-activation is within 1e-3 of ReLU's kink, float32 and float64 may disagree on its side; a zero
    # target there makes the gradients the same either way (the mask is still tested on every other element).
    t = np.where(np.abs(pre) < 1e-3, 0, t).astype(np.float32)
    pre, y_ref, dx_ref, dg_ref, db_ref = _group_norm_ref(x, gamma, beta, t, 32, 1e-5, act)
    results = {}
    for last in (False, True):
        gn = GroupNormAct(c, act=act, channels_last=last)
        assert gn._kernel is not None, cpu_kernels.status()
        gn.gamma.set_data(ms.Tensor(gamma))
        gn.beta.set_data(ms.Tensor(beta))
        gn.set_train(True)
        y, dx, (dg, db) = _forward_and_grads(gn, _nhwc(x) if last else x, _nhwc(t) if last else t, mode)
        results[last] = (_nchw(y), _nchw(dx), dg, db) if last else (y, dx, dg, db)
    # The kernels keep the statistics in float64 and round each output once, the gradients add float32 products
    # summed in double: measured <= 1e-7 of the scale for all four, both layouts. 1e-6 and 2e-6 hold on any CPU;
    # a wrong grouping, mask or transposition errs by O(1).
    for last, (y, dx, dg, db) in results.items():
        where = "channels-last" if last else "NCHW"
        _assert_close(y, y_ref, 1e-6, f"{where} forward")
        _assert_close(dx, dx_ref, 2e-6, f"{where} d/dx")
        _assert_close(dg, dg_ref, 2e-6, f"{where} d/dgamma")
        _assert_close(db, db_ref, 2e-6, f"{where} d/dbeta")
    if not act:
        assert (results[True][0] < 0).any()  # no ReLU without act


# ----------------------------------------------------------------------------------------------
# A small network against the unfold path


def _margined_state(net: ResNetV2, seed: int) -> dict[str, np.ndarray]:
    """Random parameters, every GroupNorm bias +-4 (plus noise).

    Why the margin: the gradients of a ReLU network jump where a pre-activation crosses 0, and the two paths'
    forwards differ by ~1e-6 (float32 sums in another order). Any pre-activation that close to 0 takes ReLU's
    other side on one path, and moves a gradient by up to ~30 % (a stage-4 weight gradient sums over a handful of
    positions). Measured on this net at 160 px with the usual biases: an input change of 1e-6 changes the
    gradients by 0.5 % (L2) on ONE path alone, 1e-5 at 64 px only by luck of the draw. With the biases 4 standard
    deviations away from 0, no pre-activation comes near the kink (a 4-sigma value within 1e-5: ~1e-9 each).
    """
    rng = np.random.default_rng(seed)
    state = {}
    for p in net.get_parameters():
        a = rng.standard_normal(tuple(p.shape)).astype(np.float32)
        if p.name.endswith("gamma"):
            a = 1 + 0.1 * a
        elif p.name.endswith("beta"):
            a = 4 * np.sign(a) + 0.1 * a
        elif p.name.startswith("head."):
            a = 0.1 * a
        state[p.name] = a.astype(np.float32)
    return state


def _load(net: ResNetV2, state: dict[str, np.ndarray]) -> None:
    left = ms.load_param_into_net(net, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in state.items()}, strict_load=True)
    assert not any(left), left


def _pool_margin(stem_out: np.ndarray) -> float:
    """The stem max pool's smallest lead of a window's maximum over its runner-up, relative to the map's scale
    (the pool runs on the zero-padded map, see resnetv2.Stem; the pad zeros are one value: equal on both paths)."""
    padded = np.pad(stem_out, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ho, wo = (padded.shape[2] - 3) // 2 + 1, (padded.shape[3] - 3) // 2 + 1
    windows = np.stack([padded[:, :, a : a + 2 * ho - 1 : 2, b : b + 2 * wo - 1 : 2] for a in range(3) for b in range(3)], -1)
    top = windows.max(-1, keepdims=True)
    runner_up = np.where(windows < top, windows, -np.inf).max(-1)
    return float((top[..., 0] - runner_up).min() / np.abs(stem_out).max())


def _clear_input(reference: ResNetV2, shape: tuple[int, ...]) -> np.ndarray:
    """The first of a few random images whose stem max-pool windows all have a clear winner.

    The same reason as the bias margin: where a window's two largest values are within the paths' difference
    (the stem conv's: <= 7e-7 of its scale, measured), the gradient goes to one position on one path and its
    neighbour on the other. A lead of 5e-6 is out of reach; about half of the 64x48 images have it. Decided on the
    unfold path (the reference), so the path under test plays no part in the choice."""
    for seed in range(40):
        x = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
        stem = reference.forward_intermediates(ms.Tensor(x), indices=[0], stop_early=True, intermediates_only=True)[0]
        if _pool_margin(stem.asnumpy()) > 5e-6:
            return x
    raise AssertionError("no image among 40 with a clear winner in every stem max-pool window")


def _model_pair(**kwargs) -> tuple[ResNetV2, ResNetV2]:
    dnnl = ResNetV2((1, 1, 1, 1), 1, conv_impl="onednn", eager_jit=False, **kwargs)
    unfold = ResNetV2((1, 1, 1, 1), 1, conv_impl="unfold", eager_jit=False, **kwargs)
    state = _margined_state(unfold, seed=0)
    _load(dnnl, state)
    _load(unfold, state)
    return dnnl, unfold


@needs_onednn
def test_onednn_model_runs_its_stages_channels_last_on_the_operators():
    net = ResNetV2((1, 1, 1, 1), 1, num_classes=0, conv_impl="onednn", eager_jit=False)
    convs = [cell for _, cell in net.cells_and_names() if isinstance(cell, _Conv)]
    assert len(convs) == 1 + 4 * 4  # the stem, and per unit conv1-3 and the projection
    assert all(c._dnnl is not None for c in convs), cpu_kernels.dnnl_status()
    # Channels-last from the stem conv on (the image is transposed once before it; the stem pool is the channels-last kernel).
    assert net.channels_last and [c.channels_last for c in convs] == [True] * 17
    assert net.stem.channels_last and net.stem._pool is not None
    norms = [cell for _, cell in net.cells_and_names() if isinstance(cell, GroupNormAct)]
    assert norms and all(n.channels_last and n._kernel is not None for n in norms)


@needs_onednn
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_small_model_onednn_matches_unfold(mode):
    """Features and every gradient (input and all parameters) of an R-(1,1,1,1) on onednn equal the unfold path's.

    64x48 images: non-square (a height/width mix-up shows) and the last stride-2 3x3 gets an odd size (3 -> 2)."""
    dnnl, unfold = _model_pair(num_classes=0)
    x = _clear_input(unfold, (2, 3, 64, 48))
    # 14 convolutions' float32 summation-order differences, carried through: measured <= 2.2e-6 of each tensor's
    # scale (and as much between two inputs 1e-6 apart on one path: the paths' rounding, no kink crossed).
    # 5e-5 holds on any CPU; a wrong layout, grouping or mask anywhere errs by >= 1e-2.
    _assert_paths_agree(dnnl, unfold, x, mode, 5e-5)


def _assert_paths_agree(dnnl, unfold, x: np.ndarray, mode: str, tol: float) -> None:
    """Training mode, one target: the features and every gradient (input and each parameter) of the onednn net
    within `tol` of the unfold net's (relative to each tensor's scale). x is (2, 3, 64, 48): features 2x2."""
    t = np.random.default_rng(1).standard_normal((2, 2048, 2, 2)).astype(np.float32)
    for net in (dnnl, unfold):
        net.set_train(True)
    y0, gx0, g0 = _forward_and_grads(unfold, x, t, mode, features=True)
    y1, gx1, g1 = _forward_and_grads(dnnl, x, t, mode, features=True)
    names = [p.name for p in unfold.trainable_params()]
    assert names == [p.name for p in dnnl.trainable_params()] and len(g0) == len(names)
    _assert_close(y1, y0, tol, "features")
    _assert_close(gx1, gx0, tol, "d/dx")
    for name, a, b in zip(names, g1, g0):
        _assert_close(a, b, tol, f"d/d{name}")


@needs_onednn
def test_onednn_model_returns_nchw_maps():
    """Every map the model returns (forward_features, the logits, a features_only list, forward_intermediates)
    is NCHW and equals the unfold path's; eval mode, so the calls run the compiled eager forward too."""
    dnnl, unfold = _model_pair(num_classes=7)
    for net in (dnnl, unfold):
        net.set_train(False)
        net.eager_jit = True  # __call__ runs the mindspore.jit forward (graph compiled), the methods run eagerly
    x = ms.Tensor(np.random.default_rng(2).uniform(-1, 1, (2, 3, 64, 48)).astype(np.float32))
    # The forward has no kinks (max and ReLU are continuous): only the paths' float32 rounding, measured <= 8e-7
    # of the scale; 2e-5 holds on any CPU, and an NHWC map read as NCHW errs by O(1).
    tol = 2e-5
    shapes = [(2, 64, 32, 24), (2, 256, 16, 12), (2, 512, 8, 6), (2, 1024, 4, 3), (2, 2048, 2, 2)]

    features = dnnl.forward_features(x).asnumpy()
    assert features.shape == shapes[-1]
    _assert_close(features, unfold.forward_features(x).asnumpy(), tol, "forward_features")
    _assert_close(dnnl(x).asnumpy(), unfold(x).asnumpy(), tol, "logits")

    final, maps = dnnl.forward_intermediates(x)
    final_ref, maps_ref = unfold.forward_intermediates(x)
    assert [m.shape for m in maps] == shapes
    _assert_close(final.asnumpy(), final_ref.asnumpy(), tol, "forward_intermediates final")
    _assert_close(final.asnumpy(), features, tol, "final features of forward_intermediates")
    for i, (a, b) in enumerate(zip(maps, maps_ref)):
        _assert_close(a.asnumpy(), b.asnumpy(), tol, f"forward_intermediates map {i}")
    normed = dnnl.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)[0]
    _assert_close(normed.asnumpy(), features, tol, "norm=True")
    early, two = dnnl.forward_intermediates(x, indices=[1, 2], stop_early=True)
    assert early.shape == shapes[2] and [m.shape for m in two] == shapes[1:3]
    _assert_close(early.asnumpy(), maps_ref[2].asnumpy(), tol, "stop_early final")

    state = {p.name: p.asnumpy() for p in unfold.get_parameters() if not p.name.startswith(("head.", "norm."))}
    for out_indices in ((0, 1, 2, 3, 4), (1, 3)):
        backbones = []
        for impl in ("onednn", "unfold"):
            backbone = ResNetV2((1, 1, 1, 1), 1, conv_impl=impl, features_only=True, out_indices=out_indices)
            _load(backbone, state)
            backbone.set_train(False)
            backbones.append(backbone(x))
        assert [m.shape for m in backbones[0]] == [shapes[i] for i in out_indices]
        for i, a, b in zip(out_indices, *backbones):
            _assert_close(a.asnumpy(), b.asnumpy(), tol, f"features_only map {i}")


@needs_onednn
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_amp_o2_model_on_onednn_matches_unfold(mode, amp_stack_guard):
    """amp O2 (train.py / validate.py --amp_level O2, in either --mode): the float16 convolutions take the unfold
    rewrite, between transposes in the channels-last stages, and the logits are the unfold model's under O2."""
    dnnl, unfold = _model_pair(num_classes=7)
    x = ms.Tensor(np.random.default_rng(3).uniform(-1, 1, (2, 3, 64, 48)).astype(np.float32))
    unfold.set_train(False)
    ref = unfold(x).asnumpy()
    out = {}
    _mode(mode)
    try:
        for name, net in (("onednn", dnnl), ("unfold", unfold)):
            amp = ms.amp.auto_mixed_precision(net, "O2")
            amp.set_train(False)
            out[name] = amp(x).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    # The same float16 operations on the same values on both sides (the layout between them aside): measured
    # equal. 2e-3 of the scale is four float16 ulps, room for another rounding of one intermediate.
    _assert_close(out["onednn"], out["unfold"], 2e-3, "amp O2 logits")
    assert np.abs(out["onednn"] - ref).max() > 0  # it did run in float16


# ----------------------------------------------------------------------------------------------
# Which path runs


@needs_onednn
def test_auto_picks_onednn_on_cpu(monkeypatch):
    assert ms.get_context("device_target") == "CPU"
    assert resolve_conv_impl("auto") == "onednn" and resolve_conv_impl(None) == "onednn"
    assert cpu_kernels.dnnl_status().startswith("in use")
    net = ResNetV2((1, 1, 1, 1), 1, num_classes=0, eager_jit=False)
    assert net.conv_impl == "onednn" and net.channels_last
    monkeypatch.setenv(CONV_IMPL_ENV, "unfold")
    assert resolve_conv_impl("auto") == "unfold"
    assert resolve_conv_impl("onednn") == "onednn"  # an explicit argument wins over the environment
    monkeypatch.setenv(CONV_IMPL_ENV, "onednn")
    assert resolve_conv_impl("auto") == "onednn"


def test_without_onednn_auto_is_unfold_and_onednn_is_one_clear_error():
    why = "unavailable: RuntimeError: MindSpore 2.7.0 ships no oneDNN 3 library (mindspore/lib/libdnnl.so.3; MindSpore 2.9 and later do)"
    # Its own MonkeyPatch, undone before the fixtures' teardown (which clears dnnl_library's cache).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_kernels, "dnnl_library", lambda: None)
        mp.setattr(cpu_kernels, "_dnnl_status", why)
        assert resolve_conv_impl("auto") == "unfold"
        with pytest.raises(ValueError) as raised:
            resolve_conv_impl("onednn")
        message = str(raised.value)
        assert "\n" not in message
        assert message == f"conv_impl 'onednn' is not available here ({why}); use conv_impl 'auto' or 'unfold'"
        mp.setenv(CONV_IMPL_ENV, "onednn")  # the environment's choice alike
        with pytest.raises(ValueError, match=re.escape(why)):
            resolve_conv_impl("auto")
        mp.delenv(CONV_IMPL_ENV)
        net = ResNetV2((1, 1, 1, 1), 1, num_classes=3, eager_jit=False)
        assert net.conv_impl == "unfold" and not net.channels_last
        assert net(ms.Tensor(np.ones((1, 3, 32, 32), np.float32))).shape == (1, 3)
        with pytest.raises(ValueError, match="conv_impl 'onednn' is not available here"):
            ResNetV2((1, 1, 1, 1), 1, num_classes=3, conv_impl="onednn")


def test_onednn_is_cpu_only(monkeypatch):
    real = ms.get_context
    monkeypatch.setattr(ms, "get_context", lambda key: "GPU" if key == "device_target" else real(key))
    assert resolve_conv_impl("auto") == "native"
    with pytest.raises(ValueError, match=re.escape("conv_impl 'onednn' is not available here (the device is not CPU)")):
        resolve_conv_impl("onednn")


@needs_compiler
def test_a_mindspore_without_onednn_3_falls_back_with_one_log_line(monkeypatch, caplog, forget_choices):
    """MindSpore 2.7 / 2.8 ship oneDNN 2 only: the loader's refusal leaves "auto" on unfold, says so once, and the
    GroupNorm kernels stay in use."""

    def no_onednn_3():
        raise RuntimeError("MindSpore 2.7.0 ships no oneDNN 3 library (mindspore/lib/libdnnl.so.3; MindSpore 2.9 and later do)")

    monkeypatch.setattr(cpu_kernels, "_mindspore_onednn", no_onednn_3)
    with caplog.at_level(logging.INFO, logger="bit_zoo"):
        assert resolve_conv_impl("auto") == "unfold"
        net = ResNetV2((1, 1, 1, 1), 1, num_classes=0, eager_jit=False)
    assert net.conv_impl == "unfold" and not net.channels_last
    said = [r.getMessage() for r in caplog.records if "oneDNN" in r.getMessage()]
    assert len(said) == 1, said
    assert "ships no oneDNN 3" in said[0] and "unfold" in said[0] and "\n" not in said[0]
    assert cpu_kernels.dnnl_status().startswith("unavailable: RuntimeError: MindSpore 2.7.0 ships no oneDNN 3")
    assert cpu_kernels.library() is not None and cpu_kernels.group_norm_act() is not None


@needs_onednn
def test_a_failed_self_check_falls_back(monkeypatch, forget_choices):
    def wrong(path):
        raise RuntimeError("self-check of DnnlConv failed: relative error 0.5")

    monkeypatch.setattr(cpu_kernels, "_dnnl_self_check", wrong)
    assert resolve_conv_impl("auto") == "unfold"
    assert "self-check of DnnlConv failed" in cpu_kernels.dnnl_status()
    assert cpu_kernels.conv2d() is None  # nothing of the refused library stays in use


@needs_onednn
def test_the_portable_build_passes_the_self_check(tmp_path, monkeypatch, forget_choices):
    """A compiler that refuses -march=native (or a CPU cpu_kernels cannot identify) gets the portable build
    (cpu_kernels._flag_sets): the oneDNN operators built so pass their self-check (forward and both backward
    kernels against float64, no reference implementation) and run the convolutions."""
    real = shutil.which("g++") or shutil.which("c++")
    picky = tmp_path / "picky-cxx"
    picky.write_text(f'#!/bin/sh\ncase "$*" in *-march=native*) echo "unknown -march" >&2; exit 1;; esac\nexec {real} "$@"\n')
    picky.chmod(0o755)
    monkeypatch.setenv("CXX", str(picky))
    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "home"))
    path = cpu_kernels.dnnl_library()
    assert path is not None, cpu_kernels.dnnl_status()
    assert cpu_kernels.build_kind() == "portable" and path.parent == tmp_path / "home" / "kernels"
    conv = StdConv2d(64, 64, 3, stride=2, padding=1, conv_impl="onednn", channels_last=True)
    assert conv.conv._dnnl is not None
    native = StdConv2d(64, 64, 3, stride=2, padding=1, conv_impl="native")
    native.weight.set_data(conv.weight.data.copy())
    x = np.random.default_rng(8).standard_normal((2, 64, 9, 11)).astype(np.float32)
    _assert_close(_nchw(conv(ms.Tensor(_nhwc(x))).asnumpy()), native(ms.Tensor(x)).asnumpy(), CONV_TOL, "portable build forward")


def test_cpu_kernels_off_gives_unfold(monkeypatch, forget_choices):
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert resolve_conv_impl("auto") == "unfold"
    assert cpu_kernels.dnnl_status() == f"not used: off (${cpu_kernels.ENV}=0)"
    with pytest.raises(ValueError, match=re.escape(f"(not used: off (${cpu_kernels.ENV}=0))")):
        resolve_conv_impl("onednn")
    net = ResNetV2((1, 1, 1, 1), 1, num_classes=0, eager_jit=False)
    assert net.conv_impl == "unfold" and not net.channels_last


# ----------------------------------------------------------------------------------------------
# oneDNN's choice of implementation


@needs_onednn
@pytest.mark.parametrize("isa", [None, "AVX2"], ids=["this-cpu", "avx2-cap"])
def test_no_reference_convolution_on_the_onednn_path(tmp_path, isa):
    """ONEDNN_VERBOSE: a PyNative train step of a small onednn model runs every convolution (forward, backward
    data, backward weights, each geometry of the net) in an optimised oneDNN implementation, never "ref".

    ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN choose as on an AVX2-only CPU (AMD EPYC before Zen 4), where the
    implementations differ: they must be optimised there too."""
    script = textwrap.dedent(
        """
        import mindspore as ms, numpy as np
        from bit_zoo.models import cpu_kernels
        from bit_zoo.models.resnetv2 import ResNetV2
        net = ResNetV2((1, 1, 1, 1), 1, num_classes=10, conv_impl="onednn", eager_jit=False)
        opt = ms.nn.SGD(net.trainable_params())
        def loss(x):
            return net(x).sum()
        grad_fn = ms.value_and_grad(loss, None, opt.parameters)
        opt(grad_fn(ms.Tensor(np.ones((2, 3, 48, 40), np.float32)))[1])
        print("DONE", cpu_kernels.dnnl_status())
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ONEDNN_VERBOSE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    path = tmp_path / "onednn_probe.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert "DONE in use" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    # onednn_verbose,v1,primitive,exec,cpu,convolution,<implementation>,<propagation>,...
    convs = [line.split(",") for line in proc.stdout.splitlines() if line.startswith("onednn_verbose") and ",exec,cpu,convolution," in line]
    kinds = {fields[7] for fields in convs}
    assert {"forward_inference", "backward_data", "backward_weights"} <= kinds, kinds
    impls = {fields[6] for fields in convs}
    assert not [impl for impl in impls if "ref" in impl], impls
    if isa:  # the cap holds (some choices name no ISA: "x64:gemm:jit", the self-check's dilated backward-weights)
        assert any("avx2" in impl for impl in impls) and not [impl for impl in impls if "avx512" in impl or "amx" in impl], impls
