"""bit_zoo.tools.embed: pre-logits of every image of a split, labels and file names, reuse of a complete file,
resume after an interruption, never a partial file taken for complete."""

from __future__ import annotations

from dataclasses import replace

import mindspore as ms
import numpy as np
import pytest

from bit_zoo.data import create_loader
from bit_zoo.tools.embed import compute_embeddings, load_embeddings, main
from bit_zoo.models.inference import load_model

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
