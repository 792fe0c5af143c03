"""What a checkpoint says about itself is checked wherever it is read, and what convert writes is accepted
everywhere a checkpoint is: the digest covers meta.json, a missing digest needs --allow_unverified, a converted
train.py checkpoint loads in validate.py, train.py --checkpoint_path and the tools, converting in place is refused.

One tiny train.py run (in-process, digits, a one-unit-per-stage ResNetV2 at 32 px) writes the checkpoint that
every test reads: the exact file train.py writes, optimizer state and all.
"""

from __future__ import annotations

import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

import train
import validate
from bit_zoo.tools import convert, embed, fewshot, predict
from bit_zoo.weights.loading import read_arrays
from bit_zoo.weights.meta import META_KEY, UnverifiedError, decode_meta, encode_meta, verify_digest, with_meta

TINY = [
    "--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "digits", "--image_size", "32", "--eval_size", "32",
    "--hflip", "false", "--opt", "sgd", "--lr", "0.01", "--scheduler", "constant", "--progress", "false",
    "--eval_samples", "16", "--num_workers", "1", "--transform", "eval", "--batch_size", "8",
]  # fmt: skip
VALIDATE = ["--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "digits", "--eval_size", "32", "--progress", "false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out.parent)
        mp.setenv("BIT_ZOO_HOME", str(out.parent / "home"))
        train.main(TINY + ["--steps", "2", "--output_dir", str(out)])
    return out


def _entries(path: Path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def _rewrite(src: Path, dst: Path, change_meta) -> Path:
    """src with its meta.json changed by `change_meta(meta)` and nothing else (the digest left as it was)."""
    arrays = _entries(src)
    meta = decode_meta(arrays)
    change_meta(meta)
    arrays[META_KEY] = encode_meta(meta)
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()], str(dst))
    return dst


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "zero.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(path)
    return path


def _error_lines(err: str) -> list[str]:
    """The error lines of a run's stderr (train.py also logs INFO lines there)."""
    return [line for line in err.splitlines() if ": error: " in line]


def _tool_runs(ckpt: Path, tmp_path: Path, image: Path) -> dict:
    """Each reader of checkpoints, as a user runs it: name -> callable returning the exit status."""
    data = ["--dataset", "digits", "--num_samples", "20", "--progress", "false", "--num_workers", "1", "--batch_size", "10"]
    few = ["--split", "test", "--shots", "1", "--seeds", "1", "--crop_pct", "1", "--eval_size", "32", "--cache_dir", str(tmp_path / "c")]
    return {
        "validate.py": lambda *extra: validate.cli(VALIDATE + ["--ckpt_path", str(ckpt), *extra]),
        "train.py --checkpoint_path": lambda *extra: train.cli(
            TINY + ["--steps", "1", "--checkpoint_path", str(ckpt), "--output_dir", str(tmp_path / "ft"), "--overwrite", "true", *extra]
        ),
        "predict": lambda *extra: predict.main([str(image), "--checkpoint_path", str(ckpt), "--progress", "false", *extra]),
        "convert": lambda *extra: convert.main(["--input", str(ckpt), "--output", str(tmp_path / "c.safetensors"), *extra]),
        "embed": lambda *extra: embed.main(
            ["--checkpoint_path", str(ckpt), *data, "--output", str(tmp_path / "e.npz"), "--overwrite", "true", *extra]
        ),
        "fewshot": lambda *extra: fewshot.main(["--checkpoint_path", str(ckpt), *data, *few, *extra]),
    }


def test_the_digest_covers_meta_json(run_dir):
    arrays = _entries(run_dir / "best.ckpt")
    assert verify_digest("best.ckpt", arrays)["class_names"] == [str(i) for i in range(10)]
    meta = decode_meta(arrays)
    meta["class_names"] = meta["class_names"][::-1]  # a label swap: the weights untouched
    with pytest.raises(ValueError, match="does not match the digest"):
        verify_digest("best.ckpt", {**arrays, META_KEY: encode_meta(meta)})
    # with_meta replaces a digest it is given (another file's) by the one of what it writes
    fresh = with_meta({k: v for k, v in arrays.items() if k != META_KEY}, meta)
    assert verify_digest("fresh", fresh)["class_names"][0] == "9"


def test_every_reader_refuses_edited_class_names(run_dir, tmp_path, image, capsys):
    """Reversed class names in meta.json (validate passed and predict labelled a 0 as 5): every reader says so in one line."""
    bad = _rewrite(run_dir / "best.ckpt", tmp_path / "reversed.ckpt", lambda m: m.update(class_names=m["class_names"][::-1]))
    for name, run in _tool_runs(bad, tmp_path, image).items():
        capsys.readouterr()
        assert run() == 2, name
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and "does not match the digest" in err[0] and "reversed.ckpt" in err[0], (name, err)
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "e.npz").exists()


