"""A/B speed of bit_zoo's and timm's ONNX exports of the same network in onnxruntime, robust to a shared machine.

    python -m benchmarks.onnx_ab                       # bit_s_r50x1 vs timm's resnetv2_50x1_bit, 128 px, batch 16, 2 threads
    python -m benchmarks.onnx_ab --blocks 40 --profile # more blocks; then time per operator type and the optimized graphs

Both files are exported as `python -m benchmarks.benchmark --onnx` exports them (random weights; timm's
through torch.onnx, opset 17, dynamic batch; bit_zoo's through export_model, dynamic batch, height and
width), then each gets its own InferenceSession in this one process. The timed blocks alternate
(A B, B A, A B, ...: a drift in the machine's load hits both alike); each block is --steps calls of one
session. Reported: the median img/s of each over the blocks, the ratio of those medians, the median and
quartiles of the per-block-pair ratios, and the ratio of the best blocks. On a machine shared with other
jobs the pair ratios are the robust figure: both halves of a pair ran within a second of each other.

The load is printed beside the result: the load average before and after, and the CPU time other
processes used while the blocks ran (from /proc/stat, less this process's own), in cores.
--profile then runs each file with onnxruntime's profiler and prints the time per operator type and
the node types of the graph onnxruntime runs after its optimizations (what it fused, what it reordered).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.benchmark import TIMM_NAME, export_bit_zoo_onnx, export_timm_onnx, machine_info

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.onnx_ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="bit_s_r50x1", help="bit_zoo model to export (default: bit_s_r50x1, timm's twin)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=16)
    p.add_argument("--image_size", "--image-size", type=int, default=128)
    p.add_argument("--num_classes", "--num-classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--blocks", type=int, default=20, help="timed blocks per file (default 20)")
    p.add_argument("--steps", type=int, default=2, help="calls per block (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per session first (default 3)")
    p.add_argument("--bit_zoo_onnx", "--bit-zoo-onnx", type=Path, help="time this file instead of a fresh export of --model")
    p.add_argument("--timm_onnx", "--timm-onnx", type=Path, help="time this file instead of a fresh export of timm's model")
    p.add_argument("--dir", type=Path, help="write the exported files here (default: a temporary directory)")
    p.add_argument("--profile", action="store_true", help="then the time per operator type and the optimized graphs' node types")
    args = p.parse_args(argv)
    for name in ("batch_size", "image_size", "threads", "blocks", "steps", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def _cpu_busy() -> tuple[float, float]:
    """(seconds all CPUs spent busy, seconds this process spent on CPU), both since boot / start."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy, own.ru_utime + own.ru_stime


def _sessions(files: dict[str, Path], threads: int, ort, *, profile: bool = False) -> dict:
    sessions = {}
    for key, path in files.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(path.with_suffix("")) + "_profile"
        sessions[key] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sessions


def _run(session, x: np.ndarray):
    return session.run(None, {session.get_inputs()[0].name: x})


