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

import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mindspore as ms
import mindspore.dataset as ds
import numpy as np

import bit_zoo
from bit_zoo.atomic import write_text_atomic
from bit_zoo.config import ConfigError, build_train_parser, grouped, parse_with_config, run_cli, save_config
from bit_zoo.data import create_loader, dataset_num_classes
from bit_zoo.data.from_config import build_eval_loader, mean_std, val_split_arg
from bit_zoo.loading import model_state, save_weights
from bit_zoo.training.checkpoint import CheckpointManager, TrainState, load_training_checkpoint
from bit_zoo.training.distributed import DistInfo, init_distributed, set_device
from bit_zoo.training.metrics import MetricsLog, Progress, evaluate, plot_curves
from bit_zoo.training.optim import OptimConfig, create_optimizer
from bit_zoo.training.schedules import ScheduleConfig, build_lr_schedule, hyperrule
from bit_zoo.training.train_step import StepConfig, Trainer

_logger = logging.getLogger("train")

# HyperRule's crop for source images below 96x96 px (all of these); others train at 480.
_SMALL_IMAGE_DATASETS = ("cifar10", "cifar100", "digits")


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )


def check_combinations(cfg, dist: DistInfo) -> None:
    """Impossible or contradictory settings, each with its fix."""
    per_device = cfg.data.batch_size / (dist.world_size * cfg.step.accum_steps)
    if cfg.step.accum_steps < 1:
        raise ConfigError(f"accum_steps={cfg.step.accum_steps}: must be >= 1")
    if per_device != int(per_device) or per_device < 1:
        raise ConfigError(
            f"batch_size={cfg.data.batch_size} (global) does not split into {dist.world_size} devices x {cfg.step.accum_steps} "
            "micro-batches: choose a batch_size divisible by devices * accum_steps"
        )
    if cfg.model.pretrained and cfg.model.checkpoint_path:
        raise ConfigError("pretrained and checkpoint_path both set: keep one (checkpoint_path loads a local file)")
    if cfg.model.checkpoint_path and not Path(cfg.model.checkpoint_path).is_file():
        raise ConfigError(
            f"checkpoint_path {cfg.model.checkpoint_path}: no such file. Point it at a weights file (.npz, mindcv .ckpt, "
            "bit_zoo .ckpt or .safetensors), or run the training that writes it first (the config's header names it)"
        )
    if cfg.model.model == "resnetv2" and cfg.model.pretrained:
        raise ConfigError(
            "--model resnetv2 (a custom --layers network) has no pretrained weights: use a registered name or pretrained false"
        )
    if cfg.schedule.scheduler != "hyperrule" and cfg.schedule.epochs is None and cfg.schedule.steps is None:
        raise ConfigError(f"scheduler {cfg.schedule.scheduler} needs a training length: set epochs or steps")
    if cfg.schedule.epochs is not None and cfg.schedule.steps is not None:
        raise ConfigError("epochs and steps both set: keep one")
    if cfg.step.ema_decay and not 0 < cfg.step.ema_decay < 1:
        raise ConfigError(f"ema_decay={cfg.step.ema_decay}: must lie in (0, 1), or 0 for no EMA")
    if cfg.step.loss_scale != "none" and cfg.model.amp_level == "O0":
        _logger.warning("loss_scale %s with amp_level O0 (float32): loss scaling is not needed", cfg.step.loss_scale)
    if cfg.data.randaugment is not None and len(cfg.data.randaugment) != 2:
        raise ConfigError(f"randaugment={cfg.data.randaugment}: give [num_ops, magnitude], e.g. [2, 20]")
    if cfg.data.dataset != "digits" and not cfg.data.data_dir:
        raise ConfigError(f"dataset {cfg.data.dataset} needs --data_dir (the folder with the data); only digits needs none")


def build_model(cfg, num_classes: int):
    m = cfg.model
    if m.model == "resnetv2":
        model = bit_zoo.ResNetV2(tuple(m.layers), m.width_factor, num_classes=num_classes, conv_impl=m.conv_impl, recompute=m.recompute)
        if m.checkpoint_path:
            bit_zoo.load_checkpoint(model, m.checkpoint_path)
        return model
    return bit_zoo.create_model(
        m.model,
        pretrained=m.pretrained,
        num_classes=num_classes,
        checkpoint_path=m.checkpoint_path,
        conv_impl=m.conv_impl,
        recompute=m.recompute,
    )


def preprocessing(cfg, model) -> dict:
    """Resolution and normalisation: the config's, else the weights record's, else BiT's [-1, 1]."""
    image_size = cfg.data.image_size or (128 if cfg.data.dataset in _SMALL_IMAGE_DATASETS else 480)
    mean, std = mean_std(cfg.data, getattr(model, "weights", None))
    return {
        "image_size": image_size,
        "eval_size": cfg.data.eval_size or image_size,
        "mean": mean,
        "std": std,
        "interpolation": cfg.data.interpolation,
    }


