"""One config schema for train.py and validate.py: groups of options declared once, as dataclasses.

    cfg = parse_config("train", argv)        # Config: cfg.system, cfg.model, cfg.data, cfg.optim, ...
    create_optimizer(params, cfg.optim, lr)  # the library takes the groups as they are

Each option is a field of one group, declared with bit_zoo.options.option (type, default, help,
choices from the module that uses it, value check, and the scripts that take it). Everything
else is generated from those fields:

* the argparse parser (``--name`` and the alias ``--name-with-hyphens``; every help shows its default);
* the YAML validation of ``-c FILE`` (unknown key -> error naming the option meant, wrong type or
  value -> error naming the key and the fix); validate.py ignores the keys only training uses;
* the saved config (config.yaml, loadable again with -c).

Adding an option is one field in its group. The groups: SystemConfig (options.py), ModelConfig
(models/options.py), DataConfig (data/from_config.py), OptimConfig (training/optim.py),
ScheduleConfig (training/schedules.py), StepConfig (training/train_step.py), CheckpointConfig
(training/checkpoint.py), DistillConfig (training/distill.py). The tools (bit_zoo/tools/) take
their options from the same groups through bit_zoo.options.parse_options.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .data.from_config import DataConfig
from .errors import ConfigError
from .models.options import ModelConfig
from .options import SystemConfig, load_yaml, parse_options, script_options
from .options import build_parser as _build_parser
from .training.checkpoint import CheckpointConfig
from .training.distill import DistillConfig
from .training.optim import OptimConfig
from .training.schedules import ScheduleConfig
from .training.train_step import StepConfig
from .utils.atomic import write_text_atomic

__all__ = [
    "ConfigError",
    "Config",
    "SystemConfig",
    "ModelConfig",
    "StepConfig",
    "build_parser",
    "parse_config",
    "save_config",
    "load_yaml",
    "script_keys",
]


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


def script_keys(script: str) -> list[str]:
    return list(script_options(script, GROUPS))


def build_parser(script: str):
    """The command line of train.py or validate.py, generated from the option groups."""
    return _build_parser(script, GROUPS, prog=f"{script}.py", description=SCRIPT_DESCRIPTIONS[script], config=CONFIG_HELP[script])


def parse_config(script: str, argv: Sequence[str] | None = None) -> Config:
    """Parse argv with the YAML file named by -c/--config as defaults; check every value.

    validate.py skips the YAML keys only training uses. Raises ConfigError for a missing or
    malformed file, an unknown key (naming the option meant), a value of the wrong type or out of
    range (naming the fix).
    """
    train_keys = set(script_keys("train"))
    parsed = parse_options(
        script,
        GROUPS,
        argv,
        prog=f"{script}.py",
        description=SCRIPT_DESCRIPTIONS[script],
        config=CONFIG_HELP[script],
        yaml_skip=(lambda key: key in train_keys) if script != "train" else None,  # a training config: its training-only keys
    )
    return Config(**parsed.groups, source=parsed.source)


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
