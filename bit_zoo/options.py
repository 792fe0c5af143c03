"""Declaring options once: a dataclass field with its help, choices, value check and scripts.

The option groups (``OptimConfig`` in training/optim.py, ``DataConfig`` in data/from_config.py,
``ModelConfig`` in models/options.py, ``SystemConfig`` here, and each tool's own group) are plain
dataclasses whose fields are declared with :func:`option`. :func:`parse_options` generates, for
one script (train.py, validate.py, or a ``python -m bit_zoo.<tool>``), the command line, the YAML
validation of ``-c FILE`` and the checks from them; the library receives the same objects. A
field's type annotation gives its parser: ``int``, ``float``, ``str``, ``bool``, ``list[int]``,
``list[float]``, and ``X | None``. A field belongs to the scripts its ``scripts=`` names; a script
may give it its own default, help or choices (``script_defaults``, ``script_help``, ``script_choices``).

Value checks (``check=``) are small functions ``value -> problem or None``; :func:`check_group`
runs them (and a group's own ``check_options()`` for rules across fields) and raises one
ConfigError naming the key, the value and the fix. An unknown option names the one meant: close
spellings, and the usual names of other training scripts (``--learning_rate`` -> ``--lr``, SYNONYMS).
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = [
    "SCRIPTS",
    "SystemConfig",
    "ToolParser",
    "parse_options",
    "build_parser",
    "script_options",
    "load_yaml",
    "unknown_option_error",
    "str2bool",
    "number",
    "int_list",
    "float_list",
    "option",
    "check_group",
    "positive",
    "non_negative",
    "at_least",
    "unit_interval",
    "each",
    "length",
]

# Every script whose command line is generated from the declarations: train.py, validate.py, the
# python -m bit_zoo.<tool> commands and the developer benchmarks (python -m benchmarks.<name>).
SCRIPTS = ("train", "validate", "predict", "embed", "fewshot", "convert", "memory", "benchmark", "eager_bench", "load_bench")
BOTH = ("train", "validate")
INFERENCE_TOOLS = ("predict", "embed", "fewshot")  # the tools that load a model for inference


# ----------------------------------------------------------------------------------- value parsers
# What a command-line or YAML value becomes (config.py's schema and the inference tools' own
# parsers both use them; here, below both, so neither imports the other for them).


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def number(kind):
    def parse(value):
        if isinstance(value, bool):  # YAML true/false are not numbers
            raise ValueError(f"expected a number, got {value!r}")
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected a whole number, got {value!r}")
            return int(value)
        if kind is int and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                number = float(value)  # "1e3" -> 1000; "2.5" stays an error
                if not number.is_integer():
                    raise ValueError(f"expected a whole number, got {value!r}") from None
                return int(number)
        return kind(value)

    parse.__name__ = kind.__name__
    return parse


def _list_of(kind):
    item = number(kind)

    def parse(value):
        if isinstance(value, (list, tuple)):
            return [item(v) for v in value]
        text = str(value).strip().strip("[]()")
        return [item(v) for v in text.replace(",", " ").split()] if text else []

    parse.__name__ = f"{kind.__name__}_list"
    return parse


int_list = _list_of(int)
float_list = _list_of(float)


class ToolParser(argparse.ArgumentParser):
    """The parser of the ``python -m bit_zoo.<tool>`` commands: a bad argument is one line and exit 2,
    as train.py and validate.py do, instead of argparse's usage dump above the error."""

    def error(self, message):
        print(f"{self.prog}: error: {message}. Run with --help for every option and its default.", file=sys.stderr)
        sys.exit(2)


