"""train.py end to end on tiny settings: outputs, fp16 + loss scale + EMA + accumulation + clipping,
resume after a kill, bad input, and (heavy) data parallel with msrun and mpirun.

Runs go through train.main(argv) in-process where possible; a tiny ResNetV2 (one unit per stage)
at 32 px keeps each compile + step in seconds on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

import train
from conftest import results_rows
from bit_zoo.config import parse_config
from bit_zoo.errors import ConfigError, TrainingStopped
from bit_zoo.weights.meta import META_KEY, verify_digest

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "digits", "--image_size", "32", "--eval_size", "32",
    "--hflip", "false", "--opt", "sgd", "--lr", "0.01", "--scheduler", "constant", "--progress", "false",
    "--eval_samples", "16", "--num_workers", "1",
]  # fmt: skip
# Deterministic input ("eval" transform: resize only, no random crop) so runs can be compared exactly.
EXACT = TINY + ["--transform", "eval", "--batch_size", "8"]


def params_of(path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    data = ms.load_checkpoint(str(path))
    return {
        k: v.asnumpy()
        for k, v in data.items()
        if not k.startswith(("ema.", "optim.", "state.", META_KEY)) or prefix and k.startswith(prefix)
    }


def assert_same_params(a: dict, b: dict, *, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """6 uninterrupted steps with a checkpoint after every step (used by several tests)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out.parent)
        summary = train.main(EXACT + ["--steps", "6", "--save_interval", "1", "--keep_max", "2", "--output_dir", str(out)])
    return out, summary


def test_outputs_of_a_run(reference_run):
    out, summary = reference_run
    for name in ("last.ckpt", "best.ckpt", "metrics.jsonl", "curves.png", "config.yaml", "summary.json"):
        assert (out / name).is_file(), name
    assert [p.name for p in sorted(out.glob("step_*.ckpt"))] == ["step_5.ckpt", "step_6.ckpt"]  # keep_max 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r["kind"] == "epoch"][-1]
    assert {"train_loss", "lr", "top1", "top5", "eval_loss", "img_per_s"} <= epoch.keys()
    assert records[-1]["kind"] == "summary" and summary["steps"] == 6 and summary["final"]["images"] == 16
    keys = ms.load_checkpoint(str(out / "last.ckpt")).keys()
    assert "state.step" in keys and "optim.global_step" in keys and any(k.startswith("optim.moments.") for k in keys)
    # the resolved config reproduces the run's settings
    assert parse_config("train", ["-c", str(out / "config.yaml")]).schedule.steps == 6
    assert json.loads((out / "summary.json").read_text())["class_names"] == [str(i) for i in range(10)]


def test_every_checkpoint_carries_meta_and_digest(reference_run):
    out, _ = reference_run
    for name in ("last.ckpt", "best.ckpt", "step_6.ckpt"):
        arrays = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(out / name)).items()}
        assert next(iter(arrays)) == META_KEY, "meta.json must be the first entry (a truncated file keeps it)"
        meta = verify_digest(out / name, arrays)
        assert meta["model"] == "resnetv2" and meta["layers"] == [1, 1, 1, 1] and meta["width_factor"] == 1
        assert meta["num_classes"] == 10 and meta["in_channels"] == 3 and meta["class_names"] == [str(i) for i in range(10)]
        assert meta["preprocess"] == {
            "image_size": 32, "eval_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0
        }  # fmt: skip


def _entry_ends(data: bytes) -> list[int]:
    """Byte offsets where the entries of a MindSpore checkpoint (protobuf: repeated field 1) end."""
    ends, pos = [], 0
    while pos < len(data):
        assert data[pos] == 0x0A
        pos, length, shift = pos + 1, 0, 0
        while True:
            byte = data[pos]
            length |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                break
        pos += length
        ends.append(pos)
    return ends


