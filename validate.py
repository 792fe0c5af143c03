"""Evaluate a checkpoint over every image of an eval split: top-1, top-5, loss, image count.

    python validate.py -c configs/quickstart_digits.yaml --ckpt_path outputs/quickstart_digits/best.ckpt
    python validate.py --model bit_m_r50x1 --dataset cifar10 --data_dir DIR --ckpt_path BiT-M-R50x1-CIFAR10.npz --image_size 128
    python validate.py --model bit_s_r50x1 --dataset imagenet --data_dir DIR --ckpt_path BiT_resnet50-1e4795a4.ckpt

--ckpt_path takes a bit_zoo training checkpoint (EMA weights by default when it has them;
--ema false for the raw ones), an upstream .npz or a mindcv .ckpt (detected from the bytes).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import mindspore as ms
import numpy as np

import bit_zoo
from bit_zoo.atomic import write_text_atomic
from bit_zoo.config import ConfigError, build_validate_parser, grouped, parse_with_config, run_cli, train_only_keys
from bit_zoo.data import dataset_num_classes
from bit_zoo.data.from_config import build_eval_loader, mean_std
from bit_zoo.loading import EMA_PREFIX, read_arrays
from bit_zoo.training.distributed import set_device
from bit_zoo.training.metrics import evaluate

_logger = logging.getLogger("validate")


def _has_ema(path: str) -> bool:
    fmt, arrays = read_arrays(path)
    return fmt == "ckpt" and any(k.startswith(EMA_PREFIX) for k in arrays)


def main(argv: list[str] | None = None) -> dict:
    parser = build_validate_parser()
    args = parse_with_config(parser, argv, ignore_keys=train_only_keys())
    cfg = grouped(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    set_device(cfg.system.device_target, cfg.system.mode)
    m, d = cfg.model, cfg.data
    if not m.ckpt_path and not m.pretrained:
        raise ConfigError("nothing to evaluate: pass --ckpt_path FILE (training checkpoint, .npz or mindcv .ckpt) or --pretrained true")
    if m.ckpt_path and m.pretrained:
        raise ConfigError("ckpt_path and pretrained both set: keep one")
    if d.dataset != "digits" and not d.data_dir:
        raise ConfigError(f"dataset {d.dataset} needs --data_dir")
    if m.ckpt_path and not Path(m.ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {m.ckpt_path}: no such file")

    num_classes = dataset_num_classes(d.dataset, d.data_dir, d.classes)
    if m.num_classes is not None and m.num_classes != num_classes:
        subset = f" (classes: {d.classes})" if d.classes is not None else ""
        raise ConfigError(
            f"num_classes={m.num_classes} but {d.dataset} has {num_classes} classes{subset}: set num_classes: {num_classes} or null"
        )
    use_ema = False
    if m.ckpt_path:
        has_ema = _has_ema(m.ckpt_path)
        use_ema = has_ema if m.ema is None else m.ema
        if use_ema and not has_ema:
            raise ConfigError(f"--ema true but {m.ckpt_path} holds no EMA weights: pass --ema false")

    if m.model == "resnetv2":
        model = bit_zoo.ResNetV2(tuple(m.layers), m.width_factor, num_classes=num_classes, conv_impl=m.conv_impl)
    else:
        model = bit_zoo.create_model(m.model, pretrained=m.pretrained, num_classes=num_classes, conv_impl=m.conv_impl)
    if m.ckpt_path:
        bit_zoo.load_checkpoint(model, m.ckpt_path, ema=use_ema)
    w = getattr(model, "weights", None)
    # Eval preprocessing: the config's, else the weights record's (BiT: [-1, 1], resize to the input size).
    image_size = d.eval_size or d.image_size or (w.input_size if w else 128)
    mean, std = mean_std(d, w)
    info = build_eval_loader(
        d,
        split=d.split,
        batch_size=d.batch_size,
        image_size=image_size,
        interpolation=d.interpolation or (w.interpolation if w else "bilinear"),
        mean=mean,
        std=std,
        seed=cfg.system.seed,
        num_classes=num_classes,
    )
    net = ms.amp.auto_mixed_precision(model, m.amp_level) if m.amp_level != "O0" else model
    result = evaluate(net, info.dataset, progress=cfg.system.progress, desc="validate")
    result.update(
        model=m.model,
        checkpoint=m.ckpt_path or f"pretrained:{m.model}",
        weights="ema" if use_ema else "raw",
        dataset=d.dataset,
        split=d.split,
        image_size=image_size,
    )
    print(
        f"{result['model']} {result['checkpoint']} ({result['weights']} weights) on {d.dataset} {d.split} at {image_size} px: "
        f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  images {result['images']}"
    )
    print(json.dumps({k: (float(v) if isinstance(v, np.floating) else v) for k, v in result.items()}))
    if cfg.system.output_json:
        write_text_atomic(cfg.system.output_json, json.dumps(result, indent=2))
    return result


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, prog="validate.py")


if __name__ == "__main__":
    sys.exit(cli())
