"""Config machinery, every shipped config, and the schedules/optimizer pieces that need no training."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

import bit_zoo
from conftest import results_rows
from bit_zoo.config import build_parser, config_dict, parse_config, save_config, script_keys
from bit_zoo.data import default_train_resize
from bit_zoo.data.from_config import default_image_size
from bit_zoo.errors import ConfigError
from bit_zoo.training import train_step
from bit_zoo.training.optim import OPTIMIZERS, OptimConfig, decay_filter
from bit_zoo.training.schedules import ScheduleConfig, build_lr_schedule, hyperrule, hyperrule_resolution, resolve_schedule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def write_yaml(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_yaml_sets_defaults_and_command_line_overrides(tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", {"lr": 0.02, "opt": "rmsprop", "milestones": [30, 40], "num_classes": None})
    cfg = parse_config("train", ["-c", str(cfg_file), "--lr", "0.5"])
    assert cfg.optim.lr == 0.5 and cfg.optim.opt == "rmsprop" and cfg.schedule.milestones == [30.0, 40.0]
    assert cfg.model.num_classes is None and cfg.source == str(cfg_file)


def test_groups_are_the_library_configs():
    """cfg.optim / cfg.schedule / cfg.step are the library's own dataclasses, handed to it as they are."""
    cfg = parse_config("train", ["--lr", "0.1", "--ema_decay", "0.99"])
    assert type(cfg.optim) is OptimConfig and type(cfg.schedule) is ScheduleConfig and type(cfg.step) is train_step.StepConfig
    assert cfg.optim.lr == 0.1 and cfg.step.ema_decay == 0.99 and cfg.data.dataset == "cifar10"
    assert "{" + ",".join(OPTIMIZERS) + "}" in build_parser("train").format_help()  # choices from training/optim.py


def test_every_option_is_declared_once_and_shows_its_default():
    keys = script_keys("train") + script_keys("validate")
    assert len(set(script_keys("train"))) == len(script_keys("train"))
    for script in ("train", "validate"):
        text = build_parser(script).format_help()
        for key in script_keys(script):
            entry = text[text.index(f"--{key} ") :]
            assert "(default:" in " ".join(entry.split("  --")[0].split()), f"{script} --help shows no default for --{key}"
    assert {"lr", "ckpt_path", "batch_size"} <= set(keys)


def test_validate_help_describes_evaluation():
    text = " ".join(build_parser("validate").format_help().split())
    assert "train crop" not in text and "GLOBAL" not in text
    assert parse_config("validate", []).data.batch_size == 64 and parse_config("train", []).data.batch_size == 512


def test_hyphenated_aliases():
    cfg = parse_config("train", ["--num-classes", "3", "--ema-decay", "0.5", "--weight-decay", "0.1"])
    assert cfg.model.num_classes == 3 and cfg.step.ema_decay == 0.5 and cfg.optim.weight_decay == 0.1
    assert parse_config("validate", ["--ckpt-path", "x.ckpt"]).model.ckpt_path == "x.ckpt"


