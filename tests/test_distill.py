"""Distillation (bit_zoo.training.distill): the KL loss against numpy, the teacher fed the student's
exact (mixed-up) batch, a frozen teacher over optimizer steps, student-only checkpoints, the
teacher builder's errors and the evaluation counts.

Tiny ResNetV2 models (one unit per stage) at 32 px on digits; two PyNative Trainer steps are shared
by the step tests (module fixture).
"""

from __future__ import annotations

import threading
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from conftest import write_train_checkpoint
from mindspore import nn

import bit_zoo
from bit_zoo.data import create_loader
from bit_zoo.weights.loading import model_state
from bit_zoo.training.checkpoint import TrainState, save_training_checkpoint
from bit_zoo.training.distill import (
    TEACHER_PREFIX,
    DistillEvaluator,
    DistillNetWithLoss,
    build_teacher,
    check_teacher_input,
    distill_counts,
)
from bit_zoo.training.metrics import combine_parts, evaluate, evaluate_part, gather_parts
from bit_zoo.training.optim import OptimConfig, create_optimizer
from bit_zoo.training.train_step import StepConfig, Trainer

NUM_CLASSES = 10


def tiny(seed: int, *, head_scale: float = 0.0) -> bit_zoo.ResNetV2:
    """The smallest ResNetV2; a non-zero head (head_scale) so its logits are not all equal."""
    ms.set_seed(seed)
    net = bit_zoo.ResNetV2((1, 1, 1, 1), 1, num_classes=NUM_CLASSES)
    if head_scale:
        rng = np.random.default_rng(seed)
        for p in net.get_parameters():
            if p.name.startswith("head.fc."):
                p.set_data(ms.Tensor((head_scale * rng.standard_normal(p.shape)).astype(np.float32)))
    return net


class Recorder(nn.Cell):
    """Runs net and keeps a copy of every input it sees (PyNative: construct is plain Python)."""

    def __init__(self, net: nn.Cell, log: list) -> None:
        super().__init__(auto_prefix=False)
        self.net = net
        self.log = log

    def construct(self, x):
        self.log.append(x.asnumpy().copy())
        return self.net(x)


def reference_loss(s: np.ndarray, t: np.ndarray, y: np.ndarray, temperature: float, label_weight: float) -> float:
    """T^2 KL(softmax(t/T) || softmax(s/T)) + w * soft-label cross-entropy, written out in float64."""
    s, t = s.astype(np.float64), t.astype(np.float64)
    p = np.exp(t / temperature) / np.exp(t / temperature).sum(-1, keepdims=True)
    q = np.exp(s / temperature) / np.exp(s / temperature).sum(-1, keepdims=True)
    kl = (p * np.log(p / q)).sum(-1).mean() * temperature**2
    log_q1 = np.log(np.exp(s) / np.exp(s).sum(-1, keepdims=True))
    return float(kl + label_weight * -(y * log_q1).sum(-1).mean())


@pytest.mark.parametrize("temperature,label_weight", [(1.0, 0.0), (4.0, 0.0), (2.0, 0.3)])
def test_kl_loss_equals_numpy(temperature, label_weight):
    student, teacher = tiny(0, head_scale=0.5), tiny(1, head_scale=2.0)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32))
    y = np.eye(NUM_CLASSES, dtype=np.float32)[[1, 2, 3, 4]] * 0.7 + np.eye(NUM_CLASSES, dtype=np.float32)[[4, 3, 2, 1]] * 0.3
    s, t = student(x).asnumpy(), teacher(x).asnumpy()
    assert np.abs(s - t).max() > 0.1  # distinct distributions: a KL of 0 would prove nothing
    cell = DistillNetWithLoss(student, teacher, soft_labels=True, temperature=temperature, label_weight=label_weight)
    loss = float(cell(x, ms.Tensor(y)).asnumpy())
    np.testing.assert_allclose(loss, reference_loss(s, t, y, temperature, label_weight), rtol=1e-5)


