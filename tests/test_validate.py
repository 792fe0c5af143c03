"""validate.py: training checkpoints (EMA or raw), upstream .npz and mindcv .ckpt; text + JSON; every image;
its accuracy against one computed here without bit_zoo's data pipeline or evaluate()."""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest

import bit_zoo
import train
import validate
from bit_zoo.errors import ConfigError
from bit_zoo.weights.formats import to_npz
from bit_zoo.weights.loading import model_state, save_weights

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


def test_validate_with_the_training_config_reproduces_the_runs_eval(trained):
    """Same weights (EMA), same 16 images, same preprocessing: validate.py reports what training's last eval did."""
    final = json.loads((trained / "summary.json").read_text())["final"]
    result = validate.main(["-c", str(trained / "config.yaml"), "--ckpt_path", str(trained / "last.ckpt")])
    assert result["images"] == final["images"] == 16 and result["weights"] == final["weights"] == "ema"
    assert result["top1"] == final["top1"] and result["loss"] == pytest.approx(final["loss"], rel=1e-5)


def _digits_test_partition() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits test partition, as 32x32 RGB in [-1, 1] (nearest upsampling = each pixel repeated 4x4)."""
    from sklearn.datasets import load_digits

    from bit_zoo.data.sources import digits_partition

    digits = load_digits()
    _, test = digits_partition(digits.target)
    grey = np.round(digits.images[test] * (255.0 / 16.0)).astype(np.uint8).astype(np.float32)
    big = grey.repeat(4, axis=1).repeat(4, axis=2)
    x = np.repeat(big[:, None], 3, axis=1) / 255.0 * 2.0 - 1.0
    return x.astype(np.float32), digits.target[test]


def test_accuracy_matches_an_independent_computation(tmp_path):
    """Random weights (random head, so predictions vary): validate's top-1 and loss over all 359 test images vs numpy's."""
    model = bit_zoo.ResNetV2((1, 1, 1, 1), num_classes=10)
    rng = np.random.default_rng(0)
    state = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in model_state(model).items()}
    state["head.fc.weight"] = rng.normal(size=state["head.fc.weight"].shape).astype(np.float32)
    save_weights(state, tmp_path / "w.ckpt")
    result = validate.main(TINY + ["--ckpt_path", str(tmp_path / "w.ckpt"), "--interpolation", "nearest", "--batch_size", "100"])

    ms.load_param_into_net(model, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in state.items()})
    model.set_train(False)
    x, y = _digits_test_partition()
    logits = np.concatenate([model(ms.Tensor(x[i : i + 64])).asnumpy() for i in range(0, len(x), 64)])
    predictions = logits.argmax(1)
    assert len(set(predictions)) >= 3, "the check needs varied predictions"
    top1 = 100.0 * np.mean(predictions == y)
    shifted = logits - logits.max(1, keepdims=True)
    loss = float(np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(y)), y]))
    assert result["images"] == len(y) == 359
    assert result["top1"] == pytest.approx(top1, abs=100.0 / 359 + 1e-9)  # at most one near-tie may flip (graph vs eager)
    assert result["loss"] == pytest.approx(loss, rel=1e-3)


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
    flipped = tmp_path / "flipped.ckpt"
    raw = bytearray((trained / "last.ckpt").read_bytes())
    raw[-200] ^= 0x01
    flipped.write_bytes(bytes(raw))
    cases = [
        ([], "nothing to evaluate"),
        (["--ckpt_path", str(tmp_path / "missing.ckpt")], "no such file"),
        (["--ckpt_path", str(corrupt)], "corrupt or truncated"),
        (["--ckpt_path", str(flipped)], "flipped.ckpt does not match the digest written with it"),
        (["--ckpt_path", str(trained / "last.ckpt"), "--num_classes", "3"], "num_classes=3"),
        (["--ckpt_path", str(trained / "last.ckpt"), "--classes", "0,1,2"], "10-class classifier but the evaluated data has 3 classes"),
        (["--ckpt_path", str(trained / "last.ckpt"), "--dataset", "cifar10"], "needs --data_dir"),
        (["--ckpt_path", str(trained / "last.ckpt"), "--batch_size", "0"], "batch_size=0: must be a whole number >= 1"),
        (["--ckpt_pth", "x"], "Did you mean: --ckpt_path"),
    ]
    for extra, message in cases:
        with pytest.raises((ConfigError, ValueError, FileNotFoundError), match=message):
            validate.main(TINY + extra)
    raw_only = tmp_path / "raw.ckpt"
    save_weights({k: v for k, v in model_state(bit_zoo.ResNetV2((1, 1, 1, 1), num_classes=10)).items()}, raw_only)
    with pytest.raises(ValueError, match="holds no EMA weights"):
        validate.main(TINY + ["--ckpt_path", str(raw_only), "--ema", "true"])


def test_refuses_a_classifier_of_other_classes(npz_r50_1000, capsys):
    """Issue 9.7: a 1000-class .npz on the 10 digits classes was evaluated with a zeroed head (top-1 0.00, exit 0)."""
    path, _ = npz_r50_1000
    code = validate.cli(["--model", "bit_s_r50x1", "--dataset", "digits", "--ckpt_path", str(path), "--progress", "false"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("validate.py: ")]
    assert code == 2 and "Traceback" not in err
    assert lines == [
        f"validate.py: error: {path} has a 1000-class classifier but the evaluated data has 10 classes: evaluate it on data with "
        "its 1000 classes, or fine-tune it first (train.py --checkpoint_path)"
    ]