@pytest.mark.parametrize(
    "content, message",
    [
        ({"learning_rate": 0.1}, "unknown config key 'learning_rate'"),
        ({"lr": "fast"}, "lr: 'fast' is not a valid float"),
        ({"seed": True}, "seed: True is not a valid int"),
        ({"steps": 2.5}, "steps: 2.5 is not a valid optional int"),
        ({"lr": [0.1, 0.2]}, "lr takes one value"),
        ({"opt": "lamb"}, "'lamb' is not one of"),
        ("lr: [0.1\n", "not valid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
    ],
)
def test_bad_yaml_is_a_clear_error(tmp_path, content, message):
    cfg = write_yaml(tmp_path / "c.yaml", content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config("train", ["-c", str(cfg)])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", -1, "lr=-1.0: must be a finite number > 0"),
        ("lr", float("nan"), "lr=nan: must be a finite number > 0"),
        ("image_size", 0, "image_size=0: must be a whole number >= 1"),
        ("batch_size", -8, "batch_size=-8: must be a whole number >= 1"),
        ("epochs", 0, "epochs=0.0: must be a finite number > 0"),
        ("steps", 0, "steps=0: must be a whole number >= 1"),
        ("warmup_steps", -1, "warmup_steps=-1: must be a whole number >= 0"),
        ("decay_rate", 0, "decay_rate=0.0: must be a finite number > 0"),
        ("momentum", 1.0, "momentum=1.0: must be a number in [0, 1)"),
        ("ema_decay", 1.5, "ema_decay=1.5: must be a number in [0, 1)"),
        ("label_smoothing", 1.0, "label_smoothing=1.0: must be a number in [0, 1)"),
        ("val_split", 1.5, "val_split=1.5: must be a fraction in [0, 1) or a whole number"),
        ("weight_decay", float("inf"), "weight_decay=inf: must be a finite number >= 0"),
        ("accum_steps", 0, "accum_steps=0: must be a whole number >= 1"),
        ("randaugment", [2], "randaugment=[2]: must be a list of 2 values"),
        ("adam_betas", [0.9, 1.0], "adam_betas=[0.9, 1.0]: must be a list of which every value is a number in [0, 1)"),
        ("milestones", [3, -1], "milestones=[3.0, -1.0]: must be a list of which every value is a finite number >= 0"),
        ("layers", [1, 0, 1, 1], "layers=[1, 0, 1, 1]: must be a list of which every value is a whole number >= 1"),
        ("std", [0.5, 0, 0.5], "std=[0.5, 0.0, 0.5]: must be a list of which every value is a finite number > 0"),
    ],
)
def test_numeric_options_are_checked(tmp_path, key, value, message):
    """Every numeric option is checked at parse time (before train.py writes anything), YAML and command line alike."""
    cfg = write_yaml(tmp_path / "c.yaml", {key: value})
    with pytest.raises(ConfigError, match=re.escape(message) + ".*Fix it"):
        parse_config("train", ["-c", str(cfg)])


def test_numeric_checks_on_the_command_line():
    with pytest.raises(ConfigError, match=re.escape("lr=nan: must be a finite number > 0")):
        parse_config("train", ["--lr", "nan"])
    with pytest.raises(ConfigError, match=re.escape("batch_size=0: must be a whole number >= 1")):
        parse_config("validate", ["--batch_size", "0"])
    with pytest.raises(ConfigError, match="invalid choice"):  # argparse's own errors become one ConfigError too
        parse_config("train", ["--opt", "lamb"])