@pytest.fixture(scope="module")
def distill_steps(tmp_path_factory):
    """Two Trainer steps of distillation on mixed-up digits; everything the step tests look at."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    student, teacher = tiny(0), tiny(1, head_scale=2.0)
    seen_student, seen_teacher = [], []
    cell = DistillNetWithLoss(Recorder(student, seen_student), Recorder(teacher, seen_teacher), soft_labels=True)
    # Built over the loss cell's trainable parameters on purpose: only the freezing keeps the teacher out.
    optimizer = create_optimizer(
        cell.trainable_params(), OptimConfig(opt="adamw", weight_decay=0.1, weight_decay_filter="all"), np.full(2, 0.05, np.float32)
    )
    # the loss cell train.py hands the Trainer when the config names a teacher
    trainer = Trainer(student, optimizer, StepConfig(clip_grad_norm=1.0, ema_decay=0.9), soft_labels=True, net_with_loss=cell)
    loader = create_loader("digits", None, "train", batch_size=4, image_size=32, mixup_alpha=1.0, num_samples=16, num_workers=1)
    # copies: asnumpy() may share the parameter's memory
    before = {name: {k: v.copy() for k, v in model_state(net).items()} for name, net in (("student", student), ("teacher", teacher))}
    batches = []
    cell.set_train(True)
    for images, labels in loader.dataset.create_tuple_iterator(num_epochs=1):
        batches.append((images.asnumpy(), labels.asnumpy()))
        trainer.step([(images, labels)])
        if len(batches) == 2:
            break
    # The compiled step records only while tracing: replay the batches through the loss cell
    # eagerly to see, call by call, what student and teacher are given.
    seen_student.clear()
    seen_teacher.clear()
    for images, labels in batches:
        cell(ms.Tensor(images), ms.Tensor(labels))
    ckpt = save_training_checkpoint(
        tmp_path_factory.mktemp("distill") / "last.ckpt",
        model=student,
        optimizer=optimizer,
        ema=trainer.ema,
        scaler=trainer.scaler,
        state=TrainState(step=2),
    )
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": optimizer,
        "before": before,
        "batches": batches,
        "seen_student": seen_student,
        "seen_teacher": seen_teacher,
        "ckpt": ckpt,
    }


def test_teacher_sees_the_students_mixed_up_batch(distill_steps):
    batches, seen_s, seen_t = distill_steps["batches"], distill_steps["seen_student"], distill_steps["seen_teacher"]
    assert len(batches) == len(seen_s) == len(seen_t) == 2
    # mixup is on: targets mixing two classes (the images are blends alike)
    assert any(((labels > 0).sum(-1) == 2).any() for _, labels in batches)
    for (images, _), s, t in zip(batches, seen_s, seen_t):
        np.testing.assert_array_equal(s, images)
        np.testing.assert_array_equal(t, images)


def test_teacher_parameters_never_change(distill_steps):
    before, teacher, student = distill_steps["before"], distill_steps["teacher"], distill_steps["student"]
    after_teacher, after_student = model_state(teacher), model_state(student)
    assert all(p.name.startswith(TEACHER_PREFIX) and not p.requires_grad for p in teacher.get_parameters())
    assert not any(p.name.startswith(TEACHER_PREFIX) for p in distill_steps["optimizer"].parameters)
    assert after_teacher.keys() == before["teacher"].keys()
    for name, value in after_teacher.items():
        np.testing.assert_array_equal(value, before["teacher"][name], name)
    # the student did train: the check above is not vacuous
    changed = [k for k in after_student if not np.array_equal(after_student[k], before["student"][k])]
    assert len(changed) > len(after_student) // 2


def test_student_checkpoint_holds_no_teacher(distill_steps):
    student = distill_steps["student"]
    keys = set(model_state(student))
    assert keys == set(model_state(tiny(2)))
    saved = set(ms.load_checkpoint(str(distill_steps["ckpt"])))
    assert not [k for k in saved if "teacher" in k]
    assert keys <= saved
    fresh = tiny(3)
    bit_zoo.load_checkpoint(fresh, distill_steps["ckpt"])  # strict: every parameter of the student, nothing else
    for k, v in model_state(fresh).items():
        np.testing.assert_array_equal(v, model_state(student)[k])


def test_build_teacher_checks_its_weights(tmp_path: Path, make_upstream_npz):
    with pytest.raises(ValueError, match="exactly one of teacher_pretrained"):
        build_teacher("bit_s_r50x1", num_classes=5)
    with pytest.raises(ValueError, match="exactly one of teacher_pretrained"):
        build_teacher("bit_s_r50x1", num_classes=5, pretrained=True, checkpoint_path="x.npz")
    path = tmp_path / "teacher.npz"
    make_upstream_npz(path, "bit_s_r50x1", 5)
    with pytest.raises(ValueError, match="has 5 classes, the training data 10.*teacher_checkpoint_path"):
        build_teacher("bit_s_r50x1", num_classes=10, checkpoint_path=str(path))
    with pytest.raises(ValueError, match="carries no meta.json.*name its architecture"):
        build_teacher(None, num_classes=5, checkpoint_path=str(path))  # an upstream file does not name its architecture
    teacher = build_teacher("bit_s_r50x1", num_classes=5, checkpoint_path=str(path))
    params = list(teacher.net.get_parameters())
    assert all(p.name.startswith(TEACHER_PREFIX) and not p.requires_grad for p in params)
    assert not teacher.net.training
    assert teacher.net.get_classifier().weight.shape == (5, 2048) and np.any(teacher.net.get_classifier().weight.asnumpy())
    check_teacher_input(teacher, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # BiT's [-1, 1]
    with pytest.raises(ValueError, match="set mean/std to the teacher's"):
        check_teacher_input(teacher, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_teacher_from_a_train_checkpoint_alone(tmp_path: Path):
    """teacher_checkpoint_path of a file train.py wrote is enough: its meta.json names the architecture
    (here a resnetv2 that no registered name has), classes and normalisation; contradictions are one clear error."""
    net = bit_zoo.ResNetV2((1, 2, 1, 1), 2, num_classes=NUM_CLASSES)
    rng = np.random.default_rng(0)
    net.get_classifier().weight.set_data(ms.Tensor(rng.standard_normal((NUM_CLASSES, net.num_features)).astype(np.float32)))
    names = [str(i) for i in range(NUM_CLASSES)]
    path = write_train_checkpoint(tmp_path / "best.ckpt", net, class_names=names, image_size=16)
    teacher = build_teacher(None, num_classes=NUM_CLASSES, checkpoint_path=str(path))
    assert (teacher.name, teacher.net.layers, teacher.net.width_factor, teacher.class_names) == ("resnetv2", (1, 2, 1, 1), 2, names)
    x = ms.Tensor(rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32))
    net.set_train(False)
    np.testing.assert_allclose(teacher.net(x).asnumpy(), net(x).asnumpy(), rtol=1e-5, atol=1e-5)
    assert build_teacher("resnetv2", num_classes=NUM_CLASSES, checkpoint_path=str(path)).net.layers == (1, 2, 1, 1)
    check_teacher_input(teacher, mean=(0.5,) * 3, std=(0.5,) * 3, class_names=names)
    with pytest.raises(ValueError, match=r"trained on classes \['0'.*set classes \(and dataset\) to the teacher's"):
        check_teacher_input(teacher, mean=(0.5,) * 3, std=(0.5,) * 3, class_names=names[:5] + names[6:] + ["5"])
    with pytest.raises(ValueError, match="does not exist: train the teacher first"):
        build_teacher(None, num_classes=NUM_CLASSES, checkpoint_path=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="has 10 classes, the training data 4.*fine-tune the teacher"):
        build_teacher(None, num_classes=4, checkpoint_path=str(path))
    with pytest.raises(ValueError, match=r"teacher bit_s_r50x1: bit_s_r50x1 is layers \[3, 4, 6, 3\].*its meta.json: resnetv2"):
        build_teacher("bit_s_r50x1", num_classes=NUM_CLASSES, checkpoint_path=str(path))


def test_teacher_pretrained_needs_a_name(monkeypatch):
    from bit_zoo.config import parse_config
    from bit_zoo.training.distill import distill_teacher

    cfg = parse_config("train", ["--teacher_pretrained", "true"])
    with pytest.raises(ValueError, match="teacher_pretrained is set but no teacher"):
        distill_teacher(cfg, NUM_CLASSES, {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    with pytest.raises(ValueError, match="teacher_pretrained needs teacher"):
        build_teacher(None, num_classes=NUM_CLASSES, pretrained=True)


def test_distill_counts():
    s = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    t = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 4.0, 0.0]])
    labels = np.array([0, 2, 1, 1])
    out = distill_counts(s, t, labels)
    assert (out["n"], out["teacher_top1"], out["agree"]) == (4, 3, 2)
    reference = [reference_loss(s[i : i + 1], t[i : i + 1], np.zeros((1, 3)), 1.0, 0.0) for i in range(4)]
    np.testing.assert_allclose(out["kl"], reference)


N_VAL = 19  # odd: two ranks hold 10 and 9 images, so the gathered arrays are padded


def _digits_val(world: int = 1, rank: int = 0):
    return create_loader(
        "digits", None, "val", batch_size=8, image_size=16, num_samples=N_VAL, num_workers=1, shuffle=False, drop_remainder=False,
        num_shards=world, shard_id=rank,
    )  # fmt: skip


def test_distill_evaluation_reports_agreement_and_caches_the_teacher():
    student, teacher = tiny(0, head_scale=0.5), tiny(1, head_scale=2.0)
    calls = []
    evaluator = DistillEvaluator(Recorder(teacher, calls))
    data = _digits_val()
    first = evaluator(student, data.dataset, num_images=N_VAL)
    second = evaluator(student, data.dataset, num_images=N_VAL)
    assert len(calls) == 3 == evaluator.teacher_forwards  # three batches (8, 8, 3 padded to 8), computed once
    assert first == {**second, "seconds": first["seconds"]}
    # the very numbers of a plain evaluation of the student, plus the teacher's, from logits computed here
    plain = evaluate(student, data.dataset, num_images=N_VAL)
    assert {k: first[k] for k in plain if k != "seconds"} == {k: v for k, v in plain.items() if k != "seconds"}
    images, labels = (np.concatenate(a) for a in zip(*data.dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)))
    padded = ms.Tensor(np.concatenate([images, images[:5]]))  # 24 = 3 x 8 rows: the shapes already compiled above
    s, t = student(padded[:8]), teacher(padded[:8])
    s, t = (
        np.concatenate([out.asnumpy()] + [net(padded[i : i + 8]).asnumpy() for i in (8, 16)])[:N_VAL]
        for out, net in ((s, student), (t, teacher))
    )
    assert first["extras"] == ["agreement", "teacher_top1", "kl"]
    assert first["agreement"] == 100.0 * (s.argmax(-1) == t.argmax(-1)).sum() / N_VAL
    assert first["teacher_top1"] == 100.0 * (t.argmax(-1) == labels).sum() / N_VAL
    np.testing.assert_allclose(first["kl"], reference_loss(s, t, np.zeros_like(s), 1.0, 0.0), rtol=1e-5)
    assert 0 < first["agreement"] < 100 and first["kl"] > 0


def test_distill_evaluation_over_ranks_equals_one_process(monkeypatch):
    """Two ranks with shards of 10 and 9 images (run one after the other, then through gather_parts with a
    simulated AllGather): agreement, teacher top-1 and the KL sum combine to the one-process numbers.

    The counts are exact. The loss and KL are not exact by construction: a shard runs the network on other
    batches (10 and 9 images instead of 8, 8, 3), and oneDNN's kernels block a convolution differently per
    batch shape and per instruction set, so an image's float32 logits may differ in the last bits (seen on
    an AVX2-only CPU: loss 21.502665427870895 vs 21.5026648239961, 2.8e-8 relative, ~0.2 float32 ulp).
    A mean of positive per-image terms keeps that relative size; 1e-6 (~8 ulp) allows it, while an image
    lost or counted twice moves the mean by ~5 % (1 of 19). The gathered results (same parts, float64
    sent exactly) must equal the in-process combination bit for bit."""
    student, teacher = tiny(0, head_scale=0.5), tiny(1, head_scale=2.0)
    single = DistillEvaluator(teacher)(student, _digits_val().dataset, num_images=N_VAL)
    drop = ("seconds", "ranks")
    world = 2
    parts = [
        evaluate_part(student, _digits_val(world, r).dataset, rank=r, world_size=world, sharded=True, observer=DistillEvaluator(teacher))
        for r in range(world)
    ]
    combined = {k: v for k, v in combine_parts(parts, sharded=True, num_images=N_VAL).items() if k not in drop}
    floats = ("loss", "kl")
    assert {k: v for k, v in combined.items() if k not in floats} == {k: v for k, v in single.items() if k not in drop + floats}
    for k in floats:
        assert combined[k] == pytest.approx(single[k], rel=1e-6), k
    # through gather_parts on every rank at once (threads), over an AllGather that concatenates
    # every rank's array in rank order, as MindSpore's does
    monkeypatch.setattr("bit_zoo.training.metrics._all_gather", collective := _ThreadAllGather(world))
    for result in _gather_on_threads(parts, collective):
        assert {k: v for k, v in result.items() if k not in drop} == combined


def _gather_on_threads(parts, collective) -> list[dict]:
    world = len(parts)
    results: list = [None] * world

    def rank_main(r):
        collective.local.rank = r
        results[r] = combine_parts(gather_parts(parts[r], world), sharded=True, num_images=sum(p.images for p in parts))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    return results


class _ThreadAllGather:
    """AllGather among threads: each rank's float32 array, concatenated along axis 0 in rank order."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world
        self.local = threading.local()

    def __call__(self, x):
        self.slots[self.local.rank] = np.ascontiguousarray(x, np.float32)
        self.barrier.wait()
        out = np.concatenate(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out
