"""Evaluation (top-1, top-5, loss over every image; sharded over ranks), progress bars, the metrics file and plots."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn

from ..utils.atomic import atomic_path, write_text_atomic
from ..utils.progress import Progress

__all__ = [
    "evaluate",
    "evaluate_part",
    "combine_parts",
    "gather_parts",
    "split_float64",
    "join_float64",
    "EvalPart",
    "Progress",
    "MetricsLog",
    "plot_curves",
    "topk_correct",
]

_logger = logging.getLogger(__name__)


def topk_correct(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the k largest logits, for each k (k capped at classes)."""
    return {k: int(hits.sum()) for k, hits in _topk_hits(logits, labels, ks).items()}


def _topk_hits(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, np.ndarray]:
    labels = labels.argmax(-1) if labels.ndim == 2 else labels
    order = np.argsort(-logits, axis=-1)
    return {k: (order[:, : min(k, logits.shape[-1])] == labels[:, None]).any(axis=1) for k in ks}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class EvalPart:
    """One rank's share of an evaluation: hit counts and every image's loss (float64).

    ``counts`` and ``values`` carry an observer's further numbers (see :func:`evaluate`): integer
    counts reported as a percentage of the images, per-image float64 values reported as their mean.
    """

    rank: int
    top1: int
    top5: int
    losses: np.ndarray
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.losses)


def evaluate(
    net: nn.Cell,
    dataset,
    *,
    dist=None,
    sharded: bool = False,
    num_images: int | None = None,
    progress: bool = False,
    desc: str = "eval",
    observer=None,
) -> dict:
    """top1 / top5 (percent), mean cross-entropy and the image count over one pass of the eval split.

    The dataset must keep its remainder (drop_remainder=False) so every image counts. With
    ``dist`` (a DistInfo, or anything with ``rank`` and ``world_size``) of several ranks, every
    rank must call this (a collective at the end) and evaluates only its share:

    * ``sharded=True``: ``dataset`` already is this rank's shard, as
      ``create_loader(..., num_shards=world_size, shard_id=rank)`` builds it for an eval split
      (records rank, rank + W, ...; no padding, shards disjoint and covering the split once).
    * ``sharded=False``: ``dataset`` is the whole split on every rank; this rank runs the model on
      batches rank, rank + W, ... only (the pipeline still reads the others).

    ``num_images`` (``len(DataInfo.indices)``, the split's size) is checked against the images
    counted over all ranks: a shard padded or cut would fail here rather than skew the numbers.

    The result equals a single-process evaluation exactly: the hit counts are integers and the
    loss is the correctly rounded sum (math.fsum) of every image's float64 loss, gathered from all
    ranks, so neither the shard boundaries nor the summation order change a bit. Each batch is
    padded to the first batch's size (the padded rows are dropped) so graph mode compiles one
    shape, and an image's logits do not depend on the batch it sits in.

    ``observer`` adds numbers of its own (distillation's agreement with the teacher, see
    training/distill.py): ``observer.begin()`` before the pass, ``observer.batch(index, x, real,
    logits, labels)`` for every batch this rank evaluates (x the padded input tensor, ``real`` its
    real rows, logits and int labels of those rows), ``observer.end() -> (counts, values)`` after
    it. They travel and combine as top1 and the losses do (exactly), and appear in the result
    under their names, listed in ``result["extras"]``.
    """
    rank, world = (0, 1) if dist is None else (int(dist.rank), int(dist.world_size))
    part = evaluate_part(net, dataset, rank=rank, world_size=world, sharded=sharded, progress=progress, desc=desc, observer=observer)
    parts = [part] if world == 1 else gather_parts(part, world)
    return combine_parts(parts, sharded=sharded, num_images=num_images)


