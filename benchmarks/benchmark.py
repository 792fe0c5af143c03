"""Speed and memory of BiT R50x1 (or any bit_zoo model) on every CPU runtime a user could pick, on random data.

    python -m benchmarks.benchmark --peers --rounds 2 --no-mindcv --csv benchmarks/results/cpu.csv
    python -m benchmarks.benchmark --torch-reference --rounds 3      # bit_s_r50x1, 128 px, batch 16, graph, fp32
    python -m benchmarks.benchmark --clip-grad-norm 1 --ema-decay 0.9999 --loss-scale dynamic --no-mindcv

Rows (one subprocess per worker, so a peak RSS is its own and a failed compile's ./rank_0 dump
lands in a temporary directory; with --rounds N the workers run in turn, N times):

* ``bit_zoo <model> Trainer``: train.py's own step, ``Trainer.step`` with the step options given
  (--accum-steps, --clip-grad-norm, --ema-decay, --loss-scale) and train.py's SGD (nn.Momentum),
  in graph mode (--mode); infer = the eval-mode model as evaluate() calls it;
* ``<model> nn.TrainOneStepCell``: the floor, ``TrainOneStepCell(WithLossCell(net, loss), opt)``
  of the same model, built in the same process; the two rows' timed blocks alternate;
* ``bit_zoo <model> Trainer, PyNative`` (--pynative-row): the same in PyNative mode, no floor;
* ``timm resnetv2_50x1_bit`` (--torch-reference): the standard PyTorch loop (zero_grad, backward,
  step), eager; infer = the eval-mode model under inference_mode;
* ``timm ... torch.compile`` (--torch-compile): inference of ``torch.compile(model)`` (inductor;
  the first call includes the compile, cold or from inductor's cache as the machine has it);
* ``timm ... ONNX`` / ``bit_zoo ... ONNX`` (--onnx): each project's ONNX export (torch.onnx, and
  bit_zoo's export_model) in onnxruntime's CPU provider; the first call includes creating the session;
* ``mindcv BiT_resnet50 ...``: the cell mindcv's train.py builds (``mindcv.utils.create_trainer``
  with its defaults), first round only (~1 min a step on CPU: --mindcv-warmup / --mindcv-steps);
* with ``--teacher NAME`` (e.g. bit_m_r152x2), in a worker of their own: ``distill step``, train.py's
  distillation step (the Trainer over DistillNetWithLoss: the frozen teacher's forward on the batch
  plus the student's step), ``student step``, the same student's plain Trainer step (the two
  alternate in that process), and ``teacher forward``, the frozen eval-mode teacher alone; peak RSS
  of the first and last are taken after their warmup, in that worker (the student step's is the
  ``bit_zoo`` row's).

--peers turns on every runtime row above except mindcv. PyTorch and onnxruntime use --threads
threads (default: all cores); MindSpore its own default thread pool.

Columns: first step / first infer s = the first call's wall time, compilation (or session creation)
included; for the Trainer rows, whether bit_zoo's compile cache had the graph (hit) or not (miss;
--cold-cache: always, from an empty cache of the worker's own); img/s over the timed calls after --warmup; GFLOP/s = the network's convolution and
classifier FLOPs per image (forward_flops; a training step counted as 3x the forward) times img/s;
% peak = against the best fp32 matmul this machine ran in the same round with the same FLOPs as
one forward batch (numpy and torch, --threads threads); peak RSS = the worker's ru_maxrss after
training. The header names the CPU, its vector instruction set, the versions and the load average.
--csv appends every row, with machine, versions, load and the command, to a results file.
"""

from __future__ import annotations

import bit_zoo_malloc

if __name__ == "__main__":
    bit_zoo_malloc.preload()  # first, before MindSpore loads: this script again with jemalloc, if installed (see the module)

import argparse
import csv
import json
import logging
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from bit_zoo.data.from_config import DataConfig
from bit_zoo.errors import ConfigError
from bit_zoo.models.factory import create_model
from bit_zoo.models.options import ModelConfig
from bit_zoo.models.registry import get_weights  # `python -m benchmarks.benchmark` has imported the package (and its registry) already
from bit_zoo.options import SystemConfig, at_least, option, parse_options
from bit_zoo.training.distill import DistillConfig, DistillNetWithLoss, freeze_teacher
from bit_zoo.training.optim import OptimConfig, create_optimizer
from bit_zoo.training.train_step import StepConfig, Trainer
from bit_zoo.utils._timm import import_timm
from bit_zoo.utils.runner import run_cli

PROG = "python -m benchmarks.benchmark"
_logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent
TIMM_NAME = "resnetv2_50x1_bit"  # timm's twin of bit_s_r50x1 (the torch rows always run it)
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward-data + backward-weights, each about one forward's FLOPs


