"""Per-device memory of a training config, before any device is touched.

    python -m bit_zoo.memory -c configs/seed/bit_m_r101x3_cifar10.yaml --device_memory_gb 32

What is counted (bytes, one device, one optimizer step; P = parameter count):

* persistent: parameters (4P), gradient accumulation buffers (4P: the Trainer always keeps
  them), optimizer slots (SGD momentum 1, RMSProp 2, AdamW 2: 4P each), EMA shadow (4P);
* forward/backward: the gradients (4P) and, per weight-standardized conv, the tensors its
  backward keeps (float32 centred weight, standardized weight in the compute dtype), plus the
  activations the backward keeps for one micro-batch, tensor by tensor (below), plus a transient
  allowance of three float32 copies of the largest activation (gradients in flight);
* a fixed runtime reserve (``--reserved_gb``, default 2): the framework, HCCL buffers and
  compiled graphs. An assumption, not a measurement.

Activations kept for the backward, per element (c = compute dtype: 2 bytes under amp O2/O3, 4
under O0). GroupNorm+ReLU (statistics in float32, layers.py) keeps the centred input and the
normalised tensor in float32 (8 bytes) and its output, ReLU'd in the compute dtype (c bytes),
which the next convolution keeps too. The stem keeps its input, the padded map and the pooled map (max pool). Adds and casts
keep nothing. With recompute (per unit, ``ResNetV2(recompute=True)``) a unit keeps only its
input (c bytes per element) and its own tensors are rebuilt during its backward: the largest
unit is counted once on top.

This is the native-convolution path (Ascend, GPU); the CPU's ``onednn`` path keeps the same
tensors (channels-last). The CPU ``unfold`` path also keeps the im2col columns of every k x k
conv (9x its input); it is not modelled. The configuration is read and
checked as train.py reads it; options missing from it take train.py's defaults.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import Config, config_dict, parse_config
from ..models.factory import CUSTOM_ARCHITECTURE, resolve_architecture
from ..options import at_least, non_negative, option, parse_options, positive
from ..utils.runner import run_cli

__all__ = [
    "Geometry",
    "Plan",
    "load_config",
    "geometry",
    "param_count",
    "weight_standardisation_bytes",
    "activation_bytes",
    "plan",
    "suggest",
    "main",
]

GB = 1e9  # decimal GB: "32 GB" devices are quoted so (Ascend 910: 32 GB HBM)

DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10, "imagenet": 1000}
OPTIMIZER_SLOTS = {"sgd": 1, "rmsprop": 2, "adamw": 2}
# train.py's defaults for the options a config may leave out (the declarations'), and the input channels.
DEFAULTS = {**config_dict(Config()), "in_channels": 3}
PROG = "python -m bit_zoo.memory"
MEMORY = ("memory",)


@dataclass(frozen=True)
class Geometry:
    layers: tuple[int, ...]
    width_factor: int
    num_classes: int
    in_channels: int = 3


def geometry(model: str, *, num_classes: int, layers=None, width_factor: int = 1, in_channels: int = 3) -> Geometry:
    """The architecture of a registered name (bit_m_r101x3, name.tag) or of 'resnetv2' with layers (create_model's resolver)."""
    custom = model == CUSTOM_ARCHITECTURE  # the config's layers / width_factor are for resnetv2 only, as in train.py
    arch = resolve_architecture(model, layers=layers if custom else None, width_factor=width_factor if custom else None)
    return Geometry(arch.layers, arch.width_factor, num_classes, in_channels)


def _units(g: Geometry, image_size: int):
    """(in channels, mid, out channels, stride, input side, output side, has projection) of every unit, in order."""
    side = (image_size + 6 - 7) // 2 + 1  # stem conv 7x7/2 pad 3
    side = (side + 2 - 3) // 2 + 1  # zero pad 1, max pool 3x3/2
    prev = 64 * g.width_factor
    for i, depth in enumerate(g.layers):
        width = 256 * g.width_factor * 2**i
        for u in range(depth):
            stride = 2 if (i > 0 and u == 0) else 1
            out_side = (side + 2 - 3) // stride + 1
            cin = prev if u == 0 else width
            yield cin, width // 4, width, stride, side, out_side, (stride != 1 or cin != width)
            side = out_side
        prev = width


def param_count(g: Geometry) -> tuple[int, int]:
    """(all parameters, conv weights only) of the model."""
    stem = g.in_channels * 64 * g.width_factor * 49
    conv = stem
    other = 0
    last = 64 * g.width_factor
    for cin, mid, cout, _, _, _, proj in _units(g, 224):
        conv += cin * mid + 9 * mid * mid + mid * cout + (cin * cout if proj else 0)
        other += 2 * (cin + mid + mid)
        last = cout
    other += 2 * last  # pre-head GroupNorm
    if g.num_classes > 0:
        other += last * g.num_classes + g.num_classes
    return conv + other, conv


def weight_standardisation_bytes(g: Geometry, *, fp16: bool, recompute: bool) -> int:
    """float32 centred weight + standardized weight (compute dtype) of every conv, kept for the backward.

    With recompute the units' own are rebuilt in their backward: the stem's plus the largest unit's.
    """
    per = 4 + (2 if fp16 else 4)
    stem = g.in_channels * 64 * g.width_factor * 49
    units = [cin * mid + 9 * mid * mid + mid * cout + (cin * cout if proj else 0) for cin, mid, cout, *_, proj in _units(g, 224)]
    return per * (stem + (max(units) if recompute else sum(units)))


def activation_bytes(g: Geometry, image_size: int, batch: int, *, fp16: bool, recompute: bool) -> dict[str, int]:
    """Bytes the backward keeps for one micro-batch of `batch` images (see the module docstring)."""
    c = 2 if fp16 else 4
    gn = 8 + c  # per element of a GroupNorm+ReLU input
    s1 = (image_size + 6 - 7) // 2 + 1
    s2 = (s1 + 2 - 3) // 2 + 1
    stem_c = 64 * g.width_factor
    stem = g.in_channels * image_size**2 * c + stem_c * (s1 + 2) ** 2 * c + stem_c * s2**2 * c
    units = []
    inputs = []
    largest = stem_c * s1**2
    last_c, last_side = stem_c, s2
    for cin, mid, cout, _, side, out_side, _ in _units(g, image_size):
        units.append(gn * (cin * side**2 + mid * side**2 + mid * out_side**2))
        inputs.append(c * cin * side**2)
        largest = max(largest, cin * side**2, cout * out_side**2)
        last_c, last_side = cout, out_side
    head = gn * last_c * last_side**2 + 4 * last_c
    if recompute:
        kept = sum(inputs) + max(units)
    else:
        kept = sum(units)
    return {
        "stem": batch * stem,
        "units": batch * kept,
        "head": batch * head,
        "transient": batch * 3 * 4 * largest,
    }


@dataclass
class Plan:
    config: str
    model: str
    devices: int
    micro_batch: int
    image_size: int
    amp_level: str
    recompute: bool
    accum_steps: int
    params: int
    device_memory_gb: float
    parts_gb: dict[str, float] = field(default_factory=dict)
    total_gb: float = 0.0
    fits: bool = False
    activations_gb: dict[str, float] = field(default_factory=dict)  # kept activations both ways, for comparison


def plan(
    cfg: dict,
    *,
    devices: int,
    device_memory_gb: float,
    reserved_gb: float = 2.0,
    recompute: bool | None = None,
    accum_steps: int | None = None,
    config_name: str = "",
) -> Plan:
    """The per-device estimate of a flat config dict; `recompute` / `accum_steps` override the config's."""
    merged = {**DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k not in DEFAULTS}}
    model = str(merged["model"])
    image_size = merged.get("image_size")
    if image_size is None:
        raise ValueError(f"{config_name or 'the config'} sets no image_size: the activations depend on it; add image_size: N")
    recompute = bool(merged["recompute"]) if recompute is None else recompute
    accum = int(merged["accum_steps"] if accum_steps is None else accum_steps)
    batch = int(merged["batch_size"])
    if batch % (devices * accum):
        raise ValueError(f"batch_size {batch} does not split into {devices} devices x {accum} micro-batches: pass --devices N")
    micro = batch // (devices * accum)
    num_classes = merged["num_classes"]
    if num_classes is None:  # train.py takes it from the data: a class subset, the dataset's, else ImageNet's 1000
        classes = merged.get("classes")
        num_classes = len(classes) if classes else DATASET_CLASSES.get(str(merged.get("dataset")), 1000)
    g = geometry(model, num_classes=int(num_classes), layers=merged["layers"], width_factor=merged["width_factor"])
    opt = str(merged["opt"])
    if opt not in OPTIMIZER_SLOTS:
        raise ValueError(f"opt {opt!r}: choose one of {tuple(OPTIMIZER_SLOTS)}")
    fp16 = str(merged["amp_level"]) in ("O2", "O3")
    p, _ = param_count(g)
    act = activation_bytes(g, int(image_size), micro, fp16=fp16, recompute=recompute)
    # Weight standardisation: float32 centred weight + standardized weight in the compute dtype;
    # with recompute these live inside the recomputed units (only the largest unit's at a time).
    ws = weight_standardisation_bytes(g, fp16=fp16, recompute=recompute)
    parts = {
        "parameters": 4 * p,
        "accumulation buffers": 4 * p,
        f"optimizer slots ({opt}: {OPTIMIZER_SLOTS[opt]})": 4 * p * OPTIMIZER_SLOTS[opt],
        "EMA": 4 * p if float(merged["ema_decay"]) > 0 else 0,
        "gradients": 4 * p,
        "weight standardisation": ws,
        f"activations{' (recompute)' if recompute else ''}": act["stem"] + act["units"] + act["head"],
        "activation gradients (transient)": act["transient"],
        "runtime reserve (assumed)": int(reserved_gb * GB),
    }
    parts_gb = {k: round(v / GB, 2) for k, v in parts.items()}
    both = {}
    for rc in (False, True):
        a = activation_bytes(g, int(image_size), micro, fp16=fp16, recompute=rc)
        both["with recompute" if rc else "without recompute"] = round((a["stem"] + a["units"] + a["head"]) / GB, 2)
    total = sum(parts.values()) / GB
    return Plan(
        config_name, model, devices, micro, int(image_size), str(merged["amp_level"]), recompute, accum, p,
        device_memory_gb, parts_gb, round(total, 2), total <= device_memory_gb, both,
    )  # fmt: skip


