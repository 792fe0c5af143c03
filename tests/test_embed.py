"""bit_zoo.data.embeddings and python -m bit_zoo.embed: pre-logits of every image of a split, labels and file names, reuse of a complete file,
resume after an interruption, never a partial file taken for complete."""

from __future__ import annotations

from dataclasses import replace

import mindspore as ms
import numpy as np
import pytest

from bit_zoo.data import create_loader
from bit_zoo.data.embeddings import compute_embeddings, load_embeddings
from bit_zoo.tools.embed import main
from bit_zoo.tools._inference import load_model

CLASSES = [0, 1]
KW = dict(
    dataset="digits", data_dir=None, split="train", classes=CLASSES, num_samples=100, batch_size=25, num_workers=1, progress=False
)  # 4 equal batches: one compile


@pytest.fixture(scope="module")
def loaded():
    ms.set_seed(0)
    return load_model("resnetv2", layers=(1, 1, 1, 1), num_classes=0, image_size=16)


class _Counting:
    """The model, counting batches; raises on batch `fail_at` (an interruption)."""

    def __init__(self, model, fail_at=None):
        self.model, self.fail_at, self.calls = model, fail_at, 0
        self.num_classes, self.num_features = model.num_classes, model.num_features

    def set_train(self, mode):
        self.model.set_train(mode)

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return self.model(x)


def test_embeddings_labels_and_names(loaded, tmp_path):
    out = tmp_path / "emb.npz"
    arrays = compute_embeddings(loaded, output=out, **KW)
    from sklearn.datasets import load_digits

    target = load_digits().target
    n = len(arrays["labels"])
    assert arrays["embeddings"].shape == (n, 2048) and n == 100
    assert set(np.unique(arrays["labels"])) == {0, 1}
    originals = [int(f.split("#")[1]) for f in arrays["files"]]
    assert [CLASSES[lab] for lab in arrays["labels"]] == [int(target[i]) for i in originals]  # names and labels line up
    assert list(arrays["class_names"]) == ["0", "1"]
    # The rows are the model's pre-logits of the split's images, in order.
    info = create_loader("digits", None, "train", batch_size=25, image_size=16, transform="eval", classes=CLASSES, shuffle=False, drop_remainder=False, num_workers=1)  # fmt: skip
    images, _ = next(info.dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))
    np.testing.assert_allclose(arrays["embeddings"][:25], loaded.model(ms.Tensor(images)).asnumpy(), rtol=1e-5, atol=1e-6)
    stored = load_embeddings(out)
    assert stored is not None and int(stored["complete"]) == 1
    assert not (tmp_path / "emb.npz.partial").exists()


def test_complete_file_is_reused_and_foreign_one_refused(loaded, tmp_path):
    out = tmp_path / "emb.npz"
    first = compute_embeddings(loaded, output=out, **KW)
    counting = _Counting(loaded.model)
    again = compute_embeddings(replace(loaded, model=counting), output=out, **KW)
    assert counting.calls == 0
    np.testing.assert_array_equal(again["embeddings"], first["embeddings"])
    other = replace(loaded, preprocess=replace(loaded.preprocess, image_size=24))
    with pytest.raises(ValueError, match="--overwrite"):
        compute_embeddings(other, output=out, **KW)


