"""The benchmark CLI: table and ratios, driver flags, and (heavy) one tiny run of the Trainer and floor rows."""

from __future__ import annotations

import json

import pytest

from benchmarks import benchmark


def _row(name, role, train, infer, first=1.0, rnd=1):
    return {"name": name, "role": role, "conv_impl": role, "train_img_s": train, "infer_img_s": infer, "first_step_s": first,
            "peak_rss_train_mib": 2000.0, "peak_rss_mib": 2100.0, "warmup": 2, "steps": 10, "round": rnd}  # fmt: skip


def test_format_table_ratios_per_round():
    args = benchmark.parse_args(["--clip-grad-norm", "1", "--loss-scale", "dynamic"])
    rows = [
        _row("bit_zoo bit_s_r50x1 Trainer", "bit_zoo", 16.0, 45.0, first=8.0),
        _row("bit_s_r50x1 nn.TrainOneStepCell", "floor", 15.0, None),
        _row("timm resnetv2_50x1_bit", "torch", 20.0, 50.0),
        _row("mindcv BiT_resnet50 TrainOneStepCell", "mindcv", 0.5, 1.0, first=60.0),
        _row("bit_zoo bit_s_r50x1 Trainer", "bit_zoo", 12.0, 40.0, rnd=2),
        _row("bit_s_r50x1 nn.TrainOneStepCell", "floor", 12.5, None, rnd=2),
        {"name": "torch", "role": "torch", "error": "boom", "round": 2},
    ]
    table = benchmark.format_table(rows, args)
    assert "step options: (clip 1, dynamic loss scale)" in table
    assert "round 1: bit_zoo Trainer vs nn.TrainOneStepCell (same process, alternating): train x1.07" in table
    assert "round 1: bit_zoo Trainer vs timm resnetv2_50x1_bit: train x0.80, infer x0.90, first step 8.0 s vs 1.0 s" in table
    assert "round 1: bit_zoo Trainer vs mindcv BiT_resnet50 TrainOneStepCell: train x32.00, infer x45.00" in table
    assert "round 2: bit_zoo Trainer vs nn.TrainOneStepCell (same process, alternating): train x0.96" in table
    assert "round 2: bit_zoo Trainer vs mindcv BiT_resnet50 TrainOneStepCell: train x24.00" in table  # mindcv ran once
    assert "torch failed: boom" in table


def test_distillation_rows_and_their_breakdown():
    args = benchmark.parse_args(["--teacher", "bit_m_r152x2"])
    rows = [
        _row("distill step bit_m_r152x2 -> bit_s_r50x1", "distill", 4.0, None, first=30.0),
        _row("student step bit_s_r50x1", "student", 10.0, None),
        dict(_row("teacher forward bit_m_r152x2", "teacher", None, 8.0), first_step_s=None),
    ]
    rows[1]["peak_rss_train_mib"] = None
    table = benchmark.format_table(rows, args)
    assert "distillation step vs the student's step (same process, alternating): x0.40 of its speed" in table
    assert "per image 250 ms = student step 100 ms + teacher forward 125 ms, +25 ms left over" in table
    teacher_line = next(line for line in table.splitlines() if "teacher forward bit_m_r152x2" in line)
    assert "| 8.00 " in teacher_line and "| - " in teacher_line


def test_worker_args_drop_driver_flags(monkeypatch):
    seen = []
    monkeypatch.setattr(
        benchmark, "_run_worker", lambda which, argv: seen.append((which, argv)) or [{"name": which, "role": which, "error": "x"}]
    )
    benchmark.main(["--no-mindcv", "--json=/dev/null", "--torch-reference", "--rounds", "2", "--steps", "1", "--ema-decay", "0.9"])
    argv = ["--steps", "1", "--ema-decay", "0.9"]
    assert seen == [("bit_zoo", argv), ("torch", argv), ("bit_zoo", argv), ("torch", argv)]


def test_batch_must_split_into_micro_batches(capsys):
    assert benchmark.main(["--batch-size", "10", "--accum-steps", "4"]) == 2
    assert "does not split into --accum_steps 4" in capsys.readouterr().err


@pytest.mark.heavy
def test_tiny_graph_run(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "--no-mindcv",
        "--model",
        "bit_s_r50x1",
        "--img-size",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--blocks",
        "1",
        "--warmup",
        "1",
    ]
    assert benchmark.main([*argv, "--clip-grad-norm", "1", "--ema-decay", "0.9", "--loss-scale", "dynamic", "--json", str(out)]) == 0
    trainer, floor = json.loads(out.read_text())["results"]
    assert trainer["role"] == "bit_zoo" and floor["role"] == "floor"
    assert trainer["train_img_s"] > 0 and trainer["infer_img_s"] > 0 and floor["train_img_s"] > 0 and trainer["peak_rss_train_mib"] > 0


@pytest.mark.heavy
def test_tiny_distillation_run(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--no-mindcv", "--no-bit-zoo", "--model", "bit_s_r50x1", "--teacher", "bit_s_r50x1", "--img-size", "32", "--batch-size", "4",
            "--steps", "1", "--blocks", "1", "--warmup", "1", "--json", str(out)]  # fmt: skip
    assert benchmark.main(argv) == 0
    distill, student, teacher = json.loads(out.read_text())["results"]
    assert (distill["role"], student["role"], teacher["role"]) == ("distill", "student", "teacher")
    assert distill["train_img_s"] > 0 and student["train_img_s"] > 0 and teacher["infer_img_s"] > 0
    assert distill["peak_rss_train_mib"] >= teacher["peak_rss_train_mib"] > 0
