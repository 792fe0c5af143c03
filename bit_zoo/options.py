"""Declaring options once: a dataclass field with its help, choices, value check and scripts.

The option groups (``OptimConfig`` in training/optim.py, ``ScheduleConfig`` in
training/schedules.py, ...) are plain dataclasses whose fields are declared with :func:`option`.
bit_zoo.config generates the command line, the YAML validation and the saved config from them;
the library receives the same objects. A field's type annotation gives its parser:
``int``, ``float``, ``str``, ``bool``, ``list[int]``, ``list[float]``, and ``X | None``.

Value checks (``check=``) are small functions ``value -> problem or None``; :func:`check_group`
runs them and raises one ConfigError naming the key, the value and the fix.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import MISSING, field, fields
from typing import Any

from .errors import ConfigError

__all__ = [
    "ToolParser",
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

SCRIPTS = ("train", "validate")


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
    aliases: tuple[str, ...] = (),
):
    """A dataclass field that is also a command-line option and YAML key of the named scripts.

    `aliases`: other names accepted for it on the command line and in YAML (e.g. the MindSpore
    model zoo's data_url for data_dir)."""
    meta = {
        "aliases": aliases,
        "help": help,
        "choices": choices,
        "check": check,
        "scripts": scripts,
        "script_defaults": script_defaults or {},
        "script_help": script_help or {},
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


def check_group(group) -> None:
    """Run every field's check; raise ConfigError for the first bad value (None means "unset" and passes)."""
    for f in fields(group):
        check = f.metadata.get("check")
        value = getattr(group, f.name)
        if check is None or value is None:
            continue
        problem = check(value)
        if problem:
            default = "" if f.metadata.get("script_defaults") else f" (default: {default_of(f)!r})"
            raise ConfigError(f"{f.name}={value!r}: must be {problem}. Fix it in the config or with --{f.name}{default}")
