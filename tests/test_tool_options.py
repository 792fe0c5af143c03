"""The command lines of train.py, validate.py and every tool come from the option declarations:
one parser per value, suggestions that name the option meant, options the run would ignore refused,
and an explicit resolution honoured."""

from __future__ import annotations

import pytest

from bit_zoo.config import parse_config
from bit_zoo.errors import ConfigError


@pytest.mark.parametrize(
    "argv, meant",
    [
        (["--learning_rate", "0.1"], "--lr"),  # difflib alone says --decay_rate
        (["--num_epochs", "3"], "--epochs"),
        (["--optimizer", "adamw"], "--opt"),
        (["--resolution", "64"], "--image_size"),
        (["--batch-sz", "8"], "--batch_size"),  # a misspelling still gets the close match
    ],
)
def test_train_suggests_the_option_meant(argv, meant):
    with pytest.raises(ConfigError, match=f"Did you mean: {meant}\\?"):
        parse_config("train", argv)


def test_flags_and_lists_in_every_spelling():
    """A bare --flag means true; a list takes "3,4", "3 4" or none; aliases and hyphens reach the same option."""
    cfg = parse_config("train", ["--pretrained", "--hflip", "false", "--classes", "3", "4", "--randaugment", "2,9", "--img-size", "64"])
    assert cfg.model.pretrained is True and cfg.data.hflip is False and cfg.data.classes == [3, 4] and cfg.data.randaugment == [2, 9]
    assert cfg.data.image_size == 64
    assert parse_config("train", ["--classes", "none"]).data.classes is None
    with pytest.raises(ConfigError, match="randaugment=\\[2\\]: must be a list of 2 values"):
        parse_config("train", ["--randaugment", "2"])