def build_train_loader(cfg, dist: DistInfo, prep: dict, num_classes: int, *, start_step: int):
    d = cfg.data
    micro = d.batch_size // (dist.world_size * cfg.step.accum_steps)

    def make(mixup_alpha: float):
        return create_loader(
            d.dataset,
            d.data_dir,
            "train",
            batch_size=micro,
            image_size=prep["image_size"],
            resize_size=d.resize_size,
            transform=d.transform,
            interpolation=prep["interpolation"],
            mean=prep["mean"],
            std=prep["std"],
            randaugment=tuple(d.randaugment) if d.randaugment else None,
            mixup_alpha=mixup_alpha,
            label_smoothing=d.label_smoothing,
            few_shot=d.few_shot,
            val_split=val_split_arg(d.val_split),
            num_samples=d.num_samples,
            num_shards=dist.world_size,
            shard_id=dist.rank,
            seed=cfg.system.seed,
            num_workers=d.num_workers,
            start_step=start_step,
            hflip=d.hflip,
            num_classes=num_classes,
            classes=d.classes,
        )

    if d.mixup_alpha is not None:
        return make(d.mixup_alpha), d.mixup_alpha
    info = make(0.0)
    alpha = hyperrule(len(info.indices)).mixup_alpha if cfg.schedule.scheduler == "hyperrule" else 0.0
    return (make(alpha) if alpha else info), alpha


def schedule_for(cfg, *, num_images: int, steps_per_epoch: int) -> tuple[np.ndarray, int]:
    s = cfg.schedule
    if s.scheduler == "hyperrule":
        rule = hyperrule(num_images)
        total = s.steps or (math.ceil(s.epochs * steps_per_epoch) if s.epochs else rule.total)
        # A shortened run scales the rule's warmup and decay points with it.
        scale = total / rule.total
        warmup = s.warmup_steps if s.warmup_steps is not None else round(rule.warmup * scale)
        decays = tuple(s.decay_steps) if s.decay_steps is not None else tuple(round(x * scale) for x in rule.decays)
    else:
        total = s.steps or math.ceil(s.epochs * steps_per_epoch)
        warmup = s.warmup_steps or 0
        decays = ()
    sched = ScheduleConfig(
        scheduler=s.scheduler,
        lr=cfg.optim.lr,
        warmup_steps=warmup,
        warmup_epochs=s.warmup_epochs,
        decay_steps=decays,
        decay_rate=s.decay_rate,
        decay_epochs=s.decay_epochs,
        milestones=tuple(s.milestones),
        min_lr=s.min_lr,
    )
    return build_lr_schedule(sched, total_steps=total, steps_per_epoch=steps_per_epoch), total


def resolve_resume(cfg) -> Path | None:
    resume = cfg.checkpoint.resume
    out = Path(cfg.system.output_dir)
    if resume is None:
        if (out / "last.ckpt").exists() and not cfg.system.overwrite:
            raise ConfigError(
                f"output_dir {out} holds a previous run (last.ckpt): pass --resume auto to continue it, "
                "--output_dir NEW for a new run, or --overwrite true to replace it"
            )
        return None
    if resume == "auto":
        return out / "last.ckpt" if (out / "last.ckpt").exists() else None
    return Path(resume)


