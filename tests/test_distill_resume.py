"""Exact resume of a distillation run: a real `python train.py -c configs/distill/digits_teacher_to_student.yaml`
(shrunk on the command line: 160 training images, 16 px, 40 steps, a tiny resnetv2 teacher checkpoint written
here) is killed with SIGKILL mid-epoch, resumed with --resume auto, and every tensor of its final checkpoint
(student parameters, optimizer state, step counters) and every evaluation record (student top-1, agreement with
the teacher, KL, the teacher's top-1) must equal those of the uninterrupted run, bit for bit.

Heavy: three short train.py processes (two at once): 40 s on a quiet 2-core CPU, 5 min when it was shared.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from conftest import write_train_checkpoint

import bit_zoo

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "distill" / "digits_teacher_to_student.yaml"
STEPS_PER_EPOCH = 20  # 160 images / batch 8
SAVE_EVERY = 4


def _args(teacher: Path) -> list[str]:
    return [
        "-c", str(CONFIG), "--teacher", "null", "--teacher_checkpoint_path", str(teacher), "--teacher_pretrained", "false",
        "--layers", "1,1,1,1", "--width_factor", "1", "--few_shot", "null", "--num_samples", "160", "--eval_samples", "40",
        "--image_size", "16", "--eval_size", "16", "--batch_size", "8", "--steps", str(2 * STEPS_PER_EPOCH), "--epochs", "null",
        "--warmup_steps", "5", "--eval_interval", "1", "--save_interval", str(SAVE_EVERY), "--num_workers", "1", "--progress", "false",
    ]  # fmt: skip


def _teacher(tmp_path: Path) -> Path:
    """A tiny resnetv2 teacher with a random head, written as train.py writes its checkpoints."""
    ms.set_seed(7)
    net = bit_zoo.ResNetV2((1, 1, 1, 1), 1, num_classes=10)
    rng = np.random.default_rng(7)
    net.get_classifier().weight.set_data(ms.Tensor(rng.standard_normal((10, net.num_features)).astype(np.float32)))
    return write_train_checkpoint(tmp_path / "teacher.ckpt", net, class_names=[str(i) for i in range(10)], image_size=16)


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def _epoch_records(path: Path) -> list[dict]:
    # grad_norm apart: a float32 reduction whose order may differ between processes (see test_resume_exact.py)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "grad_norm")} for r in records if r["kind"] == "epoch"]


@pytest.mark.heavy
def test_sigkill_mid_epoch_then_resume_of_a_distillation_run_is_bit_identical(tmp_path, train_process):
    teacher = _teacher(tmp_path)

    def _train(out: str, *extra: str):
        return train_process(tmp_path, *_args(teacher), "--output_dir", out, *extra)

    reference = _train("ref")
    killed = _train("run")
    first = tmp_path / "run" / f"step_{SAVE_EVERY}.ckpt"
    deadline = time.time() + 600
    while not first.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert first.exists(), killed.stderr.read()[-2000:]
    at_kill = int(_tensors(tmp_path / "run" / "last.ckpt")["state.step"])
    assert SAVE_EVERY <= at_kill < STEPS_PER_EPOCH, f"killed at step {at_kill}: not mid-epoch 1"

    resumed = _train("run", "--resume", "auto")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()[-2000:]
    assert reference.wait(timeout=900) == 0, reference.stderr.read()[-2000:]

    ref, got = _tensors(tmp_path / "ref" / "last.ckpt"), _tensors(tmp_path / "run" / "last.ckpt")
    assert ref.keys() == got.keys()
    assert any(k.startswith("optim.") for k in ref) and not any("teacher" in k for k in ref)
    differ = [k for k in ref if not np.array_equal(ref[k], got[k])]
    assert not differ, f"{len(differ)} of {len(ref)} tensors differ after resume, e.g. {differ[:5]}"
    # every epoch's evaluation, the distillation numbers included, is identical (the resumed run wrote epoch 1 itself)
    records = _epoch_records(tmp_path / "run" / "metrics.jsonl")
    assert records == _epoch_records(tmp_path / "ref" / "metrics.jsonl")
    assert len(records) == 2 and all({"agreement", "kl", "teacher_top1"} <= r.keys() for r in records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["distill"]["teacher_top1"] == records[-1]["teacher_top1"] and summary["distill"]["teacher"] == "resnetv2"


@pytest.mark.heavy
def test_distillation_in_two_processes_matches_one(tmp_path, two_processes, train_process):
    """The same distillation step as 2 ranks (msrun, and mpirun where installed) and as 1 process, global batch 8:
    both ranks end bit-identical, close to the single process (float summation order), and the sharded
    evaluation reports agreement and KL over the whole eval split."""
    teacher = _teacher(tmp_path)
    # the same images in both runs: mixup pairs images within a rank's micro-batch and random crops are
    # per-rank draws, so they are off here; SGD, since Adam's first steps magnify float-order differences
    same = ["--steps", "6", "--eval_interval", "0", "--rank_weights", "true", "--mixup_alpha", "0", "--transform", "eval", "--opt", "sgd"]
    # lr 0.005: this untrained net's stem gradients are ~200 (weights ~0.02), so at higher rates a step moves
    # the stem a lot and float-order differences grow chaotically (discrete max-pool / ReLU choices flip).
    # Measured, worst parameter after 6 steps, 2 ranks vs 1 process: lr 0.005: 4.5e-7 (bit_zoo's CPU kernels),
    # 1.3e-5 (MindSpore's BatchNorm form); lr 0.01: 7.3e-5 / 1.0e-6; lr 0.02: 3.1e-3 / 4.7e-5.
    same += ["--lr", "0.005", "--clip_grad_norm", "0"]
    argv = [*_args(teacher), *same]
    single = train_process(tmp_path, *argv, "--output_dir", "single")
    assert single.wait(timeout=900) == 0, single.stderr.read()[-3000:]
    code, logs = two_processes(ROOT / "train.py", *argv, "--output_dir", tmp_path / "dp", cwd=tmp_path)
    assert code == 0, logs[-3000:]
    r0, r1, one = (_tensors(tmp_path / d / f"weights_rank{r}.ckpt") for d, r in (("dp", 0), ("dp", 1), ("single", 0)))
    params = [k for k in r0 if k != "meta.json"]
    for k in params:
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
        np.testing.assert_allclose(r0[k], one[k], atol=2e-5, rtol=0, err_msg=k)
    dp, sp = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("dp", "single"))
    assert dp["final"]["images"] == sp["final"]["images"] == 40
    dp, sp = dp["distill"], sp["distill"]
    assert abs(dp["agreement"] - sp["agreement"]) <= 100 / 40 and dp["kl"] == pytest.approx(sp["kl"], rel=1e-3, abs=1e-4)