def test_digest_catches_a_checkpoint_cut_at_an_entry_boundary(reference_run, tmp_path):
    """Cut after whole entries, the file still loads; the digest is what tells it is incomplete."""
    ref_out, _ = reference_run
    data = (ref_out / "last.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: _entry_ends(data)[-2]])  # every entry but the last (a state.* value)
    assert len(ms.load_checkpoint(str(cut))) == len(_entry_ends(data)) - 1  # MindSpore reads it without complaint
    flipped = tmp_path / "flipped.ckpt"
    raw = bytearray(data)
    raw[_entry_ends(data)[3] - 5] ^= 0x01  # one bit inside a weight's bytes
    flipped.write_bytes(bytes(raw))
    for bad in (cut, flipped):
        with pytest.raises(ValueError, match=f"{bad.name} does not match the digest written with it: the file is truncated or corrupted"):
            train.main(EXACT + ["--steps", "6", "--output_dir", str(tmp_path / "run"), "--resume", str(bad)])
    assert not (tmp_path / "run").exists()


def test_resume_after_kill_mid_epoch(reference_run, tmp_path):
    """Kill a run after its 2nd step (of 179 per epoch), resume it, and end where the uninterrupted run ends."""
    ref_out, _ = reference_run
    out = tmp_path / "run"
    argv = EXACT + ["--steps", "6", "--save_interval", "1", "--keep_max", "2", "--output_dir", str(out)]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *argv], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (out / "step_2.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "step_2.ckpt").exists(), "the run died before its 2nd checkpoint"
    state = ms.load_checkpoint(str(out / "last.ckpt"))
    killed_at = int(state["state.step"].asnumpy())
    assert killed_at < 6, "the run finished before it was killed"
    summary = train.main(argv + ["--resume", "auto"])
    assert summary["steps"] == 6
    assert_same_params(params_of(out / "last.ckpt"), params_of(ref_out / "last.ckpt"), atol=1e-6)
    opt_a = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(out / "last.ckpt")).items() if k.startswith("optim.")}
    opt_b = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(ref_out / "last.ckpt")).items() if k.startswith("optim.")}
    assert_same_params(opt_a, opt_b, atol=1e-6)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_step_and_resume_auto_continues(reference_run, tmp_path, monkeypatch, capsys, signum):
    """SIGTERM (preemption) or SIGINT (Ctrl-C) during step 3 of 6, no periodic saves: the step finishes, last.ckpt
    holds step 3, one line says how to continue, exit 128 + signal; --resume auto then ends where the
    uninterrupted run ends. The signal is sent to this very process from inside the step."""
    from bit_zoo.training.train_step import Trainer

    ref_out, _ = reference_run
    out = tmp_path / "run"
    argv = EXACT + ["--steps", "6", "--output_dir", str(out)]
    real_step, steps = Trainer.step, []

    def step(self, micro_batches):
        steps.append(len(steps) + 1)
        if len(steps) == 3:
            os.kill(os.getpid(), signum)
        return real_step(self, micro_batches)

    def unhandled(*_):  # what the default action (the test process killed) would mean, as a test failure
        raise AssertionError(f"{signal.Signals(signum).name} reached the default handler: training has none")

    monkeypatch.setattr(Trainer, "step", step)
    previous = signal.signal(signum, unhandled)
    try:
        code = train.cli(argv)
        assert signal.getsignal(signum) is unhandled  # the run's handler is gone again
    finally:
        signal.signal(signum, previous)
    assert code == 128 + signum
    lines = _error_lines(capsys.readouterr().err, "train.py")
    assert len(lines) == 1, lines
    assert f"{signal.Signals(signum).name} at step 3/6" in lines[0] and str(out / "last.ckpt") in lines[0], lines
    assert lines[0].endswith(" --resume auto") and "continue with: python train.py " in lines[0], lines
    assert int(ms.load_checkpoint(str(out / "last.ckpt"))["state.step"].asnumpy()) == 3
    assert steps == [1, 2, 3]  # nothing after the signalled step
    monkeypatch.setattr(Trainer, "step", real_step)
    summary = train.main(argv + ["--resume", "auto"])
    assert summary["steps"] == 6
    assert_same_params(params_of(out / "last.ckpt"), params_of(ref_out / "last.ckpt"), atol=1e-6)


def test_the_second_stop_signal_takes_the_default_action():
    """After the first SIGTERM/SIGINT the loop only sets a flag; the handler hands both signals back to the
    default action, so a second one ends the process at once, even inside a compiled step."""
    from bit_zoo.training.interrupt import StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert {s: signal.getsignal(s) for s in before} == before