def test_unknown_key_lists_close_matches(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"ema_decy": 0.9})
    with pytest.raises(ConfigError, match="Did you mean: ema_decay"):
        parse_config("train", ["-c", str(cfg)])
    with pytest.raises(ConfigError, match="Did you mean: --clip_grad_norm"):
        parse_config("train", ["--clip_grad_nrom", "1.0"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config("train", ["-c", str(tmp_path / "nope.yaml")])


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config("train", ["--lr", "0.25", "--milestones", "3,5", "--randaugment", "2,20", "--num_classes", "7"])
    saved = save_config(cfg, tmp_path / "out" / "config.yaml", command="train.py --lr 0.25")
    assert yaml.safe_load(saved.read_text()) == config_dict(cfg) and set(config_dict(cfg)) == set(script_keys("train"))
    again = parse_config("train", ["-c", str(saved)])
    assert [g for _, g in again.groups()] == [g for _, g in cfg.groups()]


def test_validate_reads_a_training_config(tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", {"lr": 0.1, "dataset": "digits", "ema_decay": 0.9, "image_size": 32})
    cfg = parse_config("validate", ["-c", str(cfg_file)])
    assert cfg.data.dataset == "digits" and cfg.data.image_size == 32
    assert cfg.optim.lr == OptimConfig().lr  # a training-only key: ignored, not applied
    with pytest.raises(ConfigError, match="unknown config key 'ckpt_path'"):  # train.py does not take validate's options
        parse_config("train", ["-c", str(write_yaml(tmp_path / "v.yaml", {"ckpt_path": "x"}))])


def _header_commands(path: Path) -> list[list[str]]:
    """The argv after train.py of every command line in the header."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and "train.py -c " in line:
            words = shlex.split(line.lstrip("#").split("  #")[0])
            out.append(words[words.index("train.py") + 1 :])
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_parses_and_has_its_header(path, monkeypatch):
    text = path.read_text(encoding="utf-8")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("#"), f"{path.name} must start with a comment"
    # the header's command is the exact command for this file, and it parses as given (run from the repository root)
    own = [argv for argv in _header_commands(path) if argv[:2] == ["-c", str(path.relative_to(ROOT))]]
    assert own, f"{path.name}: the header has no train.py command for this file"
    argv = own[0]
    monkeypatch.chdir(ROOT)
    cfg = parse_config("train", argv)
    assert bit_zoo.is_model(cfg.model.model) or cfg.model.model == "resnetv2"
    # "Expected:" states a result: a measured or reported percentage, or says plainly that there is none yet
    expected = " ".join(line for line in header if "Expected" in line)
    assert re.search(r"Expected: .*(\d+(\.\d+)?%|not reported|not measured)", expected), expected
    hardware = " ".join(line for line in header if "Hardware:" in line)
    assert re.search(r"Hardware: .*(CPU|GB|Ascend|GPU|accelerator)", hardware), f"{path.name}: header names no hardware"


def test_quickstart_headers_state_recorded_figures():
    """Each figure a quickstart header calls measured is a row of benchmarks/results/quickstart.csv for that step."""
    rows = results_rows("quickstart")
    for name, run in (("quickstart_digits_pretrain.yaml", "step1"), ("quickstart_digits.yaml", "step2")):
        header = (ROOT / "configs" / name).read_text(encoding="utf-8").split("\nmodel:")[0]
        measured = re.findall(r"measured (\d+\.\d+)%", header)
        assert measured, f"{name}: the header states no measured figure"
        recorded = {r["top1"] for r in rows if r["run"].startswith(run)}  # step2 and step2_scratch for step 2's header
        assert set(measured) <= recorded, f"{name}: {set(measured) - recorded} measured in the header, not in benchmarks/results/quickstart.csv"


def test_distill_digits_header_states_recorded_figures():
    header = (ROOT / "configs" / "distill" / "digits_teacher_to_student.yaml").read_text(encoding="utf-8")
    figures = re.findall(r"(\d+\.\d+)%", header.split("# Hardware")[0].split("# Expected")[1])
    assert len(figures) >= 5
    recorded = {r["top1"] for r in results_rows("digits")} | {v for r in results_rows("digits") for v in r["detail"].split()}
    missing = [f for f in figures if f not in recorded]
    assert not missing, f"the digits distillation header's {missing} are not in benchmarks/results/digits.csv"


def test_hyperrule_configs_cover_every_model_and_are_current():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("generate", ROOT / "configs" / "generate.py")
    generate = module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.main(["--check"]) == 0
    names = {p.stem for p in (ROOT / "configs" / "hyperrule").glob("*.yaml")}
    assert names == {f"{m}_{d}" for m in bit_zoo.list_models() for d in ("cifar10", "cifar100", "imagenet")}


def test_seed_config_has_every_value_of_the_recipe():
    cfg = config_dict(parse_config("train", ["-c", str(ROOT / "configs" / "seed" / "bit_m_r101x3_cifar10.yaml")]))
    expected = dict(
        model="bit_m_r101x3", pretrained=True, image_size=160, resize_size=192, eval_size=192, interpolation="bicubic",
        randaugment=[2, 20], mixup_alpha=0.5, label_smoothing=0.1, opt="rmsprop", rmsprop_decay=0.9, momentum=0.9,
        rmsprop_eps=1.0, weight_decay=4e-5, weight_decay_filter="conv", lr=0.02, scheduler="staircase", warmup_epochs=6.0,
        decay_rate=0.98, decay_epochs=2.5, epochs=200, batch_size=512, clip_grad_norm=1.0, ema_decay=0.9999,
        loss_scale="dynamic", loss_scale_value=2.0**24, amp_level="O2",
    )  # fmt: skip
    assert {k: cfg[k] for k in expected} == expected


DISTILL_CONFIGS = sorted((ROOT / "configs" / "distill").glob("*.yaml"))


@pytest.mark.parametrize("path", DISTILL_CONFIGS, ids=[p.stem for p in DISTILL_CONFIGS])
def test_distill_configs_name_one_teacher_source(path, monkeypatch):
    """Every shipped distillation config distils (function matching: mixup on, KL, labels out of the loss) from
    exactly one teacher source; a teacher checkpoint is the output of the shipped config that trains it."""
    from bit_zoo.training.distill import distilling

    monkeypatch.chdir(ROOT)
    cfg = parse_config("train", ["-c", str(path)])
    d = cfg.distill
    assert distilling(d) and d.distill_loss == "kl" and d.distill_label_weight == 0.0
    assert bool(d.teacher_pretrained) != bool(d.teacher_checkpoint_path), "exactly one of teacher_pretrained and teacher_checkpoint_path"
    assert cfg.data.mixup_alpha == 1.0, "the paper's mixup p=1.0"
    if d.teacher_pretrained:
        assert bit_zoo.is_model(d.teacher) and bit_zoo.get_weights(d.teacher).num_classes == cfg.model.num_classes
    else:
        # the header shows the command that writes the teacher checkpoint, and that command writes it there
        outputs = {str(Path(parse_config("train", argv).system.output_dir) / "best.ckpt") for argv in _header_commands(path)}
        assert d.teacher_checkpoint_path in outputs, (d.teacher_checkpoint_path, outputs)


def test_one_hyperrule_resolution_rule():
    """128 px below 96x96 source images, else 480: the same answer for train, validate, transforms and generate.py."""
    assert hyperrule_resolution(32, 32) == (160, 128) and hyperrule_resolution(95, 96) == (160, 128)
    assert hyperrule_resolution(96, 96) == (512, 480) and hyperrule_resolution(224, 224) == (512, 480)
    assert [default_image_size(d) for d in ("cifar10", "cifar100", "digits", "imagenet", "folder")] == [128, 128, 128, 480, 480]
    assert default_train_resize(128) == 160 and default_train_resize(480) == 512 and default_train_resize(160) == 192
    for path in (ROOT / "configs" / "hyperrule").glob("*.yaml"):
        cfg = parse_config("train", ["-c", str(path)])
        assert (cfg.data.resize_size, cfg.data.image_size) == (
            default_train_resize(default_image_size(cfg.data.dataset)),
            default_image_size(cfg.data.dataset),
        )


# ---------------------------------------------------------------------------------- schedules


def test_hyperrule_schedule_matches_the_papers_examples():
    rule = hyperrule(50_000)
    assert (rule.warmup, rule.decays, rule.total, rule.mixup_alpha) == (500, (3000, 6000, 9000), 10_000, 0.1)
    assert hyperrule(19_999).total == 500 and hyperrule(19_999).mixup_alpha == 0.0 and hyperrule(500_000).total == 20_000
    lr = build_lr_schedule(
        ScheduleConfig(scheduler="hyperrule", warmup_steps=rule.warmup, decay_steps=list(rule.decays)),
        lr=0.003,
        total_steps=rule.total,
        steps_per_epoch=97,
    )
    np.testing.assert_allclose(
        [lr[250], lr[500], lr[3000], lr[3001], lr[6001], lr[9999]], [0.0015, 0.003, 0.003, 3e-4, 3e-5, 3e-6], rtol=1e-5
    )
    assert lr[0] == 0.0


def test_resolve_schedule_scales_a_shortened_hyperrule():
    lr, total = resolve_schedule(ScheduleConfig(scheduler="hyperrule", steps=50), lr=0.1, num_images=1000, steps_per_epoch=10)
    assert total == 50 and lr[5] == pytest.approx(0.05) and lr[10] == pytest.approx(0.1) and lr[21] == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="needs a training length"):
        resolve_schedule(ScheduleConfig(scheduler="cosine"), lr=0.1, num_images=1000, steps_per_epoch=10)
    with pytest.raises(ConfigError, match="both set"):
        resolve_schedule(ScheduleConfig(scheduler="cosine", epochs=1, steps=3), lr=0.1, num_images=1000, steps_per_epoch=10)


def test_seed_staircase_schedule():
    lr = build_lr_schedule(
        ScheduleConfig(scheduler="staircase", warmup_epochs=6, decay_rate=0.98, decay_epochs=2.5),
        lr=0.02,
        total_steps=100 * 10,
        steps_per_epoch=10,
    )
    np.testing.assert_allclose([lr[30], lr[60], lr[84], lr[85], lr[110]], [0.01, 0.02, 0.02, 0.02 * 0.98, 0.02 * 0.98**2], rtol=1e-5)


def test_multistep_schedule():
    lr = build_lr_schedule(
        ScheduleConfig(scheduler="multistep", decay_rate=0.5, milestones=[30, 40], warmup_epochs=3),
        lr=0.06,
        total_steps=50,
        steps_per_epoch=1,
    )
    np.testing.assert_allclose([lr[1], lr[3], lr[29], lr[30], lr[40]], [0.02, 0.06, 0.06, 0.03, 0.015], rtol=1e-5)


def test_weight_decay_filter_conv_only():
    model = bit_zoo.ResNetV2((1, 1, 1, 1), num_classes=10)
    decayed = [p.name for p in model.trainable_params() if decay_filter("conv")(p)]
    assert decayed and all(n.endswith(".weight") and "head" not in n for n in decayed)
    assert not any(decay_filter("none")(p) for p in model.trainable_params())
