"""MixUp over whole batches and (smoothed) one-hot targets, run as the batch op's per_batch_map.

The targets come from mindcv's `mixup_target` (one-hot, label smoothing, mixing). mindcv's
`Mixup` class itself is not used: it draws lambda from the global `np.random` (not reproducible
per seed, nor resumable at a given step), its per-element modes call `np.bool`, which numpy
1.24+ removed, and it asserts an even batch size.

Lambda for training step s is drawn from a generator keyed by (seed, shard_id, s), where s comes
from the batch op's own epoch and batch counters, so it is the same in a resumed run and is not
disturbed by MindSpore's shape/type queries (which pull a batch through a copy of the pipeline).
"""

from __future__ import annotations

import numpy as np
from mindcv.data.mixup import mixup_target


class BatchMixup:
    """Mix each batch with itself reversed, lambda ~ Beta(alpha, alpha); return float32 targets [N, C]."""

    def __init__(
        self,
        num_classes: int,
        *,
        alpha: float = 0.0,
        label_smoothing: float = 0.0,
        seed: int = 0,
        shard_id: int = 0,
        start_step: int = 0,
        batches_per_epoch: int = 1,
    ):
        # start_step / batches_per_epoch serve __call__ only; the loader's StepKeyedBatch passes the step to mix().
        if alpha < 0 or not 0 <= label_smoothing < 1:
            raise ValueError(f"mixup_alpha={alpha} must be >= 0 and label_smoothing={label_smoothing} in [0, 1).")
        self.num_classes, self.alpha, self.label_smoothing = num_classes, alpha, label_smoothing
        self.seed, self.shard_id = seed, shard_id
        self.start_step, self.batches_per_epoch = start_step, batches_per_epoch

    def lam(self, step: int) -> float:
        if self.alpha == 0:
            return 1.0
        return float(np.random.default_rng([self.seed, self.shard_id, step]).beta(self.alpha, self.alpha))

    def mix(self, images: np.ndarray, labels: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        lam = self.lam(step)
        images = np.asarray(images, dtype=np.float32)
        if lam != 1.0:
            images = lam * images + (1.0 - lam) * images[::-1]
        # mixup_target pairs each label with the flipped batch's, matching images[::-1] above.
        targets = mixup_target(np.asarray(labels, dtype=np.int64), self.num_classes, lam, self.label_smoothing)
        return images.astype(np.float32), targets.astype(np.float32)

    def __call__(self, images: list, labels: list, batch_info):
        """per_batch_map signature: column row lists and MindSpore's BatchInfo."""
        step = self.start_step + batch_info.get_epoch_num() * self.batches_per_epoch + batch_info.get_batch_num()
        return self.mix(np.stack(images), np.stack(labels), step)
