"""Which records, in which order: validation hold-out, few-shot draws, shards and resumable epochs.

Everything here is a pure function of (labels, seed), so the same seed gives the same records
on every rank and every run. Each draw has its own random stream (`_VAL_STREAM`, `_FEW_SHOT_STREAM`,
epoch order) so adding few-shot sampling never moves the validation split.
"""

from __future__ import annotations

import math

import mindspore.dataset as ds
import numpy as np

_VAL_STREAM = 0
_FEW_SHOT_STREAM = 1
_EPOCH_STREAM = 2


def val_split_indices(num_records: int, val_split: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out part of a train split: (train_indices, val_indices), both sorted and disjoint.

    `val_split` is a fraction in (0, 1) or a count of records.
    """
    if isinstance(val_split, float) and not float(val_split).is_integer():
        if not 0.0 < val_split < 1.0:
            raise ValueError(f"val_split={val_split}: a fraction must lie in (0, 1); pass an int for a count of images.")
        num_val = int(round(num_records * val_split))
    else:
        num_val = int(val_split)
    if not 0 < num_val < num_records:
        raise ValueError(
            f"val_split={val_split} holds out {num_val} of {num_records} training images; it must leave at least one image on each side."
        )
    order = np.random.default_rng([seed, _VAL_STREAM]).permutation(num_records)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def few_shot_indices(indices: np.ndarray, labels: np.ndarray, k: int, seed: int, class_names: list[str] | None = None) -> np.ndarray:
    """`k` records per class drawn without replacement from `indices` (labels indexed by record)."""
    if k < 1:
        raise ValueError(f"few_shot={k}: pass a positive number of examples per class, or None for the full split.")
    rng = np.random.default_rng([seed, _FEW_SHOT_STREAM])
    picked = []
    subset_labels = labels[indices]
    for cls in np.unique(labels[labels >= 0]):  # label -1: a record outside the selected classes
        members = indices[subset_labels == cls]
        if len(members) < k:
            name = class_names[cls] if class_names else str(cls)
            raise ValueError(
                f"few_shot={k} but class {cls} ('{name}') has only {len(members)} training images"
                f"{' after the validation hold-out' if len(indices) < len(labels) else ''}; lower few_shot."
            )
        picked.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def shard_size(num_records: int, num_shards: int, shard_id: int, pad: bool) -> int:
    if pad:
        return math.ceil(num_records / num_shards)
    return len(range(shard_id, num_records, num_shards))


class EpochSampler(ds.Sampler):
    """Per-epoch shuffle (seeded by (seed, epoch)), then this rank's shard.

    With `pad` the epoch order wraps around so every shard has the same length (data-parallel
    ranks must run the same number of steps); without it the shards are disjoint and cover the
    records exactly once (evaluation). With `drop_remainder` each epoch is cut to whole batches,
    so the batches form one stream and `start_step` resumes it exactly where a run stopped: the
    first epoch a resumed iterator yields is steps start_step .. start_step + batches_per_epoch - 1.
    """

    def __init__(
        self,
        indices: np.ndarray,
        *,
        shuffle: bool,
        seed: int,
        num_shards: int,
        shard_id: int,
        pad: bool,
        batch_size: int,
        drop_remainder: bool,
        start_step: int = 0,
    ):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.shuffle, self.seed = shuffle, seed
        self.num_shards, self.shard_id, self.pad = num_shards, shard_id, pad
        self.per_shard = shard_size(len(self.indices), num_shards, shard_id, pad)
        self.epoch_length = (self.per_shard // batch_size) * batch_size if drop_remainder else self.per_shard
        self.start = start_step * batch_size
        self._epochs_started = 0
        super().__init__()

    def __len__(self) -> int:
        return self.epoch_length

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The records this shard sees in `epoch`, in order (before batching)."""
        order = np.random.default_rng([self.seed, _EPOCH_STREAM, epoch]).permutation(self.indices) if self.shuffle else self.indices
        if self.pad:
            order = np.resize(order, self.per_shard * self.num_shards)
        return order[self.shard_id :: self.num_shards][: self.epoch_length]

    def __iter__(self):
        # MindSpore calls __iter__ once per epoch on the iterator's own copy of the sampler.
        first = self.start + self._epochs_started * self.epoch_length
        self._epochs_started += 1
        position = first
        while position < first + self.epoch_length:
            epoch, offset = divmod(position, self.epoch_length)
            chunk = self.epoch_order(epoch)[offset : offset + first + self.epoch_length - position]
            yield from (int(i) for i in chunk)
            position += len(chunk)
