"""Fine-tune a BiT model from a YAML config, on one device or data-parallel.

    python train.py -c configs/quickstart_digits.yaml
    python train.py -c configs/hyperrule/bit_m_r50x1_cifar10.yaml --data_dir /data/cifar-10-batches-bin
    msrun --worker_num 2 --local_worker_num 2 train.py -c CONFIG ...
    mpirun -n 2 python train.py -c CONFIG ...          # on CPU too (see bit_zoo/training/distributed.py)
    python train.py -c CONFIG --resume auto            # continue <output_dir>/last.ckpt

Everything that can be checked is checked before the first write to output_dir, so a bad
option never clobbers an earlier run's files.
"""

from __future__ import annotations

import bit_zoo_malloc

if __name__ == "__main__":
    bit_zoo_malloc.preload()  # first, before MindSpore loads: this script again with jemalloc, if installed (see the module)

import json
import logging
import shlex
import sys
from pathlib import Path

import mindspore as ms
import mindspore.dataset as ds
import numpy as np

from bit_zoo.utils.atomic import write_text_atomic
from bit_zoo._cli import build_model, check_data, check_weights_source, localize, model_meta, resolve_num_classes, setup_logging
from bit_zoo.config import parse_config, save_config
from bit_zoo.data import require_same_data
from bit_zoo.data.from_config import build_eval_loader, build_train_loader, train_preprocessing
from bit_zoo.errors import ConfigError
from bit_zoo.models.freeze import freeze
from bit_zoo.training.checkpoint import CheckpointManager, TrainState, export_weights
from bit_zoo.training.distill import DistillEvaluator, distill_loss_cell, distill_summary, distill_teacher
from bit_zoo.utils.lock import FolderLock
from bit_zoo.utils.runner import run_cli
from bit_zoo.training.distributed import init_distributed, log_device, set_device
from bit_zoo.training.loop import Plan, TrainLoop
from bit_zoo.training.metrics import MetricsLog, plot_curves
from bit_zoo.training.optim import create_optimizer
from bit_zoo.training.resume import resolve_resume, restore
from bit_zoo.training.schedules import resolve_schedule
from bit_zoo.training.train_step import Trainer

_logger = logging.getLogger("train")


def check_batch_split(cfg, world_size: int) -> int:
    """The per-device micro-batch: the global batch must split into devices x accum_steps."""
    per_device = cfg.data.batch_size / (world_size * cfg.step.accum_steps)
    if per_device != int(per_device) or per_device < 1:
        raise ConfigError(
            f"batch_size={cfg.data.batch_size} (global) does not split into {world_size} devices x {cfg.step.accum_steps} "
            "micro-batches: choose a batch_size divisible by devices * accum_steps"
        )
    if cfg.step.loss_scale != "none" and cfg.model.amp_level == "O0":
        _logger.warning("loss_scale %s with amp_level O0 (float32): loss scaling is not needed", cfg.step.loss_scale)
    return int(per_device)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config("train", argv)
    dist = init_distributed(set_device(cfg.system.device_target, cfg.system.mode), distribute=cfg.system.distribute)
    setup_logging(dist.is_main)
    log_device(dist)
    _logger.info("malloc: %s", bit_zoo_malloc.in_use())
    micro = check_batch_split(cfg, dist.world_size)
    staged = localize(cfg, script="train")  # remote data/weights staged, a remote output_dir mirrored
    check_weights_source(cfg.model, cfg.model.checkpoint_path, flag="checkpoint_path")
    check_data(cfg.data)
    for seed in (ms.set_seed, np.random.seed, ds.config.set_seed):
        seed(cfg.system.seed)
    # one run per output_dir: a second one into the same folder stops here, before it reads or writes anything there
    with FolderLock(cfg.system.output_dir, prog="train.py", enabled=dist.is_main):
        return _train(cfg, dist, staged, micro, argv)