def forward_flops(layers: tuple[int, ...], width_factor: int, img_size: int, num_classes: int, in_channels: int = 3) -> int:
    """FLOPs (2 x multiply-adds) of one image's forward pass: every convolution and the classifier.

    GroupNorm, ReLU, the residual adds and the pools are left out (under 1 % of the total).
    """
    w = 64 * width_factor
    h = (img_size + 2 * 3 - 7) // 2 + 1  # stem 7x7/2, pad 3
    macs = h * h * in_channels * 49 * w
    h = (h + 2 - 3) // 2 + 1  # zero pad 1, max pool 3x3/2
    cin = w
    for s, depth in enumerate(layers):
        mid = w * 2**s
        out = 4 * mid
        for u in range(depth):
            stride = 2 if u == 0 and s > 0 else 1
            ho = (h + 2 - 3) // stride + 1  # the 3x3 conv carries the stride
            if u == 0:
                macs += ho * ho * cin * out  # projection shortcut
            macs += h * h * cin * mid + ho * ho * mid * mid * 9 + ho * ho * mid * out
            h, cin = ho, out
    return 2 * (macs + cin * num_classes)


def machine_info() -> dict:
    """CPU model, core count and vector instruction set (from /proc/cpuinfo), and oneDNN's ISA cap if set."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "AVX" if "avx" in flags else "SSE"
    if "avx512_bf16" in flags:
        isa += " (+BF16)"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return {"cpu": model, "cores": os.cpu_count() or 1, "isa": isa + (f", ONEDNN_MAX_CPU_ISA={cap}" if cap else "")}


def versions() -> str:
    """The installed versions of every runtime the rows use (without importing them), and the malloc of bit_zoo's rows."""
    out = []
    for dist in ("mindspore", "torch", "timm", "onnxruntime", "onnx"):
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    preloaded = os.environ.get("BIT_ZOO_MALLOC_PRELOADED")  # the workers inherit this process's LD_PRELOAD (bit_zoo_malloc)
    return ", ".join(out) + f"; malloc: {Path(preloaded).name if preloaded else 'glibc'} for bit_zoo's rows, glibc for the others"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# Workers (run inside the subprocess)


def _time_calls(call, *, warmup: int, steps: int, sync=lambda result: result):
    """The protocol every framework gets: one first call (compile included), warmup - 1 more, `steps` timed.

    `sync` waits for an asynchronous result; it runs after every untimed call and once after the
    timed loop. Returns (first call s, mean s per timed call, the last result after sync).
    """
    t0 = time.perf_counter()
    sync(call())
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        sync(call())
    t0 = time.perf_counter()
    for _ in range(steps):
        out = call()
    out = sync(out)
    return first, (time.perf_counter() - t0) / steps, out


def _first_calls(call, warmup: int) -> float:
    """Wall time of the first call (compilation included); then warmup - 1 untimed calls."""
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        call()
    return first


def _alternate(calls: dict, *, steps: int, blocks: int) -> dict:
    """Mean seconds per call of each (already warm) synchronous call, timed in alternating blocks of `steps`."""
    spent = dict.fromkeys(calls, 0.0)
    for _ in range(blocks):
        for key, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                call()
            spent[key] += time.perf_counter() - t0
    return {key: spent[key] / (steps * blocks) for key in calls}


def _record(
    name: str,
    role: str,
    runtime: str,
    conv_impl: str,
    args: argparse.Namespace,
    train,
    infer,
    rss_train: float | None,
    warmup: int,
    steps: int,
):
    """One result row from the (first s, s per call, last result) timings of training and inference (None: not measured)."""
    return {
        "name": name,
        "role": role,
        "runtime": runtime,
        "conv_impl": conv_impl,
        "train_img_s": args.batch_size / train[1] if train else None,
        "infer_img_s": args.batch_size / infer[1] if infer else None,
        "first_step_s": train[0] if train else None,
        "first_infer_s": infer[0] if infer else None,
        "peak_rss_train_mib": rss_train,
        "peak_rss_mib": _peak_rss_mib(),
        "steps": steps,
        "warmup": warmup,
    }


def _step_config(args: argparse.Namespace):
    return StepConfig(
        accum_steps=args.accum_steps,
        clip_grad_norm=args.clip_grad_norm,
        loss_scale=args.loss_scale,
        loss_scale_value=args.loss_scale_value,
        ema_decay=args.ema_decay,
    )


def _ms_data(args: argparse.Namespace):
    import mindspore as ms
    import numpy as np

    rng = np.random.default_rng(0)
    dtype = ms.float16 if args.precision == "fp16" else ms.float32
    x = rng.uniform(-1, 1, (args.batch_size, 3, args.image_size, args.image_size)).astype(np.float32)
    y = rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)
    return x, y, dtype


def _micro_batches(args: argparse.Namespace, accum_steps: int) -> list:
    """The random batch as train.py's step takes it: accum_steps (x, y) micro-batches."""
    import mindspore as ms

    x_np, y_np, dtype = _ms_data(args)
    micro = args.batch_size // accum_steps
    return [(ms.Tensor(x_np[i * micro : (i + 1) * micro], dtype), ms.Tensor(y_np[i * micro : (i + 1) * micro])) for i in range(accum_steps)]


def _bit_zoo_model(args: argparse.Namespace, name: str | None = None):
    """(net, the net under the run's AMP level) as create_model returns it, seeded alike for every row."""
    import mindspore as ms

    ms.set_seed(0)
    net = create_model(name or args.model, num_classes=args.num_classes, conv_impl=args.conv_impl, recompute=args.recompute)
    return net, ms.amp.auto_mixed_precision(net, "O2") if args.precision == "fp16" else net


