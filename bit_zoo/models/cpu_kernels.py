"""bit_zoo's own CPU kernels for GroupNorm (+ affine + ReLU), the weight standardisation and the gradient norm.

Why: on the CPU "unfold" path both normalisations run on MindSpore 2.10's BatchNorm kernel (see
layers.py), which runs on one thread and accumulates its statistics in float32. Measured on the
2-core machine (docs/speed.md): a GroupNorm of 16x256x32x32 took 11.4 ms there (and as much with
runtime_num_threads=1), 5.9 ms here with the affine and ReLU included; standardising a 512x512x3x3
weight 7.4 ms there, 3.4 ms here. The statistics are accumulated in double, so the results are
also closer to exact (a GroupNorm's largest error 8e-8 of its largest value against 5e-7).

The kernels (bit_zoo/models/_kernels/bit_cpu.cc) are MindSpore AOT custom operators, compiled once per
machine with the system C++ compiler ($CXX, else g++ or c++; OpenMP; -march=native when the CPU
is known) into $BIT_ZOO_HOME/kernels/ under a name that hashes the source, the compiler, its flags
and the CPU, written to a temporary name and renamed (concurrent ranks are safe). They run a
self-check against numpy before first use.

Used by layers.py on CPU, whichever convolution path, in training and evaluation alike (each has
its backward kernel), and by the training step for the global gradient norm (sum_squares). Anything that stops them (no compiler, a failed build or self-check,
an MS_CUSTOM_AOT_WHITE_LIST that excludes the kernel directory) leaves the BatchNorm form in use,
with one log line saying why. BIT_ZOO_CPU_KERNELS=0 turns them off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import ops

from ..utils.atomic import atomic_path, write_text_atomic
from ..utils.paths import home_dir
from ..weights.pretrained import sha256_file

__all__ = ["ENV", "SOURCE", "build_kind", "conv2d", "conv2d_add", "conv2d_cfg", "conv2d_prepared", "dnnl_library", "dnnl_status", "group_norm_act", "library", "std_weight", "stem_pool", "status", "sum_squares"]

_logger = logging.getLogger(__name__)

ENV = "BIT_ZOO_CPU_KERNELS"
SOURCE = Path(__file__).parent / "_kernels" / "bit_cpu.cc"
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++14")
_status = "not tried"


_build_kind: str | None = None


def _set_build(target: str) -> None:
    global _build_kind
    _build_kind = "portable" if target == "portable" else "native"


def build_kind() -> str:
    """'native' (-march=native for this CPU), 'portable', or 'off' when the kernels are not in use.

    Results of training runs depend on it (the float summation order differs): benchmarks/results
    records it beside each figure."""
    return _build_kind if library() is not None and _build_kind else "off"


def status() -> str:
    """Why the kernels are or are not in use (for logs and tests)."""
    return _status


def _compiler() -> list[str] | None:
    """$CXX (may carry a launcher, e.g. "ccache g++"), else g++ or c++ on the PATH."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("g++") or shutil.which("c++")
    return [found] if found else None


class _CompileError(RuntimeError):
    pass


