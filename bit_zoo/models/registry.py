"""Model registry: architecture names and their weights tags.

An architecture name (``bit_m_r101x3``) has a default weights record; other weights of the same
architecture are tags, written ``name.tag`` as in timm (``bit_m_r50x1.in21k_ft_cifar10``). A
generic architecture (``resnetv2``: any geometry, given as arguments) is registered without
weights; list_models() lists the architectures that have weights.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable

from ..weights.pretrained import Weights

__all__ = [
    "register_model",
    "split_model_name",
    "is_model",
    "list_models",
    "list_pretrained",
    "model_entrypoint",
    "get_weights",
    "list_tags",
]

_model_entrypoints: dict[str, Callable] = {}
_model_weights: dict[str, dict[str, Weights]] = {}
_default_tags: dict[str, str | None] = {}


def register_model(fn: Callable, *, weights: dict[str, Weights], default_tag: str | None) -> Callable:
    """Register an entry point under its function name with its weights records (default_tag: the default;
    a generic architecture has none: weights={}, default_tag=None)."""
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model {name!r} is registered twice")
    if weights and default_tag not in weights or not weights and default_tag is not None:
        raise ValueError(f"default tag {default_tag!r} of {name!r} has no weights record")
    _model_entrypoints[name] = fn
    _model_weights[name] = dict(weights)
    _default_tags[name] = default_tag
    return fn


def _natural_key(name: str) -> list:
    """Sort r50 before r101: numbers compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def split_model_name(model_name: str) -> tuple[str, str | None]:
    """'bit_m_r50x1.in21k' -> ('bit_m_r50x1', 'in21k'); no tag -> (name, None)."""
    name, _, tag = model_name.partition(".")
    return name, (tag or None)


def _unknown(kind: str, value: str, choices: list[str]) -> ValueError:
    close = difflib.get_close_matches(value, choices, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {kind} {value!r}.{hint} See bit_zoo.list_models() for every name.")


def model_entrypoint(model_name: str) -> Callable:
    name, _ = split_model_name(model_name)
    if name not in _model_entrypoints:
        raise _unknown("model", model_name, list(_model_entrypoints) + list_pretrained())
    return _model_entrypoints[name]


def is_model(model_name: str) -> bool:
    name, tag = split_model_name(model_name)
    return name in _model_entrypoints and (tag is None or tag in _model_weights[name])


def list_tags(model_name: str) -> list[str]:
    """Weights tags of one architecture, default first."""
    model_entrypoint(model_name)
    name, _ = split_model_name(model_name)
    default = _default_tags[name]
    if default is None:
        return []
    return [default] + [t for t in _model_weights[name] if t != default]


def get_weights(model_name: str) -> Weights:
    """The weights record for 'name' (its default) or 'name.tag'."""
    model_entrypoint(model_name)
    name, tag = split_model_name(model_name)
    if not _model_weights[name]:
        raise ValueError(f"{name} has no weights record (an architecture of any geometry): use a registered name such as bit_m_r50x1")
    tag = tag or _default_tags[name]
    if tag not in _model_weights[name]:
        raise _unknown(f"weights tag of {name}", f"{name}.{tag}", [f"{name}.{t}" for t in _model_weights[name]])
    return _model_weights[name][tag]


def list_pretrained(filter: str = "*") -> list[str]:
    """Every 'name.tag' with weights, in natural order (default tag first), optionally filtered by a glob pattern."""
    names = [f"{n}.{t}" for n in sorted(_model_weights, key=_natural_key) for t in list_tags(n)]  # generic names have none
    return [n for n in names if fnmatch.fnmatch(n, filter)]


def list_models(filter: str = "*", *, pretrained: bool = False) -> list[str]:
    """Architecture names with weights (not the generic 'resnetv2'); with pretrained=True, every 'name.tag' (timm's include_tags)."""
    if pretrained:
        return list_pretrained(filter)
    return [n for n in sorted(_model_entrypoints, key=_natural_key) if _model_weights[n] and fnmatch.fnmatch(n, filter)]
