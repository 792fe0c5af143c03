"""Loading benchmark: peak memory and time to create a model from its weights file, bit_zoo vs timm.

    python -m benchmarks.load_bench --model bit_m_r101x3 --dir /path/to/cache

Builds (once; reused when present) random weights of the model's default record in three
layouts: the upstream .npz (TF names, HWIO), a mindcv-named MindSpore .ckpt and timm's
state_dict as .safetensors (the hub's layout). Then, for each file, creates the model in a fresh
subprocess per library and reports that process's peak RSS (VmHWM: imports included) and the
wall time of the creation call alone (the file is read once beforehand, so both start from the
page cache). timm (optional) runs when importable; it cannot read the
mindcv .ckpt. The files are written array by array, so building them needs about one array of
memory, not the whole model.

The target (issue 11): bit_zoo's peak at most 1.5x the size of the fp32 weights, and its time no
longer than timm's on the same file in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bit_zoo.utils._timm import import_timm
from bit_zoo.models.factory import create_model
from bit_zoo.weights.formats import npz_key_map, timm_key_map
from bit_zoo.weights.pretrained import home_dir
from bit_zoo.models.options import ModelConfig
from bit_zoo.models.zoo import WEIGHTS
from bit_zoo.options import option, parse_options
from bit_zoo.utils.runner import run_cli

__all__ = ["build_files", "main"]

PROG = "python -m benchmarks.load_bench"
LOAD = ("load_bench",)


def _params(model_name: str):
    """(name, shape) of every parameter of the model's default record, without allocating them."""
    from mindspore.nn.utils import no_init_parameters

    with no_init_parameters():
        model = create_model(model_name)
    return [(p.name, tuple(p.shape)) for p in model.get_parameters()], model.layers


def _random(name: str, shape, rng) -> np.ndarray:
    if name.endswith("gamma"):
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if name.endswith(("beta", "bias")):
        return 0.1 * rng.standard_normal(shape, dtype=np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)