def _train_py_trainer(args: argparse.Namespace, net_with_loss=None):
    """(net, amp net, Trainer): train.py's path, create_optimizer (SGD = nn.Momentum over the lr array) and Trainer."""
    import numpy as np

    net, amp = _bit_zoo_model(args)
    # lr schedule of 100k steps: indexed by the optimizer's step counter
    opt = create_optimizer(net.trainable_params(), OptimConfig(opt="sgd", momentum=0.9), np.full(100_000, 1e-3, np.float32))
    loss_cell = net_with_loss(amp) if net_with_loss else None
    trainer = Trainer(amp, opt, _step_config(args), soft_labels=False, net_with_loss=loss_cell)
    trainer.net_with_loss.set_train(True)
    return net, amp, trainer


def _bit_zoo_worker(args: argparse.Namespace) -> list[dict]:
    """bit_zoo through train.py's own step (Trainer), and (unless --no-floor) the plain TrainOneStepCell floor.

    Both are built in this process and their timed blocks alternate, so the load of a shared
    machine hits both alike. Peak RSS of the Trainer row is taken before the floor model exists.
    """
    import mindspore as ms
    from mindspore import nn

    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE, device_target="CPU")
    if args.cold_cache:  # a compile cache of this worker's own (it runs in a fresh temporary directory): the first step compiles
        os.environ["BIT_ZOO_COMPILE_CACHE"] = str(Path("compile_cache").resolve())
    x_np, y_np, dtype = _ms_data(args)
    cfg = _step_config(args)
    net, amp, trainer = _train_py_trainer(args)
    batches = _micro_batches(args, cfg.accum_steps)
    calls = {"trainer": lambda: trainer.step(batches)[0]}
    first = {"trainer": _first_calls(calls["trainer"], args.warmup)}
    rss = {"trainer": _peak_rss_mib()}
    if not args.no_floor:
        floor_net, floor_amp = _bit_zoo_model(args)
        floor_opt = nn.Momentum(floor_net.trainable_params(), 1e-3, 0.9)
        loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
        cell = nn.TrainOneStepCell(nn.WithLossCell(floor_amp, loss_fn), floor_opt)
        cell.set_train(True)
        x, y = ms.Tensor(x_np, dtype), ms.Tensor(y_np)
        calls["floor"] = lambda: float(cell(x, y).asnumpy())
        first["floor"] = _first_calls(calls["floor"], args.warmup)
        rss["floor"] = _peak_rss_mib()
    per_call = _alternate(calls, steps=args.steps, blocks=args.blocks)

    # Inference as evaluate() and validate.py run it: the eval-mode Cell called on a batch.
    x = ms.Tensor(x_np, dtype)
    amp.set_train(False)
    infer = _time_calls(lambda: amp(x), warmup=args.warmup, steps=args.steps * args.blocks, sync=lambda out: out.asnumpy())
    runtime = f"MindSpore {ms.__version__} {'graph' if args.mode == 'graph' else 'PyNative'} ({net.conv_impl})"
    cache = ", ".join(f"{role} {status}" for role, status in trainer.compile_cache.items() if status != "pynative")
    options = _options_label(cfg) + (", PyNative" if args.mode == "pynative" else "")
    rows = [
        _record(f"bit_zoo {args.model} Trainer{options}", "bit_zoo", runtime, net.conv_impl, args, (first["trainer"], per_call["trainer"], None),
                infer, rss["trainer"], args.warmup, args.steps * args.blocks)
    ]  # fmt: skip
    rows[0]["compile_cache"] = cache or None
    if "floor" in calls:
        rows.append(
            _record(f"{args.model} nn.TrainOneStepCell", "floor", runtime, net.conv_impl, args, (first["floor"], per_call["floor"], None),
                    None, rss["floor"], args.warmup, args.steps * args.blocks)
        )  # fmt: skip
    return rows


def _pynative_worker(args: argparse.Namespace) -> list[dict]:
    """--pynative-row: the bit_zoo worker in PyNative mode (Trainer and inference, no floor)."""
    args = argparse.Namespace(**{**vars(args), "mode": "pynative", "no_floor": True})
    return [dict(row, role="bit_zoo_pynative") for row in _bit_zoo_worker(args)]


