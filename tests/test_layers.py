"""StdConv2d's CPU "unfold" path against the native convolution, GroupNormAct against nn.GroupNorm."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import mindspore as ms
import numpy as np
import pytest
from conftest import onednn_buildable
from mindspore import nn, ops

from bit_zoo.models import cpu_kernels
from bit_zoo.models.layers import GroupNormAct, StdConv2d, resolve_conv_impl
from bit_zoo.models.resnetv2 import ResNetV2

# (in, out, kernel, stride, padding, input size): the stem, the 3x3 (stride 1 and 2), the projection.
CONV_SHAPES = [
    pytest.param(3, 8, 7, 2, 3, 20, id="stem7x7s2"),
    pytest.param(8, 8, 3, 1, 1, 9, id="3x3s1"),
    pytest.param(8, 16, 3, 2, 1, 10, id="3x3s2"),
    pytest.param(8, 16, 3, 2, 1, 9, id="3x3s2-odd"),
    pytest.param(8, 16, 1, 2, 0, 10, id="1x1s2"),
]


def _onednn_possible() -> bool:
    """conv_impl "onednn" must work here: the operators can be built and the kernels are not switched off."""
    return onednn_buildable() and os.environ.get(cpu_kernels.ENV, "1") != "0"


needs_onednn = pytest.mark.skipif(not _onednn_possible(), reason="no oneDNN operators here (compiler, MindSpore < 2.9, or kernels off)")


@pytest.fixture
def graph_mode():
    """Graph mode (inside the test's own directory, see conftest: failed compiles write ./rank_0); PyNative again afterwards."""
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


class _Weighted(nn.Cell):
    """sum(net(x) * t): a loss whose gradient is t, so every output element is checked."""

    def __init__(self, net: nn.Cell) -> None:
        super().__init__()
        self.net = net

    def construct(self, x, t):
        return (self.net(x) * t).sum()


def _forward_and_grads(net: nn.Cell, x: ms.Tensor, t: np.ndarray, jit: bool = False):
    grad_fn = ms.value_and_grad(_Weighted(net), 0, net.trainable_params())
    if jit:
        grad_fn = ms.jit(grad_fn)
    _, (gx, gparams) = grad_fn(x, ms.Tensor(t))
    return net(x).asnumpy(), gx.asnumpy(), [g.asnumpy() for g in gparams]


def _close(a, b, rtol=1e-4):
    """Equal up to float32 rounding of sums: tolerance relative to the tensor's scale."""
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(1.0, float(np.abs(b).max())))


def _conv_pair(cin, cout, k, s, p):
    native = StdConv2d(cin, cout, k, stride=s, padding=p, conv_impl="native")
    unfold = StdConv2d(cin, cout, k, stride=s, padding=p, conv_impl="unfold")
    unfold.weight.set_data(native.weight.data.copy())
    return native, unfold


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("cin,cout,k,s,p,size", CONV_SHAPES)
def test_unfold_matches_native(cin, cout, k, s, p, size, mode):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        rng = np.random.default_rng(0)
        native, unfold = _conv_pair(cin, cout, k, s, p)
        x = ms.Tensor(rng.standard_normal((2, cin, size, size)).astype(np.float32))
        out = (size + 2 * p - k) // s + 1
        t = rng.standard_normal((2, cout, out, out)).astype(np.float32)
        y0, gx0, (gw0,) = _forward_and_grads(native, x, t, jit=mode == "graph")
        y1, gx1, (gw1,) = _forward_and_grads(unfold, x, t, jit=mode == "graph")
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert y1.shape == (2, cout, out, out)
    _close(y1, y0)
    _close(gx1, gx0)
    _close(gw1, gw0)


@pytest.mark.parametrize("impl", ["native", "unfold"])
def test_weight_standardization_is_upstreams(impl):
    """Per output channel: (w - mean) / sqrt(biased var + 1e-10), then a plain convolution."""
    rng = np.random.default_rng(1)
    conv = StdConv2d(4, 6, 3, padding=1, conv_impl=impl)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.1 + 0.05
    conv.weight.set_data(ms.Tensor(w))
    ref = (w - w.mean(axis=(1, 2, 3), keepdims=True)) / np.sqrt(w.var(axis=(1, 2, 3), keepdims=True) + 1e-10)
    _close(conv.standardized_weight(ms.float32).asnumpy(), ref, rtol=1e-5)