def main(argv: list[str] | None = None) -> dict:
    parser = build_train_parser()
    args = parse_with_config(parser, argv)
    cfg = grouped(parser, args)
    device = set_device(cfg.system.device_target, cfg.system.mode)
    dist = init_distributed(device, distribute=cfg.system.distribute)
    setup_logging(dist.is_main)
    check_combinations(cfg, dist)
    ms.set_seed(cfg.system.seed)
    np.random.seed(cfg.system.seed)
    ds.config.set_seed(cfg.system.seed)

    # ---- everything below up to the first write can fail on bad input; nothing is written yet
    num_classes = dataset_num_classes(cfg.data.dataset, cfg.data.data_dir, cfg.data.classes)
    if cfg.model.num_classes is not None and cfg.model.num_classes != num_classes:
        raise ConfigError(
            f"num_classes={cfg.model.num_classes} in the config but {cfg.data.dataset} at {cfg.data.data_dir} has {num_classes} classes"
            f"{f' (classes: {cfg.data.classes})' if cfg.data.classes is not None else ''}: "
            f"set num_classes: {num_classes} (or null to take it from the data)"
        )
    resume_path = resolve_resume(cfg)
    model = build_model(cfg, num_classes)
    prep = preprocessing(cfg, model)
    out = Path(cfg.system.output_dir)

    # The loader is built twice when resuming: first for its size, then at the saved position.
    probe, mixup_alpha = build_train_loader(cfg, dist, prep, num_classes, start_step=0)
    accum = cfg.step.accum_steps
    if probe.batches_per_epoch < accum:
        raise ConfigError(f"{probe.batches_per_epoch} micro-batches per epoch < accum_steps={accum}: lower batch_size or accum_steps")
    steps_per_epoch = probe.batches_per_epoch // accum
    lr, total_steps = schedule_for(cfg, num_images=len(probe.indices), steps_per_epoch=steps_per_epoch)
    eval_info = build_eval_loader(
        cfg.data,
        split="val",
        batch_size=max(1, cfg.data.batch_size // (dist.world_size * accum)),
        image_size=prep["eval_size"],
        interpolation=prep["interpolation"],
        mean=prep["mean"],
        std=prep["std"],
        seed=cfg.system.seed,
        num_classes=num_classes,
    )

    net = ms.amp.auto_mixed_precision(model, cfg.model.amp_level) if cfg.model.amp_level != "O0" else model
    o = cfg.optim
    optimizer = create_optimizer(
        model.trainable_params(),
        OptimConfig(
            opt=o.opt,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
            weight_decay_filter=o.weight_decay_filter,
            rmsprop_decay=o.rmsprop_decay,
            rmsprop_eps=o.rmsprop_eps,
            adam_betas=tuple(o.adam_betas),
            adam_eps=o.adam_eps,
        ),
        lr,
    )
    t = cfg.step
    step_cfg = StepConfig(
        accum_steps=accum,
        clip_grad_norm=t.clip_grad_norm,
        loss_scale=t.loss_scale,
        loss_scale_value=t.loss_scale_value,
        loss_scale_factor=t.loss_scale_factor,
        loss_scale_window=t.loss_scale_window,
        ema_decay=t.ema_decay,
        ema_warmup=t.ema_warmup,
    )
    soft_labels = mixup_alpha > 0 or cfg.data.label_smoothing > 0
    trainer = Trainer(net, optimizer, step_cfg, soft_labels=soft_labels, distributed=dist.distributed)

    state = TrainState(total_steps=total_steps, global_batch=cfg.data.batch_size)
    if resume_path is not None:
        state = load_training_checkpoint(resume_path, model=model, optimizer=optimizer, ema=trainer.ema, scaler=trainer.scaler)
        if state.global_batch != cfg.data.batch_size or state.total_steps != total_steps:
            raise ConfigError(
                f"{resume_path} was written by a run with batch_size={state.global_batch} and {state.total_steps} steps; this one has "
                f"batch_size={cfg.data.batch_size} and {total_steps} steps: resume with the original config"
            )
        state.micro_step = state.step * accum
        _logger.info("resumed %s at step %d/%d (epoch %d)", resume_path, state.step, total_steps, state.epoch)
    info = build_train_loader(cfg, dist, prep, num_classes, start_step=state.micro_step)[0] if state.micro_step else probe

    # ---- first writes
    manager = CheckpointManager(out, keep_max=cfg.checkpoint.keep_max, enabled=dist.is_main)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=dist.is_main, append=resume_path is not None)
    if dist.is_main:
        save_config(args, out / "config.yaml")
    _logger.info(
        "%s on %s: %d classes, %d train images, global batch %d = %d device(s) x %d micro-batch(es) x %d; %d steps (%d per epoch)",
        cfg.model.model,
        cfg.data.dataset,
        num_classes,
        len(probe.indices),
        cfg.data.batch_size,
        dist.world_size,
        accum,
        cfg.data.batch_size // (dist.world_size * accum),
        total_steps,
        steps_per_epoch,
    )
    summary = train_loop(cfg, dist, trainer, model, info, eval_info, lr, state, total_steps, steps_per_epoch, manager, metrics)
    if cfg.system.rank_weights:
        save_weights(model_state(model), out / f"weights_rank{dist.rank}.ckpt")
    if dist.is_main:
        plot_curves(metrics.records(), out / "curves.png")
        summary["outputs"] = str(out)
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def run_eval(cfg, trainer: Trainer, net, eval_info) -> dict:
    use_ema = trainer.ema is not None and cfg.step.ema_eval
    if use_ema:
        trainer.ema.swap()
    try:
        result = evaluate(net, eval_info.dataset, progress=cfg.system.progress, desc="eval")
    finally:
        if use_ema:
            trainer.ema.swap()
    result["weights"] = "ema" if use_ema else "raw"
    return result


def _stream(dataset, num_epochs: int):
    """One iterator over num_epochs epochs; a MindSpore iterator stops at each epoch's end."""
    iterator = dataset.create_tuple_iterator(num_epochs=num_epochs)
    for _ in range(num_epochs):
        yield from iterator


