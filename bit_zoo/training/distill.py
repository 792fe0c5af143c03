"""Knowledge distillation by function matching (Beyer et al., arXiv 2106.05237; big_vision's
trainers/proj/distill/distill.py): a frozen teacher and the student see the very same augmented,
mixed-up batch and the student matches the teacher's output distribution.

    loss = T^2 * KL(softmax(teacher / T) || softmax(student / T))  [+ w * cross-entropy(student, labels)]

which is big_vision's ``dist(kind="kl", t=T)`` (its recipe: T = 1, no labels, w = 0). At T = 1 it
is the plain KL divergence of the two softmaxes; the T^2 keeps gradient magnitudes comparable across
temperatures, as in Hinton et al.

Pieces:
    build_teacher(name, ...)        a registered name.tag with pretrained weights or a local file,
                                    frozen, in eval mode, in the run's AMP level
    DistillNetWithLoss(net, teacher) the loss cell: same call as train_step.NetWithLoss, so the
                                    Trainer's ForwardBackward takes it in its place
    DistillEvaluator(teacher)       student top-1/top-5/loss plus top-1 agreement with the teacher and
                                    mean KL over an eval split; the teacher's own top-1 (measured once)
    distill_metrics(...)            the numpy counts behind it, for one batch of logits

The teacher is held by the loss cell, never by the student: the student's parameters (and hence its
checkpoints, ``bit_zoo.loading.model_state(student)``) hold no teacher weight, and the optimizer,
built over the student's parameters, has no state for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ..factory import create_model
from ..options import non_negative, option, positive
from .metrics import Progress, topk_correct

__all__ = [
    "DISTILL_LOSSES",
    "TEACHER_PREFIX",
    "DistillEvaluator",
    "DistillNetWithLoss",
    "build_teacher",
    "check_teacher_input",
    "distill_metrics",
    "freeze_teacher",
    "kl_divergence",
    "np_kl_divergence",
]

_logger = logging.getLogger(__name__)

DISTILL_LOSSES = ("kl",)


@dataclass
class DistillConfig:
    """The "distill" option group: train.py distils from `teacher` when it is set (see bit_zoo.options)."""

    teacher: str | None = option(None, "distil from this registered name[.tag] (function matching); unset: train on labels")
    teacher_pretrained: bool = option(False, "the teacher's weights record (downloaded)")
    teacher_checkpoint_path: str | None = option(None, "the teacher's weights file (any format bit_zoo reads)")
    distill_loss: str = option("kl", "student-teacher loss", choices=DISTILL_LOSSES)
    distill_temperature: float = option(1.0, "softmax temperature of the KL (T^2-scaled)", check=positive)
    distill_label_weight: float = option(0.0, "weight of the label cross-entropy added to the KL", check=non_negative)


# The teacher's parameters are renamed "teacher.<name>": the student's and teacher's share names
# (both ResNetV2), and one compiled graph may not hold two parameters of the same name.
TEACHER_PREFIX = "teacher."


def kl_divergence(student_logits: ms.Tensor, teacher_logits: ms.Tensor, temperature: float = 1.0) -> ms.Tensor:
    """Batch mean of T^2 * KL(softmax(teacher / T) || softmax(student / T)), in float32."""
    s = ops.log_softmax(student_logits.astype(ms.float32) / temperature, -1)
    log_p = ops.log_softmax(teacher_logits.astype(ms.float32) / temperature, -1)
    return (ops.exp(log_p) * (log_p - s)).sum(-1).mean() * (temperature * temperature)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_kl_divergence(student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per-row T^2 * KL(softmax(teacher / T) || softmax(student / T)) in float64 (evaluation)."""
    s = _np_log_softmax(np.asarray(student_logits, np.float64) / temperature)
    log_p = _np_log_softmax(np.asarray(teacher_logits, np.float64) / temperature)
    return (np.exp(log_p) * (log_p - s)).sum(-1) * temperature**2


def freeze_teacher(teacher: nn.Cell) -> nn.Cell:
    """Eval mode, no gradients, parameters renamed under TEACHER_PREFIX (once)."""
    teacher.set_train(False)
    for p in teacher.get_parameters():
        p.requires_grad = False
        if not p.name.startswith(TEACHER_PREFIX):
            p.name = TEACHER_PREFIX + p.name
    return teacher


