"""Speed and memory benchmark: bit_zoo vs mindcv's BiT (same settings, same invocation), and timm.

    python -m bit_zoo.benchmark --model bit_s_r50x1 --img-size 128 --batch-size 16 --mode graph
    python -m bit_zoo.benchmark --torch-reference   # timm resnetv2_50x1_bit on PyTorch CPU

Each model runs in its own subprocess (so its peak RSS is its own, and a graph compile that fails
writes its ./rank_0 dump into a temporary directory). A worker measures, on random data:

* first step: wall time of the first training step, graph compilation included;
* train img/s: full steps (forward, backward, SGD-momentum update) after ``--warmup`` steps;
* infer img/s: forward passes in eval mode (first call, i.e. compilation, not timed);
* peak RSS: the process's ``ru_maxrss`` after training, and at the end.

mindcv is slow on CPU (~1 min per training step of R50x1 at 128 px, batch 16), so it runs
``--mindcv-warmup`` / ``--mindcv-steps`` (1 / 2) steps whatever ``--steps`` says.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent


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


def _record(name: str, framework: str, conv_impl: str, args: argparse.Namespace, train, infer, rss_train: float, warmup: int, steps: int):
    """One result row from the (first s, s per call, last result) timings of training and inference."""
    return {
        "name": name,
        "framework": framework,
        "conv_impl": conv_impl,
        "train_img_s": args.batch_size / train[1],
        "infer_img_s": args.batch_size / infer[1],
        "first_step_s": train[0],
        "first_infer_s": infer[0],
        "peak_rss_train_mib": rss_train,
        "peak_rss_mib": _peak_rss_mib(),
        "steps": steps,
        "warmup": warmup,
        "loss": train[2],
    }


def _ms_worker(args: argparse.Namespace, which: str) -> dict:
    import mindspore as ms
    import numpy as np
    from mindspore import nn

    ms.set_context(mode=ms.GRAPH_MODE if args.mode == "graph" else ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(0)
    if which == "bit_zoo":
        import bit_zoo

        net = bit_zoo.create_model(args.model, num_classes=args.num_classes, conv_impl=args.conv_impl, recompute=args.recompute)
        name = args.model
        impl = net.conv_impl
    else:
        import mindcv

        net = mindcv.create_model("BiT_resnet50", num_classes=args.num_classes)
        name = "mindcv BiT_resnet50"
        impl = "mindcv"
    if args.precision == "fp16":
        net = ms.amp.auto_mixed_precision(net, "O2")

    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    opt = nn.SGD(net.trainable_params(), learning_rate=1e-3, momentum=0.9)

    def forward(x, y):
        return loss_fn(net(x).astype(ms.float32), y)

    grad_fn = ms.value_and_grad(forward, None, opt.parameters)

    def train_step(x, y):
        loss, grads = grad_fn(x, y)
        opt(grads)
        return loss

    def infer(x):
        return net(x)

    if args.mode == "graph":
        train_step = ms.jit(train_step)
        infer = ms.jit(infer)

    rng = np.random.default_rng(0)
    dtype = ms.float16 if args.precision == "fp16" else ms.float32
    x = ms.Tensor(rng.uniform(-1, 1, (args.batch_size, 3, args.img_size, args.img_size)).astype(np.float32), dtype)
    y = ms.Tensor(rng.integers(0, args.num_classes, args.batch_size).astype(np.int32))
    warmup, steps = (args.warmup, args.steps) if which == "bit_zoo" else (args.mindcv_warmup, args.mindcv_steps)

    net.set_train(True)
    train = _time_calls(lambda: float(train_step(x, y).asnumpy()), warmup=warmup, steps=steps)
    rss_train = _peak_rss_mib()
    net.set_train(False)
    inference = _time_calls(lambda: infer(x), warmup=warmup, steps=steps, sync=lambda out: out.asnumpy())
    return _record(name, f"mindspore {ms.__version__}", impl, args, train, inference, rss_train, warmup, steps)


def _torch_worker(args: argparse.Namespace) -> dict:
    # Lazy: torch and timm are only needed for this reference measurement.
    import torch

    from ._timm import import_timm

    timm = import_timm()

    torch.manual_seed(0)
    name = "resnetv2_50x1_bit"
    net = timm.create_model(name, pretrained=False, num_classes=args.num_classes)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    x = torch.empty(args.batch_size, 3, args.img_size, args.img_size).uniform_(-1, 1)
    y = torch.randint(0, args.num_classes, (args.batch_size,))

    def train_step():
        with torch.autocast("cpu", dtype=dtype, enabled=args.precision == "fp16"):
            loss = loss_fn(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    net.train()
    train = _time_calls(train_step, warmup=args.warmup, steps=args.steps)
    rss_train = _peak_rss_mib()
    net.eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=args.precision == "fp16"):
        inference = _time_calls(lambda: net(x), warmup=args.warmup, steps=args.steps)
    framework = f"torch {torch.__version__} (eager, {torch.get_num_threads()} threads)"
    return _record(f"timm {name}", framework, "torch", args, train, inference, rss_train, args.warmup, args.steps)


# ----------------------------------------------------------------------------------------------
# Driver


def _run_worker(which: str, argv: list[str]) -> dict:
    """Run one worker in a fresh interpreter inside a temporary directory; return its result."""
    with tempfile.TemporaryDirectory(prefix="bit_zoo_bench_") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "bit_zoo.benchmark", *argv, "--worker", which, "--worker-out", str(out)]
        _logger.info("running %s", which)
        proc = subprocess.run(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stdout.splitlines()[-30:])
            return {"name": which, "error": f"worker exited with {proc.returncode}:\n{tail}"}
        return json.loads(out.read_text())


def format_table(results: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"model={args.model} img_size={args.img_size} batch={args.batch_size} mode={args.mode} "
        f"precision={args.precision} recompute={args.recompute}"
    )
    cols = ["name", "conv_impl", "train img/s", "infer img/s", "first step s", "peak RSS MiB", "steps"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["name"], "ERROR", "-", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                r["name"],
                r["conv_impl"],
                f"{r['train_img_s']:.2f}",
                f"{r['infer_img_s']:.2f}",
                f"{r['first_step_s']:.1f}",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['warmup']}+{r['steps']}",
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = [head, "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in rows]
    ok = {r["conv_impl"]: r for r in results if "error" not in r}
    ours = next((r for r in results if "error" not in r and r["conv_impl"] not in ("mindcv", "torch")), None)
    for ref in ("mindcv", "torch"):
        if ours is not None and ref in ok:
            o = ok[ref]
            lines.append(
                f"{ours['name']} vs {o['name']}: train x{ours['train_img_s'] / o['train_img_s']:.1f}, "
                f"infer x{ours['infer_img_s'] / o['infer_img_s']:.1f}, first step {ours['first_step_s']:.1f} s vs {o['first_step_s']:.1f} s"
            )
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']} failed: {r['error']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bit_zoo.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="bit_s_r50x1", help="bit_zoo model name")
    g.add_argument("--img-size", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--num-classes", type=int, default=1000)
    g = p.add_argument_group("execution")
    g.add_argument("--mode", choices=("graph", "pynative"), default="graph")
    g.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="fp16 = MindSpore amp O2")
    g.add_argument("--conv-impl", choices=("auto", "native", "unfold"), default="auto")
    g.add_argument("--recompute", action="store_true", help="recompute each unit's activations in backward")
    g = p.add_argument_group("measurement")
    g.add_argument("--steps", type=int, default=10, help="timed steps (train and inference each)")
    g.add_argument("--warmup", type=int, default=2, help="untimed steps, the first (compiling) one included")
    g.add_argument("--mindcv-steps", type=int, default=2)
    g.add_argument("--mindcv-warmup", type=int, default=1)
    g.add_argument("--no-mindcv", action="store_true", help="skip the mindcv BiT_resnet50 comparison")
    g.add_argument("--torch-reference", action="store_true", help="also measure timm resnetv2_50x1_bit on PyTorch CPU")
    g.add_argument("--no-bit-zoo", action="store_true", help="skip bit_zoo (e.g. with --torch-reference alone)")
    g.add_argument("--json", metavar="OUT", help="write the settings and results to this JSON file")
    p.add_argument("--worker", choices=("bit_zoo", "mindcv", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        result = _torch_worker(args) if args.worker == "torch" else _ms_worker(args, args.worker)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.model.split(".")[0].split("_")[-1] != "r50x1" and not args.no_mindcv:
        _logger.warning("mindcv's BiT_resnet50 is an R50x1: the ratios compare different architectures")
    # The workers get the same settings, less the driver-only flags.
    worker_argv, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not (a.startswith("--json=") or a in ("--torch-reference", "--no-mindcv", "--no-bit-zoo")):
            worker_argv.append(a)
    which = []
    if not args.no_bit_zoo:
        which.append("bit_zoo")
    if not args.no_mindcv:
        which.append("mindcv")
    if args.torch_reference:
        which.append("torch")
    results = [_run_worker(w, worker_argv) for w in which]
    table = format_table(results, args)
    print(table)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out")}
        Path(args.json).write_text(json.dumps({"settings": settings, "results": results, "table": table}, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