def _distill_worker(args: argparse.Namespace) -> list[dict]:
    """--teacher: train.py's distillation step against the student's plain step (alternating), and the teacher's forward."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE, device_target="CPU")
    x_np, _, dtype = _ms_data(args)
    x = ms.Tensor(x_np, dtype)
    cfg = _step_config(args)
    batches = _micro_batches(args, cfg.accum_steps)

    # The teacher as train.py builds it (frozen, eval mode, the run's AMP level); random weights: the time is the same.
    teacher = freeze_teacher(_bit_zoo_model(args, args.teacher)[1])
    teacher_fwd = _time_calls(lambda: teacher(x), warmup=args.warmup, steps=args.steps, sync=lambda out: out.asnumpy())
    rss_teacher = _peak_rss_mib()
    distill = _train_py_trainer(args, lambda net: DistillNetWithLoss(net, teacher, soft_labels=False))[2]
    calls = {"distill": lambda: distill.step(batches)[0]}
    first = {"distill": _first_calls(calls["distill"], args.warmup)}
    rss_distill = _peak_rss_mib()
    student = _train_py_trainer(args)[2]
    calls["student"] = lambda: student.step(batches)[0]
    first["student"] = _first_calls(calls["student"], args.warmup)
    per_call = _alternate(calls, steps=args.steps, blocks=args.blocks)
    framework = f"MindSpore {ms.__version__} {args.mode}"
    options = _options_label(cfg)
    n = args.steps * args.blocks
    return [
        _record(f"distill step {args.teacher} -> {args.model}{options}", "distill", framework, teacher.conv_impl, args,
                (first["distill"], per_call["distill"], None), None, rss_distill, args.warmup, n),
        _record(f"student step {args.model}{options}", "student", framework, teacher.conv_impl, args,
                (first["student"], per_call["student"], None), None, None, args.warmup, n),
        _record(f"teacher forward {args.teacher}", "teacher", framework, teacher.conv_impl, args, None, teacher_fwd, rss_teacher,
                args.warmup, args.steps),
    ]  # fmt: skip


def _options_label(cfg) -> str:
    opts = []
    if cfg.accum_steps > 1:
        opts.append(f"accum {cfg.accum_steps}")
    if cfg.clip_grad_norm:
        opts.append(f"clip {cfg.clip_grad_norm:g}")
    if cfg.ema_decay:
        opts.append(f"EMA {cfg.ema_decay:g}")
    if cfg.loss_scale != "none":
        opts.append(f"{cfg.loss_scale} loss scale")
    return f" ({', '.join(opts)})" if opts else ""


def _mindcv_worker(args: argparse.Namespace) -> list[dict]:
    """mindcv's BiT_resnet50 through the training cell mindcv's train.py builds (create_trainer, its defaults)."""
    import mindcv
    import mindspore as ms
    from mindcv.loss import create_loss
    from mindcv.utils import create_trainer
    from mindspore import nn

    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(0)
    x_np, y_np, dtype = _ms_data(args)
    net = mindcv.create_model("BiT_resnet50", num_classes=args.num_classes)
    loss = create_loss(name="CE", reduction="mean", label_smoothing=0.0)
    opt = nn.Momentum(net.trainable_params(), 1e-3, 0.9)
    # train.py's defaults: fixed loss scale 1.0, no overflow drop, no EMA / clipping / accumulation -> mindspore Model's cell.
    model = create_trainer(
        net, loss, opt, metrics=None, amp_level="O2" if args.precision == "fp16" else "O0", amp_cast_list=None,
        loss_scale_type="fixed", loss_scale=1.0, drop_overflow_update=False,
    )  # fmt: skip
    train_net = model.train_network
    train_net.set_train(True)
    x, y = ms.Tensor(x_np, dtype), ms.Tensor(y_np)
    warmup, steps = args.mindcv_warmup, args.mindcv_steps
    train = _time_calls(lambda: float(train_net(x, y).asnumpy()), warmup=warmup, steps=steps)
    rss_train = _peak_rss_mib()
    net.set_train(False)
    infer = _time_calls(lambda: net(x), warmup=warmup, steps=steps, sync=lambda out: out.asnumpy())
    name = f"mindcv BiT_resnet50 {type(train_net).__name__}"
    return [
        _record(name, "mindcv", f"MindSpore {ms.__version__} {args.mode} (mindcv)", "mindcv", args, train, infer, rss_train, warmup, steps)
    ]


def _torch_train_step(args: argparse.Namespace, torch, net, forward):
    """PyTorch's standard step for `net` (SGD with momentum, as the bit_zoo floor), calling `forward` (net or its compiled form)."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    x = torch.empty(args.batch_size, 3, args.image_size, args.image_size).uniform_(-1, 1)
    y = torch.randint(0, args.num_classes, (args.batch_size,))

    def train_step():
        with torch.autocast("cpu", dtype=dtype, enabled=args.precision == "fp16"):
            loss = loss_fn(forward(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return train_step, x, dtype


def _torch_worker(args: argparse.Namespace) -> list[dict]:
    # Lazy: torch and timm are only needed for this reference measurement.
    import torch

    timm = import_timm()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name = TIMM_NAME
    net = timm.create_model(name, pretrained=False, num_classes=args.num_classes)
    train_step, x, dtype = _torch_train_step(args, torch, net, net)
    net.train()
    steps = args.steps * args.blocks  # as many timed images as the bit_zoo rows
    train = _time_calls(train_step, warmup=args.warmup, steps=steps)
    rss_train = _peak_rss_mib()
    net.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=args.precision == "fp16"):
        inference = _time_calls(lambda: net(x), warmup=args.warmup, steps=steps)
    runtime = f"PyTorch {torch.__version__} eager, {torch.get_num_threads()} threads"
    return [_record(f"timm {name}", "torch", runtime, "torch", args, train, inference, rss_train, args.warmup, steps)]


def _timm_eval(args: argparse.Namespace):
    """(torch, timm's eval-mode model, the batch), seeded as the eager row's."""
    import torch

    timm = import_timm()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = timm.create_model(TIMM_NAME, pretrained=False, num_classes=args.num_classes).eval()
    x = torch.empty(args.batch_size, 3, args.image_size, args.image_size).uniform_(-1, 1)
    return torch, net, x


def _torch_compile_worker(args: argparse.Namespace) -> list[dict]:
    """--torch-compile: timm's model under torch.compile (inductor): the training step (forward and
    backward compiled, the optimizer eager, as torch.compile(model) is used), then inference."""
    torch, net, x = _timm_eval(args)
    steps = args.steps * args.blocks
    train_net = import_timm().create_model(TIMM_NAME, pretrained=False, num_classes=args.num_classes).train()
    train_step, _, _ = _torch_train_step(args, torch, train_net, torch.compile(train_net))
    train = _time_calls(train_step, warmup=args.warmup, steps=steps)
    rss_train = _peak_rss_mib()
    compiled = torch.compile(net)
    with torch.inference_mode():
        infer = _time_calls(lambda: compiled(x), warmup=args.warmup, steps=steps)
    runtime = f"PyTorch {torch.__version__} inductor, {torch.get_num_threads()} threads"
    return [_record(f"timm {TIMM_NAME} torch.compile", "torch_compile", runtime, "torch", args, train, infer, rss_train, args.warmup, steps)]


def _ort_infer(args: argparse.Namespace, path: Path):
    """Inference timings of an ONNX file in onnxruntime's CPU provider; the first call creates the session."""
    import numpy as np
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(-1, 1, (args.batch_size, 3, args.image_size, args.image_size)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = []

    def call():
        if not session:
            session.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
        return session[0].run(None, {session[0].get_inputs()[0].name: x})

    infer = _time_calls(call, warmup=args.warmup, steps=args.steps * args.blocks)
    return infer, f"onnxruntime {ort.__version__}, {args.threads} threads"


def export_timm_onnx(args: argparse.Namespace, path: Path) -> float:
    """timm's model (random weights) exported by torch.onnx (TorchScript exporter, opset 17, dynamic batch) to path;
    returns the export's seconds."""
    torch, net, x = _timm_eval(args)
    t0 = time.perf_counter()
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    torch.onnx.export(
        net, (x,), str(path), input_names=["image"], output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False
    )
    return time.perf_counter() - t0


def export_bit_zoo_onnx(args: argparse.Namespace, path: Path) -> float:
    """bit_zoo's own ONNX export (export_model) of args.model with random weights to path; returns the export's seconds."""
    import mindspore as ms

    from bit_zoo.models.export import export_model
    from bit_zoo.weights.loading import model_state

    ms.set_seed(0)
    net = create_model(args.model, num_classes=args.num_classes)
    t0 = time.perf_counter()
    export_model(model_state(net), get_weights(args.model).layers, path)
    return time.perf_counter() - t0


def _ort_timm_worker(args: argparse.Namespace) -> list[dict]:
    """--onnx: timm's model exported by torch.onnx (TorchScript exporter, opset 17), in onnxruntime."""
    path = Path("timm.onnx").resolve()  # the worker runs in its own temporary directory
    export_s = export_timm_onnx(args, path)
    infer, runtime = _ort_infer(args, path)
    row = _record(f"timm {TIMM_NAME} ONNX", "ort_timm", runtime, "onnx", args, None, infer, None, args.warmup, args.steps * args.blocks)
    return [dict(row, export_s=export_s)]


def _ort_bit_zoo_worker(args: argparse.Namespace) -> list[dict]:
    """--onnx: bit_zoo's own ONNX export (export_model) of --model, in onnxruntime."""
    path = Path("bit_zoo.onnx").resolve()
    export_s = export_bit_zoo_onnx(args, path)
    infer, runtime = _ort_infer(args, path)
    row = _record(
        f"bit_zoo {args.model} ONNX", "ort_bit_zoo", runtime, "onnx", args, None, infer, None, args.warmup, args.steps * args.blocks
    )
    return [dict(row, export_s=export_s)]


def _peak_worker(args: argparse.Namespace) -> list[dict]:
    """This machine's fp32 matmul speed at the size of one forward batch (n^3 multiply-adds = its FLOPs / 2)."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    arch = get_weights(args.model)
    flops = forward_flops(arch.layers, arch.width_factor, args.image_size, args.num_classes) * args.batch_size
    n = max(64, round((flops / 2) ** (1 / 3) / 64) * 64)
    a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in (0, 1))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    best = {}
    for lib, mm in (("numpy", lambda: a @ b), ("torch", lambda: torch.mm(ta, tb))):
        mm()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            mm()
            times.append(time.perf_counter() - t0)
        best[lib] = 2 * n**3 / min(times) / 1e9
    return [{"name": f"fp32 matmul {n}x{n}x{n}", "role": "peak", "runtime": f"numpy {np.__version__}, torch {torch.__version__}",
             "peak_gflops": max(best.values()), "numpy_gflops": best["numpy"], "torch_gflops": best["torch"], "matmul_n": n}]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Driver


def _run_worker(which: str, argv: list[str]) -> list[dict]:
    """Run one worker in a fresh interpreter inside a temporary directory; return its rows."""
    with tempfile.TemporaryDirectory(prefix="bit_zoo_bench_") as tmp:
        out = Path(tmp) / "result.json"
        # bit_zoo's rows run as train.py does (jemalloc preloaded when installed); every other runtime on its
        # own default, glibc's malloc: preloaded jemalloc without tuning slowed PyTorch eager by ~40 % here.
        env = dict(os.environ) if which in _BIT_ZOO_WORKERS else bit_zoo_malloc.without(dict(os.environ))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "benchmarks.benchmark", *argv, "--worker", which, "--worker-out", str(out)]
        _logger.info("running %s", which)
        proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stdout.splitlines()[-30:])
            return [{"name": which, "role": which, "error": f"worker exited with {proc.returncode}:\n{tail}"}]
        return json.loads(out.read_text())


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: dict, b: dict, key: str) -> str:
    return "-" if a.get(key) is None or b.get(key) is None else f"x{a[key] / b[key]:.2f}"


# The runtimes bit_zoo's graph-mode inference is held against.
# The other runtimes graph-mode inference is held against. Not bit_zoo's PyNative row: its inference
# is the same compiled MindSpore graph (eager_jit), not another runtime.
INFER_PEERS = ("torch", "torch_compile", "ort_timm", "ort_bit_zoo")


def ratio_lines(rows: list[dict]) -> list[str]:
    """bit_zoo's Trainer row against the floor, mindcv and timm rows of the same round, and the issue's targets."""
    ok = {r["role"]: r for r in rows if "error" not in r}
    ours = ok.get("bit_zoo")
    lines = []
    if {"distill", "student", "teacher"} <= ok.keys():
        d, s, t = 1 / ok["distill"]["train_img_s"], 1 / ok["student"]["train_img_s"], 1 / ok["teacher"]["infer_img_s"]
        lines.append(
            f"distillation step vs the student's step (same process, alternating): x{s / d:.2f} of its speed; per image "
            f"{d * 1e3:.0f} ms = student step {s * 1e3:.0f} ms + teacher forward {t * 1e3:.0f} ms, {(d - s - t) * 1e3:+.0f} ms left over"
        )
    if ours is None:
        return lines
    if "floor" in ok:
        lines.append(
            f"bit_zoo Trainer vs nn.TrainOneStepCell (same process, alternating): train {_ratio(ours, ok['floor'], 'train_img_s')}"
        )
    for role in ("mindcv", "torch", "torch_compile"):
        if role in ok and ok[role].get("train_img_s"):
            o = ok[role]
            lines.append(
                f"bit_zoo Trainer vs {o['name']}: train {_ratio(ours, o, 'train_img_s')}, infer {_ratio(ours, o, 'infer_img_s')}, "
                f"first step {ours['first_step_s']:.1f} s vs {o['first_step_s']:.1f} s"
            )
    return lines + target_lines(ok)


def _verdict(value: float, ok: bool) -> str:
    return f"{value} ({'met' if ok else 'NOT met'})"


def target_lines(ok: dict) -> list[str]:
    """Issue 24's targets, from the rows of one round that ran (role -> row)."""
    ours, lines = ok.get("bit_zoo"), []
    if ours is None:
        return lines
    if "torch" in ok and ours.get("train_img_s") and ok["torch"].get("train_img_s"):
        r = ours["train_img_s"] / ok["torch"]["train_img_s"]
        lines.append(f"target: training >= x1.00 of PyTorch eager: {_verdict(f'x{r:.2f}', r >= 1.0)}")
    peers = [ok[role] for role in INFER_PEERS if role in ok and ok[role].get("infer_img_s")]
    if peers and ours.get("infer_img_s"):
        best = max(peers, key=lambda r: r["infer_img_s"])
        r = ours["infer_img_s"] / best["infer_img_s"]
        lines.append(f"target: graph inference >= x1.00 of the fastest other runtime ({best['name']}): {_verdict(f'x{r:.2f}', r >= 1.0)}")
    if "ort_bit_zoo" in ok and "ort_timm" in ok:
        r = ok["ort_bit_zoo"]["infer_img_s"] / ok["ort_timm"]["infer_img_s"]
        lines.append(f"target: bit_zoo's ONNX >= x1.00 of timm's ONNX in onnxruntime: {_verdict(f'x{r:.2f}', r >= 1.0)}")
    first_step, first_infer = ours.get("first_step_s"), ours.get("first_infer_s")
    if first_step is not None:
        lines.append(f"target: first training step < 5 s: {_verdict(f'{first_step:.1f} s', first_step < 5)}")
    if first_infer is not None:
        lines.append(
            f"target: first inference call < 2 s (after the training graph, same process): {_verdict(f'{first_infer:.1f} s', first_infer < 2)}"
        )
    return lines


def add_flops(rows: list[dict], flops_per_image: int) -> list[dict]:
    """Achieved GFLOP/s of each row (a training step counted as TRAIN_FLOPS_PER_FORWARD forwards)."""
    out = []
    for r in rows:
        r = dict(r)
        if "error" not in r and r.get("role") != "peak":
            r["train_gflops"] = r["train_img_s"] * TRAIN_FLOPS_PER_FORWARD * flops_per_image / 1e9 if r.get("train_img_s") else None
            r["infer_gflops"] = r["infer_img_s"] * flops_per_image / 1e9 if r.get("infer_img_s") else None
        out.append(r)
    return out


def _pct(gflops, peak) -> str:
    return "-" if gflops is None else f"{gflops:.0f}" + (f" ({100 * gflops / peak:.0f}%)" if peak else "")


def format_table(results: list[dict], args: argparse.Namespace, machine: dict | None = None) -> str:
    """The header (settings, machine, versions, peak), the rows of every round and the ratios of each round."""
    opts = _options_label(_step_config(args))
    head = [
        f"model={args.model} img_size={args.image_size} batch={args.batch_size} mode={args.mode} "
        f"precision={args.precision} recompute={args.recompute}{' step options:' + opts if opts else ''}"
    ]
    if machine:
        head.append(
            f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['isa']}; load average {machine['load_before']:.1f} "
            f"before, {machine['load_after']:.1f} after; {args.threads} threads for PyTorch and onnxruntime"
        )
        head.append(f"versions: {machine['versions']}")
        if max(machine["load_before"], machine["load_after"]) > machine["cores"]:
            head.append(
                f"WARNING: load average above the {machine['cores']} cores: other processes shared the CPU, and PyTorch's and "
                "onnxruntime's thread pools lose far more to that than MindSpore's; the ratios between runtimes (and the targets "
                "below) are not those of an idle machine"
            )
    peaks = {r.get("round", 1): r for r in results if r.get("role") == "peak" and "error" not in r}
    for rnd, p in sorted(peaks.items()):
        head.append(
            f"peak (round {rnd}): {p['name']} (the FLOPs of one forward batch): numpy {p['numpy_gflops']:.0f} GFLOP/s, "
            f"torch {p['torch_gflops']:.0f} GFLOP/s"
        )
    cols = ["round", "name", "runtime", "train img/s", "infer img/s", "first step s", "first infer s", "train GFLOP/s", "infer GFLOP/s",
            "peak RSS MiB", "steps"]  # fmt: skip
    rows = []
    for r in results:
        rnd = r.get("round", 1)
        if r.get("role") == "peak":
            continue
        if "error" in r:
            rows.append([str(rnd), r["name"], "ERROR"] + ["-"] * (len(cols) - 3))
            continue
        peak = peaks.get(rnd, {}).get("peak_gflops")
        rows.append(
            [
                str(rnd),
                r["name"],
                r.get("runtime", r.get("conv_impl", "")),
                _fmt(r["train_img_s"], ".2f"),
                _fmt(r["infer_img_s"], ".2f"),
                _fmt(r["first_step_s"], ".1f") + (f" (cache {r['compile_cache']})" if r.get("compile_cache") else ""),
                _fmt(r.get("first_infer_s"), ".1f"),
                _pct(r.get("train_gflops"), peak),
                _pct(r.get("infer_gflops"), peak),
                _fmt(r["peak_rss_train_mib"], ".0f"),
                f"{r['warmup']}+{r['steps']}",
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)] if rows else [len(c) for c in cols]
    lines = head + ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in rows]
    rounds = sorted({r.get("round", 1) for r in results})
    for rnd in rounds:
        # mindcv runs in the first round only: later rounds compare against it too.
        these = [r for r in results if r.get("round", 1) == rnd]
        if not any(r.get("role") == "mindcv" for r in these):
            these += [r for r in results if r.get("role") == "mindcv"]
        for line in ratio_lines(these):
            lines.append(f"round {rnd}: {line}" if len(rounds) > 1 else line)
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']} failed: {r['error']}")
    return "\n".join(lines)