def build_teacher(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    amp_level: str = "O0",
    conv_impl: str = "auto",
) -> nn.Cell:
    """The frozen teacher: a registered ``name`` or ``name.tag`` with its weights, in the run's AMP level.

    Exactly one of ``pretrained`` (the weights record, downloaded) and ``checkpoint_path`` (a local
    file of any format bit_zoo reads, e.g. a train.py best.ckpt). Its classifier must already have
    ``num_classes`` outputs: a teacher whose head would be left out (another class count) is an
    error, since a zero head teaches nothing.
    """
    if bool(pretrained) == bool(checkpoint_path):
        raise ValueError(
            f"teacher {name}: set exactly one of teacher_pretrained (the published weights) and teacher_checkpoint_path "
            "(a local weights file, e.g. the best.ckpt of a run that trained the teacher); a random teacher teaches nothing"
        )
    teacher = create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path, num_classes=num_classes, conv_impl=conv_impl)
    head = teacher.get_classifier().weight.asnumpy()
    if not np.any(head):
        source = checkpoint_path or f"{name}'s published weights ({teacher.weights.num_classes} classes)"
        raise ValueError(
            f"teacher {name}: the classifier in {source} does not have {num_classes} classes, so it was left out (zero head). "
            "Distil from a teacher fine-tuned on this dataset's classes: fine-tune it with train.py first and pass its checkpoint"
        )
    if amp_level != "O0":
        teacher = ms.amp.auto_mixed_precision(teacher, amp_level)
    _logger.info("teacher %s (%s), %d classes, amp %s", name, checkpoint_path or "pretrained", num_classes, amp_level)
    return freeze_teacher(teacher)


def check_teacher_input(teacher: nn.Cell, *, mean, std) -> None:
    """The teacher sees the student's batch, so it must expect the student's normalisation."""
    weights = getattr(teacher, "weights", None)
    if weights is None:
        return
    if not (np.allclose(weights.mean, mean) and np.allclose(weights.std, std)):
        raise ValueError(
            f"the teacher expects inputs normalised with mean {tuple(weights.mean)} std {tuple(weights.std)}, the student's batch "
            f"has mean {tuple(mean)} std {tuple(std)}: both see the same batch, so set mean/std to the teacher's"
        )


class DistillNetWithLoss(nn.Cell):
    """Function-matching loss of ``net`` (the student, trained) against a frozen ``teacher``.

    ``construct(x, y) -> loss`` as train_step.NetWithLoss: x is the batch the student trains on,
    augmented and mixed up by the loader, and the teacher sees that same x. ``y`` (int or soft labels,
    per ``soft_labels``) enters only when ``label_weight`` > 0.
    """

    def __init__(
        self,
        net: nn.Cell,
        teacher: nn.Cell,
        *,
        soft_labels: bool,
        temperature: float = 1.0,
        label_weight: float = 0.0,
        loss: str = "kl",
    ) -> None:
        super().__init__(auto_prefix=False)
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"unknown distill_loss {loss!r}: choose one of {DISTILL_LOSSES}")
        if temperature <= 0 or label_weight < 0:
            raise ValueError(f"distill_temperature={temperature} must be > 0 and distill_label_weight={label_weight} >= 0")
        self.net = net
        self.teacher = freeze_teacher(teacher)
        self.soft_labels = soft_labels
        self.temperature = float(temperature)
        self.label_weight = float(label_weight)
        self.use_labels = label_weight > 0

    def set_train(self, mode: bool = True):
        # The loop switches the whole cell to training; the teacher stays in eval mode.
        super().set_train(mode)
        self.teacher.set_train(False)
        return self

    def construct(self, x: ms.Tensor, y: ms.Tensor) -> ms.Tensor:
        student = self.net(x).astype(ms.float32)
        teacher = ops.stop_gradient(self.teacher(x).astype(ms.float32))
        loss = kl_divergence(student, teacher, self.temperature)
        if self.use_labels:
            if self.soft_labels:
                ce = -(y * ops.log_softmax(student, -1)).sum(-1).mean()
            else:
                ce = ops.cross_entropy(student, y)
            loss = loss + self.label_weight * ce
        return loss


