"""Every numeric option of every script and tool carries a range check where it is declared, so a negative,
zero or NaN value is one line before anything runs (fewshot --l2_reg -1 printed nonsense; convert
--num_classes -1 wrote a file without a classifier; memory --devices 0 divided by zero)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from bit_zoo import config
from bit_zoo.options import SCRIPTS, script_options
from bit_zoo.tools import convert, embed, fewshot, memory, predict

GROUPS = {
    "train": config.GROUPS,
    "validate": config.GROUPS,
    "convert": convert.GROUPS,
    "embed": embed.GROUPS,
    "fewshot": fewshot.GROUPS,
    "predict": predict.GROUPS,
    "memory": [("memory", memory.MemoryConfig)],
}


def _numeric(hint) -> bool:
    if hint in (int, float):
        return True
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return any(_numeric(a) for a in args)


@pytest.mark.parametrize("script", sorted(GROUPS))
def test_every_numeric_option_has_a_range_check(script):
    assert script in SCRIPTS
    taken = script_options(script, GROUPS[script])
    unchecked = []
    for _, cls in GROUPS[script]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            # a choice list is a range too
            if f.name in taken and _numeric(hints[f.name]) and f.metadata.get("check") is None and not f.metadata.get("choices"):
                unchecked.append(f"{cls.__name__}.{f.name}")
    assert not unchecked, f"{script}: numeric options without a range check: {unchecked}"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"preprocess": {"image_size": 10**9}}, "preprocess.image_size=1000000000"),
        ({"preprocess": {"eval_size": 0}}, "preprocess.eval_size=0"),
        ({"preprocess": {"std": [0.5, 0.0, 0.5]}}, "preprocess.std"),
        ({"preprocess": {"crop_pct": float("inf")}}, "preprocess.crop_pct"),
        ({"layers": [1, 1, 10**6, 1]}, "layers"),
        ({"num_classes": -1}, "num_classes=-1"),
    ],
)
def test_a_crafted_meta_json_with_a_valid_digest_is_refused_in_one_line(tmp_path, change, named, capsys):
    """A digest vouches for integrity, not for sense: anyone can write a file whose meta.json asks for a
    billion-pixel resize or a million-unit stage and a matching digest. Readers bound every value first."""
    import numpy as np

    from bit_zoo.tools.predict import main
    from bit_zoo.weights.loading import save_weights
    from bit_zoo.weights.meta import with_meta

    meta = {"model": "resnetv2", "layers": [1, 1, 1, 1], "width_factor": 1, "num_classes": 3, "in_channels": 3, "class_names": None,
            "preprocess": {"image_size": 32, "eval_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                           "crop_pct": 1.0}}  # fmt: skip
    for key, value in change.items():
        meta[key] = {**meta[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "crafted.ckpt"
    save_weights(with_meta({"head.fc.bias": np.zeros(3, np.float32)}, meta), path)  # the digest matches what is written
    (tmp_path / "x.png").write_bytes(b"")
    assert main([str(tmp_path / "x.png"), "--checkpoint_path", str(path), "--progress", "false"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("python -m bit_zoo.predict")]
    assert len(err) == 1 and named in err[0] and "out of range" in err[0], err
