"""One config schema for train.py and validate.py: groups of options declared once, as dataclasses.

    cfg = parse_config("train", argv)        # Config: cfg.system, cfg.model, cfg.data, cfg.optim, ...
    create_optimizer(params, cfg.optim, lr)  # the library takes the groups as they are

Each option is a field of one group, declared with bit_zoo.options.option (type, default, help,
choices from the module that uses it, value check, and the scripts that take it). Everything
else is generated from those fields:

* the argparse parser (``--name`` and the alias ``--name-with-hyphens``; every help shows its default);
* the YAML validation of ``-c FILE`` (unknown key -> error with close matches, wrong type or
  value -> error naming the key and the fix); validate.py ignores the keys only training uses;
* the saved config (config.yaml, loadable again with -c).

Adding an option is one field in its group. The groups: SystemConfig, ModelConfig, StepConfig
(here), DataConfig (data/from_config.py), OptimConfig (training/optim.py), ScheduleConfig
(training/schedules.py), CheckpointConfig (training/checkpoint.py).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .utils.atomic import write_text_atomic
from .data.from_config import DataConfig
from .errors import ConfigError
from .models.freeze import FREEZE_CHOICES
from .models.layers import CONV_IMPLS
from .options import SCRIPTS, at_least, check_group, default_of, each, float_list, int_list, number, option, str2bool
from .training.checkpoint import CheckpointConfig
from .training.distill import DistillConfig
from .training.optim import OptimConfig
from .training.schedules import ScheduleConfig
from .training.train_step import StepConfig

__all__ = [
    "ConfigError",
    "Config",
    "SystemConfig",
    "ModelConfig",
    "StepConfig",
    "str2bool",
    "int_list",
    "float_list",
    "build_parser",
    "parse_config",
    "save_config",
    "load_yaml",
    "script_keys",
]

DEVICE_TARGETS = ("auto", "CPU", "GPU", "Ascend")
MODES = ("graph", "pynative")
AMP_LEVELS = ("O0", "O2", "O3")
BOTH = ("train", "validate")


@dataclass
class SystemConfig:
    device_target: str = option("auto", "auto: what this MindSpore build runs on", choices=DEVICE_TARGETS, scripts=BOTH)
    mode: str = option("graph", "graph (compiled) or pynative (eager)", choices=MODES, scripts=BOTH)
    seed: int = option(0, "seed of every random choice (data order, augmentation, init)", check=at_least(0), scripts=BOTH)
    progress: bool = option(True, "tqdm bars on a terminal (plain lines otherwise)", scripts=BOTH)
    distribute: str = option("auto", "auto: on when started by msrun/mpirun", choices=("auto", "on", "off"))
    output_dir: str = option(
        "outputs/run",
        "checkpoints, metrics.jsonl, curves.png, config.yaml, summary.json; a URL (s3://...) is written locally, then uploaded",
        aliases=("train_url",),
    )
    overwrite: bool = option(False, "allow a fresh run in an output_dir that holds a previous run")
    rank_weights: bool = option(False, "every rank also writes its final weights to weights_rank<R>.ckpt")
    output_json: str | None = option(None, "also write the results here", scripts=("validate",))


@dataclass
class ModelConfig:
    model: str = option("bit_m_r50x1", "a registered name (bit_zoo.list_models()), name.tag, or 'resnetv2' with --layers", scripts=BOTH)
    layers: list[int] = option([1, 1, 1, 1], "units per stage, for --model resnetv2 only", check=each(at_least(1)), scripts=BOTH)
    width_factor: int = option(1, "width factor, for --model resnetv2 only", check=at_least(1), scripts=BOTH)
    num_classes: int | None = option(None, "classifier outputs; default: the dataset's class count", check=at_least(1), scripts=BOTH)
    conv_impl: str = option("auto", "convolution implementation (auto: by device)", choices=("auto",) + CONV_IMPLS, scripts=BOTH)
    amp_level: str = option("O0", "O2/O3: fp16 (no bf16 kernels on CPU)", choices=AMP_LEVELS, scripts=BOTH)
    pretrained: bool = option(
        False,
        "download and load the model's weights record",
        scripts=BOTH,
        script_help={"validate": "evaluate the model's own weights record (downloads)"},
    )
    checkpoint_path: str | None = option(
        None, "initial weights file (.npz, mindcv .ckpt, bit_zoo .ckpt or .safetensors; local or a URL)", aliases=("ckpt_url",)
    )
    recompute: bool = option(False, "recompute activations in backward (less memory)")
    freeze: str = option(
        "none", "parameters left untrained: the stem, stages up to N, or all-but-head (a linear probe)", choices=FREEZE_CHOICES
    )
    ckpt_path: str | None = option(None, "training checkpoint, upstream .npz or mindcv .ckpt", scripts=("validate",))
    ema: bool | None = option(None, "use the EMA weights of a training checkpoint (None: when it has them)", scripts=("validate",))


@dataclass
class Config:
    """Every option, by group; ``source`` is the YAML file read (or None)."""

    system: SystemConfig = field(default_factory=SystemConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    step: StepConfig = field(default_factory=StepConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    source: str | None = None

    def groups(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "source"]


GROUPS = [(f.name, f.default_factory) for f in fields(Config) if f.name != "source"]
SCRIPT_DESCRIPTIONS = {
    "train": "Fine-tune a BiT model: YAML config (-c) sets defaults, --key value overrides.",
    "validate": "Evaluate a checkpoint: top-1, top-5, loss and image count over every eval image.",
}
CONFIG_HELP = {"train": "YAML config (configs/)", "validate": "a training YAML config (its training-only keys are ignored)"}


# ----------------------------------------------------------------------------------- value parsers


def _optional(parse):
    def parse_optional(value):
        if value is None or str(value).strip().lower() in ("none", "null", ""):
            return None
        return parse(value)

    parse_optional.__name__ = f"optional {parse.__name__}"
    return parse_optional


_PARSERS = {bool: str2bool, int: number(int), float: number(float), str: str, list[int]: int_list, list[float]: float_list}


def _parser_for(hint) -> Any:
    """The value parser of a field's type annotation (X | None -> also accepts none/null)."""
    args = typing.get_args(hint)
    if (typing.get_origin(hint) in (typing.Union, types.UnionType)) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return _optional(_parser_for(inner))
    if hint not in _PARSERS:
        raise TypeError(f"option type {hint} has no parser: use int, float, str, bool, list[int], list[float] or X | None")
    return _PARSERS[hint]