def _alternate(sessions: dict, x: np.ndarray, *, blocks: int, steps: int) -> dict[str, list[float]]:
    """img/s of each session per block; the order flips every block (A B, B A, ...)."""
    keys = list(sessions)
    speed = {k: [] for k in keys}
    for b in range(blocks):
        for key in keys if b % 2 == 0 else keys[::-1]:
            session = sessions[key]
            t0 = time.perf_counter()
            for _ in range(steps):
                _run(session, x)
            speed[key].append(steps * len(x) / (time.perf_counter() - t0))
    return speed


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = np.percentile(values, [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def _conv_kinds(graph) -> dict[str, str]:
    """Node name -> "Conv (depthwise)" / "Conv (+ residual Add)" for the convs onnxruntime's optimizer made so."""
    kinds = {}
    for n in graph.node:
        if n.op_type == "Conv":
            if any(a.name == "group" and a.i > 1 for a in n.attribute):
                kinds[n.name] = "Conv (depthwise)"
            elif len(n.input) > 3 and n.input[3]:  # NCHWc Conv's 4th input: the tensor it adds its result to
                kinds[n.name] = "Conv (+ residual Add)"
    return kinds


def _profile(files: dict[str, Path], x: np.ndarray, threads: int, ort, runs: int = 10) -> None:
    """The optimized graph's node types, then the median time per operator type over `runs` calls of each
    file (onnxruntime's profiler; the calls alternate between the files, as the timed blocks do)."""
    import onnx

    sessions, kinds = {}, {}
    for key, path in files.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(path.with_name(path.stem + ".optimized.onnx"))
        opts.enable_profiling = True
        opts.profile_file_prefix = str(path.with_name(path.stem + "_profile"))
        sessions[key] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        _run(sessions[key], x)  # the first call allocates: not counted
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
        kinds[key] = _conv_kinds(graph)
        nodes = collections.Counter((n.domain.replace("com.microsoft.", "") + ":" if n.domain else "") + n.op_type for n in graph.node)
        fused = sum(1 for k in kinds[key].values() if k == "Conv (+ residual Add)")
        print(f"\n{key}: {len(graph.node)} nodes after optimization ({fused} Conv with the residual Add fused):")
        print("  " + ", ".join(f"{op} {n}" for op, n in nodes.most_common()))
    for r in range(runs):
        for key in list(sessions) if r % 2 == 0 else list(sessions)[::-1]:
            _run(sessions[key], x)
    table = {}
    for key, session in sessions.items():
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink()
        calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[1:]
        per_call = [collections.Counter() for _ in calls]
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                op = kinds[key].get(e["name"][: -len("_kernel_time")], e["args"]["op_name"])
                for i, (start, end) in enumerate(calls):
                    if start <= e["ts"] <= end:
                        per_call[i][op] += e["dur"]
                        break
        ops = set().union(*per_call)
        table[key] = {op: statistics.median(c[op] for c in per_call) / 1e3 for op in ops}
        table[key]["(whole call)"] = statistics.median(end - start for start, end in calls) / 1e3
    keys = list(table)
    print(f"\nms per call, median of {runs} calls each (onnxruntime's profiler):")
    print(f"  {'operator':24s}" + "".join(f"{k.split()[0]:>12s}" for k in keys))
    for op in sorted(set().union(*table.values()), key=lambda o: -max(t.get(o, 0.0) for t in table.values())):
        print(f"  {op:24s}" + "".join(f"{table[k].get(op, 0.0):12.2f}" for k in keys))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="onnx_ab-") as tmp:
        work = args.dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = {f"bit_zoo {args.model}": args.bit_zoo_onnx, f"timm {TIMM_NAME}": args.timm_onnx}
        if files[f"bit_zoo {args.model}"] is None:
            files[f"bit_zoo {args.model}"] = work / "bit_zoo.onnx"
            export_bit_zoo_onnx(args, files[f"bit_zoo {args.model}"])
        if files[f"timm {TIMM_NAME}"] is None:
            files[f"timm {TIMM_NAME}"] = work / "timm.onnx"
            export_timm_onnx(args, files[f"timm {TIMM_NAME}"])
        x = np.random.default_rng(0).uniform(-1, 1, (args.batch_size, 3, args.image_size, args.image_size)).astype(np.float32)
        sessions = _sessions(files, args.threads, ort)
        for session in sessions.values():
            for _ in range(args.warmup):
                _run(session, x)

        load_before = os.getloadavg()[0]
        busy0, own0, t0 = *_cpu_busy(), time.perf_counter()
        speed = _alternate(sessions, x, blocks=args.blocks, steps=args.steps)
        busy1, own1, wall = *_cpu_busy(), time.perf_counter() - t0
        others = max(busy1 - busy0 - (own1 - own0), 0.0) / wall
        load_after = os.getloadavg()[0]

        m = machine_info()
        print(
            f"{m['cpu']} ({m['cores']} cores, {m['isa']}); onnxruntime {ort.__version__}, {args.threads} threads; "
            f"batch {args.batch_size}, {args.image_size} px; {args.blocks} blocks of {args.steps} calls each, alternating"
        )
        print(f"load average {load_before:.2f} before, {load_after:.2f} after; other processes used {others:.2f} cores during the blocks")
        sa, sb = speed.values()
        for key, s in speed.items():
            q1, med, q3 = _quartiles(s)
            print(f"  {key:28s} median {med:7.1f} img/s  (quartiles {q1:.1f} .. {q3:.1f}, best {max(s):.1f})")
        pair = [x_ / y_ for x_, y_ in zip(sa, sb)]
        q1, med, q3 = _quartiles(pair)
        print(
            f"bit_zoo / timm: x{statistics.median(sa) / statistics.median(sb):.3f} (medians), "
            f"x{med:.3f} per block pair (quartiles x{q1:.3f} .. x{q3:.3f}), x{max(sa) / max(sb):.3f} (best blocks)"
        )
        del sessions
        if args.profile:
            _profile(files, x, args.threads, ort)
    return 0


if __name__ == "__main__":
    sys.exit(main())
