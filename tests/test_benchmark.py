"""Smoke test of the benchmark CLI: one tiny PyNative run in a worker subprocess, and the table."""

from __future__ import annotations

import json

import pytest

from bit_zoo import benchmark


def test_format_table_ratios():
    args = benchmark.build_parser().parse_args([])
    ours = {"name": "bit_s_r50x1", "conv_impl": "unfold", "train_img_s": 6.0, "infer_img_s": 20.0, "first_step_s": 30.0}
    ours |= {"peak_rss_mib": 2000.0, "warmup": 2, "steps": 10}
    ref = {**ours, "name": "mindcv BiT_resnet50", "conv_impl": "mindcv", "train_img_s": 0.3, "infer_img_s": 0.5, "first_step_s": 70.0}
    table = benchmark.format_table([ours, ref, {"name": "torch", "error": "boom"}], args)
    assert "train x20.0, infer x40.0" in table
    assert "torch failed: boom" in table


def test_worker_args_drop_driver_flags(monkeypatch):
    seen = []
    monkeypatch.setattr(benchmark, "_run_worker", lambda which, argv: seen.append((which, argv)) or {"name": which, "error": "skipped"})
    benchmark.main(["--no-mindcv", "--json=/dev/null", "--torch-reference", "--steps", "1"])
    assert seen == [("bit_zoo", ["--steps", "1"]), ("torch", ["--steps", "1"])]


@pytest.mark.heavy
def test_tiny_pynative_run(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--no-mindcv", "--mode", "pynative", "--img-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "1"]
    assert benchmark.main([*argv, "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["train_img_s"] > 0 and result["infer_img_s"] > 0 and result["peak_rss_mib"] > 0