def suggest(cfg: dict, *, devices: int, device_memory_gb: float, reserved_gb: float = 2.0) -> list[Plan]:
    """What to set when a config does not fit: recompute at the config's accum_steps, and the
    smallest accum_steps (doubling; smaller micro-batches, same global batch) that fits without it."""
    kw = dict(devices=devices, device_memory_gb=device_memory_gb, reserved_gb=reserved_gb)
    batch = int(cfg.get("batch_size") or DEFAULTS["batch_size"])
    accum = int(cfg.get("accum_steps") or 1)
    out = []
    with_recompute = plan(cfg, recompute=True, accum_steps=accum, **kw)
    if with_recompute.fits:
        out.append(with_recompute)
    while batch % (devices * accum * 2) == 0:
        accum *= 2
        p = plan(cfg, recompute=False, accum_steps=accum, **kw)
        if p.fits:
            out.append(p)
            break
    return out


def load_config(path: str | Path) -> dict:
    """The flat option: value mapping of a training config, read and checked as train.py does (its defaults filled in)."""
    return config_dict(parse_config("train", ["-c", str(path)]))


def format_plan(p: Plan) -> str:
    lines = [
        f"{p.config or p.model}: {p.model}, {p.devices} device(s) x micro-batch {p.micro_batch} x accum_steps {p.accum_steps}, "
        f"{p.image_size} px, amp {p.amp_level}, recompute {str(p.recompute).lower()}, {p.params / 1e6:.1f}M parameters",
    ]
    width = max(len(k) for k in p.parts_gb)
    for k, v in p.parts_gb.items():
        lines.append(f"  {k:<{width}}  {v:7.2f} GB")
    lines.append(
        f"  {'total per device':<{width}}  {p.total_gb:7.2f} GB of {p.device_memory_gb:g} GB: {'fits' if p.fits else 'DOES NOT FIT'}"
    )
    lines.append("  activations: " + ", ".join(f"{v:.2f} GB {k}" for k, v in p.activations_gb.items()))
    return "\n".join(lines)


