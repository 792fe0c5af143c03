"""Eager (PyNative) inference with and without the compiled forward, against graph mode, in one process.

    python -m benchmarks.eager_bench                       # bit_s_r50x1, 128 px, batch 16
    python -m benchmarks.eager_bench --model bit_m_r101x1 --image_size 160 --batch_size 8 --iters 10

Prints, per setting, the first call (compile included) and the steady-state images per second
(median over --iters timed calls after --warmup), then eager-compiled / graph. The three settings
run the same random-weights model on the same batch; outputs are checked to agree.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass

import mindspore as ms
import numpy as np

from bit_zoo.data.from_config import DataConfig
from bit_zoo.models.factory import create_model
from bit_zoo.models.options import ModelConfig
from bit_zoo.options import at_least, option, parse_options
from bit_zoo.utils.atomic import write_text_atomic
from bit_zoo.utils.runner import run_cli

PROG = "python -m benchmarks.eager_bench"
EAGER = ("eager_bench",)


def _time_calls(fn, x, *, warmup: int, iters: int) -> tuple[float, float, np.ndarray]:
    start = time.perf_counter()
    out = fn(x).asnumpy()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn(x).asnumpy()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(x).asnumpy()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def run(model_name: str, *, image_size: int, batch_size: int, warmup: int, iters: int, conv_impl: str, skip_plain_eager: bool) -> dict:
    x = ms.Tensor(np.random.default_rng(0).uniform(-1, 1, (batch_size, 3, image_size, image_size)).astype(np.float32))
    ms.set_seed(0)
    results = {}
    settings = [("graph", ms.GRAPH_MODE, True), ("eager_compiled", ms.PYNATIVE_MODE, True)]
    if not skip_plain_eager:
        settings.append(("eager_plain", ms.PYNATIVE_MODE, False))
    outputs = {}
    for name, mode, jit in settings:
        ms.set_context(mode=mode)
        ms.set_seed(0)
        model = create_model(model_name, conv_impl=conv_impl, eager_jit=jit)
        model.set_train(False)
        first, step, out = _time_calls(model, x, warmup=warmup, iters=iters)
        results[name] = {"first_call_s": round(first, 2), "step_s": round(step, 4), "img_per_s": round(batch_size / step, 1)}
        outputs[name] = out
        print(f"{name:>15}: first call {first:6.2f} s   {batch_size / step:7.1f} img/s  ({step * 1000:.0f} ms per batch)", flush=True)
    ref = outputs["graph"]
    for name, out in outputs.items():
        diff = float(np.abs(out - ref).max())
        if diff > 1e-3 * max(1.0, float(np.abs(ref).max())):
            raise RuntimeError(f"{name} output differs from graph mode by {diff}")
    results["ratio_eager_compiled_to_graph"] = round(results["eager_compiled"]["img_per_s"] / results["graph"]["img_per_s"], 3)
    return results


@dataclass
class EagerBenchConfig:
    warmup: int = option(2, "untimed calls, the first (compiling) one included", check=at_least(1), scripts=EAGER)
    iters: int = option(5, "timed calls per setting", check=at_least(1), scripts=EAGER)
    skip_plain_eager: bool = option(False, "skip the uncompiled eager setting (slow)", scripts=EAGER)
    output_json: str | None = option(None, "write the results to this JSON file", scripts=EAGER)


GROUPS = [("model", ModelConfig), ("data", DataConfig), ("eager_bench", EagerBenchConfig)]


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> int:
    args = parse_options("eager_bench", GROUPS, argv, prog=PROG, description=__doc__).flat()
    print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, conv_impl {args.conv_impl}, MindSpore {ms.__version__}")
    results = run(
        args.model,
        image_size=args.image_size,
        batch_size=args.batch_size,
        warmup=args.warmup,
        iters=args.iters,
        conv_impl=args.conv_impl,
        skip_plain_eager=args.skip_plain_eager,
    )
    print(f"eager (compiled) / graph: {results['ratio_eager_compiled_to_graph']:.2f}x")
    if args.output_json:
        write_text_atomic(args.output_json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