@pytest.mark.parametrize("impl", ["native", "unfold"])
def test_groupnormact_matches_nn_groupnorm(impl):
    rng = np.random.default_rng(2)
    gn = GroupNormAct(64, conv_impl=impl)
    gn.gamma.set_data(ms.Tensor(rng.standard_normal(64).astype(np.float32)))
    gn.beta.set_data(ms.Tensor(rng.standard_normal(64).astype(np.float32)))

    class Reference(nn.Cell):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(32, 64, eps=1e-5)

        def construct(self, x):
            return ops.relu(self.norm(x))

    ref = Reference()
    ref.norm.gamma.set_data(gn.gamma.data.copy())
    ref.norm.beta.set_data(gn.beta.data.copy())
    x = ms.Tensor((rng.standard_normal((3, 64, 5, 5)) * 3 + 1).astype(np.float32))
    t = rng.standard_normal((3, 64, 5, 5)).astype(np.float32)
    y0, gx0, (gg0, gb0) = _forward_and_grads(ref, x, t)
    y1, gx1, (gg1, gb1) = _forward_and_grads(gn, x, t)
    _close(y1, y0)
    _close(gx1, gx0)
    _close(gg1, gg0)
    _close(gb1, gb0)


@pytest.mark.parametrize("impl", ["native", "unfold"])
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_groupnormact_without_act_and_repeated_calls(mode, impl):
    """No ReLU when act=False; repeated calls agree (the placeholder statistics stay put in graph mode too)."""
    rng = np.random.default_rng(3)
    gn = GroupNormAct(32, act=False, conv_impl=impl)
    x = rng.standard_normal((2, 32, 4, 4)).astype(np.float32)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        ys = [gn(ms.Tensor(x)).asnumpy() for _ in range(3)]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    g = x.reshape(2, 32, -1)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    _close(ys[0], ref)
    assert (ys[0] < 0).any()
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])


def test_public_interface_unchanged():
    conv = StdConv2d(4, 8, 3, stride=2, padding=1, eps=1e-10, conv_impl="unfold")
    assert [p.name for p in conv.get_parameters()] == ["weight"]
    assert conv.weight.shape == (8, 4, 3, 3)
    gn = GroupNormAct(64, num_groups=32, eps=1e-5, act=True)
    assert [p.name for p in gn.get_parameters()] == ["gamma", "beta"]


@pytest.mark.parametrize("impl", ["native", "unfold", pytest.param("onednn", marks=needs_onednn)])
def test_fp16_input(impl):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    conv = StdConv2d(8, 32, 3, stride=2, padding=1, conv_impl=impl)
    gn = GroupNormAct(32, conv_impl=impl)
    y32 = gn(conv(ms.Tensor(x))).asnumpy()
    y16 = gn(conv(ms.Tensor(x, ms.float16)))
    assert y16.dtype == ms.float16
    np.testing.assert_allclose(y16.asnumpy().astype(np.float32), y32, atol=2e-2 * np.abs(y32).max())


def test_resolve_conv_impl(monkeypatch):
    monkeypatch.delenv("BIT_ZOO_CONV_IMPL", raising=False)
    # On CPU: the oneDNN operators where they build (test_onednn.py covers both branches), else the unfold rewrite.
    on_cpu = ms.get_context("device_target") == "CPU"
    assert resolve_conv_impl("auto") == (("onednn" if cpu_kernels.dnnl_library() is not None else "unfold") if on_cpu else "native")
    assert resolve_conv_impl("native") == "native"
    monkeypatch.setenv("BIT_ZOO_CONV_IMPL", "native")
    assert resolve_conv_impl("auto") == "native"
    assert resolve_conv_impl("unfold") == "unfold"  # an explicit argument wins over the environment
    monkeypatch.setenv("BIT_ZOO_CONV_IMPL", "winograd")
    with pytest.raises(ValueError, match="winograd"):
        resolve_conv_impl("auto")


def test_small_model_unfold_matches_native():
    rng = np.random.default_rng(5)
    native = ResNetV2((1, 1, 1, 1), 1, num_classes=0, conv_impl="native")
    unfold = ResNetV2((1, 1, 1, 1), 1, num_classes=0, conv_impl="unfold")
    ms.load_param_into_net(unfold, {k: ms.Parameter(v.data.copy(), name=k) for k, v in native.parameters_dict().items()})
    x = ms.Tensor(rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32))
    _close(unfold.forward_features(x).asnumpy(), native.forward_features(x).asnumpy())