# ------------------------------------------------------------------------------------ the schema


@dataclass(frozen=True)
class _Option:
    """One field of one group, as the parser and the YAML check see it."""

    group: str
    name: str
    parse: Any
    default: Any
    meta: Any  # the field's metadata (bit_zoo.options.option)

    def default_for(self, script: str) -> Any:
        return self.meta["script_defaults"].get(script, self.default)

    def help_for(self, script: str) -> str:
        return self.meta["script_help"].get(script, self.meta["help"])

    @property
    def choices(self) -> tuple | None:
        return self.meta["choices"]

    @property
    def scripts(self) -> tuple[str, ...]:
        return self.meta["scripts"]

    @property
    def aliases(self) -> tuple[str, ...]:
        return self.meta.get("aliases", ())


def _schema() -> dict[str, _Option]:
    """name -> option over every group; a name may appear once only."""
    out: dict[str, _Option] = {}
    for group, cls in GROUPS:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name in out:
                raise TypeError(f"option {f.name} is declared twice ({out[f.name].group} and {group})")
            opt = _Option(group, f.name, _parser_for(hints[f.name]), default_of(f), f.metadata)
            if not opt.scripts or not set(opt.scripts) <= set(SCRIPTS):
                raise TypeError(f"option {f.name}: declare it with bit_zoo.options.option(..., scripts=<some of {SCRIPTS}>)")
            out[f.name] = opt
    return out


def script_keys(script: str) -> list[str]:
    return [name for name, opt in _schema().items() if script in opt.scripts]


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one ConfigError instead of argparse's usage dump and exit
        raise _ArgumentError(message)


