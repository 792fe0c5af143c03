"""MixUp over whole batches and (smoothed) one-hot targets, as a batch-level map.

The targets come from mindcv's `mixup_target` (one-hot, label smoothing, mixing). mindcv's
`Mixup` class itself is not used: it draws lambda from the global `np.random` (not reproducible
per seed, nor resumable at a given step), its per-element modes call `np.bool`, which numpy
1.24+ removed, and it asserts an even batch size. Here lambda for step s is drawn from a
generator keyed by (seed, shard_id, s), so a resumed run mixes exactly as the original did.
"""

from __future__ import annotations

import numpy as np
from mindcv.data.mixup import mixup_target


class BatchMixup:
    """Mix each batch with itself reversed, lambda ~ Beta(alpha, alpha); return float32 targets [N, C]."""

    def __init__(
        self, num_classes: int, *, alpha: float = 0.0, label_smoothing: float = 0.0, seed: int = 0, shard_id: int = 0, start_step: int = 0
    ):
        if alpha < 0 or not 0 <= label_smoothing < 1:
            raise ValueError(f"mixup_alpha={alpha} must be >= 0 and label_smoothing={label_smoothing} in [0, 1).")
        self.num_classes, self.alpha, self.label_smoothing = num_classes, alpha, label_smoothing
        self.seed, self.shard_id, self.step = seed, shard_id, start_step

    def lam(self, step: int) -> float:
        if self.alpha == 0:
            return 1.0
        return float(np.random.default_rng([self.seed, self.shard_id, step]).beta(self.alpha, self.alpha))

    def __call__(self, images: np.ndarray, labels: np.ndarray):
        lam = self.lam(self.step)
        self.step += 1
        if lam != 1.0:
            images = lam * images + (1.0 - lam) * images[::-1]
        # mixup_target pairs each label with the flipped batch's, matching images[::-1] above.
        targets = mixup_target(np.asarray(labels, dtype=np.int64), self.num_classes, lam, self.label_smoothing)
        return images.astype(np.float32), targets.astype(np.float32)