def test_interrupted_run_resumes_and_partial_is_never_complete(loaded, tmp_path):
    reference = compute_embeddings(loaded, output=tmp_path / "ref.npz", **KW)
    out = tmp_path / "emb.npz"
    broken = _Counting(loaded.model, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        compute_embeddings(replace(loaded, model=broken), output=out, save_every=1, **KW)
    assert not out.exists() and load_embeddings(out) is None
    assert sorted(p.name for p in (tmp_path / "emb.npz.partial").glob("chunk_*.npz")) == ["chunk_00000.npz", "chunk_00001.npz"]
    resumed = _Counting(loaded.model)
    arrays = compute_embeddings(replace(loaded, model=resumed), output=out, save_every=1, **KW)
    assert resumed.calls == 2  # 4 batches, the first two (complete chunks) not recomputed
    np.testing.assert_allclose(arrays["embeddings"], reference["embeddings"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(arrays["files"], reference["files"])


def test_truncated_output_is_recomputed(loaded, tmp_path):
    out = tmp_path / "emb.npz"
    out.write_bytes(b"PK\x03\x04 truncated")
    assert load_embeddings(out) is None
    counting = _Counting(loaded.model)
    arrays = compute_embeddings(replace(loaded, model=counting), output=out, **KW)
    assert counting.calls > 0 and load_embeddings(out) is not None and len(arrays["labels"]) > 0


def test_cli_writes_npz(tmp_path, capsys):
    out = tmp_path / "cli.npz"
    code = main(["--model", "resnetv2", "--layers", "1,1,1,1", "--eval_size", "16", "--dataset", "digits", "--classes", "3,4",
                 "--split", "val", "--num_samples", "40", "--batch_size", "16", "--num_workers", "1", "--progress", "false", "--output", str(out)])  # fmt: skip
    assert code == 0
    assert "40 embeddings of dimension 2048" in capsys.readouterr().out
    with np.load(out) as z:
        assert z["embeddings"].shape == (40, 2048) and int(z["complete"]) == 1 and list(z["class_names"]) == ["3", "4"]


# ----------------------------------------------------------------------------------------------
# Caches keyed by content: a checkpoint replaced at the same path is another model


def _write_checkpoint(path, seed: int) -> None:
    """A bit_zoo checkpoint as train.py writes one (meta.json with its digest), random weights of `seed`."""
    import bit_zoo
    from bit_zoo.weights.loading import model_state, save_weights
    from bit_zoo.weights.meta import with_meta

    model = bit_zoo.ResNetV2((1, 1, 1, 1), num_classes=2, eager_jit=False)
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(v.shape).astype(np.float32) * (0.1 if v.ndim < 4 else 1.0) + (k.endswith("gamma"))
              for k, v in model_state(model).items()}  # fmt: skip
    pp = {"image_size": 16, "eval_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}
    meta = {"model": "resnetv2", "layers": [1, 1, 1, 1], "width_factor": 1, "num_classes": 2, "in_channels": 3,
            "class_names": ["0", "1"], "preprocess": pp}  # fmt: skip
    save_weights(with_meta(params, meta), path)


CLI_DATA = ["--dataset", "digits", "--classes", "0,1", "--num_samples", "50", "--batch_size", "25", "--num_workers", "1"]
CLI_DATA += ["--progress", "false"]


def test_a_checkpoint_changed_at_the_same_path_is_embedded_again(tmp_path, capsys):
    ckpt = tmp_path / "best.ckpt"
    run = [*CLI_DATA, "--checkpoint_path", str(ckpt), "--output"]
    _write_checkpoint(ckpt, seed=1)
    assert main([*run, str(tmp_path / "emb.npz")]) == 0
    first = load_embeddings(tmp_path / "emb.npz")["embeddings"]
    _write_checkpoint(ckpt, seed=2)  # fine-tuned further, written to the same place
    capsys.readouterr()
    assert main([*run, str(tmp_path / "emb.npz")]) == 2  # not reused: another model's embeddings
    assert "they differ in: weights_content" in capsys.readouterr().err
    assert main([*run, str(tmp_path / "emb.npz"), "--overwrite", "true"]) == 0
    again = load_embeddings(tmp_path / "emb.npz")["embeddings"]
    assert main([*run, str(tmp_path / "fresh.npz")]) == 0
    assert np.abs(again - first).max() > 1e-3  # the old model's rows are not reused...
    np.testing.assert_array_equal(again, load_embeddings(tmp_path / "fresh.npz")["embeddings"])  # ...the new model's are there


def test_fewshot_cache_follows_the_checkpoint_content(tmp_path, capsys):
    from bit_zoo.tools import fewshot

    ckpt = tmp_path / "best.ckpt"
    few = [*CLI_DATA, "--checkpoint_path", str(ckpt), "--split", "test", "--shots", "1", "--seeds", "1", "--crop_pct", "1"]
    few += ["--eval_size", "16"]
    _write_checkpoint(ckpt, seed=1)
    assert fewshot.main([*few, "--cache_dir", str(tmp_path / "cache")]) == 0
    old = {p.name: np.load(p)["embeddings"] for p in (tmp_path / "cache").glob("*.npz")}
    _write_checkpoint(ckpt, seed=2)
    capsys.readouterr()
    assert fewshot.main([*few, "--cache_dir", str(tmp_path / "cache")]) == 0
    table = capsys.readouterr().out
    assert fewshot.main([*few, "--cache_dir", str(tmp_path / "fresh_cache")]) == 0
    assert capsys.readouterr().out == table  # the numbers of the model now at that path, as with an empty cache
    for name, before in old.items():
        now = np.load(tmp_path / "cache" / name)["embeddings"]
        np.testing.assert_array_equal(now, np.load(tmp_path / "fresh_cache" / name)["embeddings"])
        assert np.abs(now - before).max() > 1e-3


def test_a_partial_file_of_another_model_is_discarded_on_resume(tmp_path):
    ckpt = tmp_path / "best.ckpt"
    _write_checkpoint(ckpt, seed=1)
    out = tmp_path / "emb.npz"
    first = load_model(checkpoint_path=str(ckpt), num_classes=0)
    with pytest.raises(KeyboardInterrupt):  # killed after two complete chunks
        compute_embeddings(replace(first, model=_Counting(first.model, fail_at=3)), output=out, save_every=1, **KW)
    _write_checkpoint(ckpt, seed=2)  # the checkpoint changed before the rerun
    second = load_model(checkpoint_path=str(ckpt), num_classes=0)
    resumed = _Counting(second.model)
    arrays = compute_embeddings(replace(second, model=resumed), output=out, save_every=1, **KW)
    assert resumed.calls == 4  # nothing of the first model's chunks kept
    reference = compute_embeddings(second, output=tmp_path / "ref.npz", **KW)
    np.testing.assert_array_equal(arrays["embeddings"], reference["embeddings"])