@dataclass
class MemoryConfig:
    device_memory_gb: float = option(32.0, "memory of one device (Ascend 910: 32)", check=positive, scripts=MEMORY)
    devices: int = option(8, "data-parallel devices the global batch_size splits over", check=at_least(1), scripts=MEMORY)
    reserved_gb: float = option(2.0, "framework, HCCL buffers and graphs (an assumption)", check=non_negative, scripts=MEMORY)
    json: bool = option(False, "print the estimate as JSON", scripts=MEMORY)


def _config(parser) -> None:
    parser.add_argument("-c", "--config", required=True, help="a training YAML config (configs/...)")


def parse(argv: list[str] | None):
    return parse_options("memory", [("memory", MemoryConfig)], argv, prog=PROG, description=__doc__, positionals=_config)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> int:
    parsed = parse(argv)
    args, path = parsed["memory"], parsed.args.config
    cfg = load_config(path)
    kw = dict(devices=args.devices, device_memory_gb=args.device_memory_gb, reserved_gb=args.reserved_gb)
    p = plan(cfg, config_name=path, **kw)
    options = [] if p.fits else suggest(cfg, **kw)
    if args.json:
        print(json.dumps({"plan": asdict(p), "fitting_options": [asdict(o) for o in options]}, indent=2))
        return 0
    print(format_plan(p))
    if not p.fits:
        if options:
            print("fits with:")
            for o in options:
                print(f"  recompute: {str(o.recompute).lower()}, accum_steps: {o.accum_steps}  ->  {o.total_gb:.2f} GB")
        else:
            print("nothing tried fits (recompute, accum_steps up to a micro-batch of 1): use more devices or a smaller image_size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