CSV_FIELDS = (
    "date_utc", "commit", "cpu", "cores", "isa", "load_before", "load_after", "versions", "command", "model", "img_size",
    "batch_size", "precision", "threads", "round", "name", "role", "runtime", "train_img_s", "infer_img_s", "first_step_s",
    "first_infer_s", "compile_cache", "train_gflops", "infer_gflops", "peak_gflops", "peak_rss_train_mib", "warmup", "steps", "error",
)  # fmt: skip


def append_csv(path: str | os.PathLike, results: list[dict], meta: dict) -> None:
    """Append one line per row (the peak as a row of its own), with the run's machine, versions and command."""
    path = Path(path)
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != CSV_FIELDS:
            raise ValueError(f"{path} has other columns than this benchmark writes ({', '.join(header[:5])}, ...): pass another --csv file")
        new = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = True
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in results:
            row = {**meta, **r}
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if k in CSV_FIELDS})


def _commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout
        dirty = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return sha.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


BENCH = ("benchmark",)


@dataclass
class BenchConfig:
    precision: str = option("fp32", "fp16 = MindSpore amp O2", choices=("fp32", "fp16"), scripts=BENCH)
    steps: int = option(5, "timed steps per block (train; inference times --steps calls)", check=at_least(1), scripts=BENCH)
    blocks: int = option(2, "alternating timed blocks of the Trainer and floor rows", check=at_least(1), scripts=BENCH)
    warmup: int = option(2, "untimed steps, the first (compiling) one included", check=at_least(1), scripts=BENCH)
    rounds: int = option(1, "repeat the bit_zoo and timm workers, alternating (mindcv runs once)", check=at_least(1), scripts=BENCH)
    mindcv_steps: int = option(2, "timed steps of the mindcv row", check=at_least(1), scripts=BENCH)
    mindcv_warmup: int = option(1, "untimed steps of the mindcv row", check=at_least(1), scripts=BENCH)
    no_mindcv: bool = option(False, "skip the mindcv BiT_resnet50 comparison", scripts=BENCH)
    no_floor: bool = option(False, "skip the nn.TrainOneStepCell floor row (it doubles the memory)", scripts=BENCH)
    torch_reference: bool = option(False, "also measure timm resnetv2_50x1_bit on PyTorch CPU", scripts=BENCH)
    no_bit_zoo: bool = option(False, "skip bit_zoo (e.g. with --torch_reference alone)", scripts=BENCH)
    torch_compile: bool = option(False, "also time timm under torch.compile (inductor): training step and inference", scripts=BENCH)
    onnx: bool = option(False, "also time timm's and bit_zoo's ONNX exports in onnxruntime", scripts=BENCH)
    pynative_row: bool = option(False, "also run the bit_zoo Trainer and inference rows in PyNative mode", scripts=BENCH)
    peers: bool = option(False, "every runtime row: torch_reference, torch_compile, onnx, pynative_row", scripts=BENCH)
    threads: int = option(os.cpu_count() or 1, "threads for PyTorch and onnxruntime (default: all cores)", check=at_least(1), scripts=BENCH)
    cold_cache: bool = option(False, "the Trainer rows compile from scratch (an empty compile cache of their own)", scripts=BENCH)
    json: str | None = option(None, "write the settings and results to this JSON file", scripts=BENCH)
    csv: str | None = option(None, "append every row, with machine, versions, load and command, to this CSV file", scripts=BENCH)