def test_fp16_dynamic_loss_scale_ema_clip_accumulation(tmp_path):
    """The seed recipe's step (RMSProp, conv-only decay, fp16 O2 + dynamic scale from 2^24, EMA, clip, mixup + smoothing), batch split 2."""
    out = tmp_path / "run"
    argv = [
        "--progress", "false", "--eval_samples", "16", "--hflip", "false",
        "-c", str(ROOT / "configs" / "seed" / "bit_m_r101x3_cifar10.yaml"), "--dataset", "digits", "--data_dir", "null",
        "--model", "resnetv2", "--pretrained", "false", "--image_size", "32", "--resize_size", "36", "--eval_size", "32",
        "--randaugment", "2,20", "--batch_size", "8", "--accum_steps", "2", "--epochs", "null", "--steps", "4",
        "--num_workers", "1", "--ema_decay", "0.9", "--lr", "0.02", "--warmup_epochs", "0", "--loss_scale_value", "65536",
        "--output_dir", str(out),
    ]  # fmt: skip
    summary = train.main(argv)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r["kind"] == "epoch"][-1]
    assert epoch["overflow_steps"] < 4, "every fp16 step overflowed"
    assert epoch["loss_scale"] == 65536 / 2 ** epoch["overflow_steps"], "each overflow halves the dynamic scale"
    assert np.isfinite(epoch["train_loss"]) and summary["final"]["weights"] == "ema"
    data = ms.load_checkpoint(str(out / "last.ckpt"))
    ema = {k[4:]: v.asnumpy() for k, v in data.items() if k.startswith("ema.")}
    raw = params_of(out / "last.ckpt")
    assert ema.keys() == raw.keys()
    assert any(not np.array_equal(ema[k], raw[k]) for k in raw), "EMA weights equal the raw weights"
    assert any(k.startswith("optim.mean_square.") for k in data) and float(data["state.loss_scale"].asnumpy()) == epoch["loss_scale"]


def test_recompute_flag_trains(tmp_path, monkeypatch):
    built = []

    def build_model(*args, **kwargs):
        built.append(train_build_model(*args, **kwargs))
        return built[-1]

    train_build_model = train.build_model
    monkeypatch.setattr(train, "build_model", build_model)
    summary = train.main(EXACT + ["--steps", "1", "--recompute", "true", "--mode", "pynative", "--output_dir", str(tmp_path / "run")])
    assert summary["steps"] == 1 and np.isfinite(summary["final"]["loss"])
    blocks = [block for stage in built[0].stages for block in stage.blocks]
    # Cell.recompute() wraps the cell for the backward pass: every unit of the trained model carries the wrapper
    assert blocks and all(getattr(b, "_recompute_cell", None) is not None for b in blocks)


# ------------------------------------------------------------------------------------ bad input