def evaluate_part(
    net: nn.Cell,
    dataset,
    *,
    rank: int = 0,
    world_size: int = 1,
    sharded: bool = False,
    progress: bool = False,
    desc: str = "eval",
    observer=None,
) -> EvalPart:
    """This rank's share of the evaluation (no communication): see :func:`evaluate`."""
    net.set_train(False)
    if observer is not None:
        observer.begin()
    top1 = top5 = 0
    losses = []
    start = time.perf_counter()
    batch_size = None
    batches = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
    total = dataset.get_dataset_size()
    for index, (images, labels) in enumerate(Progress(batches, total=total, desc=desc, enabled=progress)):
        if batch_size is None:
            batch_size = len(images)
        if not sharded and index % world_size != rank:
            continue  # another rank's batch
        real = len(images)
        if real < batch_size:
            images = np.concatenate([images, np.repeat(images[-1:], batch_size - real, axis=0)])
        x = ms.Tensor(images)
        logits = net(x).asnumpy()[:real].astype(np.float64)
        labels = np.asarray(labels)
        hard = labels.argmax(-1) if labels.ndim == 2 else labels.astype(np.int64)
        if observer is not None:
            observer.batch(index, x, real, logits, hard)
        losses.append(-_log_softmax(logits)[np.arange(real), hard])
        hits = _topk_hits(logits, hard)
        top1 += int(hits[1].sum())
        top5 += int(hits[5].sum())
    loss = np.concatenate(losses) if losses else np.zeros(0, np.float64)
    counts, values = observer.end() if observer is not None else ({}, {})
    for name, v in values.items():
        if len(v) != len(loss):
            raise ValueError(f"the eval observer gave {len(v)} {name} values for {len(loss)} images: one per image")
    return EvalPart(
        rank, top1, top5, loss, time.perf_counter() - start, dict(counts), {k: np.asarray(v, np.float64) for k, v in values.items()}
    )


def combine_parts(parts: list[EvalPart], *, sharded: bool = False, num_images: int | None = None) -> dict:
    """The evaluation result from every rank's part (in rank order); checks every image counted once."""
    n = sum(p.images for p in parts)
    if n == 0:
        raise ValueError("the evaluation split is empty: check data_dir, val_split and num_samples")
    world = len(parts)
    if sharded and world > 1:
        # Disjoint strided shards of n records hold len(range(rank, n, world)) each.
        expected = [len(range(p.rank, n, world)) for p in parts]
        if [p.images for p in parts] != expected:
            raise ValueError(
                f"ranks evaluated {[p.images for p in parts]} images but disjoint shards of {n} hold {expected}: build the eval "
                "loader with num_shards=world_size, shard_id=rank, drop_remainder=False (no padding), or pass sharded=False"
            )
    if num_images is not None and n != num_images:
        raise ValueError(
            f"{n} images evaluated over {world} rank(s) but the split has {num_images}: a shard was padded, cut or evaluated twice "
            "(eval loader: drop_remainder=False, num_shards=world_size, shard_id=rank with sharded=True; the whole split with sharded=False)"
        )
    loss_sum = math.fsum(x for p in parts for x in p.losses.tolist())
    top1 = sum(p.top1 for p in parts)
    top5 = sum(p.top5 for p in parts)
    seconds = max(p.seconds for p in parts)
    result = {
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "loss": loss_sum / n,
        "images": n,
        "seconds": seconds,
        "ranks": world,
    }
    extras = {}
    for name in parts[0].counts:
        extras[name] = 100.0 * sum(p.counts[name] for p in parts) / n
    for name in parts[0].values:
        extras[name] = math.fsum(x for p in parts for x in p.values[name].tolist()) / n
    if extras:
        result.update(extras, extras=list(extras))
    return result


# ----------------------------------------------------------------------------------------------
# Communication. MindSpore's CPU collectives take float32/float16 only and AllReduce only sums,
# so everything travels as float32 through AllGather: counts exactly (below 2**24), and each
# float64 loss as three float32 pieces whose sum is that float64 exactly.