def build_parser(script: str) -> argparse.ArgumentParser:
    """The command line of train.py or validate.py, generated from the option groups."""
    parser = _Parser(
        prog=f"{script}.py",
        description=SCRIPT_DESCRIPTIONS[script],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # exact names, as in the YAML
    )
    parser.add_argument("-c", "--config", default=None, help=CONFIG_HELP[script])
    argument_groups = {name: parser.add_argument_group(name) for name, _ in GROUPS}
    for name, opt in _schema().items():
        if script not in opt.scripts:
            continue
        group = argument_groups[opt.group]
        kind = dict(dest=name, type=opt.parse, choices=opt.choices)
        group.add_argument(f"--{name}", default=opt.default_for(script), help=opt.help_for(script), **kind)
        hidden = [a for a in opt.aliases] + ([name.replace("_", "-")] if "_" in name else [])  # --num-classes for --num_classes
        for alias in hidden:
            group.add_argument(f"--{alias}", default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kind)
    return parser


# --------------------------------------------------------------------------------- YAML + argv


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to -c (see configs/)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}. Pass a readable YAML file to -c") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}. Fix the syntax at the line shown.") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value, got a {type(data).__name__}")
    return data


def _unknown_key_error(kind: str, key: str, known: Sequence[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=4, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown {kind} {key!r} in {source}.{hint} Run with --help for every option.")


def _coerce(opt: _Option, value: Any, source: str) -> Any:
    """A YAML value checked with the option's own parser and choices."""
    if isinstance(value, (list, tuple)) and not opt.parse.__name__.endswith("_list"):
        raise ConfigError(f"{source}: {opt.name} takes one value, got the list {value!r}")
    if isinstance(value, dict):
        raise ConfigError(f"{source}: {opt.name} takes a value, got the mapping {value!r}")
    try:
        value = opt.parse(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{source}: {opt.name}: {value!r} is not a valid {getattr(opt.parse, '__name__', 'value')} ({e})") from e
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{source}: {opt.name}: {value!r} is not one of {list(opt.choices)}")
    return value


def parse_config(script: str, argv: Sequence[str] | None = None) -> Config:
    """Parse argv with the YAML file named by -c/--config as defaults; check every value.

    validate.py skips the YAML keys only training uses. Raises ConfigError for a missing or
    malformed file, an unknown key (listing close matches), a value of the wrong type or out of
    range (naming the fix).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(script)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    schema = _schema()
    mine = set(script_keys(script))
    if known.config:
        source = str(known.config)
        defaults = {}
        aliases = {a: name for name, opt in schema.items() for a in opt.aliases}
        for key, value in load_yaml(known.config).items():
            key = str(key).replace("-", "_")
            key = aliases.get(key, key)
            if key not in mine:
                if key in schema and script == "validate":
                    continue  # a training config: training-only keys do not matter here
                raise _unknown_key_error("config key", key, sorted(mine), source)
            defaults[key] = _coerce(schema[key], value, source)
        parser.set_defaults(**defaults)
    args, extra = _parse_args(parser, argv)
    if extra:
        flags = [f"--{k}" for k in sorted(mine)]
        first = next((e for e in extra if e.startswith("-")), extra[0])
        key = first.split("=")[0]
        if key.startswith("-"):
            raise _unknown_key_error("option", key, flags, "the command line")
        raise ConfigError(f"unexpected argument {first!r} on the command line: options take the form --key value")
    cfg = Config(source=known.config)
    for _, group in cfg.groups():
        for f in fields(group):
            if f.name in mine:
                setattr(group, f.name, getattr(args, f.name))
        check_group(group)
    return cfg


def _parse_args(parser: argparse.ArgumentParser, argv: list[str]):
    try:
        return parser.parse_known_args(argv)
    except _ArgumentError as e:
        raise ConfigError(f"{e}. Run with --help for every option and its default.") from None


# --------------------------------------------------------------------------------------- saving


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_dict(cfg: Config, script: str = "train") -> dict[str, Any]:
    """The flat option: value mapping of a script's options (the YAML keys), in group order."""
    mine = set(script_keys(script))
    return {f.name: _plain(getattr(group, f.name)) for _, group in cfg.groups() for f in fields(group) if f.name in mine}


def save_config(cfg: Config, path: str | Path, *, script: str = "train", command: str | None = None) -> Path:
    """Write the resolved config as YAML (loadable again with -c), atomically."""
    header = f"# resolved config (from {cfg.source or 'defaults'} + command line)\n"
    if command:
        header += f"# command: {command}\n"
    return write_text_atomic(path, header + yaml.safe_dump(config_dict(cfg, script), sort_keys=False))