def test_graph_mode_train_step_unfold(graph_mode):
    """A whole (small) model compiles and trains in graph mode on the unfold path: jit(value_and_grad + SGD)."""
    ms.set_seed(0)
    net = ResNetV2((1, 1, 1, 1), 1, num_classes=10, conv_impl="unfold")
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    opt = nn.SGD(net.trainable_params(), learning_rate=0.1, momentum=0.9)

    def forward(x, y):
        return loss_fn(net(x), y)

    grad_fn = ms.value_and_grad(forward, None, opt.parameters)

    @ms.jit
    def train_step(x, y):
        loss, grads = grad_fn(x, y)
        opt(grads)
        return loss

    rng = np.random.default_rng(6)
    x = ms.Tensor(rng.uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32))
    y = ms.Tensor(np.arange(4, dtype=np.int32))
    stem_before = net.stem.conv.weight.asnumpy().copy()
    losses = [float(train_step(x, y).asnumpy()) for _ in range(3)]
    assert np.isfinite(losses).all()
    assert losses[0] == pytest.approx(np.log(10), rel=1e-4)  # zero head: uniform logits
    assert losses[-1] < losses[0]
    assert not np.allclose(net.stem.conv.weight.asnumpy(), stem_before)


def test_no_reference_conv_kernel(tmp_path):
    """ONEDNN_VERBOSE: the unfold path never reaches oneDNN's reference ("ref") convolution.

    A PyNative train step of a small model (the kernels are the ones graph mode picks too).
    """
    script = textwrap.dedent(
        """
        import mindspore as ms, numpy as np
        from bit_zoo.models.resnetv2 import ResNetV2
        net = ResNetV2((1, 1, 1, 1), 1, num_classes=10, conv_impl="unfold")
        opt = ms.nn.SGD(net.trainable_params())
        def loss(x):
            return net(x).sum()
        grad_fn = ms.value_and_grad(loss, None, opt.parameters)
        opt(grad_fn(ms.Tensor(np.ones((2, 3, 32, 32), np.float32)))[1])
        print("DONE")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ONEDNN_VERBOSE="1", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    path = tmp_path / "onednn_probe.py"  # graph mode compiles source files only, not -c strings
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "DONE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    convs = [
        line for line in proc.stdout.splitlines() if line.startswith("onednn_verbose") and ",exec," in line and ",convolution," in line
    ]
    assert convs, "no oneDNN convolution seen: is ONEDNN_VERBOSE honoured?"
    # onednn_verbose,v1,primitive,exec,cpu,convolution,<implementation>,<propagation>,...
    impls = {line.split(",")[6] for line in convs}
    assert not [impl for impl in impls if "ref" in impl], impls


class _ConvNorm(nn.Cell):
    def __init__(self, impl: str) -> None:
        super().__init__()
        self.conv = StdConv2d(4, 8, 3, padding=1, conv_impl=impl)
        self.norm = GroupNormAct(8, num_groups=2, conv_impl=impl)

    def construct(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("impl", ["native", "unfold", pytest.param("onednn", marks=needs_onednn)])
@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_amp_o2_keeps_statistics_in_float32(mode, impl, amp_stack_guard):
    """A near-constant filter (1 + 1e-3 noise: the noise is below fp16's spacing at 1) under amp O2
    gives the fp32 result up to fp16 rounding of the convolution. With the weight read in fp16 its
    variations vanish and the standardisation divides ~0 by sqrt(1e-10): ~25% of the output scale."""
    rng = np.random.default_rng(7)
    w = (1.0 + 1e-3 * rng.standard_normal((8, 4, 3, 3))).astype(np.float32)
    x = ms.Tensor(rng.standard_normal((2, 4, 6, 6)).astype(np.float32))

    def build():
        net = _ConvNorm(impl)
        net.conv.weight.set_data(ms.Tensor(w))
        return net

    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        ref = build()(x).asnumpy()
        amp = ms.amp.auto_mixed_precision(build(), "O2")
        out = amp(x).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    diff = np.abs(out - ref).max()
    assert diff <= 2e-3 * np.abs(ref).max(), diff
    assert diff > 0  # the convolution itself did run in fp16