def split_float64(x: np.ndarray) -> np.ndarray:
    """(n,) float64 -> (n, 3) float32 with a + b + c == x exactly (in float64, added in order)."""
    x = np.asarray(x, np.float64)
    a = x.astype(np.float32)
    r = x - a.astype(np.float64)
    b = r.astype(np.float32)
    c = (r - b.astype(np.float64)).astype(np.float32)
    return np.stack([a, b, c], axis=-1)


def join_float64(pieces: np.ndarray) -> np.ndarray:
    p = np.asarray(pieces).astype(np.float64)
    return (p[..., 0] + p[..., 1]) + p[..., 2]


def _all_gather(x: np.ndarray) -> np.ndarray:
    from mindspore import ops

    return ops.AllGather()(ms.Tensor(np.ascontiguousarray(x, np.float32))).asnumpy()


def gather_parts(part: EvalPart, world_size: int) -> list[EvalPart]:
    """Every rank's EvalPart on every rank (two AllGathers: the counts, then the padded per-image
    losses and observer values). Every rank has the same observer, hence the same names."""
    if part.images >= 2**24:
        raise ValueError(f"{part.images} images on one rank: counts travel as float32, exact below 2**24 only")
    names, value_names = list(part.counts), list(part.values)
    row = [part.images, part.top1, part.top5, part.seconds, *(part.counts[k] for k in names)]
    header = _all_gather(np.array(row, np.float32)).reshape(world_size, len(row))
    counts = header[:, 0].astype(np.int64)
    width = max(1, int(counts.max()))
    columns = [part.losses, *(part.values[k] for k in value_names)]
    mine = np.zeros((width, len(columns), 3), np.float32)
    for c, column in enumerate(columns):
        mine[: part.images, c] = split_float64(column)
    pieces = _all_gather(mine).reshape(world_size, width, len(columns), 3)
    parts = []
    for r in range(world_size):
        joined = join_float64(pieces[r, : counts[r]])  # (images, columns)
        parts.append(
            EvalPart(
                r,
                int(header[r, 1]),
                int(header[r, 2]),
                joined[:, 0],
                float(header[r, 3]),
                {k: int(header[r, 4 + i]) for i, k in enumerate(names)},
                {k: joined[:, 1 + i] for i, k in enumerate(value_names)},
            )  # fmt: skip
        )
    return parts


class MetricsLog:
    """Append one JSON object per line (per epoch, plus the final summary) to metrics.jsonl."""

    def __init__(self, path: str | Path, *, enabled: bool = True, append: bool = False, resumed_step: int | None = None) -> None:
        """append: continue a resumed run's file. Its records of steps after `resumed_step` (the resumed
        checkpoint's) are dropped, since the run does those steps again: a kill can land between an
        epoch's record and its checkpoint reaching the disk (or, with a remote output_dir, the bucket)."""
        self.path = Path(path)
        self.enabled = enabled
        if enabled and not append:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", encoding="utf-8")
        elif enabled and resumed_step is not None:
            records = self.records()
            kept = [r for r in records if r.get("step", 0) <= resumed_step]
            if len(kept) != len(records):
                write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(records: list[dict], path: str | Path) -> Path | None:
    """PNG of train loss, eval loss, eval top-1/top-5 and lr against the optimizer step."""
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = [r["step"] for r in epochs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(step, [r["train_loss"] for r in epochs], marker="o", label="train")
    if any("eval_loss" in r for r in epochs):
        axes[0].plot(
            [r["step"] for r in epochs if "eval_loss" in r], [r["eval_loss"] for r in epochs if "eval_loss" in r], marker="o", label="eval"
        )
    axes[0].set_title("loss")
    axes[0].legend()
    evals = [r for r in epochs if "top1" in r]
    if evals:
        axes[1].plot([r["step"] for r in evals], [r["top1"] for r in evals], marker="o", label="top-1")
        axes[1].plot([r["step"] for r in evals], [r["top5"] for r in evals], marker="o", label="top-5")
        axes[1].legend()
    axes[1].set_title("eval accuracy (%)")
    axes[2].plot(step, [r["lr"] for r in epochs], marker="o")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)
