"""Evaluation (top-1, top-5, loss over every image), progress bars, the metrics file and plots."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn

from ..atomic import atomic_path

__all__ = ["evaluate", "Progress", "MetricsLog", "plot_curves", "topk_correct"]

_logger = logging.getLogger(__name__)


def topk_correct(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the k largest logits, for each k (k capped at classes)."""
    labels = labels.argmax(-1) if labels.ndim == 2 else labels
    order = np.argsort(-logits, axis=-1)
    out = {}
    for k in ks:
        out[k] = int((order[:, : min(k, logits.shape[-1])] == labels[:, None]).any(axis=1).sum())
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def evaluate(net: nn.Cell, dataset, *, progress: bool = False, desc: str = "eval") -> dict:
    """top1 / top5 (percent), mean cross-entropy and the image count over one pass of dataset.

    The dataset must keep its remainder (drop_remainder=False) so every image counts.
    """
    net.set_train(False)
    n = 0
    loss_sum = 0.0
    correct = {1: 0, 5: 0}
    start = time.perf_counter()
    batches = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
    for images, labels in Progress(batches, total=dataset.get_dataset_size(), desc=desc, enabled=progress):
        logits = net(ms.Tensor(images)).asnumpy().astype(np.float64)
        labels = np.asarray(labels)
        hard = labels.argmax(-1) if labels.ndim == 2 else labels.astype(np.int64)
        loss_sum += float(-_log_softmax(logits)[np.arange(len(hard)), hard].sum())
        for k, c in topk_correct(logits, hard).items():
            correct[k] += c
        n += len(hard)
    if n == 0:
        raise ValueError("the evaluation split is empty: check data_dir, val_split and num_samples")
    seconds = time.perf_counter() - start
    return {"top1": 100.0 * correct[1] / n, "top5": 100.0 * correct[5] / n, "loss": loss_sum / n, "images": n, "seconds": seconds}


class Progress:
    """tqdm on a terminal, plain log lines every `every` items otherwise; silent when not enabled."""

    def __init__(self, iterable: Iterable, *, total: int | None, desc: str, enabled: bool = True, every: int = 50) -> None:
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.every = every
        self.postfix: dict = {}
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

    def set_postfix(self, **kwargs) -> None:
        self.postfix = kwargs
        if self._bar is not None:
            self._bar.set_postfix(kwargs, refresh=False)

    def __iter__(self) -> Iterator:
        for i, item in enumerate(self.iterable, 1):
            yield item
            if self._bar is not None:
                self._bar.update(1)
            elif self.enabled and (i % self.every == 0 or i == self.total):
                extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
                _logger.info("%s %d/%s %s", self.desc, i, self.total if self.total else "?", extra)
        if self._bar is not None:
            self._bar.close()


class MetricsLog:
    """Append one JSON object per line (per epoch, plus the final summary) to metrics.jsonl."""

    def __init__(self, path: str | Path, *, enabled: bool = True, append: bool = False) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled and not append:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("", encoding="utf-8")

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