def _train(cfg, dist, staged, micro: int, argv: list[str] | None) -> dict:
    mirror = staged.mirror
    # ---- everything below up to the first write can fail on bad input; nothing is written yet
    num_classes = resolve_num_classes(cfg)
    out = Path(cfg.system.output_dir)
    resume_path = resolve_resume(cfg.checkpoint.resume, out, overwrite=cfg.system.overwrite)
    model = build_model(cfg.model, num_classes, weights=cfg.model.checkpoint_path, recompute=cfg.model.recompute)
    freeze(model, cfg.model.freeze)  # before the optimizer: it takes model.trainable_params()
    prep = train_preprocessing(cfg.data, model)
    loader_args = dict(micro_batch=micro, shard=(dist.world_size, dist.rank), seed=cfg.system.seed, num_classes=num_classes)
    hyperrule_mixup = cfg.schedule.scheduler == "hyperrule"
    train_data, mixup_alpha = build_train_loader(cfg.data, prep, start_step=0, hyperrule_mixup=hyperrule_mixup, **loader_args)
    accum = cfg.step.accum_steps
    if train_data.batches_per_epoch < accum:
        raise ConfigError(f"{train_data.batches_per_epoch} micro-batches per epoch < accum_steps={accum}: lower batch_size or accum_steps")
    steps_per_epoch = train_data.batches_per_epoch // accum
    lr, total_steps = resolve_schedule(cfg.schedule, lr=cfg.optim.lr, num_images=len(train_data.indices), steps_per_epoch=steps_per_epoch)
    plan = Plan(lr=lr, total_steps=total_steps, steps_per_epoch=steps_per_epoch, global_batch=cfg.data.batch_size)
    eval_data = build_eval_loader(
        cfg.data, split="val", batch_size=micro, preprocess=prep["eval"], seed=cfg.system.seed, num_classes=num_classes,
        shard=(dist.world_size, dist.rank),
    )  # fmt: skip

    net = ms.amp.auto_mixed_precision(model, cfg.model.amp_level) if cfg.model.amp_level != "O0" else model
    optimizer = create_optimizer(model.trainable_params(), cfg.optim, lr)
    soft_labels = mixup_alpha > 0 or cfg.data.label_smoothing > 0
    teacher = distill_teacher(cfg, num_classes, prep, class_names=train_data.class_names)
    loss_cell = None if teacher is None else distill_loss_cell(cfg.distill, net, teacher, soft_labels=soft_labels)
    trainer = Trainer(net, optimizer, cfg.step, soft_labels=soft_labels, distributed=dist.distributed, net_with_loss=loss_cell)
    state = TrainState(total_steps=total_steps, global_batch=cfg.data.batch_size)
    if resume_path is not None:
        state = restore(
            resume_path, trainer=trainer, model=model, total_steps=total_steps, global_batch=cfg.data.batch_size, accum_steps=accum,
            check_meta=lambda meta: require_same_data(meta, train_data.fingerprint, train_data.class_names),
            allow_unverified=cfg.model.allow_unverified,
        )  # fmt: skip
        train_data, _ = build_train_loader(cfg.data, prep, start_step=state.micro_step, hyperrule_mixup=hyperrule_mixup, **loader_args)

    # ---- first writes
    meta = model_meta(cfg.model, model, class_names=train_data.class_names, prep=prep)
    meta["data_fingerprint"] = train_data.fingerprint  # a resume compares it: see training/resume.py
    manager = CheckpointManager(
        out, keep_max=cfg.checkpoint.keep_max, enabled=dist.is_main, meta=meta, async_save=cfg.checkpoint.async_save
    )
    metrics = MetricsLog(out / "metrics.jsonl", enabled=dist.is_main, append=resume_path is not None, resumed_step=state.step)
    if dist.is_main:
        save_config(
            staged.as_given(cfg),
            out / "config.yaml",
            command=shlex.join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        )
    _logger.info(
        "%s on %s: %d classes, %d train images, global batch %d = %d device(s) x %d micro-batch(es) x %d; %d steps (%d per epoch)",
        cfg.model.model, cfg.data.dataset, num_classes, len(train_data.indices), cfg.data.batch_size, dist.world_size, accum, micro,
        total_steps, steps_per_epoch,
    )  # fmt: skip
    loop = TrainLoop(
        trainer, model, plan=plan, train_data=train_data, eval_data=eval_data, step=cfg.step, checkpoint=cfg.checkpoint,
        manager=manager, metrics=metrics, dist=dist, progress=cfg.system.progress,
        on_save=mirror.sync_soon if mirror is not None and dist.is_main else None,
        eval_observer=None if teacher is None else DistillEvaluator(teacher.net, temperature=cfg.distill.distill_temperature),
    )  # fmt: skip
    result = loop.run(state)
    summary = {
        "kind": "summary",
        "model": cfg.model.model,
        "dataset": cfg.data.dataset,
        "num_classes": model.num_classes,
        "class_names": train_data.class_names,
        "bad_images": sorted(set(train_data.bad_images.paths) | set(eval_data.bad_images.paths)),
        "global_batch": cfg.data.batch_size,
        "devices": dist.world_size,
        **result,
    }
    if teacher is not None:  # the teacher's top-1 and the student's agreement with it, from the last evaluation
        summary["distill"] = distill_summary(teacher, result["final"])
    metrics.write(summary)
    if cfg.system.rank_weights:
        export_weights(model, out / f"weights_rank{dist.rank}.ckpt", meta=meta)
    if dist.is_main:
        plot_curves(metrics.records(), out / "curves.png")
        summary["outputs"] = staged.outputs(out)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        if mirror is not None:
            mirror.sync()  # a failure here is one line and exit 4 (run_cli); the local copy is complete
        print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    final = summary["final"]
    lines = [
        "",
        f"Finished {summary['model']} on {summary['dataset']}: {summary['steps']} steps, global batch {summary['global_batch']}, "
        f"{summary['devices']} device(s), {summary['train_seconds'] / 60:.1f} min",
    ]
    if final:
        lines.append(
            f"  eval ({final['weights']} weights, {final['images']} images): top-1 {final['top1']:.2f}%  top-5 {final['top5']:.2f}%  "
            f"loss {final['loss']:.4f}   best top-1 {summary['best_top1']:.2f}%"
        )
    d = summary.get("distill")
    if d and d["agreement"] is not None:
        lines.append(
            f"  teacher {d['teacher']} ({d['teacher_source']}): top-1 {d['teacher_top1']:.2f}%; student agreement "
            f"{d['agreement']:.2f}%, KL {d['kl']:.4f}"
        )
    lines.append(f"  outputs: {summary['outputs']} (last.ckpt, best.ckpt, metrics.jsonl, curves.png, config.yaml, summary.json)")
    print("\n".join(lines))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, prog="train.py")


if __name__ == "__main__":
    sys.exit(cli())