def _write_npz(path: Path, arrays) -> None:
    tmp = path.with_name(path.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, a in arrays:
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    os.replace(tmp, path)


def _write_safetensors(path: Path, arrays: list[tuple[str, tuple[int, ...]]], produce) -> None:
    header, offset = {}, 0
    for key, shape in arrays:
        n = int(np.prod(shape)) * 4
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, _ in arrays:
            f.write(np.ascontiguousarray(produce(key), dtype="<f4").tobytes())
    os.replace(tmp, path)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _write_ckpt(path: Path, arrays) -> None:
    """MindSpore's checkpoint protobuf (Checkpoint{repeated Value{tag, TensorProto}}), one entry at a time."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        for key, a in arrays:
            dims = b"".join(_varint(1 << 3) + _varint(d) for d in a.shape)
            tensor = dims + _field(2, b"Float32") + _field(3, np.ascontiguousarray(a, dtype="<f4").tobytes())
            f.write(_field(1, _field(1, key.encode()) + _field(2, tensor)))
    os.replace(tmp, path)


def build_files(model_name: str, out_dir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write (or reuse) the model's random weights as upstream .npz, mindcv .ckpt and timm .safetensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "npz": out_dir / f"{model_name}.npz",
        "mindcv_ckpt": out_dir / f"{model_name}.mindcv.ckpt",
        "timm_safetensors": out_dir / f"{model_name}.timm.safetensors",
    }
    if all(p.is_file() for p in files.values()):
        return files
    params, layers = _params(model_name)
    shapes = dict(params)

    def produce(name):  # the same values in every layout: one generator per parameter, seeded by its index
        i = [n for n, _ in params].index(name)
        return _random(name, shapes[name], np.random.default_rng([seed, i]))

    if not files["npz"].is_file():
        inverse = {dst: src for src, dst in npz_key_map(layers).items()}

        def npz_arrays():
            for name, _ in params:
                a = produce(name)
                if name == "head.fc.weight":
                    a = a.T.reshape(1, 1, a.shape[1], a.shape[0])
                elif a.ndim == 4:
                    a = a.transpose(2, 3, 1, 0)
                yield inverse[name], np.ascontiguousarray(a)

        _write_npz(files["npz"], npz_arrays())
    if not files["mindcv_ckpt"].is_file():
        _write_ckpt(files["mindcv_ckpt"], ((_mindcv_key(n), _mindcv_array(n, produce(n))) for n, _ in params))
    if not files["timm_safetensors"].is_file():
        tk = timm_key_map(layers)
        inv = {v: k for k, v in tk.items()}
        timm_shapes = [(tk[n], s + (1, 1) if n == "head.fc.weight" else s) for n, s in params]
        _write_safetensors(files["timm_safetensors"], timm_shapes, lambda k: produce(inv[k]))
    return files


def _mindcv_key(name: str) -> str:
    """bit_zoo name -> mindcv's BiT name (the inverse of formats.mindcv_name)."""
    if name == "stem.conv.weight":
        return "conv1.weight"
    if name.startswith("norm."):
        return "gn." + name.split(".")[1]
    if name.startswith("head.fc."):
        return "classifier." + name.split(".")[2]
    _, s, _, u, leaf, kind = name.split(".")
    prefix = f"layer{int(s) + 1}.{u}."
    if leaf == "downsample":
        return prefix + "down_sample.0.weight"
    if leaf.startswith("norm"):
        return f"{prefix}gn{leaf[-1]}.{kind}"
    return f"{prefix}{leaf}.weight"


def _mindcv_array(name: str, a: np.ndarray) -> np.ndarray:
    return a.reshape(*a.shape, 1, 1) if name == "head.fc.weight" else a


# ----------------------------------------------------------------------------------------------
# Workers: one process per measurement, so each peak is its own.


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def _worker(lib: str, model_name: str, path: str, fmt: str) -> dict:
    if lib == "bit_zoo":
        after_import = _rss_mib()
        t = time.perf_counter()
        model = create_model(model_name, checkpoint_path=path)
        seconds = time.perf_counter() - t
        n = sum(int(np.prod(p.shape)) for p in model.get_parameters())
    else:
        timm = import_timm()
        import torch

        w = next(iter(WEIGHTS[model_name].values()))
        arch = w.hf_hub_id.split("/")[1].split(".")[0]
        after_import = _rss_mib()
        t = time.perf_counter()
        with torch.no_grad():
            model = timm.create_model(arch, num_classes=w.num_classes)
            if fmt == "npz":
                from timm.models.resnetv2 import _load_weights

                _load_weights(model, path)
            else:
                timm.models.load_checkpoint(model, path)
        seconds = time.perf_counter() - t
        n = sum(p.numel() for p in model.parameters())
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork/exec, so a
    # child would report the builder's peak; VmHWM belongs to this process's own memory map.
    peak = _status_mib("VmHWM")
    return {"lib": lib, "format": fmt, "seconds": seconds, "peak_rss_mib": peak, "rss_after_import_mib": after_import, "params": n}


def _warm(path: Path) -> None:
    """Read the file once so that every measurement starts from the page cache: whichever library ran
    first would otherwise pay for the disk alone."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def _measure(lib: str, model_name: str, path: Path, fmt: str) -> dict:
    _warm(path)
    cmd = [sys.executable, "-m", "benchmarks.load_bench", "--worker", lib, "--model", model_name, "--file", str(path), "--format", fmt]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{lib} worker failed on {path} (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1])


def _timm_available() -> bool:
    try:
        import_timm()
        return True
    except Exception:  # noqa: BLE001 - optional reference
        return False


@dataclass
class LoadBenchConfig:
    dir: str | None = option(None, "where the generated files live (default: $BIT_ZOO_HOME/load_bench)", scripts=LOAD)
    formats: str = option("npz,mindcv_ckpt,timm_safetensors", "comma-separated subset to measure", scripts=LOAD)
    no_timm: bool = option(False, "skip the timm reference", scripts=LOAD)


GROUPS = [("model", ModelConfig), ("load_bench", LoadBenchConfig)]


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog=PROG)


def _hidden(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--format", help=argparse.SUPPRESS)


def _main(argv: list[str] | None) -> int:
    args = parse_options("load_bench", GROUPS, argv, prog=PROG, description=__doc__, positionals=_hidden).flat()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.model, args.file, args.format)), flush=True)
        os._exit(0)  # skip MindSpore's noisy interpreter teardown
    out_dir = Path(args.dir or home_dir() / "load_bench")
    t = time.perf_counter()
    files = build_files(args.model, out_dir)
    print(f"files ready in {time.perf_counter() - t:.1f} s under {out_dir}", flush=True)
    with_timm = not args.no_timm and _timm_available()
    rows = []
    for fmt in args.formats.split(","):
        path = files[fmt]
        size_mib = path.stat().st_size / 2**20
        for lib in ("bit_zoo", "timm") if with_timm and fmt != "mindcv_ckpt" else ("bit_zoo",):
            r = _measure(lib, args.model, path, fmt)
            r["file_mib"] = size_mib
            rows.append(r)
            print(
                f"{fmt:17s} {lib:8s} file {size_mib:7.0f} MiB  time {r['seconds']:6.2f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB "
                f"(after imports {r['rss_after_import_mib']:5.0f} MiB)  peak/file {r['peak_rss_mib'] / size_mib:.2f}",
                flush=True,
            )
    weights_mib = rows[0]["params"] * 4 / 2**20
    print(f"fp32 weights: {rows[0]['params']:,} parameters = {weights_mib:.0f} MiB; target peak <= {1.5 * weights_mib:.0f} MiB")
    ok = True
    for fmt in args.formats.split(","):
        ours = next(r for r in rows if r["format"] == fmt and r["lib"] == "bit_zoo")
        ref = next((r for r in rows if r["format"] == fmt and r["lib"] == "timm"), None)
        mem_ok = ours["peak_rss_mib"] <= 1.5 * weights_mib
        time_ok = ref is None or ours["seconds"] <= ref["seconds"]
        ok &= mem_ok and time_ok
        vs = f"timm {ref['seconds']:.2f} s / {ref['peak_rss_mib']:.0f} MiB" if ref else "timm n/a"
        print(
            f"{fmt:17s} peak {'OK' if mem_ok else 'OVER'} ({ours['peak_rss_mib'] / weights_mib:.2f}x)  time {'OK' if time_ok else 'SLOWER'} ({vs})"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