def test_a_deleted_digest_is_refused_unless_the_user_allows_it(run_dir, tmp_path, image, capsys):
    bare = _rewrite(run_dir / "best.ckpt", tmp_path / "nodigest.ckpt", lambda m: m.pop("digest"))
    runs = _tool_runs(bare, tmp_path, image)
    for name, run in runs.items():
        capsys.readouterr()
        assert run() == 2, name
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and "carries no digest" in err[0] and "--allow_unverified" in err[0], (name, err)
    for name in ("validate.py", "predict", "convert"):
        assert runs[name]("--allow_unverified", "true") == 0, name
    # the converted copy carries a fresh digest: checked, no option needed
    _, arrays = read_arrays(tmp_path / "c.safetensors")
    assert verify_digest("c", arrays)["class_names"] == [str(i) for i in range(10)]
    with pytest.raises(UnverifiedError, match="--allow_unverified"):
        verify_digest("nodigest.ckpt", _entries(bare))


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_a_converted_training_checkpoint_loads_everywhere(run_dir, tmp_path, image, suffix, capsys):
    src = run_dir / "best.ckpt"
    out = tmp_path / f"converted{suffix}"
    assert convert.main(["--input", str(src), "--output", str(out)]) == 0
    _, arrays = read_arrays(out)
    meta = verify_digest(out, arrays)  # the old file's digest covered its optimizer entries: this one is fresh
    assert meta["class_names"] == [str(i) for i in range(10)] and not any(k.startswith(("optim.", "state.")) for k in arrays)
    capsys.readouterr()
    assert validate.cli(VALIDATE + ["--ckpt_path", str(out), "--ema", "false"]) == 0
    converted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert validate.cli(VALIDATE + ["--ckpt_path", str(src), "--ema", "false"]) == 0
    original = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the same weights through the same evaluation: the same numbers
    assert (converted["top1"], converted["loss"], converted["images"]) == (original["top1"], original["loss"], original["images"])
    assert train.cli(TINY + ["--steps", "1", "--checkpoint_path", str(out), "--output_dir", str(tmp_path / "ft")]) == 0
    assert predict.main([str(image), "--checkpoint_path", str(out), "--progress", "false"]) == 0


def test_converting_in_place_is_refused(run_dir, tmp_path, capsys):
    copy = tmp_path / "last.ckpt"
    copy.write_bytes((run_dir / "last.ckpt").read_bytes())
    before = copy.read_bytes()
    (tmp_path / "alias.ckpt").symlink_to(copy)
    for output in (copy, tmp_path / "alias.ckpt", tmp_path / "." / "last.ckpt"):
        capsys.readouterr()
        assert convert.main(["--input", str(copy), "--output", str(output)]) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and "is the --input file" in err[0], err
    assert copy.read_bytes() == before


def test_resume_refuses_a_checkpoint_with_edited_meta(run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.ckpt", "metrics.jsonl"):
        (out / name).write_bytes((run_dir / name).read_bytes())
    _rewrite(out / "last.ckpt", out / "last.ckpt", lambda m: m.update(class_names=m["class_names"][::-1]))
    assert train.cli(TINY + ["--steps", "4", "--output_dir", str(out), "--resume", "auto"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "does not match the digest" in err[0] and "last.ckpt" in err[0], err


def test_an_older_digest_that_does_not_cover_meta_json_needs_the_option():
    """Files of earlier versions carry a digest of the other entries only: their meta.json is unchecked."""
    import hashlib

    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    h = hashlib.sha256()  # the earlier digest, written out here as those versions computed it
    h.update(f"w\0{arrays['w'].dtype.str}\0{arrays['w'].shape}\0".encode())
    h.update(arrays["w"].tobytes())
    old = {META_KEY: encode_meta({"class_names": ["a", "b"], "digest": h.hexdigest()}), **arrays}
    with pytest.raises(UnverifiedError, match="older bit_zoo's digest.*--allow_unverified"):
        verify_digest("old.ckpt", old)
    assert verify_digest("old.ckpt", old, allow_unverified=True)["class_names"] == ["a", "b"]
    with pytest.raises(ValueError, match="does not match"):  # a changed entry is refused, option or not
        verify_digest("old.ckpt", {**old, "w": arrays["w"] + 1}, allow_unverified=True)
