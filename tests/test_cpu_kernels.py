"""bit_zoo's CPU kernels (cpu_kernels.py): exact against float64, differentiable, and a fallback that always works."""

from __future__ import annotations

import os
import shutil

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from bit_zoo.models import cpu_kernels
from bit_zoo.models.layers import GroupNormAct, StdConv2d

needs_compiler = pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler on this machine")


def _reset():
    """Forget every process-wide choice of cpu_kernels: each of its functools.cache functions, found rather than
    listed, so that one added later is not missed. The oneDNN convolutions too: they are built on top of library()
    and must follow its choice (a stale dnnl_library() would keep conv_impl "auto" on "onednn", whose channels-last
    GroupNorm needs library(); a stale conv2d_prepared() kept the operators of the portable build's library after
    test_onednn's portable-build test, so eval-mode convolutions ran another build than training-mode ones)."""
    for f in vars(cpu_kernels).values():
        if callable(getattr(f, "cache_clear", None)) and getattr(f, "__module__", None) == cpu_kernels.__name__:
            f.cache_clear()


def kernels_switched_on(monkeypatch):
    """Generator for autouse fixtures: the suite also runs with BIT_ZOO_CPU_KERNELS=0 (every other test then takes
    MindSpore's forms); the kernels' own tests still test the kernels. Only such a run pays for forgetting the cached choice."""
    if cpu_kernels.ENV not in os.environ:
        yield
        return
    monkeypatch.delenv(cpu_kernels.ENV)
    _reset()
    yield
    _reset()


@pytest.fixture(autouse=True)
def _kernels_not_switched_off(monkeypatch):
    yield from kernels_switched_on(monkeypatch)


@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    """A private kernel cache; the process-wide choice is forgotten before and after. A user's
    BIT_ZOO_CPU_KERNELS=0 (the suite run with the kernels off) does not apply to the kernels' own tests."""
    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    _reset()
    yield tmp_path / "home" / "kernels"
    _reset()


def _group_norm_ref(x, gamma, beta, groups=32, eps=1e-5, relu=True):
    n, c = x.shape[:2]
    a = x.astype(np.float64).reshape(n, groups, -1)
    y = ((a - a.mean(2, keepdims=True)) / np.sqrt(a.var(2, keepdims=True) + eps)).reshape(x.shape)
    y = y * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)
    return np.maximum(y, 0) if relu else y


class _Loss(nn.Cell):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def construct(self, x, t):
        return (self.cell(x) * t).sum()


def _grads(cell, x, t):
    cell.set_train(True)
    loss = _Loss(cell)
    loss.set_train(True)
    return ms.grad(loss, grad_position=0, weights=cell.trainable_params())(ms.Tensor(x), ms.Tensor(t))


def _batchnorm_form(cell):
    """The same cell without the kernel: MindSpore's BatchNorm form, as when the kernels are unavailable."""
    cell._kernel = None
    return cell


@needs_compiler
def test_kernels_are_used_on_cpu(fresh_kernels):
    gn = GroupNormAct(64)
    assert gn._kernel is not None, cpu_kernels.status()
    assert cpu_kernels.status().startswith("in use")
    assert cpu_kernels.build_kind() == ("native" if cpu_kernels._cpu_identity() else "portable")
    assert len(list(fresh_kernels.glob("bit_cpu-*.so"))) == 1
    assert GroupNormAct(64, conv_impl="native")._kernel is not None  # on CPU, whichever convolution path


