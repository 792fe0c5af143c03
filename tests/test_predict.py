"""python -m bit_zoo.predict: checkpoints with meta.json (no --model), folder datasets against validate.py,
undecodable files, ImageNet label names, table / CSV / JSON output."""

from __future__ import annotations

import csv
import json

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

import bit_zoo
import validate
from bit_zoo.weights import labels
from bit_zoo.data import create_loader
from bit_zoo.data.sources import scan_class_folders
from bit_zoo.weights.loading import model_state, save_weights
from bit_zoo.weights.meta import META_KEY, with_meta
from bit_zoo.tools.predict import main

CLASSES = ["ant", "bee", "cat"]
LAYERS = [1, 1, 1, 1]


def _random_state(model, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in model_state(model).items():
        r = rng.standard_normal(a.shape).astype(np.float32)
        out[name] = 1 + 0.1 * r if name.endswith("gamma") else 0.1 * r if name.endswith(("beta", "bias")) else r
    return out


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """train/ and val/ class folders of small RGB images (digits 0-2 drawn in colour, with noise)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("folders")
    digits = load_digits()
    rng = np.random.default_rng(0)
    for split, start in (("train", 0), ("val", 600)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            idx = np.flatnonzero(digits.target == label)[start // 100 : start // 100 + 6]
            for j, i in enumerate(idx):
                grey = digits.images[i] * 15
                rgb = np.stack([grey, grey * rng.uniform(0.3, 1), grey * rng.uniform(0.3, 1)], -1) + rng.uniform(0, 40, (8, 8, 3))
                Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).resize((20, 20)).save(root / split / name / f"{name}_{j}.png")
    return root


@pytest.fixture(scope="module")
def meta_checkpoint(tmp_path_factory):
    """A bit_zoo checkpoint with its meta.json entry, as train.py writes it (random but non-zero head)."""
    model = bit_zoo.ResNetV2(tuple(LAYERS), num_classes=3, eager_jit=False)
    params = _random_state(model, seed=11)
    meta = {
        "model": "resnetv2",
        "layers": LAYERS,
        "width_factor": 1,
        "num_classes": 3,
        "in_channels": 3,
        "class_names": CLASSES,
        "preprocess": {
            "image_size": 32,
            "eval_size": 32,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        },
    }
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    save_weights(with_meta(params, meta), path)
    return path


def test_folder_predictions_use_class_names_and_match_validate(folder_data, meta_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "preds.json"
    assert main([str(folder_data / "val"), "--checkpoint_path", str(meta_checkpoint), "--output_json", str(out_json), "--batch_size", "4", "--progress", "false"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    preds = result["predictions"]
    assert len(preds) == 18 and not result["skipped"]
    assert {p["labels"][0] for p in preds} <= set(CLASSES) and len({p["labels"][0] for p in preds}) > 1
    assert all(abs(sum(p["probs"]) - 1) < 1e-5 for p in preds)  # 3 classes: top-k is the whole distribution
    assert preds[0]["file"] in table and preds[0]["labels"][0] in table
    top1 = 100.0 * np.mean([p["labels"][0] == p["file"].split("/")[-2] for p in preds])

    # Per file, the same class as the eval pipeline of the data layer (validate.py's) with the same weights.
    info = create_loader("folder", str(folder_data), "val", batch_size=18, image_size=32, transform="eval", shuffle=False, drop_remainder=False, num_workers=1)  # fmt: skip
    images, _ = next(info.dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))
    model = bit_zoo.ResNetV2(tuple(LAYERS), num_classes=3, eager_jit=False)
    bit_zoo.load_checkpoint(model, meta_checkpoint)
    model.set_train(False)
    expected = model(ms.Tensor(images)).asnumpy().argmax(1)
    _, paths, _ = scan_class_folders(folder_data / "val")
    assert [p["file"] for p in preds] == paths
    assert [p["indices"][0] for p in preds] == expected.tolist()

    # validate.py on the same folder dataset and checkpoint reports the same top-1.
    ref = validate.main(
        ["--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "folder", "--data_dir", str(folder_data), "--split", "val",
         "--image_size", "32", "--ckpt_path", str(meta_checkpoint), "--num_workers", "1", "--progress", "false"]
    )  # fmt: skip
    assert ref["images"] == 18
    assert ref["top1"] == pytest.approx(top1)


def test_undecodable_file_is_skipped_and_csv_written(folder_data, meta_checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    good = folder_data / "val" / "bee" / "bee_0.png"
    out_csv = tmp_path / "p.csv"
    code = main([str(bad), str(good), "--checkpoint_path", str(meta_checkpoint), "--topk", "2", "--output_csv", str(out_csv), "--progress", "false"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    assert "SKIPPED" in captured.out and "broken.jpg" in captured.out
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["file", "label_1", "prob_1", "index_1", "label_2", "prob_2", "index_2"]
    assert len(rows) == 2 and rows[1][0] == str(good) and rows[1][1] in CLASSES
    # Nothing classified: non-zero exit.
    assert main([str(bad), "--checkpoint_path", str(meta_checkpoint), "--progress", "false"]) == 1


def test_checkpoint_without_meta_needs_model(meta_checkpoint, folder_data, tmp_path, capsys):
    bare = tmp_path / "bare.ckpt"
    from bit_zoo.weights.loading import read_arrays

    _, arrays = read_arrays(meta_checkpoint)
    save_weights({k: v for k, v in arrays.items() if k != META_KEY}, bare)
    img = str(folder_data / "val" / "ant" / "ant_0.png")
    assert main([img, "--checkpoint_path", str(bare), "--progress", "false"]) == 2
    assert "carries no meta.json" in capsys.readouterr().err
    # With the architecture named it works; no class names in the file, so generic labels.
    out = tmp_path / "p.json"
    assert main([img, "--checkpoint_path", str(bare), "--model", "resnetv2", "--layers", "1,1,1,1", "--image_size", "32", "--output_json", str(out), "--progress", "false"]) == 0  # fmt: skip
    assert json.loads(out.read_text())["predictions"][0]["labels"][0].startswith("class_")


def test_imagenet_heads_get_imagenet_names(tmp_path, folder_data, make_upstream_npz):
    npz = tmp_path / "BiT-S-R50x1.npz"
    make_upstream_npz(npz, "bit_s_r50x1", 1000, seed=2)
    out = tmp_path / "p.json"
    img = str(folder_data / "val" / "cat" / "cat_0.png")
    assert main([img, "--model", "bit_s_r50x1", "--checkpoint_path", str(npz), "--image_size", "32", "--topk", "3", "--output_json", str(out), "--progress", "false"]) == 0  # fmt: skip
    pred = json.loads(out.read_text())["predictions"][0]
    names = labels.imagenet_names(1000)
    assert pred["labels"] == [names[i] for i in pred["indices"]]
    assert names[0] == "tench, Tinca tinca" and names[-1].startswith("toilet tissue")
    in21k = labels.imagenet_names(21843)
    assert len(in21k) == 21843 and in21k[0] == "organism, being"  # Google's head order starts at n00004475
    assert labels.imagenet21k_synsets()[1] == "n00005787"
    assert labels.imagenet_names(10) is None


def test_a_16_bit_png_is_classified_like_its_8_bit_twin(folder_data, meta_checkpoint, tmp_path):
    """A 16-bit grey PNG (PIL mode I;16) holding the same picture as an 8-bit one gets the same probabilities:
    predict scales it (PIL's convert("RGB") clipped it at 255, a white image)."""
    grey = np.asarray(Image.open(folder_data / "val" / "bee" / "bee_0.png").convert("L"))
    Image.fromarray(grey).save(tmp_path / "a8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "b16.png")
    assert Image.open(tmp_path / "b16.png").mode == "I;16"
    out = tmp_path / "p.json"
    assert main([str(tmp_path), "--checkpoint_path", str(meta_checkpoint), "--output_json", str(out), "--progress", "false"]) == 0
    eight, sixteen = json.loads(out.read_text())["predictions"]
    assert eight["indices"] == sixteen["indices"]
    np.testing.assert_allclose(sixteen["probs"], eight["probs"], rtol=1e-5)
