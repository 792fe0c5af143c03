"""Evaluate a checkpoint over every image of an eval split: top-1, top-5, loss, image count.

    python validate.py -c configs/quickstart_digits.yaml --ckpt_path outputs/quickstart_digits/best.ckpt
    python validate.py --model bit_m_r50x1 --dataset cifar10 --data_dir DIR --ckpt_path BiT-M-R50x1-CIFAR10.npz --image_size 128
    python validate.py --model bit_s_r50x1 --dataset imagenet --data_dir DIR --ckpt_path BiT_resnet50-1e4795a4.ckpt

--ckpt_path takes a bit_zoo training checkpoint (EMA weights by default when it has them;
--ema false for the raw ones), an upstream .npz or a mindcv .ckpt (detected from the bytes). Its
classifier must have as many classes as the evaluated data; preprocessing not set in the config
comes from the checkpoint's meta.json, else the weights record.
"""

from __future__ import annotations

import bit_zoo_malloc

if __name__ == "__main__":
    bit_zoo_malloc.preload()  # first, before MindSpore loads: this script again with jemalloc, if installed (see the module)

import json
import logging
import sys

import mindspore as ms
import numpy as np

from bit_zoo.utils.atomic import write_text_atomic
from bit_zoo._cli import build_model, check_data, check_weights_source, localize, resolve_num_classes, setup_logging
from bit_zoo.config import parse_config
from bit_zoo.data.from_config import build_eval_loader, eval_preprocessing
from bit_zoo.utils.runner import run_cli
from bit_zoo.training.distributed import set_device
from bit_zoo.training.metrics import evaluate

_logger = logging.getLogger("validate")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config("validate", argv)
    setup_logging()
    _logger.info("malloc: %s", bit_zoo_malloc.in_use())
    set_device(cfg.system.device_target, cfg.system.mode)
    staged = localize(cfg, script="validate")  # a remote ckpt_path / data_dir staged into the cache
    m, d = cfg.model, cfg.data
    check_weights_source(m, m.ckpt_path, flag="ckpt_path", required=True)
    check_data(d)
    num_classes = resolve_num_classes(cfg)
    model = build_model(m, num_classes, weights=m.ckpt_path, ema=m.ema, same_classes=True)
    prep = eval_preprocessing(d, model)
    info = build_eval_loader(d, split=d.split, batch_size=d.batch_size, preprocess=prep, seed=cfg.system.seed, num_classes=num_classes)
    net = ms.amp.auto_mixed_precision(model, m.amp_level) if m.amp_level != "O0" else model
    result = evaluate(net, info.dataset, progress=cfg.system.progress, desc="validate")
    result.update(
        model=m.model,
        checkpoint=staged.given.get(("model", "ckpt_path"), m.ckpt_path) or f"pretrained:{m.model}",
        weights="ema" if model.origin.ema else "raw",
        dataset=d.dataset,
        split=d.split,
        image_size=prep.image_size,
    )
    print(
        f"{result['model']} {result['checkpoint']} ({result['weights']} weights) on {d.dataset} {d.split} at {prep.image_size} px: "
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
