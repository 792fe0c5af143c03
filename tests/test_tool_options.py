"""The command lines of train.py, validate.py and every tool come from the option declarations:
one parser per value, suggestions that name the option meant, options the run would ignore refused,
and an explicit resolution honoured."""

from __future__ import annotations

import pytest

from bit_zoo.config import parse_config
from bit_zoo.errors import ConfigError


@pytest.mark.parametrize(
    "argv, meant",
    [
        (["--learning_rate", "0.1"], "--lr"),  # difflib alone says --decay_rate
        (["--num_epochs", "3"], "--epochs"),
        (["--optimizer", "adamw"], "--opt"),
        (["--img_size", "64"], "--image_size"),
        (["--batch-sz", "8"], "--batch_size"),  # a misspelling still gets the close match
    ],
)
def test_train_suggests_the_option_meant(argv, meant):
    with pytest.raises(ConfigError, match=f"Did you mean: {meant}\\?"):
        parse_config("train", argv)


def test_yaml_key_suggests_the_option_meant(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'.*Did you mean: lr\\?"):
        parse_config("train", ["-c", str(cfg)])