def _cpu_identity() -> str | None:
    """This CPU's model and instruction-set flags (Linux /proc/cpuinfo), or None when unknown."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return None
    keep = ("model name", "flags", "features", "cpu part", "cpu implementer")
    seen: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in keep and name not in seen:
            seen[name] = " ".join(value.split())
    return "\n".join(f"{k}: {v}" for k, v in sorted(seen.items())) if ("flags" in seen or "features" in seen) else None


def _flag_sets() -> list[tuple[tuple[str, ...], str]]:
    """(flags, what they are built for), best first.

    -march=native (AVX2 / AVX-512 on x86): the training step ran 8 % faster with it than with the
    portable build (docs/speed.md). Such a library is only valid on the CPU it was built for, so
    its cache key carries that CPU's model and instruction-set flags: a cache shared between
    machines then holds one build per kind of CPU. Unknown CPU, or a compiler that refuses the
    flag: the portable build.
    """
    identity = _cpu_identity()
    portable = (_FLAGS, "portable")
    return [((*_FLAGS, "-march=native"), identity), portable] if identity else [portable]


def _build(compiler: list[str], source_path: Path = SOURCE, link: tuple[str, ...] = (), identity: bytes = b"") -> Path:
    """The compiled library for this source, compiler, flags (and CPU); built if not in the cache yet.

    ``link``: extra compiler arguments after the source (include and library paths); ``identity``:
    anything else the build depends on (the oneDNN library it links), part of the cache key."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = source_path.read_bytes() + identity
    errors = []
    for flags, target in _flag_sets():
        key = hashlib.sha256(source + "\0".join((*compiler, version, platform.machine(), *flags, *link, target)).encode()).hexdigest()
        path = home_dir() / "kernels" / f"{source_path.stem}-{key[:16]}.so"
        # The digest written after a build vouches for the file: a damaged or truncated one is rebuilt
        # (a loader check would not do: dlopen answers from memory for a path already loaded).
        digest = path.with_name(path.name + ".sha256")
        if path.is_file() and digest.is_file():
            if digest.read_text().strip() == sha256_file(path):
                if source_path == SOURCE:
                    _set_build(target)
                return path
            _logger.warning("bit_zoo CPU kernels: %s does not match its digest; rebuilding it", path)
        try:
            with atomic_path(path) as tmp:
                done = subprocess.run([*compiler, *flags, "-o", str(tmp), str(source_path), *link], capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise _CompileError(f"{' '.join([*compiler, *flags])} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        except _CompileError as e:
            errors.append(str(e))
            continue
        write_text_atomic(digest, sha256_file(path) + "\n")
        _logger.info("bit_zoo CPU kernels compiled to %s (%s)", path, " ".join(flags))
        if source_path == SOURCE:
            _set_build(target)
        return path
    raise RuntimeError("; ".join(errors))


def _same_as_first(*args):
    return args[0]


def _grad_shapes(x, gamma, *_):
    return x, gamma, gamma  # dx, dgamma, dbeta


def _norm_shape(x, *_):
    return x, [2, x[0], x[1]]  # y, stats: per (sample, channel) its group's mean and 1 / std


def _norm_shape_nhwc(x, *_):
    return x, [2, x[0], x[-1]]  # channels-last x: (N, H, W, C)


def _stem_pool_shape(x, *_):
    return [x[0], (x[1] - 1) // 2 + 1, (x[2] - 1) // 2 + 1, x[3]]


def _scalar(*_):
    return [1]


def _float32(*_):
    return ms.float32


def _norm_dtype(x, *_):
    return x, x


# Each operator's output shape and dtype functions, the one place they are stated.
_SIGNATURES = {
    "GroupNormAct": (_norm_shape, _norm_dtype),
    "GroupNormActGrad": (_grad_shapes, _grad_shapes),
    "GroupNormActNHWC": (_norm_shape_nhwc, _norm_dtype),
    "GroupNormActNHWCGrad": (_grad_shapes, _grad_shapes),
    "StdWeight": (_same_as_first, _same_as_first),
    "StemPoolNHWC": (_stem_pool_shape, _same_as_first),
    "StemPoolNHWCGrad": (_same_as_first, _same_as_first),
    "StdWeightGrad": (_same_as_first, _same_as_first),
    "SumSquares": (_scalar, _float32),
}


def _custom(path: Path, name: str, bprop=None) -> ops.Custom:
    """The AOT operator `name` of the library, with its signature from _SIGNATURES."""
    shapes, dtypes = _SIGNATURES[name]
    return ops.Custom(f"{path}:{name}", out_shape=shapes, out_dtype=dtypes, func_type="aot", bprop=bprop)


def _self_check(path: Path) -> None:
    """Run the three forward kernels once on small inputs against numpy in float64; raise if they disagree."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 8, 3, 5)) * 2 + 3).astype(np.float32)
    g = (1 + 0.2 * rng.standard_normal(8)).astype(np.float32)
    b = (0.2 * rng.standard_normal(8)).astype(np.float32)
    y = _custom(path, "GroupNormAct")(ms.Tensor(x), ms.Tensor(g), ms.Tensor(b), ms.Tensor(np.array([4, 1e-5, 1], np.float32)))[0]
    a = x.astype(np.float64).reshape(2, 4, -1)
    ref = (a - a.mean(2, keepdims=True)) / np.sqrt(a.var(2, keepdims=True) + 1e-5)
    ref = np.maximum(ref.reshape(x.shape) * g.reshape(1, 8, 1, 1) + b.reshape(1, 8, 1, 1), 0)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    v = _custom(path, "StdWeight")(ms.Tensor(w), ms.Tensor(np.array([1e-10], np.float32)))
    wa = w.astype(np.float64).reshape(6, -1)
    wref = ((wa - wa.mean(1, keepdims=True)) / np.sqrt(wa.var(1, keepdims=True) + 1e-10)).reshape(w.shape)
    parts = (w, x)
    total = _custom(path, "SumSquares")(*[ms.Tensor(p) for p in parts])
    sref = sum(float((p.astype(np.float64) ** 2).sum()) for p in parts)
    cfg = ms.Tensor(np.array([4, 1e-5, 1], np.float32))
    y_last = _custom(path, "GroupNormActNHWC")(ms.Tensor(x.transpose(0, 2, 3, 1).copy()), ms.Tensor(g), ms.Tensor(b), cfg)[0]
    xs = rng.standard_normal((2, 7, 6, 5)).astype(np.float32)
    padded = np.pad(xs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    pooled = np.stack(
        [np.stack([padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max((1, 2)) for j in range(3)], 1) for i in range(4)], 1
    )
    for what, out, expected in (
        ("StemPoolNHWC", _custom(path, "StemPoolNHWC")(ms.Tensor(xs)), pooled),
        ("GroupNormAct", y, ref),
        ("GroupNormActNHWC", y_last, ref.transpose(0, 2, 3, 1)),
        ("StdWeight", v, wref),
        ("SumSquares", total / sref, np.ones(1)),
    ):
        err = float(np.abs(out.asnumpy() - expected).max())
        if not err <= 1e-5:
            raise RuntimeError(f"self-check of {what} failed: max error {err:.3g}")


@functools.cache
def library() -> Path | None:
    """The checked kernel library, or None (the reason is in status() and logged once)."""
    global _status
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        _status = f"off (${ENV}={os.environ[ENV]})"
        return None
    if ms.get_context("device_target") != "CPU":
        _status = "not used: the device is not CPU"
        return None
    compiler = _compiler()
    if compiler is None:
        _status = (
            "unavailable: no C++ compiler ($CXX, g++ or c++); install one (e.g. apt install g++) for faster CPU training and inference"
        )
        _logger.info("bit_zoo CPU kernels %s", _status)
        return None
    try:
        path = _build(compiler)
        _self_check(path)
    except Exception as e:  # any failure leaves the BatchNorm form, which is correct, only slower
        _status = f"unavailable: {type(e).__name__}: {e}"
        _logger.warning(
            "bit_zoo CPU kernels %s; using MindSpore's BatchNorm form (slower on CPU). They are built in %s "
            "(set BIT_ZOO_HOME for another place); set %s=0 to skip them.",
            _status,
            home_dir() / "kernels",
            ENV,
        )
        return None
    _status = f"in use: {path}"
    return path


# The backward operators of the library in use, set with the forward ones. The bprop functions
# are module-level, not closures: MindSpore caches a parsed bprop by its function object, and a
# closure re-created after a reset (tests do that) could reuse a freed one's identity.
_group_norm_act_grad = None
_group_norm_act_nhwc_grad = None
_std_weight_grad = None
_stem_pool_grad = None


def _group_norm_act_bprop(x, gamma, beta, cfg, out, dout):
    dx, dgamma, dbeta = _group_norm_act_grad(x, gamma, out[0], dout[0], out[1], cfg)
    return dx, dgamma, dbeta, ops.zeros_like(cfg)


def _group_norm_act_nhwc_bprop(x, gamma, beta, cfg, out, dout):
    dx, dgamma, dbeta = _group_norm_act_nhwc_grad(x, gamma, out[0], dout[0], out[1], cfg)
    return dx, dgamma, dbeta, ops.zeros_like(cfg)


def _stem_pool_bprop(x, out, dout):
    return (_stem_pool_grad(x, dout),)


def _std_weight_bprop(w, cfg, out, dout):
    return _std_weight_grad(w, dout, cfg), ops.zeros_like(cfg)


@functools.cache
def group_norm_act(channels_last: bool = False) -> ops.Custom | None:
    """(x, gamma, beta, cfg=[groups, eps, relu]) -> (relu?(GroupNorm(x) * gamma + beta), stats), or None; differentiable.

    x is (N, C, ...), or with channels_last (N, ..., C)."""
    global _group_norm_act_grad, _group_norm_act_nhwc_grad
    path = library()
    if path is None:
        return None
    if channels_last:
        _group_norm_act_nhwc_grad = _custom(path, "GroupNormActNHWCGrad")
        return _custom(path, "GroupNormActNHWC", _group_norm_act_nhwc_bprop)
    _group_norm_act_grad = _custom(path, "GroupNormActGrad")
    return _custom(path, "GroupNormAct", _group_norm_act_bprop)


@functools.cache
def stem_pool() -> ops.Custom | None:
    """Channels-last (N, H, W, C) -> zero-pad 1 then 3x3/2 max pool (BiT's stem pool), or None; differentiable."""
    global _stem_pool_grad
    path = library()
    if path is None:
        return None
    _stem_pool_grad = _custom(path, "StemPoolNHWCGrad")
    return _custom(path, "StemPoolNHWC", _stem_pool_bprop)


@functools.cache
def std_weight() -> ops.Custom | None:
    """(w, cfg=[eps]) -> per output channel (w - mean) / sqrt(var + eps), or None; differentiable."""
    global _std_weight_grad
    path = library()
    if path is None:
        return None
    _std_weight_grad = _custom(path, "StdWeightGrad")
    return _custom(path, "StdWeight", _std_weight_bprop)


@functools.cache
def sum_squares() -> ops.Custom | None:
    """(t1, t2, ...) float32 tensors -> (1,) float32 sum of all their squared elements, or None; not differentiable."""
    path = library()
    return None if path is None else _custom(path, "SumSquares")


# ----------------------------------------------------------------------------------------------
# Convolutions on oneDNN (_kernels/bit_dnnl.cc), the CPU's conv_impl "onednn".
#
# A second library: it links MindSpore's own oneDNN (mindspore/lib/libdnnl.so.3, shipped from
# MindSpore 2.9; 2.7 and 2.8 ship oneDNN 2, whose API differs), so a failure here leaves the
# kernels above in use and the convolutions on the unfold rewrite.

DNNL_SOURCE = Path(__file__).parent / "_kernels" / "bit_dnnl.cc"
_DNNL_HEADERS = Path(__file__).parent / "_kernels" / "onednn"
_dnnl_status = "not tried"


def dnnl_status() -> str:
    """Why the oneDNN convolutions are or are not in use (for logs and tests)."""
    return _dnnl_status


def _mindspore_onednn() -> Path:
    """MindSpore's oneDNN 3 library; raises when this MindSpore ships none."""
    path = Path(ms.__file__).parent / "lib" / "libdnnl.so.3"
    if not path.is_file():
        raise RuntimeError(f"MindSpore {ms.__version__} ships no oneDNN 3 library (mindspore/lib/libdnnl.so.3; MindSpore 2.9 and later do)")
    return path


def _conv_reference(x: np.ndarray, w: np.ndarray, stride: int, pad: int, dil: int) -> np.ndarray:
    """A float64 convolution in numpy (sum over the kernel taps), for the self-check."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1, (wd + 2 * pad - dil * (k - 1) - 1) // stride + 1
    y = np.zeros((n, o, ho, wo))
    for a in range(k):
        for b in range(k):
            patch = xp[:, :, a * dil : a * dil + stride * (ho - 1) + 1 : stride, b * dil : b * dil + stride * (wo - 1) + 1 : stride]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, a, b].astype(np.float64))
    return y


def _dnnl_self_check(path: Path) -> None:
    """Forward against numpy in float64; both backward kernels by the adjoint identity
    <dy, conv(x, w)> = <dx, x> = <dw, w> (the convolution is linear in x and in w); and no
    reference implementation of oneDNN (which would be slower than the unfold rewrite)."""
    import ctypes

    rng = np.random.default_rng(0)
    for stride, pad, dil, k, last in ((2, 1, 1, 3, False), (1, 2, 2, 3, True), (2, 0, 1, 1, True), (2, 3, 1, 7, False)):
        x = rng.standard_normal((2, 16, 9, 9)).astype(np.float32)
        w = rng.standard_normal((32, 16, k, k)).astype(np.float32)
        cfg = conv2d_cfg(stride, pad, dil, last)
        ref = _conv_reference(x, w, stride, pad, dil)
        if last:  # the same check in channels-last memory
            x, ref = x.transpose(0, 2, 3, 1).copy(), ref.transpose(0, 2, 3, 1).copy()
        y = conv2d()(ms.Tensor(x), ms.Tensor(w), cfg).asnumpy()
        dy = rng.standard_normal(ref.shape).astype(np.float32)
        dx = _dnnl_bwd_data(ms.Tensor(x), ms.Tensor(w), ms.Tensor(dy), cfg).asnumpy()
        dw = _dnnl_bwd_weights(ms.Tensor(w), ms.Tensor(x), ms.Tensor(dy), cfg).asnumpy()
        scale = float(np.abs(ref).max())
        inner = float((dy.astype(np.float64) * ref).sum())
        checks = (
            ("DnnlConv", float(np.abs(y - ref).max()) / scale),
            ("DnnlConvBwdData", abs(float((dx.astype(np.float64) * x).sum()) - inner) / (abs(inner) + scale)),
            ("DnnlConvBwdWeights", abs(float((dw.astype(np.float64) * w).sum()) - inner) / (abs(inner) + scale)),
        )
        if last:  # the fused residual add: conv + shortcut; the inference forms on the raw weight
            s = rng.standard_normal(ref.shape).astype(np.float32)
            ya = conv2d_add()(ms.Tensor(x), ms.Tensor(w), ms.Tensor(s), cfg).asnumpy()
            checks += (("DnnlConvAdd", float(np.abs(ya - (ref + s)).max()) / scale),)
            eps = ms.Tensor(np.array([1e-10], np.float32))
            wa = w.astype(np.float64).reshape(w.shape[0], -1)
            w_std = ((wa - wa.mean(1, keepdims=True)) / np.sqrt(wa.var(1, keepdims=True) + 1e-10)).reshape(w.shape)
            ref_std = _conv_reference(x.transpose(0, 3, 1, 2), w_std, stride, pad, dil).transpose(0, 2, 3, 1)
            conv_std, conv_std_add = conv2d_prepared()
            for _ in range(2):  # the second call reuses the prepared weights
                yp = conv_std(ms.Tensor(x), ms.Tensor(w), cfg, eps).asnumpy()
                checks += (("DnnlConvStd", float(np.abs(yp - ref_std).max()) / float(np.abs(ref_std).max())),)
            yq = conv_std_add(ms.Tensor(x), ms.Tensor(w), ms.Tensor(s), cfg, eps).asnumpy()
            checks += (("DnnlConvStdAdd", float(np.abs(yq - (ref_std + s)).max()) / float(np.abs(ref_std).max())),)
        for what, err in checks:
            if not err <= 1e-5:
                raise RuntimeError(f"self-check of {what} failed: relative error {err:.3g}")
    lib = ctypes.CDLL(str(path))
    lib.BitDnnlImpl.restype = ctypes.c_char_p
    shape = ctypes.c_int64 * 4
    for kind in range(3):
        for last in (0, 1):
            impl = lib.BitDnnlImpl(kind, shape(16, 64, 32, 32), shape(64, 64, 3, 3), 1, 1, 1, last).decode()
            if not impl or "ref" in impl.split(":")[0]:
                raise RuntimeError(f"oneDNN offers only {impl or 'no'} implementation for a 3x3 convolution on this CPU")


@functools.cache
def dnnl_library() -> Path | None:
    """The checked oneDNN convolution library, or None (the reason is in dnnl_status() and logged once)."""
    global _dnnl_status
    if library() is None:  # same switches and compiler as the other kernels
        _dnnl_status = f"not used: {status()}"
        return None
    try:
        onednn = _mindspore_onednn()
        stat = onednn.stat()
        link = (f"-I{_DNNL_HEADERS}", f"-L{onednn.parent}", "-l:libdnnl.so.3", f"-Wl,-rpath,{onednn.parent}")
        headers = b"".join(p.read_bytes() for p in sorted(_DNNL_HEADERS.rglob("*.h*")))
        path = _build(_compiler(), DNNL_SOURCE, link, headers + f"{ms.__version__}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        _dnnl_path[0] = path
        _dnnl_self_check(path)
    except Exception as e:  # the unfold rewrite stays, correct and slower
        _dnnl_status = f"unavailable: {type(e).__name__}: {e}"
        _dnnl_path[0] = None
        conv2d.cache_clear()  # the operators the self-check made must not outlive it
        conv2d_add.cache_clear()
        conv2d_prepared.cache_clear()
        _logger.warning("bit_zoo oneDNN convolutions %s; convolutions use the unfold rewrite (slower on CPU)", _dnnl_status)
        return None
    _dnnl_status = f"in use: {path}"
    return path


_dnnl_path: list[Path | None] = [None]  # set while dnnl_library() builds and checks, so conv2d() can run the self-check
_dnnl_bwd_data = None
_dnnl_bwd_weights = None


def _dnnl_conv_bprop(x, w, cfg, out, dout):
    return _dnnl_bwd_data(x, w, dout, cfg), _dnnl_bwd_weights(w, x, dout, cfg), ops.zeros_like(cfg)


def _dnnl_conv_add_bprop(x, w, shortcut, cfg, out, dout):
    return _dnnl_bwd_data(x, w, dout, cfg), _dnnl_bwd_weights(w, x, dout, cfg), dout, ops.zeros_like(cfg)


def _third(x, w, shortcut, cfg, *_):
    return shortcut


def _std_conv_out_shape(x, w, cfg, eps):
    return _conv_out_shape(x, w, cfg)


def _prepared_std(w, eps):
    return std_weight()(w, eps)


def _dnnl_conv_std_bprop(x, w, cfg, eps, out, dout):
    # The gradient of an eval-mode forward (saliency, adversarial inputs): standardise again and
    # go through the same backward kernels as training.
    v = _prepared_std(w, eps)
    dv = _dnnl_bwd_weights(v, x, dout, cfg)
    return _dnnl_bwd_data(x, v, dout, cfg), _std_weight_grad(w, dv, eps), ops.zeros_like(cfg), ops.zeros_like(eps)


def _dnnl_conv_std_add_bprop(x, w, shortcut, cfg, eps, out, dout):
    dx, dw, dcfg, deps = _dnnl_conv_std_bprop(x, w, cfg, eps, out, dout)
    return dx, dw, dout, dcfg, deps


def conv2d_cfg(stride: int, padding: int, dilation: int, channels_last: bool = False) -> ms.Tensor:
    """The geometry argument of conv2d(): a tensor of shape (stride, padding + 1, dilation, layout),
    layout 1 for NCHW activations, 2 for channels-last (N, H, W, C) ones.

    The geometry is its shape, not its values: MindSpore infers a custom operator's output shape
    from the input shapes alone, and keeps one shape function per operator name (a second
    operator of the same name with another stride was given the first one's output shape)."""
    return ms.Tensor(np.zeros((stride, padding + 1, dilation, 2 if channels_last else 1), np.float32))


def _conv_out_shape(x, w, cfg):
    stride, padding, dilation, last = cfg[0], cfg[1] - 1, cfg[2], cfg[3] == 2
    h, wd = (x[1], x[2]) if last else (x[2], x[3])
    ho, wo = ((n + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for n, k in ((h, w[2]), (wd, w[3])))
    return [x[0], ho, wo, w[0]] if last else [x[0], w[0], ho, wo]


@functools.cache
def conv2d() -> ops.Custom | None:
    """(x NCHW, w OIHW, conv2d_cfg(stride, padding, dilation)) -> the convolution on oneDNN, or None; differentiable."""
    global _dnnl_bwd_data, _dnnl_bwd_weights
    path = _dnnl_path[0] if _dnnl_path[0] is not None else dnnl_library()
    if path is None:
        return None
    _dnnl_bwd_data = ops.Custom(f"{path}:DnnlConvBwdData", out_shape=_same_as_first, out_dtype=_same_as_first, func_type="aot")
    _dnnl_bwd_weights = ops.Custom(f"{path}:DnnlConvBwdWeights", out_shape=_same_as_first, out_dtype=_same_as_first, func_type="aot")
    return ops.Custom(f"{path}:DnnlConv", out_shape=_conv_out_shape, out_dtype=_same_as_first, func_type="aot", bprop=_dnnl_conv_bprop)


@functools.cache
def conv2d_add() -> ops.Custom | None:
    """(x, w, shortcut, conv2d_cfg(..., channels_last=True)) -> conv2d(x, w) + shortcut, or None; differentiable.

    The residual add of a block done by oneDNN as it writes the convolution's output (a post-op),
    not in a separate pass over the tensor. Channels-last tensors only."""
    path = _dnnl_path[0] if _dnnl_path[0] is not None else dnnl_library()
    if path is None or conv2d() is None:
        return None
    return ops.Custom(f"{path}:DnnlConvAdd", out_shape=_third, out_dtype=_third, func_type="aot", bprop=_dnnl_conv_add_bprop)


@functools.cache
def conv2d_prepared() -> tuple[ops.Custom, ops.Custom] | None:
    """The inference forms, or None: (conv(x, w_raw, cfg, eps), conv_add(x, w_raw, shortcut, cfg, eps)).

    They take the raw weight and its standardisation's eps ((1,) float32) and keep the
    standardised weight in oneDNN's format between calls while the raw weight's bytes stay the
    same (a 64-bit digest is checked on every call; bit_dnnl.cc). Differentiable (through the
    training kernels)."""
    path = _dnnl_path[0] if _dnnl_path[0] is not None else dnnl_library()
    if path is None or conv2d() is None or std_weight() is None:
        return None
    return (
        ops.Custom(f"{path}:DnnlConvStd", out_shape=_std_conv_out_shape, out_dtype=_same_as_first, func_type="aot", bprop=_dnnl_conv_std_bprop),
        ops.Custom(f"{path}:DnnlConvStdAdd", out_shape=_third, out_dtype=_third, func_type="aot", bprop=_dnnl_conv_std_add_bprop),
    )