def distill_metrics(student_logits: np.ndarray, teacher_logits: np.ndarray, labels: np.ndarray, *, temperature: float = 1.0) -> dict:
    """Counts over one batch: student top-1/top-5 correct, teacher top-1 correct, top-1 agreement,
    summed KL(teacher || student) at ``temperature`` and summed student cross-entropy; ``n`` rows."""
    s = np.asarray(student_logits, np.float64)
    t = np.asarray(teacher_logits, np.float64)
    labels = np.asarray(labels)
    hard = labels.argmax(-1) if labels.ndim == 2 else labels.astype(np.int64)
    student_correct = topk_correct(s, hard)
    return {
        "n": len(hard),
        "top1": student_correct[1],
        "top5": student_correct[5],
        "teacher_top1": topk_correct(t, hard, ks=(1,))[1],
        "agree": int((s.argmax(-1) == t.argmax(-1)).sum()),
        "kl": float(np_kl_divergence(s, t, temperature).sum()),
        "loss": float(-_np_log_softmax(s)[np.arange(len(hard)), hard].sum()),
    }


class DistillEvaluator:
    """Student vs. teacher over an eval split: one pass gives the student's top-1/top-5/loss (as
    metrics.evaluate), its top-1 agreement with the teacher and mean KL (percent / nats per image).

    The eval pipeline is deterministic (no shuffle, resize + center crop), so the teacher's logits
    are computed on the first call and cached (``cache=True``; N x classes float32 on the host);
    ``teacher_top1`` is measured then, once.
    """

    def __init__(self, teacher: nn.Cell, *, temperature: float = 1.0, cache: bool = True) -> None:
        self.teacher = teacher
        self.temperature = float(temperature)
        self.cache = cache
        self._teacher_logits: list[np.ndarray] | None = None
        self.teacher_top1: float | None = None

    def __call__(self, student: nn.Cell, dataset, *, progress: bool = False, desc: str = "eval") -> dict:
        student.set_train(False)
        self.teacher.set_train(False)
        cached = self._teacher_logits
        fresh: list[np.ndarray] = []
        totals = {"n": 0, "top1": 0, "top5": 0, "teacher_top1": 0, "agree": 0, "kl": 0.0, "loss": 0.0}
        start = time.perf_counter()
        batches = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
        for i, (images, labels) in enumerate(Progress(batches, total=dataset.get_dataset_size(), desc=desc, enabled=progress)):
            x = ms.Tensor(images)
            s = student(x).asnumpy()
            t = cached[i] if cached is not None else self.teacher(x).asnumpy().astype(np.float32)
            fresh.append(t)
            for k, v in distill_metrics(s, t, labels, temperature=self.temperature).items():
                totals[k] += v
        n = totals["n"]
        if n == 0:
            raise ValueError("the evaluation split is empty: check data_dir, val_split and num_samples")
        if cached is not None and len(fresh) != len(cached):
            raise RuntimeError(f"the eval split gave {len(fresh)} batches, the cached teacher logits {len(cached)}: build it once")
        if cached is None:
            self.teacher_top1 = 100.0 * totals["teacher_top1"] / n
            if self.cache:
                self._teacher_logits = fresh
        return {
            "top1": 100.0 * totals["top1"] / n,
            "top5": 100.0 * totals["top5"] / n,
            "loss": totals["loss"] / n,
            "agreement": 100.0 * totals["agree"] / n,
            "kl": totals["kl"] / n,
            "teacher_top1": self.teacher_top1,
            "images": n,
            "seconds": time.perf_counter() - start,
        }


def distill_teacher(cfg, num_classes: int, prep: dict) -> nn.Cell | None:
    """The run's frozen teacher (None without ``teacher``), checked against the student's input normalisation."""
    d = cfg.distill
    if d.teacher is None:
        return None
    teacher = build_teacher(
        d.teacher,
        num_classes=num_classes,
        pretrained=d.teacher_pretrained,
        checkpoint_path=d.teacher_checkpoint_path,
        amp_level=cfg.model.amp_level,
        conv_impl=cfg.model.conv_impl,
    )
    check_teacher_input(teacher, mean=prep["mean"], std=prep["std"])
    return teacher


def distill_loss_cell(d: DistillConfig, net: nn.Cell, teacher: nn.Cell, *, soft_labels: bool) -> DistillNetWithLoss:
    """The Trainer's loss cell for function matching: the teacher sees the student's very batch."""
    return DistillNetWithLoss(
        net, teacher, soft_labels=soft_labels, temperature=d.distill_temperature, label_weight=d.distill_label_weight, loss=d.distill_loss
    )
