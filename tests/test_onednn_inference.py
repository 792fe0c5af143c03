"""The oneDNN path beyond the convolution itself: eval-mode prepared weights (cpu_kernels.conv2d_prepared), the
fused residual add (cpu_kernels.conv2d_add), the channels-last stem pool (cpu_kernels.stem_pool) and the GroupNorm
kernels' check of gamma's length.

The prepared weights are a cache (bit_dnnl.cc: the standardised weight kept in oneDNN's format, keyed by the raw
weight's buffer, revalidated by a digest of its bytes): checked here against the training path, which standardises
on every call, through every way a weight changes (in place, set_data, load_param_into_net, an EMA-like swap), with
the cache bounded or off, and for its gradients.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from bit_zoo.models import cpu_kernels
from bit_zoo.models.layers import GroupNormAct, _Conv
from bit_zoo.models.resnetv2 import PreActBottleneck, ResNetV2

# Helpers (and the fixture that keeps the kernels on whatever the suite's environment) shared with the convolution
# tests: one definition of the tolerance helper, the margined parameters and the paths' comparison.
from test_onednn import (
    _assert_close,
    _assert_paths_agree,
    _forward_and_grads,
    _kernels_on,  # noqa: F401  (autouse fixture: the kernels on, BIT_ZOO_CONV_IMPL unset)
    _load,
    _margined_state,
    _mode,
    _nchw,
    _nhwc,
    _pool_margin,
    needs_compiler,
    needs_onednn,
)

# Eval mode (DnnlConvStd: bit_dnnl.cc's standardize(), then the same oneDNN forward primitive) against training
# mode (bit_cpu.cc's StdWeight, then DnnlConv): the one difference is the standardised weight, the same formula in
# two compilation units. Measured: bit-identical (error 0) on an AVX-512 EPYC. On a CPU where the compiler contracts
# or vectorises the two copies differently they may differ by an ulp (6e-8) per weight element, which through the
# net's 17 convolutions stays well under 2e-6 of the scale.
EVAL_TOL = 2e-6
# A changed weight must move the output by this much of its scale (50x EVAL_TOL), so that a stale prepared weight,
# which would leave the output as it was, cannot pass for the reference within EVAL_TOL. Measured: the smallest
# change below (one element of a 2048-channel stage-4 weight) moves the logits by 4.5e-4 of their scale.
CHANGED = 1e-4

MODES = ["pynative", "eager_jit", "graph"]  # eager_jit: PyNative, eval calls run ResNetV2's compiled forward


def _net(state, mode: str, num_classes: int = 7) -> ResNetV2:
    net = ResNetV2((1, 1, 1, 1), 1, num_classes=num_classes, conv_impl="onednn", eager_jit=mode == "eager_jit")
    _load(net, state)
    return net


def _run(net: nn.Cell, x: np.ndarray, mode: str, train: bool = False) -> np.ndarray:
    net.set_train(train)
    _mode("graph" if mode == "graph" else "pynative")
    try:
        return net(ms.Tensor(x)).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def _image(seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (2, 3, 64, 48)).astype(np.float32)


def _margined(seed: int) -> dict[str, np.ndarray]:
    """Random parameters of the test model (R-(1,1,1,1), 7 classes), every GroupNorm bias +-4: see _margined_state."""
    return _margined_state(ResNetV2((1, 1, 1, 1), 1, num_classes=7, conv_impl="unfold", eager_jit=False), seed)


def _live_state(seed: int) -> dict[str, np.ndarray]:
    """As _margined, every GroupNorm bias +4 (plus noise): no ReLU silences a channel, so a change to any filter
    reaches the logits (with a bias of -4, a change to that channel's filter may not)."""
    return {k: np.abs(v) if k.endswith("beta") else v for k, v in _margined(seed).items()}


def _changed(w: np.ndarray, where: str) -> np.ndarray:
    """w with one element moved by 20 (the first or the last of the buffer): not a per-channel scale + shift, which
    the standardisation would undo, and one element only, so a digest that skipped any part of the buffer (the
    last of its chunks, the odd trailing float) would miss it."""
    out = w.copy()
    out.flat[0 if where == "first" else -1] += 20.0
    return out


class _Reference:
    """The training-mode forward of one separate onednn model (StdWeight + DnnlConv on every call: no cache), in
    PyNative, with whatever parameters it is given: what an eval-mode forward of those parameters must give."""

    def __init__(self) -> None:
        self.net = ResNetV2((1, 1, 1, 1), 1, num_classes=7, conv_impl="onednn", eager_jit=False)

    def __call__(self, state, x):
        _load(self.net, state)
        return _run(self.net, x, "pynative", train=True)


def _convs(net: nn.Cell) -> list[_Conv]:
    return [cell for _, cell in net.cells_and_names() if isinstance(cell, _Conv)]


# ----------------------------------------------------------------------------------------------
# Eval-mode prepared weights


@needs_onednn
def test_eval_mode_runs_the_prepared_operators():
    """PyNative eval: every convolution goes through DnnlConvStd, conv3 of each unit through DnnlConvStdAdd;
    training mode through neither (it must see the weight standardised on every call)."""
    net = _net(_margined(0), "pynative")
    calls = []

    def spy(kernel, what):
        def run(*args):
            calls.append(what)
            return kernel(*args)

        return run

    convs = _convs(net)
    assert all(c._dnnl_std is not None and c._dnnl_std_add is not None for c in convs), cpu_kernels.dnnl_status()
    for c in convs:
        c._dnnl_std, c._dnnl_std_add = spy(c._dnnl_std, "std"), spy(c._dnnl_std_add, "std_add")
    _run(net, _image(), "pynative", train=True)
    assert calls == []
    _run(net, _image(), "pynative")
    assert sorted(calls) == ["std"] * 13 + ["std_add"] * 4  # the stem, conv1, conv2 and the projection; conv3 + shortcut


@needs_onednn
@pytest.mark.parametrize("mode", MODES)
def test_eval_matches_training_and_repeats_bit_for_bit(mode):
    """The eval-mode output (prepared weights) equals the training-mode one (standardised per call), and later eval
    calls (the prepared weights reused) give it again bit for bit."""
    state = _margined(0)
    net = _net(state, mode)
    x = _image()
    trained = _run(net, x, mode, train=True)
    first = _run(net, x, mode)
    _assert_close(first, trained, EVAL_TOL, "eval against training mode")
    # The second and third calls read the prepared weights: the same bytes through the same primitive.
    for _ in range(2):
        np.testing.assert_array_equal(_run(net, x, mode), first)


@needs_onednn
@pytest.mark.parametrize("mode", MODES)
def test_in_place_weight_change_reaches_the_next_eval_call(mode):
    """ops.assign writes into the Parameter's own buffer (the cache's key stays the same): the next eval call must
    prepare the weight again. One element each of the stem's 7x7, a 3x3, a fused-add conv3 (1M floats: several
    digest chunks) and a stride-2 projection (2M floats), first and last elements of the buffer."""
    state = _live_state(0)
    net = _net(state, mode)
    reference = _Reference()
    params = dict(net.parameters_and_names())
    x = _image()
    before = _run(net, x, mode)
    current = dict(state)
    for name, where in (
        ("stem.conv.weight", "first"),
        ("stages.0.blocks.0.conv2.weight", "last"),
        ("stages.3.blocks.0.conv3.weight", "last"),
        ("stages.3.blocks.0.downsample.weight", "first"),
    ):
        p = params[name]
        ptr = p.data_ptr()
        current[name] = _changed(current[name], where)
        ops.assign(p, ms.Tensor(current[name]))
        assert p.data_ptr() == ptr  # in place: the cache sees the same buffer with other bytes
        after = _run(net, x, mode)
        _assert_close(after, reference(current, x), EVAL_TOL, f"eval after {name} changed in place")
        assert np.abs(after - before).max() > CHANGED * np.abs(before).max(), f"changing {name} did not change the output"
        np.testing.assert_array_equal(_run(net, x, mode), after)  # and the re-prepared weight is kept
        before = after


@needs_onednn
@pytest.mark.parametrize("mode", MODES)
def test_ema_like_swap_and_back_gives_the_original_output(mode):
    """Every weight assigned other values in place (an EMA copy swapped in for evaluation), then the originals
    assigned back: the EMA output is the EMA weights' own, and the original output comes back bit for bit (the same
    bytes standardised and reordered by the same deterministic code)."""
    state, ema = _live_state(0), _live_state(1)
    net = _net(state, mode)
    params = dict(net.parameters_and_names())
    x = _image()
    original = _run(net, x, mode)
    for name in params:
        ops.assign(params[name], ms.Tensor(ema[name]))
    swapped = _run(net, x, mode)
    _assert_close(swapped, _Reference()(ema, x), EVAL_TOL, "eval with the EMA weights")
    assert np.abs(swapped - original).max() > CHANGED * np.abs(original).max()
    for name in params:
        ops.assign(params[name], ms.Tensor(state[name]))
    np.testing.assert_array_equal(_run(net, x, mode), original)


@needs_onednn
@pytest.mark.parametrize("mode", MODES)
def test_set_data_and_load_param_into_net_reach_eval(mode):
    """A checkpoint loaded into the model (load_param_into_net: set_data, a new buffer) and one weight replaced
    by set_data: the next eval call gives the new parameters' output."""
    state, other = _live_state(0), _live_state(2)
    net = _net(state, mode)
    reference = _Reference()
    x = _image()
    original = _run(net, x, mode)
    _load(net, other)
    loaded = _run(net, x, mode)
    _assert_close(loaded, reference(other, x), EVAL_TOL, "eval after load_param_into_net")
    assert np.abs(loaded - original).max() > CHANGED * np.abs(original).max()
    name = "stages.1.blocks.0.conv2.weight"
    other = dict(other, **{name: _changed(other[name], "last")})
    dict(net.parameters_and_names())[name].set_data(ms.Tensor(other[name]))
    replaced = _run(net, x, mode)
    _assert_close(replaced, reference(other, x), EVAL_TOL, "eval after set_data")
    assert np.abs(replaced - loaded).max() > CHANGED * np.abs(loaded).max()


def _eval_sequence(net: ResNetV2, state: dict[str, np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """Eval outputs of: two calls, one weight changed in place, the weight assigned back (also run by the
    subprocess of the cache-size test, with its own BIT_ZOO_WEIGHT_CACHE_MB)."""
    name = "stages.3.blocks.0.conv3.weight"
    p = dict(net.parameters_and_names())[name]
    outs = [_run(net, x, "pynative"), _run(net, x, "pynative")]
    ops.assign(p, ms.Tensor(_changed(state[name], "last")))
    outs.append(_run(net, x, "pynative"))
    ops.assign(p, ms.Tensor(state[name]))
    outs.append(_run(net, x, "pynative"))
    return outs


_CACHE_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from bit_zoo.models import cpu_kernels
from test_onednn_inference import _eval_sequence, _net
data = np.load(sys.argv[2])
state = {k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")}
outs = _eval_sequence(_net(state, "pynative"), state, data["x"])
np.savez(sys.argv[3], *outs)
print("DONE", cpu_kernels.dnnl_status())
"""


@needs_onednn
@pytest.mark.parametrize("cache_mb", ["0", "1"], ids=["cache-off", "cache-1mb"])
def test_weight_cache_size_changes_no_output(cache_mb, tmp_path):
    """BIT_ZOO_WEIGHT_CACHE_MB=0 (every call prepares its weights in scratch memory) and =1 (the small weights
    kept, the 2048-channel ones, 4 and 8 MB, prepared per call) give this process's outputs (default 1024 MB: all
    kept), bit for bit, through the same changes. The variable is read once per process: a subprocess, on the
    kernel library this process built (its BIT_ZOO_HOME), so nothing is compiled again."""
    state = _live_state(0)
    x = _image()
    expected = _eval_sequence(_net(state, "pynative"), state, x)
    np.savez(tmp_path / "in.npz", x=x, **{f"state/{k}": v for k, v in state.items()})
    # Both kernel libraries this process uses (built under the BIT_ZOO_HOME of whichever test came first), with
    # the digests that vouch for them, copied into one home for the subprocess.
    built = [cpu_kernels.library(), cpu_kernels.dnnl_library()]
    assert None not in built, cpu_kernels.dnnl_status()
    # The eval-mode operators this process ran are that library's (not a stale choice of an earlier test's).
    assert cpu_kernels.conv2d_prepared()[0].func == f"{built[1]}:DnnlConvStd"
    kernels = tmp_path / "home" / "kernels"
    kernels.mkdir(parents=True)
    for path in built:
        for f in (path, path.with_name(path.name + ".sha256")):
            shutil.copy2(f, kernels / f.name)
    library = kernels / built[1].name
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, BIT_ZOO_WEIGHT_CACHE_MB=cache_mb, BIT_ZOO_HOME=str(tmp_path / "home"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tests.parent), os.environ.get("PYTHONPATH")]))
    script = tmp_path / "cache_probe.py"
    script.write_text(_CACHE_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tests), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert f"DONE in use: {library}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    got = [got[f"arr_{i}"] for i in range(len(expected))]
    # Same library, same bytes, same deterministic arithmetic: only where the prepared weights live differs.
    for i, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(a, b, err_msg=f"eval call {i} with BIT_ZOO_WEIGHT_CACHE_MB={cache_mb}")
    assert np.abs(got[2] - got[0]).max() > CHANGED * np.abs(got[0]).max()  # the in-place change was seen


@needs_onednn
@pytest.mark.parametrize("mode", MODES)
def test_eval_mode_gradients_match_training_mode(mode):
    """Gradients of an eval-mode forward (saliency maps, adversarial examples: DnnlConvStd's bprop standardises
    again and runs the training kernels) with respect to the image and every parameter equal the training-mode
    path's. Margined GroupNorm biases keep every pre-activation away from ReLU's kink (see _margined_state)."""
    state = _margined(0)
    net = _net(state, mode)
    x = _image()
    t = np.random.default_rng(5).standard_normal((2, 7)).astype(np.float32)
    grad_mode = "graph" if mode == "graph" else "pynative"
    results = {}
    for train in (True, False):
        net.set_train(train)
        results[train] = _forward_and_grads(net, x, t, grad_mode)
    names = [p.name for p in net.trainable_params()]
    (y1, gx1, g1), (y0, gx0, g0) = results[False], results[True]
    # The bprop standardises with the training path's StdWeight and runs the same backward kernels: the gradients
    # differ only where the forwards do (EVAL_TOL). Measured: identical (0). Where the forwards differ by ulps, the
    # backward amplifies them (an input change of 1e-6 moves this net's gradients by up to ~2e-6, test_onednn.py):
    # 2e-5 holds on any CPU. A bprop that dropped the standardisation's gradient or the shortcut's errs by O(1).
    _assert_close(y1, y0, EVAL_TOL, "logits")
    _assert_close(gx1, gx0, 2e-5, "d/dx")
    assert len(g1) == len(names) == len(g0)
    for name, a, b in zip(names, g1, g0):
        _assert_close(a, b, 2e-5, f"d/d{name}")


# ----------------------------------------------------------------------------------------------
# The fused residual add


def _block_state(block: nn.Cell, seed: int) -> dict[str, np.ndarray]:
    """Random parameters of one unit, the GroupNorm biases +-4 (no pre-activation near ReLU's kink)."""
    rng = np.random.default_rng(seed)
    state = {}
    for p in block.get_parameters():
        a = rng.standard_normal(tuple(p.shape))
        if p.name.endswith("gamma"):
            a = 1 + 0.1 * a
        elif p.name.endswith("beta"):
            a = 4 * np.sign(a) + 0.1 * a
        state[p.name] = a.astype(np.float32)
    return state


@needs_onednn
@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "cin,cout,stride", [(256, 256, 1), (64, 256, 1), (256, 512, 2)], ids=["identity-shortcut", "projection", "projection-s2"]
)
def test_bottleneck_fused_add_matches_unfold(cin, cout, stride, train, mode):
    """A PreActBottleneck on onednn channels-last (conv3 + shortcut in one oneDNN call: DnnlConvAdd in training,
    DnnlConvStdAdd in eval) against the unfold one (conv3, then an add): the output, the input's gradient (through
    the shortcut too: the identity passes dout straight to x) and every parameter's, the projection's included.
    9x7 input: odd sizes under stride 2, H != W."""
    blocks = {}
    for impl, last in (("onednn", True), ("unfold", False)):
        blocks[impl] = PreActBottleneck(cin, cout, stride=stride, conv_impl=impl, channels_last=last)
    block = blocks["onednn"]
    assert block.conv3.conv._dnnl_add is not None and block.conv3.conv._dnnl_std_add is not None, cpu_kernels.dnnl_status()
    assert block.has_proj == (cin != cout or stride != 1)
    state = _block_state(blocks["unfold"], seed=cin + cout + stride)
    for b in blocks.values():
        left = ms.load_param_into_net(b, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in state.items()}, strict_load=True)
        assert not any(left), left
        b.set_train(train)
    rng = np.random.default_rng(stride)
    x = rng.standard_normal((2, cin, 9, 7)).astype(np.float32)
    ho, wo = (9 - 1) // stride + 1, (7 - 1) // stride + 1
    t = rng.standard_normal((2, cout, ho, wo)).astype(np.float32)
    y0, gx0, g0 = _forward_and_grads(blocks["unfold"], x, t, mode)
    y1, gx1, g1 = _forward_and_grads(block, _nhwc(x), _nhwc(t), mode)
    y1, gx1 = _nchw(y1), _nchw(gx1)
    names = [p.name for p in blocks["unfold"].trainable_params()]
    assert names == [p.name for p in block.trainable_params()]
    # Three or four convolutions' float32 summation-order differences (K <= 576 products each; see CONV_TOL in
    # test_onednn.py), carried through two GroupNorms: measured <= 1.4e-6 of the scale. 2e-5 holds on any CPU; a
    # dropped add, a shortcut read in another layout or a bprop giving it no gradient errs by O(1).
    tol = 2e-5
    _assert_close(y1, y0, tol, "output")
    _assert_close(gx1, gx0, tol, "d/dx")
    for name, a, b in zip(names, g1, g0):
        _assert_close(a, b, tol, f"d/d{name}")


# ----------------------------------------------------------------------------------------------
# The channels-last stem pool


def _stem_pool_ref(x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero pad 1, 3x3/2 max pool of an (N, H, W, C) x; dx: each window's gradient to its first maximum in
    row-major order over the padded window, dropped when that is a padded zero."""
    n, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((n, ho, wo, c), x.dtype)
    dx = np.zeros_like(x)
    s_idx, c_idx = np.meshgrid(np.arange(n), np.arange(c), indexing="ij")
    for i in range(ho):
        for j in range(wo):
            window = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(n, 9, c)
            y[:, i, j] = window.max(1)
            first = window.argmax(1)  # numpy: the first maximum
            a, b = 2 * i + first // 3 - 1, 2 * j + first % 3 - 1  # in x's coordinates
            inside = (a >= 0) & (a < h) & (b >= 0) & (b < w)
            np.add.at(dx, (s_idx[inside], a[inside], b[inside], c_idx[inside]), dy[:, i, j][inside])
    return y, dx


# Odd and even heights and widths (the output size rounds up), a map smaller than one window, H != W.
_POOL_CASES = [
    pytest.param(values, hw, "pynative", id=f"{values}-{hw[0]}x{hw[1]}")
    for values in ("ties", "negative", "random")
    for hw in ((7, 6), (8, 9), (1, 1), (2, 3), (12, 10))
] + [pytest.param("ties", (7, 6), "graph", id="ties-7x6-graph"), pytest.param("negative", (8, 9), "graph", id="negative-8x9-graph")]


@needs_compiler
@pytest.mark.parametrize("values,hw,mode", _POOL_CASES)
def test_stem_pool_matches_numpy(values, hw, mode):
    """StemPoolNHWC and its gradient against numpy, exactly: the forward is a max (no rounding), and with integer
    values and gradients every sum is exact. "ties": integers in [-2, 2], so many windows have several maxima,
    and a 0 in x ties with a padded zero (whichever comes first in row-major order takes the gradient);
    "negative": all below zero, so every border window's maximum is a padded zero and its gradient is dropped."""
    rng = np.random.default_rng(hw[0] * 10 + hw[1])
    shape = (2, *hw, 5)
    if values == "ties":
        x = rng.integers(-2, 3, shape)
    elif values == "negative":
        x = -rng.integers(1, 4, shape)
    else:
        x = rng.standard_normal(shape)
    x = x.astype(np.float32)
    ho, wo = (hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1
    dy = rng.integers(-8, 9, (2, ho, wo, 5)).astype(np.float32)
    pool = cpu_kernels.stem_pool()
    assert pool is not None, cpu_kernels.status()

    def weighted(a, t):
        return (pool(a) * t).sum()

    def pool_only(a):
        return pool(a)

    grad_fn = ms.value_and_grad(weighted, 0)
    _mode(mode)
    try:
        if mode == "graph":
            grad_fn = ms.jit(grad_fn)
        _, dx = grad_fn(ms.Tensor(x), ms.Tensor(dy))
        y = (ms.jit(pool_only) if mode == "graph" else pool_only)(ms.Tensor(x))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    y_ref, dx_ref = _stem_pool_ref(x, dy)
    assert y.shape == y_ref.shape
    np.testing.assert_array_equal(y.asnumpy(), y_ref)
    np.testing.assert_array_equal(dx.asnumpy(), dx_ref)
    if values == "negative":
        assert (y_ref[:, 0] == 0).all() and (y_ref[:, :, 0] == 0).all()  # the padded zeros did win the border


def _negative_border_state(unfold: ResNetV2, seed: int) -> dict[str, np.ndarray]:
    """Margined parameters, the stem's filters each a centre tap (plus 0.1 % noise, so the channels differ):
    standardised, a filter is +c at the centre and about -c/147 elsewhere, so on an image near -1 the stem conv
    gives about (in-window taps / 147 - 1) * c: ~0 inside (the image's noise decides) and clearly negative (by >= 8 %
    of the map's scale, measured) in the output's first two rows and columns, whose taps reach into the conv's zero
    padding. The pool's first row and column of windows then all have a padded zero as their maximum."""
    state = _margined_state(unfold, seed)
    w = 0.001 * np.random.default_rng(seed).standard_normal(state["stem.conv.weight"].shape)
    w[:, :, 3, 3] += 1.0
    state["stem.conv.weight"] = w.astype(np.float32)
    return state


@needs_onednn
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_model_with_negative_stem_border_matches_unfold(mode):
    """The model's features and every gradient on onednn (StemPoolNHWC: the padded zero takes the border windows'
    gradient and drops it) against unfold (an explicit zero pad, MindSpore's max pool, the pad's gradient sliced
    off), on a stem output negative all along its border."""
    unfold = ResNetV2((1, 1, 1, 1), 1, num_classes=0, conv_impl="unfold", eager_jit=False)
    dnnl = ResNetV2((1, 1, 1, 1), 1, num_classes=0, conv_impl="onednn", eager_jit=False)
    state = _negative_border_state(unfold, 0)
    _load(unfold, state)
    _load(dnnl, state)
    for seed in range(40):  # a clear winner in every pool window (see test_onednn._clear_input)
        x = (-1 + 0.1 * np.random.default_rng(seed).uniform(-1, 1, (2, 3, 64, 48))).astype(np.float32)
        stem = unfold.forward_intermediates(ms.Tensor(x), indices=[0], stop_early=True, intermediates_only=True)[0].asnumpy()
        if _pool_margin(stem) > 5e-6:
            break
    else:
        raise AssertionError("no image among 40 with a clear winner in every stem max-pool window")
    # The premise: the stem conv output is negative on its first two rows and columns (the border windows).
    assert (stem[:, :, :2] < 0).all() and (stem[:, :, :, :2] < 0).all()
    assert (stem[:, :, 2:-2, 2:-2] > 0).any()  # and not everywhere: the interior has real maxima
    # As test_onednn.test_small_model_onednn_matches_unfold (14 convolutions' summation-order differences), but this
    # net is touchier: the stem output is a cancellation (a near-constant image under zero-mean filters), and an
    # input change of 1e-6 moves its gradients by up to 2.5e-5 of their scale on one path alone. Measured between the
    # paths: <= 9e-6 (stage-0 weights). 1e-4 holds on any CPU. A border window's gradient sent to an input position
    # instead of dropped puts the input gradient off by 2.5x its scale; one sent to the neighbouring channel, 8e-3.
    _assert_paths_agree(dnnl, unfold, x, mode, 1e-4)


# ----------------------------------------------------------------------------------------------
# GroupNorm kernels: gamma's length


@needs_compiler
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc-kernel", "nchw-kernel"])
def test_group_norm_fed_the_wrong_layout_raises(channels_last):
    """A GroupNormAct(64) given a map in the other layout whose last (or second) axis happens to divide into the 32
    groups: the kernel sees 32 "channels" and a 64-long gamma, and refuses (error 3, raised by MindSpore) instead
    of normalising the wrong axis with half of gamma. The backward kernels check alike."""
    gn = GroupNormAct(64, channels_last=channels_last)
    assert gn._kernel is not None, cpu_kernels.status()
    kernel = "GroupNormActNHWC" if channels_last else "GroupNormAct"
    x = np.random.default_rng(0).standard_normal((2, 64, 4, 32) if channels_last else (2, 32, 4, 64)).astype(np.float32)
    # MindSpore's words for an AOT kernel's non-zero return: "... function(GroupNormActNHWC) is 3. ..."
    with pytest.raises(RuntimeError, match=re.escape(f"({kernel}) is 3")):
        gn(ms.Tensor(x)).asnumpy()
    # Its backward, called directly with a forward of the right layout and a gamma of the wrong length.
    grad = cpu_kernels._group_norm_act_nhwc_grad if channels_last else cpu_kernels._group_norm_act_grad
    right = _nhwc(x) if channels_last else _nchw(x)
    y, stats = gn._kernel(ms.Tensor(right), gn.gamma, gn.beta, gn._kernel_cfg)
    with pytest.raises(RuntimeError, match=re.escape(f"({kernel}Grad) is 3")):
        grad(ms.Tensor(right), ms.Tensor(np.ones(32, np.float32)), y, y, stats, gn._kernel_cfg)[0].asnumpy()