def test_yaml_key_suggests_the_option_meant(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'.*Did you mean: lr\\?"):
        parse_config("train", ["-c", str(cfg)])


# ------------------------------------------------------------------------------------------------
# Every tool on the declarations


def test_tools_take_their_options_from_the_declarations():
    """conv_impl's choices, the data options and the bool parser come from the one declaration of each."""
    from bit_zoo.models.layers import CONV_IMPLS
    from bit_zoo.tools import convert, embed, fewshot, predict

    for parse, argv in ((predict.parse, ["x.jpg"]), (embed.parse, ["--output", "e.npz"]), (fewshot.parse, [])):
        with pytest.raises(ConfigError, match="invalid choice: 'im2col'") as bad:
            parse(argv + ["--conv_impl", "im2col"])
        assert all(impl in str(bad.value) for impl in CONV_IMPLS)
        with pytest.raises(ConfigError, match="--progress: expected a boolean"):  # the old lambda took "maybe" for false
            parse(argv + ["--progress", "maybe"])
        assert parse(argv + ["--progress", "false"])["system"].progress is False
    e = embed.parse(["--output", "e.npz", "--dataset", "folder", "--data_dir", "d", "--classes", "3", "4", "--val_split", "0.2"])["data"]
    assert (e.dataset, e.data_dir, e.classes, e.val_split, e.batch_size) == ("folder", "d", [3, 4], 0.2, 64)
    with pytest.raises(ConfigError, match="val_split=-1.0: must be"):  # the check train.py applies
        embed.parse(["--output", "e.npz", "--val_split", "-1"])
    with pytest.raises(ConfigError, match="--output is required"):
        embed.parse([])
    assert fewshot.parse(["--shots", "1", "5", "--seeds", "2"])["fewshot"].shots == [1, 5]
    c = convert.parse(["--output", "x.onnx", "--img_size", "64", "--ema"])  # its former spellings still work
    assert c["data"].image_size == 64 and c["model"].ema is True and c["convert"].output == "x.onnx"


@pytest.mark.parametrize("tool", ["predict", "embed", "fewshot", "convert", "memory"])
def test_every_tool_suggests_the_option_meant(tool):
    import importlib

    parse = importlib.import_module(f"bit_zoo.tools.{tool}").parse
    argv = {"predict": ["x.jpg"], "embed": ["--output", "e.npz"], "memory": ["-c", "c.yaml"]}.get(tool, [])
    typo = ["--batch-sz", "8"] if tool != "memory" else ["--device", "2"]
    meant = "--batch_size" if tool != "memory" else "--devices"
    with pytest.raises(ConfigError, match=f"Did you mean: {meant}"):
        parse(argv + typo)


def test_no_tool_imports_another_tool_or_the_training_scripts_config():
    """A tool imports only what it uses: no sibling tool, no config/training/_cli for the inference tools."""
    import ast
    from pathlib import Path

    import bit_zoo.tools

    folder = Path(bit_zoo.tools.__file__).parent
    tools = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")}  # _inference: shared plumbing, not a tool
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = [a.name for a in node.names]
                assert not (node.level == 1 and (node.module in tools or any(n in tools for n in names))), (path.name, target)
                assert not (node.module or "").startswith("bit_zoo.tools"), (path.name, target)
                if path.stem in ("predict", "embed", "fewshot", "convert", "remote"):
                    assert not (node.level == 2 and (node.module or "").split(".")[0] in ("config", "_cli", "training")), (path.name, target)


# ------------------------------------------------------------------------------------------------
# An option the dataset does not use is refused


@pytest.mark.parametrize("script", ["train", "validate", "embed", "fewshot"])
def test_data_dir_with_digits_is_refused(script):
    argv = ["--dataset", "digits", "--data_dir", "/nonexistent"]
    if script in ("train", "validate"):
        parse = lambda a: parse_config(script, a)  # noqa: E731
    else:
        import importlib

        parse = importlib.import_module(f"bit_zoo.tools.{script}").parse
        argv += ["--output", "e.npz"] if script == "embed" else []
    with pytest.raises(ConfigError, match="digits .* reads no data_dir.*'/nonexistent'"):
        parse(argv)
    parse([a for a in argv if a not in ("--data_dir", "/nonexistent")])  # without it: fine


def test_data_dir_with_digits_is_refused_from_a_config_file(tmp_path, capsys):
    import train

    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: digits\ndata_dir: /nonexistent\n")
    assert train.cli(["-c", str(cfg), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reads no data_dir" in err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_export_options_for_a_weights_file(tmp_path, capsys):
    from bit_zoo.tools import convert

    assert convert.main(["--model", "bit_s_r50x1", "--input", "x.npz", "--output", str(tmp_path / "w.ckpt"), "--img_size", "64"]) == 2
    assert "shape the example input of an export" in capsys.readouterr().err  # was: accepted and ignored
    assert not (tmp_path / "w.ckpt").exists()


# ------------------------------------------------------------------------------------------------
# An explicit resolution decides the size


def test_fewshot_image_size_decides_the_size():
    from bit_zoo.tools import fewshot

    def size(*argv):
        d, f = (fewshot.parse(list(argv))[k] for k in ("data", "fewshot"))
        pp = fewshot.protocol_preprocess(d, f.crop_pct)
        return pp.resize_size, pp.image_size

    assert size() == (256, 224)  # big_vision's protocol
    assert size("--image_size", "32") == (37, 32)  # was (256, 224): --image_size accepted and ignored
    assert size("--image_size", "32", "--eval_size", "48", "--crop_pct", "1") == (None, 48)  # eval_size first, as validate.py


def test_fewshot_and_embed_run_at_the_size_asked(tmp_path, capsys):
    """One small run each on digits (a random-init resnetv2: the size is what is checked, not the accuracy)."""
    import numpy as np

    from bit_zoo.tools import embed, fewshot

    common = ["--model", "resnetv2", "--layers", "1,1,1,1", "--dataset", "digits", "--classes", "3,4", "--num_samples", "20",
              "--batch_size", "10", "--num_workers", "1", "--progress", "false", "--image_size", "32"]  # fmt: skip
    out = tmp_path / "fs.json"
    argv = common + ["--shots", "1", "--seeds", "1", "--cache_dir", str(tmp_path / "cache"), "--output_json", str(out)]
    assert fewshot.main(argv) == 0
    assert "37->32 px" in capsys.readouterr().out  # resize 32 / 0.875, center crop 32
    import json

    assert json.loads(out.read_text())["preprocess"]["image_size"] == 32
    npz = tmp_path / "e.npz"
    assert embed.main(common + ["--split", "val", "--output", str(npz)]) == 0
    assert "32->32 px" in capsys.readouterr().out
    with np.load(npz) as z:
        assert json.loads(str(z["fingerprint"]))["preprocess"]["image_size"] == 32


def test_predict_header_names_the_size(tmp_path, capsys):
    from PIL import Image

    from bit_zoo.tools import predict

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    argv = [str(image), "--model", "resnetv2", "--layers", "1,1,1,1", "--image_size", "24", "--progress", "false",
            "--output_json", str(tmp_path / "p.json")]  # fmt: skip
    assert predict.main(argv) == 0
    assert "24->24 px" in capsys.readouterr().err.splitlines()[0]
    import json

    assert json.loads((tmp_path / "p.json").read_text())["preprocess"]["image_size"] == 24
