"""The benchmark CLI: table and ratios, driver flags, and (heavy) one tiny run of the Trainer and floor rows."""

from __future__ import annotations

import json

import pytest

from benchmarks import benchmark


def _row(name, role, train, infer, first=1.0, rnd=1):
    return {"name": name, "role": role, "conv_impl": role, "runtime": role, "train_img_s": train, "infer_img_s": infer, "first_step_s": first,
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
    assert seen == [("bit_zoo", argv), ("torch", argv), ("peak", argv)] * 2


def test_peers_run_every_runtime_and_pass_no_driver_flag(monkeypatch):
    seen = []
    monkeypatch.setattr(
        benchmark, "_run_worker", lambda which, argv: seen.append((which, argv)) or [{"name": which, "role": which, "error": "x"}]
    )
    benchmark.main(["--peers", "--no_mindcv", "--csv", "/dev/null", "--threads", "1"])
    expected = ["bit_zoo", "bit_zoo_pynative", "torch", "torch_compile", "ort_bit_zoo", "ort_timm", "peak"]
    assert [w for w, _ in seen] == expected
    assert all(argv == ["--threads", "1"] for _, argv in seen)


@pytest.mark.parity
def test_forward_flops_match_pytorchs_flop_counter():
    """The analytic count against torch's own FlopCounterMode on timm's twin (convolutions and the classifier)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bit_zoo.utils._timm import import_timm

    net = import_timm().create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10).eval()
    for size in (64, 97):  # an odd size: the stem and the strided convs round down
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(torch.zeros(1, 3, size, size))
        assert benchmark.forward_flops((3, 4, 6, 3), 1, size, 10) == counter.get_total_flops()


def test_targets_and_gflops_against_the_peak():
    args = benchmark.parse_args([])
    rows = [
        dict(_row("bit_zoo bit_s_r50x1 Trainer", "bit_zoo", 10.0, 30.0, first=4.0), first_infer_s=2.5),
        _row("timm resnetv2_50x1_bit", "torch", 20.0, 25.0),
        _row("timm resnetv2_50x1_bit ONNX", "ort_timm", None, 40.0),
        _row("bit_zoo bit_s_r50x1 ONNX", "ort_bit_zoo", None, 44.0),
        {
            "name": "fp32 matmul 1024x1024x1024",
            "role": "peak",
            "peak_gflops": 200.0,
            "numpy_gflops": 150.0,
            "torch_gflops": 200.0,
            "round": 1,
        },
    ]
    rows = benchmark.add_flops(rows, 2_000_000_000)  # 2 GFLOP per image
    assert rows[0]["infer_gflops"] == 60.0 and rows[0]["train_gflops"] == 60.0  # a training step: 3 forwards
    machine = {"cpu": "Test CPU", "cores": 2, "isa": "AVX2", "load_before": 0.5, "load_after": 1.5, "versions": "mindspore 2.10.0"}
    table = benchmark.format_table(rows, args, machine)
    assert "machine: Test CPU, 2 cores, AVX2; load average 0.5 before, 1.5 after" in table
    assert "peak (round 1): fp32 matmul 1024x1024x1024 (the FLOPs of one forward batch): numpy 150 GFLOP/s, torch 200 GFLOP/s" in table
    ours = next(line for line in table.splitlines() if line.startswith("| 1     | bit_zoo bit_s_r50x1 Trainer"))
    assert "| 60 (30%) " in ours
    assert "target: training >= x1.00 of PyTorch eager: x0.50 (NOT met)" in table
    assert "target: graph inference >= x1.00 of the fastest other runtime (bit_zoo bit_s_r50x1 ONNX): x0.68 (NOT met)" in table
    assert "target: bit_zoo's ONNX >= x1.00 of timm's ONNX in onnxruntime: x1.10 (met)" in table
    assert "target: first training step < 5 s: 4.0 s (met)" in table
    assert "target: first inference call < 2 s (after the training graph, same process): 2.5 s (NOT met)" in table
    assert "WARNING" not in table
    assert "WARNING: load average above the 2 cores" in benchmark.format_table(rows, args, dict(machine, load_after=2.5))


def test_csv_appends_rows_with_the_run_and_refuses_other_columns(tmp_path):
    out = tmp_path / "results" / "cpu.csv"
    meta = {"cpu": "Test CPU", "isa": "AVX2", "command": "python -m benchmarks.benchmark --peers", "versions": "mindspore 2.10.0"}
    benchmark.append_csv(out, [_row("a", "bit_zoo", 1.0, 2.0)], meta)
    benchmark.append_csv(out, [_row("b", "torch", 3.0, 4.0), {"name": "c", "role": "c", "error": "boom"}], meta)
    import csv

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["train_img_s"] == "3" and rows[1]["command"] == meta["command"] and rows[2]["error"] == "boom"
    other = tmp_path / "other.csv"
    other.write_text("name,speed\nx,1\n")
    with pytest.raises(ValueError, match="other columns"):
        benchmark.append_csv(other, [_row("a", "bit_zoo", 1.0, 2.0)], meta)
    assert other.read_text() == "name,speed\nx,1\n"


def test_machine_info_names_the_cpu_and_its_isa(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    info = benchmark.machine_info()
    assert info["cores"] >= 1 and info["cpu"]
    assert info["isa"].split(" ")[0].rstrip(",") in ("AVX-512", "AVX2", "AVX", "SSE")
    assert info["isa"].endswith("ONEDNN_MAX_CPU_ISA=AVX2")


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
    trainer, floor, peak = json.loads(out.read_text())["results"]
    assert peak["role"] == "peak" and peak["peak_gflops"] > 0
    assert trainer["role"] == "bit_zoo" and floor["role"] == "floor"
    assert trainer["train_img_s"] > 0 and trainer["infer_img_s"] > 0 and floor["train_img_s"] > 0 and trainer["peak_rss_train_mib"] > 0


@pytest.mark.heavy
def test_tiny_onnx_and_pynative_rows(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    argv = ["--no-mindcv", "--onnx", "--pynative-row", "--no-floor", "--img-size", "32", "--batch-size", "2", "--steps", "1",
            "--blocks", "1", "--warmup", "1", "--json", str(out), "--csv", str(tmp_path / "r.csv")]  # fmt: skip
    assert benchmark.main(argv) == 0
    rows = {r["role"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"bit_zoo", "bit_zoo_pynative", "ort_bit_zoo", "ort_timm", "peak"}
    for role in ("bit_zoo", "bit_zoo_pynative", "ort_bit_zoo", "ort_timm"):
        assert rows[role]["infer_img_s"] > 0 and rows[role]["infer_gflops"] > 0 and rows[role]["first_infer_s"] > 0
    assert rows["bit_zoo_pynative"]["train_img_s"] > 0 and "PyNative" in rows["bit_zoo_pynative"]["runtime"]
    assert rows["peak"]["peak_gflops"] > 0
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + 5


@pytest.mark.heavy
def test_tiny_distillation_run(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--no-mindcv", "--no-bit-zoo", "--model", "bit_s_r50x1", "--teacher", "bit_s_r50x1", "--img-size", "32", "--batch-size", "4",
            "--steps", "1", "--blocks", "1", "--warmup", "1", "--json", str(out)]  # fmt: skip
    assert benchmark.main(argv) == 0
    distill, student, teacher, peak = json.loads(out.read_text())["results"]
    assert peak["role"] == "peak"
    assert (distill["role"], student["role"], teacher["role"]) == ("distill", "student", "teacher")
    assert distill["train_img_s"] > 0 and student["train_img_s"] > 0 and teacher["infer_img_s"] > 0
    assert distill["peak_rss_train_mib"] >= teacher["peak_rss_train_mib"] > 0