@needs_compiler
@pytest.mark.parametrize("act", [True, False])
def test_group_norm_kernel_matches_float64_and_the_batchnorm_form(act):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 64, 5, 7)) * 2 + 3).astype(np.float32)  # shifted: a one-pass variance would lose digits
    gamma = (1 + 0.2 * rng.standard_normal(64)).astype(np.float32)
    beta = (0.2 * rng.standard_normal(64)).astype(np.float32)
    gn = GroupNormAct(64, act=act)
    assert gn._kernel is not None, cpu_kernels.status()
    gn.gamma.set_data(ms.Tensor(gamma))
    gn.beta.set_data(ms.Tensor(beta))
    ref = _group_norm_ref(x, gamma, beta, relu=act)
    for training in (False, True):  # the kernel in both modes
        gn.set_train(training)
        ours = gn(ms.Tensor(x)).asnumpy()
        assert np.abs(ours - ref).max() <= 2e-7 * np.abs(ref).max()
    batchnorm_form = _batchnorm_form(gn)(ms.Tensor(x)).asnumpy()
    assert np.abs(batchnorm_form - ref).max() <= 2e-6 * np.abs(ref).max()


@needs_compiler
def test_kernels_differentiate_like_the_batchnorm_form():
    """Gradients through the kernels (training mode) equal those of MindSpore's BatchNorm form."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 64, 6, 6)) + 1).astype(np.float32)
    t = rng.standard_normal((2, 64, 6, 6)).astype(np.float32)
    gn = GroupNormAct(64)
    gn.gamma.set_data(ms.Tensor((1 + 0.3 * rng.standard_normal(64)).astype(np.float32)))
    gn.beta.set_data(ms.Tensor((0.3 * rng.standard_normal(64)).astype(np.float32)))
    conv = StdConv2d(64, 64, 3, padding=1)
    conv.weight.set_data(ms.Tensor((rng.standard_normal((64, 64, 3, 3)) * 0.1 + 0.02).astype(np.float32)))
    for cell in (gn, conv):
        assert cell._kernel is not None, cpu_kernels.status()
        (gx_k, gw_k) = _grads(cell, x, t)
        (gx_b, gw_b) = _grads(_batchnorm_form(cell), x, t)
        for a, b in zip((gx_k, *gw_k), (gx_b, *gw_b)):
            a, b = a.asnumpy(), b.asnumpy()
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), type(cell).__name__


@needs_compiler
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_both_modes_run_the_kernels(training):
    """Training and evaluation alike go through the kernels (the training step got faster with them); an
    eval-mode conv on the oneDNN path standardises inside its own operator (the weight prepared once)."""
    calls = []

    def spy(kernel):
        def run(*args):
            calls.append(kernel)
            return kernel(*args)

        return run

    gn, conv = GroupNormAct(64), StdConv2d(64, 64, 3, padding=1)
    for cell in (gn, conv):
        assert cell._kernel is not None, cpu_kernels.status()
        cell._kernel = spy(cell._kernel)
        cell.set_train(training)
    if conv.conv._dnnl_std is not None and not training:
        conv.conv._dnnl_std = spy(conv.conv._dnnl_std)
    x = np.random.default_rng(5).standard_normal((2, 64, 4, 4)).astype(np.float32)
    conv(gn(ms.Tensor(x)))
    assert len(calls) == 2


@needs_compiler
def test_weight_standardization_kernel_matches_float64():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((32, 16, 3, 3)) * 0.05 + 0.3).astype(np.float32)
    conv = StdConv2d(16, 32, 3, padding=1)
    assert conv._kernel is not None, cpu_kernels.status()
    conv.weight.set_data(ms.Tensor(w))
    conv.set_train(False)
    a = w.astype(np.float64).reshape(32, -1)
    ref = ((a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-10)).reshape(w.shape)
    assert np.abs(conv.standardized_weight(ms.float32).asnumpy() - ref).max() <= 1e-6


def test_without_a_compiler_the_batchnorm_form_runs(fresh_kernels, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh_kernels / "no-such-compiler"))
    gn = GroupNormAct(64)
    assert gn._kernel is None
    assert cpu_kernels.status().startswith("unavailable"), cpu_kernels.status()
    assert "no-such-compiler" in cpu_kernels.status()
    gn.set_train(False)
    x = np.random.default_rng(3).standard_normal((2, 64, 4, 4)).astype(np.float32)
    ref = _group_norm_ref(x, np.ones(64, np.float32), np.zeros(64, np.float32))
    assert np.abs(gn(ms.Tensor(x)).asnumpy() - ref).max() <= 2e-6


def test_a_failing_compile_is_reported_and_falls_back(fresh_kernels, monkeypatch):
    fake = fresh_kernels.parent / "fake-cxx"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'fatal error: omp.h: No such file' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    assert cpu_kernels.library() is None
    assert "omp.h" in cpu_kernels.status()
    assert not list(fresh_kernels.glob("*")), "a failed build leaves nothing in the cache"


def test_switched_off_by_the_environment(fresh_kernels, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert cpu_kernels.group_norm_act() is None and cpu_kernels.std_weight() is None
    assert cpu_kernels.status().startswith("off") and cpu_kernels.build_kind() == "off"


@needs_compiler
def test_a_damaged_cached_library_is_rebuilt(fresh_kernels):
    first = cpu_kernels.library()
    assert first is not None
    first.unlink()  # a new file: this process has the old one mapped
    first.write_bytes(b"not an ELF file")
    _reset()
    again = cpu_kernels.library()
    assert again == first and again.read_bytes()[:4] == b"\x7fELF"
    assert cpu_kernels.status().startswith("in use")


@needs_compiler
def test_an_aot_white_list_that_excludes_the_cache_falls_back(fresh_kernels, monkeypatch, tmp_path):
    monkeypatch.setenv("MS_CUSTOM_AOT_WHITE_LIST", str(tmp_path / "elsewhere"))
    assert cpu_kernels.library() is None
    assert "legal path" in cpu_kernels.status(), cpu_kernels.status()


@needs_compiler
def test_a_model_in_graph_mode_uses_them_and_agrees_with_training_form(fresh_kernels):
    """A graph-mode R50x1 on the kernels gives the features of the same model on MindSpore's BatchNorm form."""
    import bit_zoo

    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = bit_zoo.create_model("bit_s_r50x1", num_classes=10)
        x = ms.Tensor(np.random.default_rng(4).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32))
        net.set_train(False)
        ours = net.forward_features(x).asnumpy()
        assert cpu_kernels.status().startswith("in use")
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    _reset()
    shutil.rmtree(fresh_kernels, ignore_errors=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cpu_kernels.ENV, "0")
        plain = bit_zoo.create_model("bit_s_r50x1", num_classes=10)
        plain.set_train(False)
        ms.load_param_into_net(plain, {p.name: ms.Parameter(p.data.copy(), name=p.name) for p in net.get_parameters()})
        ref = plain.forward_features(x).asnumpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@needs_compiler
