"""YAML + argparse: a YAML file sets the parser's defaults, the command line overrides them.

Shared by train.py and validate.py, which each build their own small parser in argument groups.

* ``-c/--config FILE``: a YAML mapping of option names (the parser's dests) to values.
* Unknown keys, in the YAML or on the command line, are an error listing the close matches.
* YAML values are checked against the option's type and choices, as command-line values are.
* :func:`grouped` turns the flat namespace into one namespace per argument group, so the
  scripts pass grouped config objects down instead of loose keyword arguments.
* :func:`save_config` writes the resolved config (YAML) next to the outputs.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from .atomic import write_text_atomic

__all__ = ["ConfigError", "str2bool", "int_list", "float_list", "parse_with_config", "grouped", "save_config", "load_yaml"]


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the problem and the fix."""


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def _list_of(kind):
    def parse(value):
        if isinstance(value, (list, tuple)):
            return [kind(v) for v in value]
        text = str(value).strip().strip("[]()")
        return [kind(v) for v in text.replace(",", " ").split()] if text else []

    parse.__name__ = f"{kind.__name__}_list"
    return parse


int_list = _list_of(int)
float_list = _list_of(float)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to -c (see configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}. Fix the syntax at the line shown.") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value, got a {type(data).__name__}")
    return data


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config") and a.dest != argparse.SUPPRESS}


