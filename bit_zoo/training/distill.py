"""Knowledge distillation by function matching (Beyer et al., arXiv 2106.05237; big_vision's
trainers/proj/distill/distill.py): a frozen teacher and the student see the very same augmented,
mixed-up batch and the student matches the teacher's output distribution.

    loss = T^2 * KL(softmax(teacher / T) || softmax(student / T))  [+ w * cross-entropy(student, labels)]

which is big_vision's ``dist(kind="kl", t=T)`` (its recipe: T = 1, no labels, w = 0). At T = 1 it
is the plain KL divergence of the two softmaxes; the T^2 keeps gradient magnitudes comparable across
temperatures, as in Hinton et al.

Pieces:
    build_teacher(name, ...)        a Teacher: a registered name.tag with published weights, or a local
                                    file (a train.py checkpoint names its own architecture), frozen,
                                    in eval mode, in the run's AMP level, with the normalisation and
                                    classes it expects
    DistillNetWithLoss(net, teacher) the loss cell: same call as train_step.NetWithLoss, so the
                                    Trainer's ForwardBackward takes it in its place
    DistillEvaluator(teacher)       an observer of metrics.evaluate: top-1 agreement with the teacher,
                                    mean KL and the teacher's top-1, gathered over ranks; the
                                    teacher's eval logits cached (they never change)
    distill_counts(...)             the numpy numbers behind it, for one batch of logits

The teacher is held by the loss cell, never by the student: the student's parameters (and hence its
checkpoints, ``bit_zoo.weights.loading.model_state(student)``) hold no teacher weight, and the optimizer,
built over the student's parameters, has no state for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ..data.preprocess import resolve_data_config
from ..models.factory import create_model
from ..options import non_negative, option, positive
from .metrics import evaluate, topk_correct

__all__ = [
    "DISTILL_LOSSES",
    "TEACHER_PREFIX",
    "DistillEvaluator",
    "DistillNetWithLoss",
    "build_teacher",
    "check_teacher_input",
    "distill_counts",
    "distilling",
    "Teacher",
    "distill_summary",
    "freeze_teacher",
    "kl_divergence",
    "np_kl_divergence",
]

_logger = logging.getLogger(__name__)

DISTILL_LOSSES = ("kl",)


@dataclass
class DistillConfig:
    """The "distill" option group: train.py distils from `teacher` when it is set (see bit_zoo.options)."""

    teacher: str | None = option(
        None, "distil from this registered name[.tag] (function matching); unset with teacher_checkpoint_path: the checkpoint's own",
        scripts=("train", "benchmark"),
        script_help={"benchmark": "also time distillation from this teacher (e.g. bit_m_r152x2) into --model, in its own worker"},
    )  # fmt: skip
    teacher_pretrained: bool = option(False, "the teacher's weights record (downloaded)")
    teacher_checkpoint_path: str | None = option(
        None, "the teacher's weights file: a train.py checkpoint (carries its architecture) or any format bit_zoo reads with teacher"
    )
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


@dataclass
class Teacher:
    """The frozen teacher and what it expects: the input normalisation it was trained with and its class names."""

    net: nn.Cell
    name: str  # registered name[.tag], or the checkpoint's (e.g. 'resnetv2')
    source: str  # the checkpoint path or 'pretrained:<name>'
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] | None  # from the checkpoint's meta.json; None for published weights
    num_classes: int


def build_teacher(
    name: str | None = None,
    *,
    num_classes: int,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    amp_level: str = "O0",
    conv_impl: str = "auto",
    allow_unverified: bool = False,
) -> Teacher:
    """The frozen teacher, from a registered ``name[.tag]`` with its published weights (``pretrained``)
    or from a local weights file (``checkpoint_path``), in the run's AMP level.

    A checkpoint train.py wrote carries its architecture (meta.json: e.g. ``resnetv2`` with layers and
    width_factor), so ``name`` may be left unset; other files (upstream .npz, mindcv .ckpt) need it.
    A training checkpoint's EMA weights are used when it has them (as validate.py does). The
    classifier must have ``num_classes`` outputs: a teacher of another class count teaches nothing.
    """
    where = f"teacher {name or checkpoint_path}"
    if pretrained and checkpoint_path:
        raise ValueError(
            f"{where}: set exactly one of teacher_pretrained (the published weights) and teacher_checkpoint_path "
            "(a local weights file, e.g. the best.ckpt of a run that trained the teacher), not both"
        )
    if not pretrained and not checkpoint_path:
        raise ValueError(
            f"{where}: set exactly one of teacher_pretrained (the published weights) and teacher_checkpoint_path "
            "(a local weights file, e.g. the best.ckpt of a run that trained the teacher); a random teacher teaches nothing"
        )
    if checkpoint_path and not Path(checkpoint_path).is_file():
        raise ValueError(
            f"teacher_checkpoint_path {checkpoint_path} does not exist: train the teacher first (its run writes <output_dir>/best.ckpt) "
            "or point teacher_checkpoint_path at its weights file"
        )
    if pretrained and name is None:
        raise ValueError("teacher_pretrained needs teacher: NAME[.tag] (a registered model whose published weights are the teacher)")
    try:
        teacher = create_model(
            name, checkpoint_path=checkpoint_path, pretrained=pretrained, conv_impl=conv_impl, allow_unverified=allow_unverified
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    origin = teacher.origin
    classes = teacher.num_classes
    source = checkpoint_path or f"{name}'s published weights"
    if classes != num_classes:
        raise ValueError(
            f"teacher {origin.name}: the classifier in {source} has {classes} classes, the training data {num_classes}, "
            f"so it does not have {num_classes} classes to teach. Distil on the classes the teacher was trained on (classes), "
            "or fine-tune the teacher on this dataset with train.py first and pass its best.ckpt as teacher_checkpoint_path"
        )
    pp = resolve_data_config(teacher)  # the normalisation the teacher was trained with
    if amp_level != "O0":
        teacher = ms.amp.auto_mixed_precision(teacher, amp_level)
    used = "ema" if origin.ema else "raw"
    _logger.info("teacher %s from %s (%s weights), %d classes, amp %s", origin.name, origin.source, used, classes, amp_level)
    return Teacher(freeze_teacher(teacher), origin.name, origin.source, tuple(pp.mean), tuple(pp.std), origin.class_names, classes)


def check_teacher_input(teacher: Teacher, *, mean, std, class_names: list[str] | None = None) -> None:
    """The teacher sees the student's batch, so it must expect the student's normalisation (and classes, when both are named)."""
    if not (np.allclose(teacher.mean, mean) and np.allclose(teacher.std, std)):
        raise ValueError(
            f"the teacher expects inputs normalised with mean {tuple(teacher.mean)} std {tuple(teacher.std)}, the student's batch "
            f"has mean {tuple(mean)} std {tuple(std)}: both see the same batch, so set mean/std to the teacher's"
        )
    if teacher.class_names is not None and class_names is not None and list(teacher.class_names) != list(class_names):
        raise ValueError(
            f"the teacher ({teacher.source}) was trained on classes {teacher.class_names}, the training data has {list(class_names)}: "
            "its outputs would teach the wrong labels; set classes (and dataset) to the teacher's"
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


def distill_counts(student_logits: np.ndarray, teacher_logits: np.ndarray, labels: np.ndarray, *, temperature: float = 1.0) -> dict:
    """One batch: teacher top-1 hits, student-teacher top-1 agreements and every image's
    KL(teacher || student) at ``temperature`` (float64), for ``n`` rows."""
    s = np.asarray(student_logits, np.float64)
    t = np.asarray(teacher_logits, np.float64)
    labels = np.asarray(labels)
    hard = labels.argmax(-1) if labels.ndim == 2 else labels.astype(np.int64)
    return {
        "n": len(hard),
        "teacher_top1": topk_correct(t, hard, ks=(1,))[1],
        "agree": int((s.argmax(-1) == t.argmax(-1)).sum()),
        "kl": np_kl_divergence(s, t, temperature),
    }


class DistillEvaluator:
    """Student vs. teacher over an eval split, in the same pass as the student's top-1.

    An observer of ``metrics.evaluate`` (see there): for every batch a rank evaluates it adds the
    teacher's top-1 hits, the student's top-1 agreement with the teacher and each image's
    KL(teacher || student) at ``temperature``; they are gathered over ranks exactly as the
    student's own counts and losses, so a data-parallel result equals the one-process one. The
    result gains ``agreement`` (percent), ``kl`` (mean, nats per image) and ``teacher_top1``.

    The eval pipeline is deterministic (no shuffle, resize + center crop), so the teacher's logits
    are computed on the first pass and cached by batch index (``cache=True``; this rank's images x
    classes float32 on the host): the teacher runs once per run, however many evaluations follow.
    """

    def __init__(self, teacher: nn.Cell, *, temperature: float = 1.0, cache: bool = True) -> None:
        self.teacher = teacher
        self.temperature = float(temperature)
        self.cache = cache
        self._cached: dict[int, np.ndarray] | None = None
        self._fresh: dict[int, np.ndarray] = {}
        self._counts: dict[str, int] = {}
        self._kl: list[np.ndarray] = []
        self.teacher_forwards = 0  # batches the teacher ran on (a test checks the cache)

    def begin(self) -> None:
        self.teacher.set_train(False)
        self._fresh, self._kl = {}, []
        self._counts = {"agreement": 0, "teacher_top1": 0}

    def batch(self, index: int, x: ms.Tensor, real: int, logits: np.ndarray, labels: np.ndarray) -> None:
        t = None if self._cached is None else self._cached.get(index)
        if t is None:
            t = self.teacher(x).asnumpy()[:real].astype(np.float32)  # x is padded to one shape; keep the real rows
            self.teacher_forwards += 1
        if len(t) != real:
            raise RuntimeError(f"eval batch {index}: {real} images but {len(t)} cached teacher rows; the eval split changed")
        self._fresh[index] = t
        counts = distill_counts(logits, t, labels, temperature=self.temperature)
        self._counts["agreement"] += counts["agree"]
        self._counts["teacher_top1"] += counts["teacher_top1"]
        self._kl.append(counts["kl"])

    def end(self) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        if self.cache and self._cached is None:
            self._cached = self._fresh
        kl = np.concatenate(self._kl) if self._kl else np.zeros(0, np.float64)
        return dict(self._counts), {"kl": kl}

    def __call__(self, student: nn.Cell, dataset, *, dist=None, sharded: bool = False, num_images: int | None = None,
                 progress: bool = False, desc: str = "eval") -> dict:  # fmt: skip
        """metrics.evaluate of ``student`` with this observer: top1/top5/loss plus agreement, kl, teacher_top1."""
        return evaluate(student, dataset, dist=dist, sharded=sharded, num_images=num_images, progress=progress, desc=desc, observer=self)


def distilling(d: DistillConfig) -> bool:
    """Whether the run distils: a teacher is named or its checkpoint given."""
    return d.teacher is not None or d.teacher_checkpoint_path is not None


def distill_teacher(cfg, num_classes: int, prep: dict, class_names: list[str] | None = None) -> Teacher | None:
    """The run's frozen teacher (None when not distilling), checked against the student's input
    normalisation and, when both are known, its class names."""
    d = cfg.distill
    if not distilling(d):
        if d.teacher_pretrained:
            raise ValueError("teacher_pretrained is set but no teacher: set teacher: NAME[.tag], or unset teacher_pretrained")
        return None
    teacher = build_teacher(
        d.teacher,
        num_classes=num_classes,
        pretrained=d.teacher_pretrained,
        checkpoint_path=d.teacher_checkpoint_path,
        amp_level=cfg.model.amp_level,
        conv_impl=cfg.model.conv_impl,
        allow_unverified=cfg.model.allow_unverified,
    )
    check_teacher_input(teacher, mean=prep["mean"], std=prep["std"], class_names=class_names)
    return teacher


def distill_loss_cell(d: DistillConfig, net: nn.Cell, teacher: Teacher, *, soft_labels: bool) -> DistillNetWithLoss:
    """The Trainer's loss cell for function matching: the teacher sees the student's very batch."""
    return DistillNetWithLoss(
        net,
        teacher.net,
        soft_labels=soft_labels,
        temperature=d.distill_temperature,
        label_weight=d.distill_label_weight,
        loss=d.distill_loss,
    )


def distill_summary(teacher: Teacher, final: dict) -> dict:
    """The summary's "distill" entry: the teacher, its top-1 (measured once: its logits are cached)
    and the student's agreement with it at the last evaluation."""
    return {
        "teacher": teacher.name,
        "teacher_source": teacher.source,
        "teacher_top1": final.get("teacher_top1"),
        "student_top1": final.get("top1"),
        "agreement": final.get("agreement"),
        "kl": final.get("kl"),
        "images": final.get("images"),
    }