def option(
    default: Any,
    help: str,  # noqa: A002 - the argparse word
    *,
    choices: tuple | None = None,
    check=None,
    scripts: tuple[str, ...] = ("train",),
    script_defaults: dict[str, Any] | None = None,
    script_help: dict[str, str] | None = None,
    script_choices: dict[str, tuple] | None = None,
    aliases: tuple[str, ...] = (),
    required: bool = False,
):
    """A dataclass field that is also a command-line option and YAML key of the named scripts.

    `aliases`: other names accepted for it on the command line and in YAML (e.g. the MindSpore
    model zoo's data_url for data_dir). `script_defaults` / `script_help` / `script_choices`: what
    differs for one script (validate.py's batch_size is per eval step, 64). `required`: the
    script cannot run without a value (from the command line or the YAML file)."""
    meta = {
        "required": required,
        "aliases": aliases,
        "help": help,
        "choices": choices,
        "check": check,
        "scripts": scripts,
        "script_defaults": script_defaults or {},
        "script_help": script_help or {},
        "script_choices": script_choices or {},
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


# --------------------------------------------------------------------------------- value checks
# Each returns None when the value is fine, else what the value must be (the message's "must be ...").


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def finite(v):
    return None if _finite(v) else "a finite number"


def positive(v):
    return None if _finite(v) and v > 0 else "a finite number > 0"


def non_negative(v):
    return None if _finite(v) and v >= 0 else "a finite number >= 0"


def at_least(low):
    def check(v):
        return None if _finite(v) and v >= low else f"a whole number >= {low}"

    return check


def unit_interval(v):
    """[0, 1): momentum-like decay values and fractions."""
    return None if _finite(v) and 0 <= v < 1 else "a number in [0, 1)"


def each(check):
    def check_all(values):
        bad = [x for x in values if check(x)]
        return f"a list of which every value is {check(bad[0])}" if bad else None

    return check_all


def length(n: int, check=None):
    def check_list(values):
        if len(values) != n:
            return f"a list of {n} values"
        return each(check)(values) if check else None

    return check_list


def check_group(group, names: Sequence[str] | None = None) -> None:
    """Run the checks of the fields in `names` (default: all), then the group's own rules across
    fields (a ``check_options()`` method, e.g. an option the chosen dataset does not use); raise
    ConfigError for the first bad value (None means "unset" and passes)."""
    for f in fields(group):
        if names is not None and f.name not in names:
            continue
        check = f.metadata.get("check")
        value = getattr(group, f.name)
        if check is None or value is None:
            continue
        problem = check(value)
        if problem:
            default = "" if f.metadata.get("script_defaults") else f" (default: {default_of(f)!r})"
            raise ConfigError(f"{f.name}={value!r}: must be {problem}. Fix it in the config or with --{f.name}{default}")
    across = getattr(group, "check_options", None)
    if across is not None:
        across(set(names) if names is not None else {f.name for f in fields(group)})


# ------------------------------------------------------------------------------ the system group
# Options of every script that belong to no part of the library: the device, the seed, the outputs.

DEVICE_TARGETS = ("auto", "CPU", "GPU", "Ascend")
MODES = ("graph", "pynative")
ALL_TOOLS_TRAIN_VALIDATE = BOTH + INFERENCE_TOOLS


@dataclass
class SystemConfig:
    device_target: str = option("auto", "auto: what this MindSpore build runs on", choices=DEVICE_TARGETS, scripts=BOTH)
    mode: str = option(
        "graph",
        "graph (compiled) or pynative (eager)",
        choices=MODES,
        scripts=ALL_TOOLS_TRAIN_VALIDATE + ("benchmark",),
        script_defaults={t: "pynative" for t in INFERENCE_TOOLS},
        script_help={t: "pynative runs a compiled forward (see ResNetV2 eager_jit); graph compiles the whole network" for t in INFERENCE_TOOLS},
    )
    seed: int = option(
        0,
        "seed of every random choice (data order, augmentation, init)",
        check=at_least(0),
        scripts=BOTH + ("embed", "fewshot"),
    )
    progress: bool = option(True, "tqdm bars on a terminal (plain lines otherwise)", scripts=ALL_TOOLS_TRAIN_VALIDATE)
    distribute: str = option("auto", "auto: on when started by msrun/mpirun", choices=("auto", "on", "off"))
    output_dir: str = option(
        "outputs/run",
        "checkpoints, metrics.jsonl, curves.png, config.yaml, summary.json; a URL (s3://...) is written locally, then uploaded",
        aliases=("train_url",),
    )
    overwrite: bool = option(
        False,
        "allow a fresh run in an output_dir that holds a previous run",
        scripts=("train", "embed"),
        script_help={"embed": "replace an --output computed with other settings"},
    )
    rank_weights: bool = option(False, "every rank also writes its final weights to weights_rank<R>.ckpt")
    output_json: str | None = option(
        None,
        "also write the results here",
        scripts=("validate", "predict", "fewshot"),
        script_help={"predict": "write predictions (and skipped files) as JSON"},
    )


# ----------------------------------------------------------------------------------- the schema


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


@dataclass(frozen=True)
class Opt:
    """One field of one group as one script sees it: its parser, default, help and choices."""

    group: str
    name: str
    parse: Any
    default: Any
    help: str
    choices: tuple | None
    aliases: tuple[str, ...]
    required: bool = False


Groups = Sequence[tuple[str, type]]


def script_options(script: str, groups: Groups) -> dict[str, Opt]:
    """name -> option: the fields of `groups` that `script` takes; a name may appear once per script."""
    if script not in SCRIPTS:
        raise TypeError(f"unknown script {script!r}: add it to bit_zoo.options.SCRIPTS")
    out: dict[str, Opt] = {}
    for group, cls in groups:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            meta = f.metadata
            if "scripts" not in meta:
                continue  # a plain field (e.g. what a script fills in itself)
            if not meta["scripts"] or not set(meta["scripts"]) <= set(SCRIPTS):
                raise TypeError(f"option {f.name}: declare it with bit_zoo.options.option(..., scripts=<some of {SCRIPTS}>)")
            if script not in meta["scripts"]:
                continue
            if f.name in out:
                raise TypeError(f"option {f.name} is declared twice for {script} ({out[f.name].group} and {group})")
            out[f.name] = Opt(
                group,
                f.name,
                _parser_for(hints[f.name]),
                meta["script_defaults"].get(script, default_of(f)),
                meta["script_help"].get(script, meta["help"]),
                meta.get("script_choices", {}).get(script, meta["choices"]),
                tuple(meta.get("aliases", ())),
                bool(meta.get("required", False)),
            )
    return out


# The names other training scripts (timm, mindcv, PyTorch examples, Keras) use for an option, so
# that a user's habit gets the option meant: difflib alone answers --learning_rate with --decay_rate.
SYNONYMS = {
    "learning_rate": "lr",
    "base_lr": "lr",
    "lr_base": "lr",
    "initial_lr": "lr",
    "optimizer": "opt",
    "optim": "opt",
    "sched": "scheduler",
    "lr_scheduler": "scheduler",
    "lr_schedule": "scheduler",
    "num_epochs": "epochs",
    "epoch": "epochs",
    "max_epochs": "epochs",
    "n_epochs": "epochs",
    "epoch_size": "epochs",
    "max_steps": "steps",
    "num_steps": "steps",
    "total_steps": "steps",
    "iterations": "steps",
    "max_iters": "steps",
    "warmup": "warmup_steps",
    "warmup_iters": "warmup_steps",
    "wd": "weight_decay",
    "bs": "batch_size",
    "batch": "batch_size",
    "train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "grad_accum_steps": "accum_steps",
    "gradient_accumulation_steps": "accum_steps",
    "grad_accumulation": "accum_steps",
    "clip_grad": "clip_grad_norm",
    "max_grad_norm": "clip_grad_norm",
    "grad_clip": "clip_grad_norm",
    "model_ema_decay": "ema_decay",
    "smoothing": "label_smoothing",
    "mixup": "mixup_alpha",
    "aa": "randaugment",
    "auto_augment": "randaugment",
    "img_size": "image_size",
    "input_size": "image_size",
    "resolution": "image_size",
    "crop_size": "image_size",
    "size": "image_size",
    "eval_image_size": "eval_size",
    "val_size": "eval_size",
    "test_size": "eval_size",
    "arch": "model",
    "model_name": "model",
    "network": "model",
    "backbone": "model",
    "pretrain": "pretrained",
    "weights": "checkpoint_path",
    "ckpt": "checkpoint_path",
    "checkpoint": "checkpoint_path",
    "initial_checkpoint": "checkpoint_path",
    "resume_from": "resume",
    "n_classes": "num_classes",
    "class_num": "num_classes",
    "nb_classes": "num_classes",
    "workers": "num_workers",
    "j": "num_workers",
    "data": "data_dir",
    "data_path": "data_dir",
    "data_root": "data_dir",
    "dataset_dir": "data_dir",
    "dataset_path": "data_dir",
    "root": "data_dir",
    "output": "output_dir",
    "out_dir": "output_dir",
    "save_dir": "output_dir",
    "ckpt_save_dir": "output_dir",
    "logdir": "output_dir",
    "amp": "amp_level",
    "precision": "amp_level",
    "device": "device_target",
    "top_k": "topk",
    "k": "topk",
    "shot": "shots",
    "n_shots": "shots",
    "num_shots": "shots",
    "l2": "l2_reg",
}


def _normal(key: str) -> str:
    return key.lstrip("-").replace("-", "_").lower()


def unknown_option_error(kind: str, key: str, known: Sequence[str], source: str) -> ConfigError:
    """"unknown option '--learning_rate' in the command line. Did you mean: --lr?" (known names without dashes)."""
    dashes = "--" if key.startswith("-") else ""
    name = _normal(key)
    meant = [n for n in known if n.lower() == name]
    for form in (name, name.replace("_", "")):
        target = SYNONYMS.get(form)
        if target in known and target not in meant:
            meant.append(target)
    if not meant:  # a known synonym is the answer; close spellings only otherwise (--learning_rate is not --decay_rate)
        meant = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
    hint = f" Did you mean: {', '.join(dashes + m for m in meant[:4])}?" if meant else ""
    return ConfigError(f"unknown {kind} {key!r} in {source}.{hint} Run with --help for every option.")


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


def coerce(opt: Opt, value: Any, source: str) -> Any:
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (a tool's module docstring, with its example commands); every option's default shown."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default:" in text else super()._get_help_string(action)  # a help that explains its default says it once


class _ListAction(argparse.Action):
    """Every value given to a list option, as one list (each value may itself be "1,5,10"); "none" unsets it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if any(v is None for v in values):
            setattr(namespace, self.dest, None)
            return
        setattr(namespace, self.dest, [x for v in values for x in v])


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one ConfigError instead of argparse's usage dump and exit
        raise _ArgumentError(message)


def build_parser(
    script: str,
    groups: Groups,
    *,
    prog: str,
    description: str | None = None,
    config: str | None = None,
    positionals: Callable[[argparse.ArgumentParser], None] | None = None,
    formatter_class=None,
) -> argparse.ArgumentParser:
    """The command line of `script`, generated from the fields of `groups` it takes.

    `config`: the help of -c/--config (a YAML file of defaults), None for no -c. `positionals`
    adds the arguments that are not options (predict's paths)."""
    formatter_class = formatter_class or HelpFormatter
    parser = _Parser(prog=prog, description=description, formatter_class=formatter_class, allow_abbrev=False)  # exact names, as in YAML
    if positionals is not None:
        positionals(parser)
    if config is not None:
        parser.add_argument("-c", "--config", default=None, help=config)
    argument_groups = {}
    for name, opt in script_options(script, groups).items():
        if opt.group not in argument_groups:
            argument_groups[opt.group] = parser.add_argument_group(opt.group)
        group = argument_groups[opt.group]
        kind = dict(dest=name, type=opt.parse, choices=opt.choices)
        if opt.parse.__name__ in ("str2bool", "optional str2bool"):
            kind.update(nargs="?", const=True, metavar="{true,false}")  # --flag alone means true
        elif opt.parse.__name__.endswith("_list"):
            kind.update(nargs="+", action=_ListAction)  # --shots 1 5 10 as well as --shots 1,5,10
        group.add_argument(f"--{name}", default=opt.default, help=opt.help, **kind)
        spellings = dict.fromkeys(a for n in (name, *opt.aliases) for a in (n, n.replace("_", "-")))  # --num-classes for --num_classes
        hidden = [a for a in spellings if a != name]
        for alias in hidden:
            group.add_argument(f"--{alias}", default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kind)
    return parser


@dataclass
class Parsed:
    """What parse_options() read: one instance per group, the other arguments, the YAML file."""

    groups: dict[str, Any]
    args: argparse.Namespace
    source: str | None = None
    yaml_skipped: list[str] = field(default_factory=list)

    def __getitem__(self, group: str) -> Any:
        return self.groups[group]

    def flat(self) -> argparse.Namespace:
        """Every option of every group and the other arguments as one namespace (args.topk, args.dataset, ...)."""
        out = argparse.Namespace(**vars(self.args))
        for group in self.groups.values():
            for f in fields(group):
                setattr(out, f.name, getattr(group, f.name))
        return out


def parse_options(
    script: str,
    groups: Groups,
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    description: str | None = None,
    config: str | None = None,
    yaml_skip: Callable[[str], bool] | None = None,
    positionals: Callable[[argparse.ArgumentParser], None] | None = None,
    formatter_class=None,
) -> Parsed:
    """Parse argv (with the YAML file named by -c as defaults when `config` is given) and check every value.

    A YAML key that `script` does not take is an error listing the close matches, unless
    `yaml_skip(key)` says it belongs to another script (validate.py: the training keys; a tool
    reading a training config: every key it does not take). Raises ConfigError for a malformed
    file, an unknown option, a value of the wrong type or out of range (naming the fix).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(
        script, groups, prog=prog, description=description, config=config, positionals=positionals, formatter_class=formatter_class
    )
    mine = script_options(script, groups)
    source, skipped = None, []
    if config is not None:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("-c", "--config", default=None)
        known, _ = pre.parse_known_args(argv)
        source = known.config
    if source:
        defaults = {}
        aliases = {a: name for name, opt in mine.items() for a in opt.aliases}
        for key, value in load_yaml(source).items():
            key = str(key).replace("-", "_")
            key = aliases.get(key, key)
            if key not in mine:
                if yaml_skip is not None and yaml_skip(key):
                    skipped.append(key)
                    continue
                raise unknown_option_error("config key", key, sorted(mine), str(source))
            defaults[key] = coerce(mine[key], value, str(source))
        parser.set_defaults(**defaults)
    try:
        args, extra = parser.parse_known_args(argv)
    except _ArgumentError as e:
        raise ConfigError(f"{e}. Run with --help for every option and its default.") from None
    if extra:
        first = next((e for e in extra if e.startswith("-")), extra[0])
        key = first.split("=")[0]
        if key.startswith("-"):
            raise unknown_option_error("option", key, sorted(mine), "the command line")
        raise ConfigError(f"unexpected argument {first!r} on the command line: options take the form --key value")
    for name, opt in mine.items():
        if opt.required and getattr(args, name) is None:
            raise ConfigError(f"--{name} is required ({opt.help}). Run with --help for every option.")
    out = {}
    for group, cls in groups:
        instance = cls()
        taken = [f.name for f in fields(cls) if f.name in mine and mine[f.name].group == group]
        for name in taken:
            setattr(instance, name, getattr(args, name))
            delattr(args, name)
        check_group(instance, taken)
        out[group] = instance
    return Parsed(out, args, source, skipped)