def test_an_unwritable_cache_falls_back(fresh_kernels, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("BIT_ZOO_HOME", str(blocker))
    assert cpu_kernels.library() is None
    assert cpu_kernels.status().startswith("unavailable"), cpu_kernels.status()
    assert GroupNormAct(64)._kernel is None


@needs_compiler
def test_built_for_this_cpu_and_portable_when_the_compiler_refuses(fresh_kernels, monkeypatch):
    """-march=native first, keyed by this CPU; a compiler that refuses it gets the portable build."""
    sets = cpu_kernels._flag_sets()
    if cpu_kernels._cpu_identity() is not None:
        assert "-march=native" in sets[0][0] and sets[0][1] == cpu_kernels._cpu_identity()
    assert "-march=native" not in sets[-1][0] and sets[-1][1] == "portable"
    real = shutil.which("g++") or shutil.which("c++")
    picky = fresh_kernels.parent / "picky-cxx"
    picky.parent.mkdir(parents=True)
    picky.write_text(f'#!/bin/sh\ncase "$*" in *-march=native*) echo "unknown -march" >&2; exit 1;; esac\nexec {real} "$@"\n')
    picky.chmod(0o755)
    monkeypatch.setenv("CXX", str(picky))
    path = cpu_kernels.library()
    assert path is not None, cpu_kernels.status()
    assert cpu_kernels.build_kind() == "portable"
    assert len(list(fresh_kernels.glob("bit_cpu-*.so"))) == 1
    assert path.read_bytes()[:4] == b"\x7fELF"