def train_loop(cfg, dist, trainer, model, info, eval_info, lr, state: TrainState, total_steps, steps_per_epoch, manager, metrics) -> dict:
    accum = cfg.step.accum_steps
    net = trainer.net
    remaining_micro = (total_steps - state.step) * accum
    num_epochs = max(1, math.ceil(remaining_micro / info.batches_per_epoch))
    batches = _stream(info.dataset, num_epochs) if remaining_micro > 0 else iter(())
    ckpt = {"model": model, "optimizer": trainer.optimizer, "ema": trainer.ema, "scaler": trainer.scaler}
    start = time.perf_counter()
    last_eval: dict = {}
    epoch_loss, epoch_steps, epoch_images, epoch_time = 0.0, 0, 0, 0.0
    overflow_steps = 0
    progress = Progress(
        range(state.step, total_steps),
        total=total_steps - state.step,
        desc="train",
        enabled=dist.is_main and cfg.system.progress,
        every=cfg.checkpoint.log_interval,
    )
    net.set_train(True)
    for _ in progress:
        t0 = time.perf_counter()
        losses = []
        for _ in range(accum):
            images, labels = next(batches)
            losses.append(trainer.micro_step(images, labels))
            state.micro_step += 1
        finite, grad_norm = trainer.apply()
        loss = float(np.mean([x.asnumpy() for x in losses]))
        state.step += 1
        overflow_steps += not finite
        epoch_loss += loss
        epoch_steps += 1
        epoch_images += cfg.data.batch_size
        epoch_time += time.perf_counter() - t0
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr[state.step - 1]:.2e}")
        end_of_epoch = state.step % steps_per_epoch == 0 or state.step == total_steps
        periodic = cfg.checkpoint.save_interval > 0 and state.step % cfg.checkpoint.save_interval == 0
        if end_of_epoch:
            state.epoch += 1 if state.step % steps_per_epoch == 0 else 0
            record = {
                "kind": "epoch",
                "epoch": state.epoch,
                "step": state.step,
                "train_loss": epoch_loss / epoch_steps,
                "lr": float(lr[state.step - 1]),
                "img_per_s": epoch_images / epoch_time,
                "loss_scale": trainer.loss_scale,
                "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # JSON has no NaN
                "overflow_steps": overflow_steps,
            }
            last_step = state.step == total_steps
            interval = cfg.checkpoint.eval_interval
            best = False
            if dist.is_main and (last_step or (interval > 0 and state.epoch % interval == 0)):
                last_eval = run_eval(cfg, trainer, net, eval_info)
                net.set_train(True)
                record.update(top1=last_eval["top1"], top5=last_eval["top5"], eval_loss=last_eval["loss"], eval_images=last_eval["images"])
                best = last_eval["top1"] > state.best_top1
                state.best_top1 = max(state.best_top1, last_eval["top1"])
                _logger.info(
                    "epoch %d step %d/%d: train loss %.4f, eval top-1 %.2f top-5 %.2f loss %.4f (%d images, %s weights), %.1f img/s",
                    state.epoch, state.step, total_steps, record["train_loss"], record["top1"], record["top5"], record["eval_loss"],
                    last_eval["images"], last_eval["weights"], record["img_per_s"],
                )  # fmt: skip
            elif dist.is_main:
                _logger.info(
                    "epoch %d step %d/%d: train loss %.4f, %.1f img/s",
                    state.epoch,
                    state.step,
                    total_steps,
                    record["train_loss"],
                    record["img_per_s"],
                )
            metrics.write(record)
            manager.save(periodic=periodic, best=best, state=state, **ckpt)
            epoch_loss, epoch_steps, epoch_images, epoch_time, overflow_steps = 0.0, 0, 0, 0.0, 0
        elif periodic:
            manager.save(periodic=True, best=False, state=state, **ckpt)
    wall = time.perf_counter() - start
    summary = {
        "kind": "summary",
        "model": cfg.model.model,
        "dataset": cfg.data.dataset,
        "num_classes": model.num_classes,
        "steps": state.step,
        "epochs": state.epoch,
        "global_batch": cfg.data.batch_size,
        "devices": dist.world_size,
        "train_seconds": wall,
        "final": {k: v for k, v in last_eval.items() if k != "seconds"},
        "best_top1": state.best_top1,
        "train_state": asdict(state),
    }
    metrics.write(summary)
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
    lines.append(f"  outputs: {summary['outputs']} (last.ckpt, best.ckpt, metrics.jsonl, curves.png, config.yaml, summary.json)")
    print("\n".join(lines))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, argv, prog="train.py")


if __name__ == "__main__":
    sys.exit(cli())
