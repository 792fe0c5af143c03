"""bit_zoo.tools.fewshot: big_vision's closed-form ridge regression, its nested seeded k-shot draw, and the CLI
(-c config, cached embeddings, table + JSON)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from bit_zoo.tools.fewshot import BIAS_CONSTANT, fewshot_indices, main, ridge_accuracy, ridge_fit, run_fewshot


def _direct_solution(x, y, num_classes, l2):
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    xb = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    t = 2.0 * np.eye(num_classes)[y] - 1.0
    return np.linalg.solve(xb.T @ xb + l2 * np.eye(xb.shape[1]), xb.T @ t)


@pytest.mark.parametrize(("n", "d"), [(40, 8), (6, 30)], ids=["N>=D", "N<D"])
def test_ridge_fit_is_the_ridge_solution(n, d):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d))
    y = rng.integers(0, 3, n)
    w, _, _ = ridge_fit(x, y, 3, 2.0**3)
    np.testing.assert_allclose(w, _direct_solution(x, y, 3, 2.0**3), rtol=1e-6, atol=1e-8)


def test_ridge_separates_clusters_and_not_noise():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((4, 64)) * 3

    def draw(n):  # noqa: E306
        y = np.repeat(np.arange(4), n)
        return centers[y] + rng.standard_normal((len(y), 64)), y

    x_tr, y_tr = draw(5)
    x_te, y_te = draw(50)
    assert ridge_accuracy(ridge_fit(x_tr, y_tr, 4, 2.0**10), x_te, y_te) == 1.0
    shuffled = rng.permutation(y_te)  # labels unrelated to the features: about chance
    assert ridge_accuracy(ridge_fit(x_tr, y_tr, 4, 2.0**10), x_te, shuffled) < 0.5


def test_fewshot_draw_is_nested_seeded_and_per_class():
    labels = np.repeat(np.arange(3), 12)
    one = fewshot_indices(labels, 3, 1, seed=0)
    five = fewshot_indices(labels, 3, 5, seed=0)
    assert np.bincount(labels[five]).tolist() == [5, 5, 5]
    assert set(one) <= set(five)  # big_vision takes prefixes of one permutation per class
    np.testing.assert_array_equal(five, fewshot_indices(labels, 3, 5, seed=0))
    assert not np.array_equal(five, fewshot_indices(labels, 3, 5, seed=1))
    with pytest.raises(ValueError, match="has 12"):
        fewshot_indices(labels, 3, 13, seed=0, class_names=["a", "b", "c"])


def test_run_fewshot_reports_mean_and_std_over_seeds():
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((2, 16)) * 0.7
    y_tr, y_te = np.repeat([0, 1], 30), np.repeat([0, 1], 100)
    train = {"embeddings": centers[y_tr] + rng.standard_normal((60, 16)), "labels": y_tr, "class_names": np.array(["a", "b"])}
    test = {"embeddings": centers[y_te] + rng.standard_normal((200, 16)), "labels": y_te, "class_names": np.array(["a", "b"])}
    res = run_fewshot(train, test, shots=(1, 25), seeds=3)
    for r in res.values():
        assert len(r["per_seed"]) == 3
        assert r["mean"] == pytest.approx(np.mean(r["per_seed"])) and r["std"] == pytest.approx(np.std(r["per_seed"]))
    assert res[25]["mean"] > res[1]["mean"]


def test_cli_with_config_caches_embeddings(tmp_path, capsys, caplog):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: resnetv2\nlayers: [1, 1, 1, 1]\ndataset: digits\nclasses: [3, 4]\nimage_size: 16\neval_size: 16\n"
        "few_shot: 10\nepochs: 3\nnum_samples: 50\nbatch_size: 25\nnum_workers: 1\n"  # few_shot / epochs: training keys, skipped
    )
    out = tmp_path / "fs.json"
    argv = ["-c", str(cfg), "--shots", "1", "2", "--seeds", "2", "--crop_pct", "1", "--cache_dir", str(tmp_path / "cache"),
            "--progress", "false", "--output_json", str(out)]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"1", "2"} and result["train_images"] == 50 and result["eval_images"] == 50
    assert result["preprocess"]["image_size"] == 16 and result["preprocess"]["resize_size"] is None
    assert f"{result['results']['2']['mean']:.2f}%" in table
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # one per split
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npz")}
    caplog.clear()
    caplog.set_level(logging.INFO, logger="bit_zoo.data.embeddings")
    assert main(argv + ["--batch_size", "10"]) == 0  # embeddings come from the cache (the batch size changes nothing)
    assert caplog.text.count("reused") == 2
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npz")} == stamps
    assert json.loads(out.read_text())["results"] == result["results"]
