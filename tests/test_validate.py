"""validate.py: training checkpoints (EMA or raw), upstream .npz and mindcv .ckpt; text + JSON; every image."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bit_zoo
import train
import validate
from bit_zoo.config import ConfigError
from bit_zoo.formats import to_npz
from bit_zoo.loading import model_state, save_weights

TINY = [
    "--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "digits", "--image_size", "32", "--num_workers", "1", "--progress", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step training run with EMA: its last.ckpt holds raw and ema.* weights."""
    out = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out.parent)
        train.main(
            TINY + ["--eval_size", "32", "--hflip", "false", "--batch_size", "8", "--opt", "sgd", "--lr", "0.01", "--scheduler", "constant",
                    "--steps", "2", "--ema_decay", "0.5", "--eval_samples", "16", "--output_dir", str(out)]
        )  # fmt: skip
    return out


def test_training_checkpoint_ema_and_raw(trained, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    ema = validate.main(TINY + ["--ckpt_path", str(trained / "last.ckpt"), "--output_json", str(out_json)])
    text = capsys.readouterr().out
    assert "top-1" in text and "(ema weights)" in text
    assert json.loads(out_json.read_text())["images"] == 359  # digits' whole test partition, no dropped remainder
    assert ema["weights"] == "ema" and ema["images"] == 359
    raw = validate.main(TINY + ["--ckpt_path", str(trained / "last.ckpt"), "--ema", "false", "--batch_size", "50"])
    assert raw["weights"] == "raw" and raw["images"] == 359  # 359 = 7 x 50 + 9: the remainder counts
    assert raw["loss"] != ema["loss"]


def test_validate_with_the_training_config(trained):
    result = validate.main(["-c", str(trained / "config.yaml"), "--ckpt_path", str(trained / "best.ckpt"), "--eval_samples", "20"])
    assert result["images"] == 20 and 0 <= result["top1"] <= 100


def test_upstream_npz_and_mindcv_formats(tmp_path):
    model = bit_zoo.ResNetV2((1, 1, 1, 1), num_classes=10)
    state = model_state(model)
    state["head.fc.weight"] = np.random.default_rng(0).normal(size=state["head.fc.weight"].shape).astype(np.float32)
    np.savez(tmp_path / "w.npz", **to_npz(state, (1, 1, 1, 1)))
    save_weights(state, tmp_path / "w.ckpt")
    a = validate.main(TINY + ["--ckpt_path", str(tmp_path / "w.npz"), "--eval_samples", "24"])
    b = validate.main(TINY + ["--ckpt_path", str(tmp_path / "w.ckpt"), "--eval_samples", "24"])
    assert a["images"] == b["images"] == 24
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def test_bad_input(trained, tmp_path):
    corrupt = tmp_path / "bad.ckpt"
    corrupt.write_bytes((trained / "last.ckpt").read_bytes()[:500])
    cases = [
        ([], "nothing to evaluate"),
        (["--ckpt_path", str(tmp_path / "missing.ckpt")], "no such file"),
        (["--ckpt_path", str(corrupt)], "corrupt or truncated"),
        (["--ckpt_path", str(trained / "last.ckpt"), "--num_classes", "3"], "num_classes=3"),
        (["--ckpt_path", str(trained / "last.ckpt"), "--dataset", "cifar10"], "needs --data_dir"),
        (["--ckpt_pth", "x"], "Did you mean: --ckpt_path"),
    ]
    for extra, message in cases:
        with pytest.raises((ConfigError, ValueError, FileNotFoundError), match=message):
            validate.main(TINY + extra)
    raw_only = tmp_path / "raw.ckpt"
    save_weights({k: v for k, v in model_state(bit_zoo.ResNetV2((1, 1, 1, 1), num_classes=10)).items()}, raw_only)
    with pytest.raises(ConfigError, match="holds no EMA weights"):
        validate.main(TINY + ["--ckpt_path", str(raw_only), "--ema", "true"])