GROUPS = [
    ("system", SystemConfig),
    ("model", ModelConfig),
    ("data", DataConfig),
    ("step", StepConfig),
    ("distill", DistillConfig),
    ("measurement", BenchConfig),
]


def _worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", choices=tuple(_WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker_out", "--worker-out", help=argparse.SUPPRESS)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Every option as one namespace (args.image_size, args.accum_steps, ...), from the declarations train.py uses."""
    return parse_options("benchmark", GROUPS, argv, prog=PROG, description=__doc__, positionals=_worker_args).flat()


_BIT_ZOO_WORKERS = ("bit_zoo", "bit_zoo_pynative", "distill")
_WORKERS = {
    "bit_zoo": _bit_zoo_worker,
    "bit_zoo_pynative": _pynative_worker,
    "mindcv": _mindcv_worker,
    "torch": _torch_worker,
    "torch_compile": _torch_compile_worker,
    "ort_bit_zoo": _ort_bit_zoo_worker,
    "ort_timm": _ort_timm_worker,
    "peak": _peak_worker,
    "distill": _distill_worker,
}
_DRIVER_FLAGS = (
    "--torch_reference", "--torch-reference", "--no_mindcv", "--no-mindcv", "--no_bit_zoo", "--no-bit-zoo", "--torch_compile",
    "--torch-compile", "--onnx", "--pynative_row", "--pynative-row", "--peers",
)  # fmt: skip
_DRIVER_OPTIONS = ("--json", "--rounds", "--csv")
_BOOLS = ("true", "false", "1", "0", "yes", "no", "y", "n", "on", "off")


def worker_argv(argv: list[str]) -> list[str]:
    """The workers get the same settings, less the driver-only options (a flag's explicit true/false too)."""
    out, skip, flag = [], False, False
    for a in argv:
        if skip:
            skip = False
        elif flag and a.lower() in _BOOLS:
            flag = False
        elif a in _DRIVER_OPTIONS:
            skip = True
        elif a in _DRIVER_FLAGS:
            flag = True
        elif not a.startswith(tuple(o + "=" for o in _DRIVER_OPTIONS + _DRIVER_FLAGS)):
            flag = False
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        result = _WORKERS[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in filter(None, (args.model, args.teacher)):
        get_weights(name)  # a bad name is one line here (run_cli), not a traceback in every worker
    if args.batch_size % args.accum_steps:
        raise ConfigError(f"--batch_size {args.batch_size} does not split into --accum_steps {args.accum_steps} micro-batches")
    if args.model.split(".")[0].split("_")[-1] != "r50x1" and not args.no_mindcv:
        _logger.warning("mindcv's BiT_resnet50 is an R50x1: the ratios compare different architectures")
    if args.peers:
        args.torch_reference = args.torch_compile = args.onnx = args.pynative_row = True
    wargv = worker_argv(argv)
    machine = {**machine_info(), "versions": versions(), "load_before": os.getloadavg()[0]}
    arch = get_weights(args.model)
    flops = forward_flops(arch.layers, arch.width_factor, args.image_size, args.num_classes)
    results = []
    for rnd in range(1, args.rounds + 1):
        which = [] if args.no_bit_zoo else ["bit_zoo"] + (["bit_zoo_pynative"] if args.pynative_row else [])
        which += ["torch"] if args.torch_reference else []
        which += ["torch_compile"] if args.torch_compile else []
        which += ["ort_bit_zoo", "ort_timm"] if args.onnx else []
        which += ["mindcv"] if rnd == 1 and not args.no_mindcv else []
        which += ["distill"] if args.teacher else []
        which += ["peak"] if which else []
        for w in which:
            results += [dict(row, round=rnd) for row in add_flops(_run_worker(w, wargv), flops)]
    machine["load_after"] = os.getloadavg()[0]
    table = format_table(results, args, machine)
    print(table)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out")}
        Path(args.json).write_text(json.dumps({"settings": settings, "machine": machine, "results": results, "table": table}, indent=2))
    if args.csv:
        meta = {
            **machine,
            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "commit": _commit(),
            "command": "python -m benchmarks.benchmark " + shlex.join(argv),
            "model": args.model,
            "img_size": args.image_size,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "threads": args.threads,
        }
        append_csv(args.csv, results, meta)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