def _unknown_key_error(kind: str, key: str, known: Sequence[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=4, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown {kind} {key!r} in {source}.{hint} Run with --help for every option.")


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Check a YAML value with the option's own type and choices."""
    if value is None:
        return None
    kind = action.type
    try:
        if action.nargs in ("+", "*") and isinstance(value, (list, tuple)):
            value = [kind(v) if kind else v for v in value]
        elif kind is not None and not (isinstance(value, (list, tuple)) and kind in (int, float, str)):
            value = kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{source}: {key}: {value!r} is not a valid {getattr(kind, '__name__', 'value')} ({e})") from e
    if isinstance(value, (list, tuple)) and kind in (int, float, str) and action.nargs is None:
        raise ConfigError(f"{source}: {key} takes one value, got the list {value!r}")
    if action.choices is not None:
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v not in action.choices]
        if bad:
            raise ConfigError(f"{source}: {key}: {bad[0]!r} is not one of {list(action.choices)}")
    return value


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *, ignore_keys=()) -> argparse.Namespace:
    """Parse argv with the YAML file named by -c/--config as defaults.

    ``ignore_keys``: YAML keys that are valid for another script and skipped here.

    Raises ConfigError for a missing or malformed file, an unknown key in it or on the command
    line (listing close matches), or a value of the wrong type.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    options = _options(parser)
    if known.config:
        source = str(known.config)
        defaults = {}
        for key, value in load_yaml(known.config).items():
            if key in ignore_keys:
                continue
            if key not in options:
                raise _unknown_key_error("config key", key, list(options), source)
            defaults[key] = _coerce(options[key], key, value, source)
        parser.set_defaults(**defaults)
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = [f"--{o.lstrip('-')}" for o in options]
        first = next((e for e in extra if e.startswith("-")), extra[0])
        key = first.split("=")[0]
        if key.startswith("-"):
            raise _unknown_key_error("option", key, flags, "the command line")
        raise ConfigError(f"unexpected argument {first!r} on the command line: options take the form --key value")
    args.config = known.config
    return args


def grouped(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SimpleNamespace:
    """One SimpleNamespace per argument group (by the group's title), e.g. cfg.optim.lr."""
    out = {}
    for group in parser._action_groups:
        if group.title in ("positional arguments", "options", "optional arguments"):
            continue
        fields = {a.dest: getattr(args, a.dest) for a in group._group_actions if a.dest != "help"}
        out[group.title] = SimpleNamespace(**fields)
    return SimpleNamespace(**out)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save_config(args: argparse.Namespace, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with -c), atomically."""
    data = {k: _plain(v) for k, v in sorted(vars(args).items()) if k != "config"}
    header = f"# resolved config (from {args.config or 'defaults'} + command line)\n"
    return write_text_atomic(path, header + yaml.safe_dump(data, sort_keys=False))


# ----------------------------------------------------------------------------------------------
# The two command lines. Both read the same YAML files: validate.py accepts a training config
# and ignores the keys only training uses.

DEVICE_TARGETS = ("auto", "CPU", "GPU", "Ascend")
MODES = ("graph", "pynative")
AMP_LEVELS = ("O0", "O2", "O3")
DATASETS = ("cifar10", "cifar100", "imagenet", "folder", "digits")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")


def _optional(kind):
    def parse(value):
        if value is None or str(value).strip().lower() in ("none", "null", ""):
            return None
        return kind(value)

    parse.__name__ = f"optional_{getattr(kind, '__name__', 'value')}"
    return parse


def _system_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = parser.add_argument_group("system")
    g.add_argument("--device_target", default="auto", choices=DEVICE_TARGETS, help="auto: what this MindSpore build runs on")
    g.add_argument("--mode", default="graph", choices=MODES, help="graph (compiled) or pynative (eager)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--progress", type=str2bool, default=True, help="tqdm bars on a terminal (plain lines otherwise)")
    return g


def _model_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model", default="bit_m_r50x1", help="a registered name (bit_zoo.list_models()), name.tag, or 'resnetv2' with --layers"
    )
    g.add_argument("--layers", type=int_list, default=[1, 1, 1, 1], help="units per stage, for --model resnetv2 only")
    g.add_argument("--width_factor", type=int, default=1, help="width factor, for --model resnetv2 only")
    g.add_argument("--num_classes", type=_optional(int), default=None, help="default: the dataset's class count")
    g.add_argument("--conv_impl", default="auto", choices=("auto", "native", "unfold"))
    g.add_argument("--amp_level", default="O0", choices=AMP_LEVELS, help="O2/O3: fp16 (no bf16 kernels on CPU)")
    return g


def _data_group(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=DATASETS)
    g.add_argument("--data_dir", type=_optional(str), default=None, help="not needed for digits")
    g.add_argument("--classes", type=_optional(int_list), default=None, help="keep only these label ids, relabelled 0..n-1 in this order")
    g.add_argument(
        "--image_size", type=_optional(int), default=None, help="train crop; default: HyperRule's (128 below 96x96 px, else 480)"
    )
    g.add_argument("--eval_size", type=_optional(int), default=None, help="eval resolution; default image_size")
    g.add_argument(
        "--eval_resize_size",
        type=_optional(int),
        default=None,
        help="resize before a center crop to eval_size; default none (BiT: resize straight)",
    )
    g.add_argument("--interpolation", type=_optional(str), default=None, choices=(None,) + INTERPOLATIONS)
    g.add_argument("--mean", type=_optional(float_list), default=None, help="default: the weights record's ([-1, 1] for BiT)")
    g.add_argument("--std", type=_optional(float_list), default=None)
    g.add_argument("--batch_size", type=int, default=512, help="train: GLOBAL batch (all devices, all micro-batches); eval: per step")
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--val_split", type=float, default=0, help="hold out this fraction (or count) of train as the eval split")
    g.add_argument("--eval_samples", type=_optional(int), default=None, help="evaluate on the first N eval images only")
    return g


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a BiT model: YAML config (-c) sets defaults, --key value overrides.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-c", "--config", default=None, help="YAML config (configs/)")
    g = _system_group(parser)
    g.add_argument("--distribute", default="auto", choices=("auto", "on", "off"), help="auto: on when started by msrun/mpirun")
    g.add_argument("--output_dir", default="outputs/run", help="checkpoints, metrics.jsonl, curves.png, config.yaml, summary.json")
    g.add_argument("--overwrite", type=str2bool, default=False, help="allow a fresh run in an output_dir that holds a previous run")
    g.add_argument("--rank_weights", type=str2bool, default=False, help="every rank also writes its final weights to weights_rank<R>.ckpt")

    m = _model_group(parser)
    m.add_argument("--pretrained", type=str2bool, default=False, help="download and load the model's weights record")
    m.add_argument("--checkpoint_path", type=_optional(str), default=None, help="initial weights file (.npz, mindcv .ckpt, bit_zoo .ckpt)")
    m.add_argument("--recompute", type=str2bool, default=False, help="recompute activations in backward (less memory)")

    d = _data_group(parser)
    d.add_argument("--resize_size", type=_optional(int), default=None, help="train resize before the random crop (HyperRule 160/512)")
    d.add_argument("--transform", default="hyperrule", choices=("hyperrule", "seed", "eval"))
    d.add_argument("--hflip", type=str2bool, default=True)
    d.add_argument("--randaugment", type=_optional(int_list), default=None, help="num_ops magnitude, e.g. [2, 20]")
    d.add_argument("--mixup_alpha", type=_optional(float), default=None, help="default: HyperRule's (0.1 from 20k images, else 0)")
    d.add_argument("--label_smoothing", type=float, default=0.0)
    d.add_argument("--few_shot", type=_optional(int), default=None, help="k training images per class")
    d.add_argument("--num_samples", type=_optional(int), default=None, help="train on the first N records only")

    o = parser.add_argument_group("optim")
    o.add_argument("--opt", default="sgd", choices=("sgd", "rmsprop", "adamw"))
    o.add_argument("--lr", type=float, default=0.003)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--nesterov", type=str2bool, default=False)
    o.add_argument("--weight_decay", type=float, default=0.0)
    o.add_argument("--weight_decay_filter", default="none", choices=("none", "conv", "no_norm_bias", "all"))
    o.add_argument("--rmsprop_decay", type=float, default=0.9)
    o.add_argument("--rmsprop_eps", type=float, default=1.0)
    o.add_argument("--adam_betas", type=float_list, default=[0.9, 0.999])
    o.add_argument("--adam_eps", type=float, default=1e-8)

    s = parser.add_argument_group("schedule")
    s.add_argument("--scheduler", default="hyperrule", choices=("hyperrule", "staircase", "multistep", "cosine", "constant"))
    s.add_argument("--epochs", type=_optional(float), default=None, help="training length in epochs (not with hyperrule's default)")
    s.add_argument("--steps", type=_optional(int), default=None, help="training length in optimizer steps; hyperrule: by dataset size")
    s.add_argument("--warmup_steps", type=_optional(int), default=None, help="hyperrule: by dataset size")
    s.add_argument("--warmup_epochs", type=float, default=0.0)
    s.add_argument("--decay_steps", type=_optional(int_list), default=None, help="hyperrule: by dataset size")
    s.add_argument("--decay_rate", type=float, default=0.1)
    s.add_argument("--decay_epochs", type=float, default=1.0, help="staircase: decay every this many epochs")
    s.add_argument("--milestones", type=float_list, default=[], help="multistep: epochs")
    s.add_argument("--min_lr", type=float, default=0.0)

    t = parser.add_argument_group("step")
    t.add_argument("--accum_steps", type=int, default=1, help="micro-batches per optimizer step (upstream batch split)")
    t.add_argument("--clip_grad_norm", type=float, default=0.0, help="clip by global norm; 0 = off")
    t.add_argument("--loss_scale", default="none", choices=("none", "static", "dynamic"))
    t.add_argument("--loss_scale_value", type=float, default=2.0**24)
    t.add_argument("--loss_scale_factor", type=int, default=2)
    t.add_argument("--loss_scale_window", type=int, default=2000)
    t.add_argument("--ema_decay", type=float, default=0.0, help="0 = no EMA")
    t.add_argument("--ema_warmup", type=str2bool, default=True, help="decay min(d, (1+n)/(10+n)) as TF's num_updates")
    t.add_argument("--ema_eval", type=str2bool, default=True, help="evaluate (and pick best) with the EMA weights")

    k = parser.add_argument_group("checkpoint")
    k.add_argument("--resume", type=_optional(str), default=None, help="a training checkpoint, or 'auto' for <output_dir>/last.ckpt")
    k.add_argument("--save_interval", type=int, default=0, help="also save every N optimizer steps (step_N.ckpt); 0 = epoch ends only")
    k.add_argument("--keep_max", type=int, default=3, help="periodic checkpoints kept")
    k.add_argument("--eval_interval", type=int, default=1, help="evaluate every N epochs (and at the end); 0 = at the end only")
    k.add_argument("--log_interval", type=int, default=20, help="progress lines every N steps when not a terminal")
    return parser


def build_validate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="validate.py",
        description="Evaluate a checkpoint: top-1, top-5, loss and image count over every eval image.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-c", "--config", default=None, help="a training YAML config (its training-only keys are ignored)")
    g = _system_group(parser)
    g.add_argument("--output_json", type=_optional(str), default=None, help="also write the results here")
    m = _model_group(parser)
    m.add_argument("--ckpt_path", type=_optional(str), default=None, help="training checkpoint, upstream .npz or mindcv .ckpt")
    m.add_argument("--ema", type=str2bool, default=None, help="use the EMA weights of a training checkpoint (default: if it has them)")
    m.add_argument("--pretrained", type=str2bool, default=False, help="evaluate the model's own weights record (downloads)")
    d = _data_group(parser)
    d.add_argument(
        "--split", default="val", choices=("val", "test"), help="val: held-out part of train with val_split, else the test split"
    )
    parser.set_defaults(batch_size=64)
    return parser


def train_only_keys() -> set[str]:
    return set(_options(build_train_parser())) - set(_options(build_validate_parser()))


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None, *, prog: str) -> int:
    """Run a script's main(argv): bad input prints one clear line and exits 2, not a traceback."""
    try:
        main(argv)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
