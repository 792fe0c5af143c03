"""Distillation on real data in minutes on a CPU: scikit-learn's digits (8x8, upscaled to 16 px).

    python scripts/distill_digits.py --out outputs/distill_digits                 # all 1437 training images
    python scripts/distill_digits.py --out outputs/distill_digits_k10 --few_shot 10   # 10 labelled images per class

Three trainings on the same training images, then held-out top-1 (digits' fixed 20% test
partition, 360 images) of each:
  1. the teacher, a deeper ResNet-v2 (two units per stage, twice the student), trained on the labels;
  2. the student (one unit per stage) distilled from it: function matching, the teacher seeing the
     student's exact augmented and mixed-up batch, KL at temperature 1, no labels;
  3. the same student trained on the labels alone, for the same number of steps.
Plus the student-teacher top-1 agreement and mean KL on the held-out images. The results go to
<out>/results.json; the printed table is what the README shows.

This is wiring over the library (create_loader, Trainer, distill.py), not a training script:
train.py distils once the config keys of configs/distill/ are wired in.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import mindspore as ms
import mindspore.dataset as ds
import numpy as np

import bit_zoo
from bit_zoo.atomic import write_text_atomic
from bit_zoo.data import create_loader
from bit_zoo.training.distill import DistillEvaluator, DistillNetWithLoss, freeze_teacher
from bit_zoo.training.metrics import evaluate
from bit_zoo.training.optim import OptimConfig, create_optimizer
from bit_zoo.training.schedules import ScheduleConfig, build_lr_schedule
from bit_zoo.training.train_step import StepConfig, Trainer

_logger = logging.getLogger("distill_digits")

TEACHER_LAYERS = (2, 2, 2, 2)
STUDENT_LAYERS = (1, 1, 1, 1)


def loader(args, split: str, *, mixup_alpha: float = 0.0):
    return create_loader(
        "digits",
        None,
        split,
        batch_size=args.batch_size if split == "train" else 120,
        image_size=args.image_size,
        hflip=False,
        mixup_alpha=mixup_alpha,
        few_shot=args.few_shot if split == "train" else None,
        seed=args.seed,
        num_workers=1,
    )


def train(args, net, *, steps: int, teacher=None, mixup_alpha: float) -> tuple[float, int]:
    """SGD momentum 0.9, warmup then cosine, clip 1.0; labels, or the teacher when given. (seconds, images)"""
    ms.set_seed(args.seed)
    info = loader(args, "train", mixup_alpha=mixup_alpha)
    lr = build_lr_schedule(
        ScheduleConfig(scheduler="cosine", lr=args.lr, warmup_steps=min(50, steps // 10)),
        total_steps=steps,
        steps_per_epoch=info.batches_per_epoch,
    )
    optimizer = create_optimizer(net.trainable_params(), OptimConfig(opt="sgd", momentum=0.9), lr)
    soft = mixup_alpha > 0
    cell = None if teacher is None else DistillNetWithLoss(net, teacher, soft_labels=soft, temperature=1.0)
    trainer = Trainer(net, optimizer, StepConfig(clip_grad_norm=1.0), soft_labels=soft, net_with_loss=cell)
    if cell is not None:
        cell.set_train(True)
    net.set_train(True)
    epochs = -(-steps // info.batches_per_epoch)
    batches = info.dataset.create_tuple_iterator(num_epochs=epochs)
    start = time.perf_counter()
    step = 0
    for _ in range(epochs):
        for images, labels in batches:
            loss, _, _ = trainer.step([(images, labels)])
            step += 1
            if step % 50 == 0 or step == steps:
                _logger.info("step %d/%d loss %.4f (%.1f s)", step, steps, loss, time.perf_counter() - start)
            if step == steps:
                break
        if step == steps:
            break
    return time.perf_counter() - start, len(info.indices)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/distill_digits")
    p.add_argument("--few_shot", type=int, default=None, help="labelled training images per class (default: all)")
    p.add_argument("--teacher_steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each student")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=16, help="digits are 8x8: 16 px loses nothing and costs a quarter of 32 px")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--mixup_alpha", type=float, default=1.0, help="distillation: mixup of pairs, Beta(a, a) (the paper: 1.0)")
    p.add_argument("--label_mixup_alpha", type=float, default=0.0, help="the label-trained runs' mixup")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ms.set_context(mode=ms.GRAPH_MODE)
    ds.config.set_seed(args.seed)
    np.random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    val = loader(args, "val").dataset

    ms.set_seed(args.seed)
    teacher = bit_zoo.ResNetV2(TEACHER_LAYERS, 1, num_classes=10)
    t_sec, n_train = train(args, teacher, steps=args.teacher_steps, mixup_alpha=args.label_mixup_alpha)
    teacher_eval = evaluate(teacher, val)
    _logger.info("teacher: top-1 %.2f", teacher_eval["top1"])
    freeze_teacher(teacher)
    evaluator = DistillEvaluator(teacher)

    runs = {}
    for name, with_teacher in (("student_distilled", True), ("student_labels", False)):
        ms.set_seed(args.seed)
        student = bit_zoo.ResNetV2(STUDENT_LAYERS, 1, num_classes=10)
        sec, _ = train(
            args, student, steps=args.steps, teacher=teacher if with_teacher else None,
            mixup_alpha=args.mixup_alpha if with_teacher else args.label_mixup_alpha,
        )  # fmt: skip
        result = evaluator(student, val)
        result["train_seconds"] = sec
        runs[name] = result
        _logger.info("%s: top-1 %.2f agreement %.2f kl %.4f", name, result["top1"], result["agreement"], result["kl"])

    results = {
        "args": vars(args),
        "train_images": n_train,
        "held_out_images": runs["student_labels"]["images"],
        "teacher": {"layers": TEACHER_LAYERS, "top1": teacher_eval["top1"], "train_seconds": t_sec, "steps": args.teacher_steps},
        **runs,
    }
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    rows = [
        f"| teacher 2-2-2-2, labels ({args.teacher_steps} steps) | {teacher_eval['top1']:.2f} | | | {t_sec / 60:.1f} |",
        *(
            f"| student 1-1-1-1, {'distilled (KL, mixup ' + str(args.mixup_alpha) + ')' if k == 'student_distilled' else 'labels'} "
            f"({args.steps} steps) | {r['top1']:.2f} | {r['agreement']:.2f} | {r['kl']:.4f} | {r['train_seconds'] / 60:.1f} |"
            for k, r in runs.items()
        ),
    ]
    print(
        f"\ndigits, {n_train} training images{f' ({args.few_shot} per class)' if args.few_shot else ''}, held-out {results['held_out_images']}"
    )
    print("| model | held-out top-1 | agreement with teacher | KL(teacher‖student) | training min |\n|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