def test_errors_before_anything_is_overwritten(reference_run, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "prev"
    shutil.copytree(ref_out, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cases = [
        (["--num_classes", "7"], "num_classes=7 in the config but digits"),
        ([], "holds a previous run"),
        (["--batch_size", "6", "--accum_steps", "4", "--overwrite", "true"], "does not split"),
        (["--dataset", "cifar10", "--overwrite", "true"], "needs --data_dir"),
        (["--dataset", "cifar10", "--data_dir", str(tmp_path / "missing"), "--overwrite", "true"], "not a directory"),
        (["--model", "bit_s_r50x2", "--overwrite", "true"], "Did you mean"),
        (["--resume", str(tmp_path / "nope.ckpt")], "no such file"),
        (["--checkpoint_path", str(tmp_path / "nope.npz"), "--overwrite", "true"], "nope.npz: no such file"),
        (["--lr", "-1", "--overwrite", "true"], r"lr=-1.0: must be a finite number > 0"),
        (["--lr", "nan", "--overwrite", "true"], r"lr=nan: must be a finite number > 0"),
        (["--batch_size", "-8", "--overwrite", "true"], r"batch_size=-8: must be a whole number >= 1"),
        (["--image_size", "0", "--overwrite", "true"], r"image_size=0: must be a whole number >= 1"),
    ]
    for extra, message in cases:
        with pytest.raises((ConfigError, ValueError, FileNotFoundError), match=message):
            train.main(EXACT + ["--steps", "2", "--output_dir", str(out)] + extra)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes((ref_out / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        train.main(EXACT + ["--steps", "2", "--output_dir", str(out), "--resume", str(corrupt)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _error_lines(err: str, prog: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(f"{prog}: ")]


def test_cli_exit_code_and_message(tmp_path, capsys):
    assert train.cli(EXACT + ["--ema_decy", "0.1"]) == 2
    lines = _error_lines(capsys.readouterr().err, "train.py")
    assert len(lines) == 1 and lines[0].startswith(
        "train.py: error: unknown option '--ema_decy' in the command line. Did you mean: --ema_decay"
    )


def test_oserrors_are_one_line(tmp_path, capsys):
    """A symlink loop in data_dir and an output_dir that cannot be created: one line each, exit 2."""
    root = tmp_path / "folder" / "train"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    (root / "a" / "loop.jpg").symlink_to(root / "a" / "loop.jpg")
    (root / "b" / "loop").symlink_to(root / "b" / "loop")
    assert (
        train.cli(
            EXACT + ["--dataset", "folder", "--data_dir", str(tmp_path / "folder"), "--steps", "1", "--output_dir", str(tmp_path / "o")]
        )
        == 2
    )
    lines = _error_lines(capsys.readouterr().err, "train.py")
    assert len(lines) == 1 and "loop" in lines[0], lines
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert train.cli(EXACT + ["--steps", "1", "--output_dir", str(blocker / "run")]) == 2
    lines = _error_lines(capsys.readouterr().err, "train.py")
    assert len(lines) == 1 and "Not a directory" in lines[0] and str(blocker) in lines[0], lines


@pytest.mark.heavy
def test_nonfinite_loss_stops_the_run(tmp_path, capsys):
    """lr 1e30 blows the weights up after the first step: the run stops after 3 non-finite steps, exit 3, one line,
    and last.ckpt stays the checkpoint of the last step before them."""
    out = tmp_path / "run"
    code = train.cli(
        EXACT + ["--lr", "1e30", "--steps", "10", "--save_interval", "1", "--max_nonfinite_steps", "3", "--output_dir", str(out)]
    )
    lines = _error_lines(capsys.readouterr().err, "train.py")
    assert code == 3 and len(lines) == 1, lines
    first, last, kept = map(
        int, re.search(r"non-finite for 3 consecutive steps \((\d+)-(\d+),.*last.ckpt \(step (\d+)\)", lines[0]).groups()
    )
    assert last == first + 2 < 10 and kept == first - 1
    assert int(ms.load_checkpoint(str(out / "last.ckpt"))["state.step"].asnumpy()) == kept


# ------------------------------------------------------------------------------- data parallel


DP = EXACT + ["--steps", "3", "--eval_interval", "0", "--rank_weights", "true"]


def _check_data_parallel(out: Path, single: Path) -> None:
    r0, r1 = (params_of(out / f"weights_rank{r}.ckpt") for r in (0, 1))
    assert_same_params(r0, r1)  # bit-identical across ranks
    # same global batch (8 = 2 x 4 vs 1 x 8) on one process: same result up to float summation order
    assert_same_params(r0, params_of(single / "weights_rank0.ckpt"), atol=2e-5)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out.parent)
        train.main(DP + ["--output_dir", str(out)])
    return out


@pytest.mark.heavy
def test_two_processes_match_single_process(single_process_run, two_processes, tmp_path):
    out = tmp_path / "dp"
    code, output = two_processes(ROOT / "train.py", *DP, "--output_dir", out, cwd=tmp_path, timeout=600)
    assert code == 0, output[-3000:]
    _check_data_parallel(out, single_process_run)


# ------------------------------------------------------------------ recipes on CIFAR-format data


@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("fake_cifar", ROOT / "scripts" / "fake_cifar.py")
    fake = module_from_spec(spec)
    spec.loader.exec_module(fake)
    return fake.write(tmp_path_factory.mktemp("cifar"))


SCALED_DOWN = ["--model", "bit_s_r50x1", "--pretrained", "false", "--image_size", "32", "--resize_size", "36", "--eval_size", "32",
               "--steps", "2", "--batch_size", "8", "--eval_samples", "16", "--num_workers", "1", "--progress", "false"]  # fmt: skip


@pytest.mark.heavy
@pytest.mark.parametrize("config", ["seed/bit_m_r101x3_cifar10.yaml", "hyperrule/bit_s_r50x1_cifar10.yaml"])
def test_recipes_scaled_down_on_cifar_format_data(fake_cifar10, tmp_path, config):
    """The seed recipe and the HyperRule, every other value as shipped, at 32 px for 2 steps of R50x1."""
    extra = ["--epochs", "null", "--accum_steps", "2"] if config.startswith("seed") else ["--accum_steps", "1"]
    summary = train.main(
        ["-c", str(ROOT / "configs" / config), "--data_dir", str(fake_cifar10), *SCALED_DOWN, *extra, "--output_dir", str(tmp_path / "run")]
    )
    assert summary["steps"] == 2 and summary["final"]["images"] == 16


@pytest.mark.heavy
def test_seed_recipe_scaled_down_in_two_processes(fake_cifar10, two_processes, tmp_path):
    """The seed recipe as shipped (fp16 O2, dynamic loss scale, EMA, RMSProp, accumulation) in 2 processes, scaled
    down: both ranks end bit-identical, the run evaluates its shards and writes its checkpoints."""
    out = tmp_path / "dp"
    code, output = two_processes(
        ROOT / "train.py", "-c", ROOT / "configs" / "seed" / "bit_m_r101x3_cifar10.yaml", "--data_dir", fake_cifar10, *SCALED_DOWN,
        "--epochs", "null", "--accum_steps", "2", "--batch_size", "16", "--rank_weights", "true", "--output_dir", out, cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, output[-3000:]
    r0, r1 = (params_of(out / f"weights_rank{r}.ckpt") for r in (0, 1))
    assert_same_params(r0, r1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final"]["images"] == 16
    assert (out / "last.ckpt").exists() and (out / "best.ckpt").exists()


def test_fine_tunes_from_an_upstream_npz(tmp_path, make_upstream_npz):
    """The fine-tuning path: BiT weights in the upstream .npz layout, a new 10-class zero head, a few HyperRule steps."""
    npz = tmp_path / "BiT-S-R50x1.npz"
    upstream = make_upstream_npz(npz, "bit_s_r50x1", 1000, seed=3)
    out = tmp_path / "run"
    argv = [
        "--model", "bit_s_r50x1", "--checkpoint_path", str(npz), "--dataset", "digits", "--image_size", "32",
        "--eval_size", "32", "--hflip", "false", "--opt", "sgd", "--lr", "0.003", "--scheduler", "constant",
        "--progress", "false", "--eval_samples", "16", "--num_workers", "1", "--transform", "eval",
        "--batch_size", "8", "--steps", "2", "--output_dir", str(out),
    ]  # fmt: skip
    summary = train.main(argv)
    assert summary["steps"] == 2
    tuned = params_of(out / "last.ckpt")
    assert tuned["head.fc.weight"].shape == (10, 2048) and tuned["head.fc.weight"].any()  # zero head, then trained
    # the backbone started from the file: two small SGD steps move it only a little
    for k in ("stem.conv.weight", "stages.3.blocks.2.conv3.weight", "norm.gamma"):
        np.testing.assert_allclose(tuned[k], upstream[k], atol=0.05, err_msg=k)


def _run_quickstart(tmp_path, step1_extra: list[str], step2_extra: list[str]) -> tuple[dict, dict, Path]:
    """The README's two quickstart commands, run from tmp_path (conftest's working directory; the configs
    use relative output paths)."""
    common = ["--progress", "false", "--num_workers", "1"]
    pre = train.main(["-c", str(ROOT / "configs" / "quickstart_digits_pretrain.yaml"), *common, *step1_extra])
    fine = train.main(["-c", str(ROOT / "configs" / "quickstart_digits.yaml"), *common, *step2_extra])
    return pre, fine, tmp_path / "outputs"


def test_quickstart_fine_tunes_the_pretrained_checkpoint(tmp_path):
    """Scaled down: step 1 on digits 0-5 writes best.ckpt, step 2 loads all of it but the 6-class head."""
    pre, fine, out = _run_quickstart(tmp_path, ["--epochs", "null", "--steps", "4"], ["--steps", "2", "--eval_samples", "16"])
    assert pre["num_classes"] == 6 and fine["num_classes"] == 4 and fine["final"]["images"] == 16
    source = params_of(out / "quickstart_digits_pretrain" / "best.ckpt")
    tuned = params_of(out / "quickstart_digits" / "last.ckpt")
    assert source["head.fc.weight"].shape[0] == 6 and tuned["head.fc.weight"].shape[0] == 4
    for k in ("stem.conv.weight", "stages.3.blocks.0.conv2.weight", "norm.gamma"):  # the backbone came from step 1
        np.testing.assert_allclose(tuned[k], source[k], atol=0.02, err_msg=k)


def _this_cpu() -> tuple[str, str]:
    """(model name, "avx512" or "avx2" or "other"): what benchmarks/results/quickstart.csv records per row."""
    info = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return name, "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


@pytest.mark.heavy
def test_quickstart_gives_the_recorded_figures(tmp_path):
    """The full quickstart (about 1 minute of training per step on 2 cores) against benchmarks/results/quickstart.csv.

    The run is deterministic on one machine, so where the file has a row for this kind of CPU (model name,
    instruction set) and kernel build, the result must equal it to the printed digit. Across CPUs the float
    summation order differs (oneDNN and bit_zoo's kernels pick their code per instruction set) and the recorded
    runs differ by up to 3 held-out images; elsewhere the result must be within 3 images of a recorded one.
    """
    from bit_zoo.models import cpu_kernels

    pre, fine, _ = _run_quickstart(tmp_path, [], [])
    assert pre["final"]["images"] == 216 and fine["final"]["images"] == 143
    kernels = cpu_kernels.build_kind()
    cpu, isa = _this_cpu()
    rows = results_rows("quickstart")
    for run, result in (("step1", pre), ("step2", fine)):
        got = round(result["final"]["top1"], 2)
        recorded = [r for r in rows if r["run"] == run]
        same = [float(r["top1"]) for r in recorded if (r["cpu"], r["isa"], r["cpu_kernels"]) == (cpu, isa, kernels)]
        if same:
            assert got in same, f"{run}: {got} on this CPU ({cpu}, {isa}, kernels {kernels}), recorded {same}"
        else:
            step = 100 / result["final"]["images"]
            assert any(abs(got - float(r["top1"])) <= 3 * step + 1e-6 for r in recorded), f"{run}: {got}, recorded {recorded}"


# ------------------------------------------------------------------ the loop itself, with a scripted trainer


class _ScriptedTrainer:
    """Trainer's interface as the loop uses it; step() returns the scripted (loss, finite, grad_norm)."""

    def __init__(self, script, loss_scale: float = 1.0) -> None:
        self.script = iter(script)
        self.loss_scale = loss_scale
        self.net = type("Net", (), {"set_train": lambda self, mode=True: None})()
        self.optimizer = self.ema = self.scaler = None

    def step(self, micro_batches):
        assert len(micro_batches) == 1
        return next(self.script)


class _Batches:
    batches_per_epoch = 4
    bad_images: tuple = ()  # DataInfo's count of undecodable images: none here
    indices: tuple = ()  # DataInfo's records of the split (the loop passes their count to evaluate)

    def __init__(self) -> None:
        self.dataset = self

    def create_tuple_iterator(self, num_epochs):
        return self

    def __iter__(self):
        return iter([("images", "labels")] * self.batches_per_epoch)


class _Manager:
    def __init__(self, directory) -> None:
        self.directory = directory
        self.saved = []

    def save(self, *, periodic, best, state, **kwargs):
        self.saved.append(state.step)

    def wait(self):
        pass


def _loop(tmp_path, script, *, total_steps, monkeypatch, loss_scale="none", scale=1.0, limit=3):
    from bit_zoo.config import StepConfig
    from bit_zoo.training import loop as loop_mod
    from bit_zoo.training.checkpoint import CheckpointConfig, TrainState
    from bit_zoo.training.metrics import MetricsLog

    monkeypatch.setattr(loop_mod, "evaluate", lambda *a, **k: {"top1": 50.0, "top5": 90.0, "loss": 1.0, "images": 8, "seconds": 0.1})
    manager = _Manager(tmp_path)
    plan = loop_mod.Plan(lr=np.full(total_steps, 0.1, np.float32), total_steps=total_steps, steps_per_epoch=4, global_batch=8)
    loop = loop_mod.TrainLoop(
        _ScriptedTrainer(script, scale), None, plan=plan, train_data=_Batches(), eval_data=_Batches(),
        step=StepConfig(loss_scale=loss_scale, max_nonfinite_steps=limit), checkpoint=CheckpointConfig(save_interval=1, log_interval=1),
        manager=manager, metrics=MetricsLog(tmp_path / "m.jsonl"), progress=True,
    )  # fmt: skip
    return loop, manager, TrainState(total_steps=total_steps)


def test_loop_stops_after_consecutive_nonfinite_losses(tmp_path, monkeypatch):
    nan = float("nan")
    script = [
        (1.0, True, 1.0),
        (0.9, True, 1.0),
        (nan, False, nan),
        (2.0, True, 1.0),
        (nan, False, nan),
        (nan, False, nan),
        (nan, False, nan),
    ]
    loop, manager, state = _loop(tmp_path, script + [(1.0, True, 1.0)] * 5, total_steps=12, monkeypatch=monkeypatch)
    with pytest.raises(
        TrainingStopped, match=r"were non-finite for 3 consecutive steps \(5-7.*last good checkpoint is .*last.ckpt \(step 4\)"
    ):
        loop.run(state)
    assert manager.saved == [1, 2, 4], "no checkpoint is written while the loss is non-finite"


def test_loop_lets_a_dynamic_loss_scale_recover(tmp_path, monkeypatch):
    """Overflowing gradients with a finite loss are the dynamic scaler's business while it can still shrink."""
    script = [(1.0, False, float("inf"))] * 5 + [(1.0, True, 1.0)] * 3
    loop, _, state = _loop(tmp_path, script, total_steps=8, monkeypatch=monkeypatch, loss_scale="dynamic", scale=2.0**10)
    assert loop.run(state)["steps"] == 8
    loop, _, state = _loop(tmp_path, script, total_steps=8, monkeypatch=monkeypatch, loss_scale="dynamic", scale=1.0)
    with pytest.raises(TrainingStopped, match="3 consecutive steps"):
        loop.run(state)


def test_loop_logs_the_same_train_loss_as_the_bar_and_no_epoch_zero(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    losses = [4.0, 2.0, 3.0, 1.0, 5.0, 7.0]  # epoch 1: mean 2.5; then 2 steps of epoch 2: mean 6.0
    loop, _, state = _loop(tmp_path, [(x, True, 1.0) for x in losses], total_steps=6, monkeypatch=monkeypatch)
    loop.run(state)
    lines = [r.getMessage() for r in caplog.records]
    bar = [line for line in lines if line.startswith("train ")]
    assert "train 4/6 loss=2.5000 lr=1.00e-01" in bar and "train 6/6 loss=6.0000 lr=1.00e-01" in bar
    epoch_lines = [line for line in lines if "train loss" in line]
    assert epoch_lines[0].startswith("epoch 1 step 4/6: train loss 2.5000")
    assert epoch_lines[1].startswith("1.50 epochs step 6/6: train loss 6.0000")
    assert not any(line.startswith("epoch 0") for line in lines)
    caplog.clear()
    loop, _, state = _loop(tmp_path, [(1.0, True, 1.0)] * 2, total_steps=2, monkeypatch=monkeypatch)
    loop.run(state)
    assert [r.getMessage() for r in caplog.records if "train loss" in r.getMessage()][0].startswith("0.50 epochs step 2/2")


def test_resume_with_changed_training_data_says_what_changed(tmp_path, capsys):
    """A folder run checkpoints, an image is deleted, --resume auto: one line naming the class and the counts
    and how to continue, exit 2, the checkpoint untouched."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for split, per_class in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / "folder" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "folder" / split / cls / f"{i}.png")
    out = tmp_path / "run"
    argv = EXACT + ["--dataset", "folder", "--data_dir", str(tmp_path / "folder"), "--batch_size", "4", "--save_interval", "1"]
    argv += ["--output_dir", str(out)]
    assert train.cli(argv + ["--steps", "2"]) == 0
    before = (out / "last.ckpt").read_bytes()
    (tmp_path / "folder" / "train" / "dog" / "3.png").unlink()
    capsys.readouterr()
    assert train.cli(argv + ["--steps", "4", "--resume", "auto"]) == 2
    lines = _error_lines(capsys.readouterr().err, "train.py")
    assert len(lines) == 1, lines
    assert "the training data changed" in lines[0] and "8 training images then, 7 now" in lines[0], lines
    assert "class 'dog': 4 -> 3 images" in lines[0] and "--output_dir NEW" in lines[0], lines
    assert (out / "last.ckpt").read_bytes() == before


def test_resume_with_images_replaced_in_place_is_refused_unless_told(tmp_path, capsys):
    """The same file names and counts, but one image's pixels replaced (same size on disk, so only the content
    digest can tell): --resume auto is refused in one line naming --check_data_content, exit 2, the checkpoint
    untouched; with --check_data_content false the run resumes."""
    from PIL import Image

    rng = np.random.default_rng(4)
    for split, per_class in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / "folder" / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "folder" / split / cls / f"{i}.bmp")
    out = tmp_path / "run"
    argv = EXACT + ["--dataset", "folder", "--data_dir", str(tmp_path / "folder"), "--batch_size", "4", "--save_interval", "1"]
    argv += ["--output_dir", str(out)]
    assert train.cli(argv + ["--steps", "4"]) == 0  # a finished run resumes too (0 steps left): the check comes first
    before = (out / "last.ckpt").read_bytes()
    replaced = tmp_path / "folder" / "train" / "dog" / "2.bmp"
    size = replaced.stat().st_size
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(replaced)
    assert replaced.stat().st_size == size  # BMP: the size depends on the geometry only
    capsys.readouterr()
    assert train.cli(argv + ["--steps", "4", "--resume", "auto"]) == 2
    lines = _error_lines(capsys.readouterr().err, "train.py")
    assert len(lines) == 1, lines
    assert "their contents changed" in lines[0] and "--check_data_content false" in lines[0], lines
    assert (out / "last.ckpt").read_bytes() == before
    assert train.cli(argv + ["--steps", "4", "--resume", "auto", "--check_data_content", "false"]) == 0


def test_unreachable_weights_are_one_line(tmp_path, monkeypatch, capsys):
    """pretrained weights from a mirror that refuses connections: one line naming the URL and the variable, exit 2."""
    monkeypatch.setenv("BIT_ZOO_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("BIT_ZOO_WEIGHTS_SOURCE", "google")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("BIT_ZOO_BASE_URL", f"http://127.0.0.1:{port}")
    argv = ["--model", "bit_s_r50x1", "--pretrained", "true", "--dataset", "digits", "--steps", "1", "--output_dir", str(tmp_path / "o")]
    assert train.cli(argv) == 2
    lines = _error_lines(capsys.readouterr().err, "train.py")
    assert len(lines) == 1 and f"cannot reach http://127.0.0.1:{port}/BiT-S-R50x1.npz" in lines[0] and "BIT_ZOO_BASE_URL" in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_background_checkpoint_writes_equal_synchronous_ones(reference_run, tmp_path):
    """The reference run saved in the background (the default); a synchronous run writes the same bytes."""
    ref_out, _ = reference_run
    out = tmp_path / "sync"
    train.main(EXACT + ["--steps", "6", "--save_interval", "1", "--keep_max", "2", "--output_dir", str(out), "--async_save", "false"])
    names = sorted(p.name for p in out.glob("*.ckpt"))
    assert names == sorted(p.name for p in ref_out.glob("*.ckpt")) == ["best.ckpt", "last.ckpt", "step_5.ckpt", "step_6.ckpt"]
    for name in names:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name


def test_a_failed_background_write_is_raised_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    from bit_zoo.utils.atomic import DiskFullError
    from bit_zoo.training import checkpoint as ckpt_mod
    from bit_zoo.training.checkpoint import CheckpointManager, TrainState

    monkeypatch.setattr(ckpt_mod, "training_arrays", lambda **kw: {"w": np.full(4, kw["state"].step, np.float32)})
    manager = CheckpointManager(tmp_path, async_save=True)
    uploaded = []
    manager.save(periodic=False, best=False, then=lambda: uploaded.append(1), state=TrainState(step=1))
    manager.wait()
    assert uploaded == [1] and ms.load_checkpoint(str(tmp_path / "last.ckpt"))["w"].asnumpy()[0] == 1

    def full(arrays, path):
        raise DiskFullError(f"no space left on the device for {path}")

    monkeypatch.setattr(ckpt_mod, "_atomic_save", full)
    manager.save(periodic=False, best=False, then=lambda: uploaded.append(2), state=TrainState(step=2))  # returns at once
    with pytest.raises(DiskFullError, match="last.ckpt"):
        manager.wait()
    assert uploaded == [1], "nothing is uploaded after a failed write"
    assert ms.load_checkpoint(str(tmp_path / "last.ckpt"))["w"].asnumpy()[0] == 1


def test_resumed_metrics_drop_the_records_of_steps_done_again(tmp_path):
    """A kill between an epoch's record and its checkpoint: the resumed run redoes those steps, so
    their records go (no step logged twice), and the ones up to the checkpoint stay."""
    from bit_zoo.training.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (3, 6, 9):
        log.write({"kind": "epoch", "step": step})
    assert [r["step"] for r in MetricsLog(path, append=True, resumed_step=6).records()] == [3, 6]
    assert [r["step"] for r in MetricsLog(path, append=True, resumed_step=6).records()] == [3, 6]
    assert MetricsLog(path, append=False).records() == []
