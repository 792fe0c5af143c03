"""Config machinery, every shipped config, and the schedules/optimizer pieces that need no training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import bit_zoo
from bit_zoo.config import ConfigError, build_train_parser, build_validate_parser, grouped, parse_with_config, save_config, train_only_keys
from bit_zoo.training.optim import decay_filter
from bit_zoo.training.schedules import ScheduleConfig, build_lr_schedule, hyperrule, hyperrule_resolution

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def write_yaml(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_yaml_sets_defaults_and_command_line_overrides(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"lr": 0.02, "opt": "rmsprop", "milestones": [30, 40], "num_classes": None})
    args = parse_with_config(build_train_parser(), ["-c", str(cfg), "--lr", "0.5"])
    assert args.lr == 0.5 and args.opt == "rmsprop" and args.milestones == [30.0, 40.0] and args.num_classes is None
    assert args.config == str(cfg)


def test_grouped_namespaces():
    parser = build_train_parser()
    cfg = grouped(parser, parse_with_config(parser, ["--lr", "0.1", "--ema_decay", "0.99"]))
    assert cfg.optim.lr == 0.1 and cfg.step.ema_decay == 0.99 and cfg.data.dataset == "cifar10"


@pytest.mark.parametrize(
    "content, message",
    [
        ({"learning_rate": 0.1}, "unknown config key 'learning_rate'"),
        ({"lr": "fast"}, "lr: 'fast' is not a valid float"),
        ({"opt": "lamb"}, "'lamb' is not one of"),
        ("lr: [0.1\n", "not valid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
    ],
)
def test_bad_yaml_is_a_clear_error(tmp_path, content, message):
    cfg = write_yaml(tmp_path / "c.yaml", content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_with_config(build_train_parser(), ["-c", str(cfg)])


def test_unknown_key_lists_close_matches(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"ema_decy": 0.9})
    with pytest.raises(ConfigError, match="Did you mean: ema_decay"):
        parse_with_config(build_train_parser(), ["-c", str(cfg)])
    with pytest.raises(ConfigError, match="Did you mean: --clip_grad_norm"):
        parse_with_config(build_train_parser(), ["--clip_grad_nrom", "1.0"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_with_config(build_train_parser(), ["-c", str(tmp_path / "nope.yaml")])


def test_saved_config_round_trips(tmp_path):
    parser = build_train_parser()
    args = parse_with_config(parser, ["--lr", "0.25", "--milestones", "3,5", "--randaugment", "2,20"])
    saved = save_config(args, tmp_path / "out" / "config.yaml")
    again = parse_with_config(build_train_parser(), ["-c", str(saved)])
    assert {k: v for k, v in vars(again).items() if k != "config"} == {k: v for k, v in vars(args).items() if k != "config"}


def test_validate_reads_a_training_config(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"lr": 0.1, "dataset": "digits", "ema_decay": 0.9, "image_size": 32})
    args = parse_with_config(build_validate_parser(), ["-c", str(cfg)], ignore_keys=train_only_keys())
    assert args.dataset == "digits" and args.image_size == 32 and not hasattr(args, "lr")


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_parses_and_has_its_header(path):
    text = path.read_text(encoding="utf-8")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and text.startswith("#"), f"{path.name} must start with a comment"
    assert any("train.py -c configs/" in line for line in header), "header must give the exact command"
    assert any("Expected" in line for line in header), "header must state the expected result"
    assert any("Hardware" in line or "CPU" in line for line in header), "header must name the hardware"
    args = parse_with_config(build_train_parser(), ["-c", str(path)])
    assert bit_zoo.is_model(args.model) or args.model == "resnetv2"


def test_hyperrule_configs_cover_every_model_and_are_current():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("generate", ROOT / "configs" / "generate.py")
    generate = module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.main(["--check"]) == 0
    names = {p.stem for p in (ROOT / "configs" / "hyperrule").glob("*.yaml")}
    assert names == {f"{m}_{d}" for m in bit_zoo.list_models() for d in ("cifar10", "cifar100", "imagenet")}


def test_seed_config_has_every_value_of_the_recipe():
    args = parse_with_config(build_train_parser(), ["-c", str(ROOT / "configs" / "seed" / "bit_m_r101x3_cifar10.yaml")])
    expected = dict(
        model="bit_m_r101x3", pretrained=True, image_size=160, resize_size=192, eval_size=192, interpolation="bicubic",
        randaugment=[2, 20], mixup_alpha=0.5, label_smoothing=0.1, opt="rmsprop", rmsprop_decay=0.9, momentum=0.9,
        rmsprop_eps=1.0, weight_decay=4e-5, weight_decay_filter="conv", lr=0.02, scheduler="staircase", warmup_epochs=6.0,
        decay_rate=0.98, decay_epochs=2.5, epochs=200, batch_size=512, clip_grad_norm=1.0, ema_decay=0.9999,
        loss_scale="dynamic", loss_scale_value=2.0**24, amp_level="O2",
    )  # fmt: skip
    assert {k: getattr(args, k) for k in expected} == expected


# ---------------------------------------------------------------------------------- schedules


def test_hyperrule_schedule_matches_the_papers_examples():
    rule = hyperrule(50_000)
    assert (rule.warmup, rule.decays, rule.total, rule.mixup_alpha) == (500, (3000, 6000, 9000), 10_000, 0.1)
    assert hyperrule(19_999).total == 500 and hyperrule(19_999).mixup_alpha == 0.0 and hyperrule(500_000).total == 20_000
    lr = build_lr_schedule(
        ScheduleConfig(scheduler="hyperrule", lr=0.003, warmup_steps=rule.warmup, decay_steps=rule.decays),
        total_steps=rule.total,
        steps_per_epoch=97,
    )
    np.testing.assert_allclose(
        [lr[250], lr[500], lr[3000], lr[3001], lr[6001], lr[9999]], [0.0015, 0.003, 0.003, 3e-4, 3e-5, 3e-6], rtol=1e-5
    )
    assert lr[0] == 0.0
    assert hyperrule_resolution(32, 32) == (160, 128) and hyperrule_resolution(224, 224) == (512, 480)


def test_seed_staircase_schedule():
    lr = build_lr_schedule(
        ScheduleConfig(scheduler="staircase", lr=0.02, warmup_epochs=6, decay_rate=0.98, decay_epochs=2.5),
        total_steps=100 * 10,
        steps_per_epoch=10,
    )
    np.testing.assert_allclose([lr[30], lr[60], lr[84], lr[85], lr[110]], [0.01, 0.02, 0.02, 0.02 * 0.98, 0.02 * 0.98**2], rtol=1e-5)


def test_multistep_schedule():
    lr = build_lr_schedule(
        ScheduleConfig(scheduler="multistep", lr=0.06, decay_rate=0.5, milestones=(30, 40), warmup_epochs=3),
        total_steps=50,
        steps_per_epoch=1,
    )
    np.testing.assert_allclose([lr[1], lr[3], lr[29], lr[30], lr[40]], [0.02, 0.06, 0.06, 0.03, 0.015], rtol=1e-5)


def test_weight_decay_filter_conv_only():
    model = bit_zoo.ResNetV2((1, 1, 1, 1), num_classes=10)
    decayed = [p.name for p in model.trainable_params() if decay_filter("conv")(p)]
    assert decayed and all(n.endswith(".weight") and "head" not in n for n in decayed)
    assert not any(decay_filter("none")(p) for p in model.trainable_params())
