"""bit_zoo.data: the official CIFAR binary layouts, class folders and digits through create_loader.

The CIFAR files are full size (MindSpore's readers want every record) and written once per
session; each record stamps its own index into its first three pixels so tests can check which
records a loader yields, in which order.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from mindspore.dataset.vision import Inter
from PIL import Image

from bit_zoo.data import (
    BadImageError,
    BatchMixup,
    EpochSampler,
    check_num_classes,
    create_loader,
    dataset_num_classes,
    describe_change,
    few_shot_indices,
    val_split_indices,
)
from bit_zoo.data.sources import CIFAR100_CLASSES, digits_partition
from bit_zoo.data.transforms import rand_augment

CIFAR10_RECORD, CIFAR100_RECORD = 3073, 3074


def _cifar_records(rng, count: int, record: int, labels: list[tuple[int, int]], first_index: int) -> np.ndarray:
    """Random records; label bytes from `labels` [(offset, classes)], pixels 0..2 stamp the global index."""
    out = rng.integers(0, 256, (count, record), dtype=np.uint8)
    for offset, classes in labels:
        out[:, offset] = rng.integers(0, classes, count)
    index = np.arange(first_index, first_index + count)
    pixels = record - 3072  # the image follows the label bytes, channel-major (R plane first)
    out[:, pixels], out[:, pixels + 1], out[:, pixels + 2] = index // 65536, (index // 256) % 256, index % 256
    return out


@pytest.fixture(scope="session")
def data_cifar10_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cifar-10-batches-bin"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        _cifar_records(rng, 10000, CIFAR10_RECORD, [(0, 10)], 10000 * i).tofile(root / f"data_batch_{i + 1}.bin")
    _cifar_records(rng, 10000, CIFAR10_RECORD, [(0, 10)], 0).tofile(root / "test_batch.bin")
    (root / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
    return root


@pytest.fixture(scope="session")
def data_cifar100_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "cifar-100-binary"
    root.mkdir()
    rng = np.random.default_rng(1)
    _cifar_records(rng, 50000, CIFAR100_RECORD, [(0, 20), (1, 100)], 0).tofile(root / "train.bin")
    _cifar_records(rng, 10000, CIFAR100_RECORD, [(0, 20), (1, 100)], 0).tofile(root / "test.bin")
    return root


def _labels(path, record: int, offset: int) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8).reshape(-1, record)[:, offset].astype(np.int64)


def _write_images(root, counts: dict[str, int], rng) -> None:
    for cls, count in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            h, w = rng.integers(20, 48, 2)
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            image.save(root / cls / (f"{i}.png" if i % 2 else f"{i}.JPEG"))


@pytest.fixture(scope="session")
def data_imagenet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(2)
    _write_images(root / "train", {"n01": 5, "n02": 4, "n03": 3}, rng)
    _write_images(root / "val", {"n01": 2, "n02": 2, "n03": 1}, rng)
    return root


def _batches(info):
    return list(info.dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))


def _stamps(images: np.ndarray) -> np.ndarray:
    """Recover the stamped record index from eval-transformed (identity resize, [-1, 1]) CIFAR images."""
    pixels = np.rint(images[:, 0, 0, :3] * 127.5 + 127.5).astype(np.int64)
    return pixels[:, 0] * 65536 + pixels[:, 1] * 256 + pixels[:, 2]


# ----------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("transform", ["hyperrule", "seed"])
def test_cifar10_train_batches(data_cifar10_dir, transform):
    info = create_loader(
        "cifar10", str(data_cifar10_dir), "train", batch_size=8, image_size=48, resize_size=56, transform=transform, num_samples=32
    )
    assert (info.num_images, info.batches_per_epoch, info.num_classes) == (32, 4, 10)
    assert info.class_names == [f"c{i}" for i in range(10)]  # read from batches.meta.txt
    batches = _batches(info)
    assert len(batches) == info.batches_per_epoch == info.dataset.get_dataset_size()
    images, labels = batches[0]
    assert images.shape == (8, 3, 48, 48) and images.dtype == np.float32
    assert labels.shape == (8,) and labels.dtype == np.int32
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() < -0.9 and images.max() > 0.9


def test_cifar10_yields_the_records_it_reports(data_cifar10_dir):
    """Identity resize + eval transform keep the stamps: the shuffled epoch is info.indices, permuted."""
    info = create_loader(
        "cifar10", str(data_cifar10_dir), "train", batch_size=10, image_size=32, transform="eval", val_split=0.5, num_samples=40, seed=3
    )
    images, labels = map(np.concatenate, zip(*_batches(info)))
    stamps = _stamps(images)
    assert sorted(stamps) == sorted(info.indices) and list(stamps) != sorted(stamps)
    train_labels = np.concatenate([_labels(data_cifar10_dir / f"data_batch_{i}.bin", CIFAR10_RECORD, 0) for i in range(1, 6)])
    np.testing.assert_array_equal(labels, train_labels[stamps])


def test_cifar10_splits(data_cifar10_dir):
    test = create_loader("cifar10", str(data_cifar10_dir), "test", batch_size=64, image_size=32, num_samples=100)
    assert test.dataset.get_dataset_size() == test.batches_per_epoch == 2
    stamps = _stamps(np.concatenate([b[0] for b in _batches(test)]))
    np.testing.assert_array_equal(stamps, np.arange(100))  # eval: file order, not shuffled
    val = create_loader("cifar10", str(data_cifar10_dir), "val", batch_size=64, image_size=32)
    assert val.num_images == 10000  # without val_split, "val" is the official test batch
    held_out = create_loader("cifar10", str(data_cifar10_dir), "val", batch_size=64, image_size=32, val_split=1000)
    assert held_out.num_images == 1000 and held_out.indices.max() >= 10000  # drawn from the 50k train records


def test_cifar10_few_shot_and_val_split(data_cifar10_dir):
    def loader(split, seed):
        return create_loader("cifar10", str(data_cifar10_dir), split, batch_size=8, image_size=32, few_shot=5, val_split=0.1, seed=seed)

    train, val = loader("train", 0), loader("val", 0)
    assert (train.num_images, val.num_images) == (50, 5000) and not set(train.indices) & set(val.indices)
    np.testing.assert_array_equal(train.indices, loader("train", 0).indices)
    assert not np.array_equal(train.indices, loader("train", 1).indices)
    labels = np.concatenate([_labels(data_cifar10_dir / f"data_batch_{i}.bin", CIFAR10_RECORD, 0) for i in range(1, 6)])
    assert np.bincount(labels[train.indices]).tolist() == [5] * 10


def test_cifar10_class_subset(data_cifar10_dir):
    """classes=[3, 1]: only those records, relabelled 0 and 1 in that order, in train (with few-shot and a
    held-out val) and in the official test split; the yielded records are the ones reported."""
    root = str(data_cifar10_dir)
    kw = dict(batch_size=4, image_size=32, transform="eval", classes=[3, 1], seed=2)
    train = create_loader("cifar10", root, "train", few_shot=6, val_split=0.1, **kw)
    val = create_loader("cifar10", root, "val", val_split=0.1, **kw)
    test = create_loader("cifar10", root, "test", num_samples=30, **kw)
    assert (train.num_classes, train.class_names, train.num_images) == (2, ["c3", "c1"], 12)
    assert dataset_num_classes("cifar10", root, [3, 1]) == 2
    originals = np.concatenate([_labels(data_cifar10_dir / f"data_batch_{i}.bin", CIFAR10_RECORD, 0) for i in range(1, 6)])
    test_originals = _labels(data_cifar10_dir / "test_batch.bin", CIFAR10_RECORD, 0)
    assert np.bincount(originals[train.indices], minlength=10)[[3, 1]].tolist() == [6, 6]
    assert set(originals[val.indices]) == {1, 3} and not set(train.indices) & set(val.indices)
    assert len(val.indices) == round(0.1 * np.isin(originals, [3, 1]).sum())  # the hold-out is 10% of the subset
    for info, source_labels in ((train, originals), (test, test_originals)):
        images, labels = map(np.concatenate, zip(*_batches(info)))
        stamps = _stamps(images)
        assert sorted(stamps) == sorted(info.indices)
        np.testing.assert_array_equal(labels, np.where(source_labels[stamps] == 3, 0, 1))
    mixed = create_loader("cifar10", root, "train", num_samples=8, mixup_alpha=0.2, **kw)
    assert _batches(mixed)[0][1].shape == (4, 2)  # soft targets over the subset's classes
    with pytest.raises(ValueError, match=r"classes \[10\] are out of range.*labels 0..9"):
        create_loader("cifar10", root, "test", batch_size=4, image_size=32, classes=[1, 10])
    with pytest.raises(ValueError, match="lists a label twice"):
        dataset_num_classes("digits", None, [1, 1])
    with pytest.raises(ValueError, match="model has 10 output classes but .* has 2"):
        create_loader("cifar10", root, "test", batch_size=4, image_size=32, classes=[3, 1], num_classes=10)


def test_cifar100(data_cifar100_dir):
    info = create_loader("cifar100", str(data_cifar100_dir.parent), "test", batch_size=16, image_size=32, num_samples=20)
    assert info.num_classes == 100 and info.class_names == CIFAR100_CLASSES and len(set(CIFAR100_CLASSES)) == 100
    images, labels = map(np.concatenate, zip(*_batches(info)))
    assert images.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(labels, _labels(data_cifar100_dir / "test.bin", CIFAR100_RECORD, 1)[:20])  # fine labels
    train = create_loader("cifar100", str(data_cifar100_dir), "train", batch_size=8, image_size=32, few_shot=1)
    assert train.num_images == 100 and sorted(_labels(data_cifar100_dir / "train.bin", CIFAR100_RECORD, 1)[train.indices]) == list(
        range(100)
    )


# ------------------------------------------------------------------------------------ folders, digits


def test_imagenet_folders(data_imagenet_dir):
    train = create_loader("imagenet", str(data_imagenet_dir), "train", batch_size=4, image_size=32, seed=1)
    assert (train.num_images, train.batches_per_epoch, train.class_names) == (12, 3, ["n01", "n02", "n03"])
    assert dataset_num_classes("imagenet", str(data_imagenet_dir)) == 3
    images, labels = _batches(train)[0]
    assert images.shape == (4, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    val = create_loader("imagenet", str(data_imagenet_dir), "val", batch_size=4, image_size=40)
    labels = np.concatenate([b[1] for b in _batches(val)])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2])  # eval keeps the last, partial batch


def test_folder_without_split_dirs(tmp_path):
    _write_images(tmp_path / "flowers", {"daisy": 4, "rose": 4}, np.random.default_rng(3))
    root = str(tmp_path / "flowers")
    train = create_loader("folder", root, "train", batch_size=2, image_size=24, val_split=2, seed=5)
    val = create_loader("folder", root, "val", batch_size=2, image_size=24, val_split=2, seed=5)
    assert (train.num_images, val.num_images) == (6, 2) and not set(train.indices) & set(val.indices)
    assert sum(b[0].shape[0] for b in _batches(val)) == 2
    with pytest.raises(FileNotFoundError, match="no test/ folder.*val_split"):
        create_loader("folder", root, "test", batch_size=2, image_size=24)


def test_digits():
    train = create_loader("digits", None, "train", batch_size=32, image_size=32, hflip=False, mixup_alpha=0.2, label_smoothing=0.1)
    test = create_loader("digits", None, "test", batch_size=100, image_size=32)
    assert (train.num_images, test.num_images, train.num_classes) == (1438, 359, 10)
    assert dataset_num_classes("digits", None) == 10
    train_idx, test_idx = digits_partition(np.repeat(np.arange(10), 180))
    assert not set(train_idx) & set(test_idx) and len(train_idx) + len(test_idx) == 1800
    images, labels = _batches(test)[-1]
    assert images.shape == (59, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    images, targets = _batches(train)[0]
    assert images.shape == (32, 3, 32, 32) and targets.shape == (32, 10) and targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    assert targets.min() > 0  # label smoothing leaves no exact zeros


# -------------------------------------------------------------------------------- subsets and order


def test_few_shot_reproducible_and_disjoint_from_val():
    labels = np.repeat(np.arange(5), 20)
    train, val = val_split_indices(len(labels), 0.2, seed=0)
    shots = few_shot_indices(train, labels, 3, seed=0)
    np.testing.assert_array_equal(shots, few_shot_indices(train, labels, 3, seed=0))
    assert not np.array_equal(shots, few_shot_indices(train, labels, 3, seed=1))
    assert np.bincount(labels[shots]).tolist() == [3] * 5 and len(set(shots)) == 15
    assert not set(shots) & set(val)
    train_b, val_b = val_split_indices(len(labels), 0.2, seed=1)
    assert not np.array_equal(val, val_b)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    assert len(val_split_indices(100, 7, seed=0)[1]) == 7


def test_shards_disjoint_and_covering():
    indices = np.arange(103)
    kwargs = dict(shuffle=False, seed=0, num_shards=2, batch_size=10, drop_remainder=False)
    shards = [list(EpochSampler(indices, shard_id=r, pad=False, **kwargs)) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(103))
    # Training pads so both ranks run the same number of steps; each epoch covers every record.
    train = [EpochSampler(indices, **{**kwargs, "shuffle": True, "drop_remainder": True}, shard_id=r, pad=True) for r in (0, 1)]
    orders = [s.epoch_order(0) for s in train]
    assert len(orders[0]) == len(orders[1]) == 50
    full = [EpochSampler(indices, **{**kwargs, "shuffle": True}, shard_id=r, pad=True).epoch_order(0) for r in (0, 1)]
    assert set(full[0]) | set(full[1]) == set(range(103)) and len(full[0]) == len(full[1]) == 52


def test_loader_shards(data_imagenet_dir):
    ranks = [
        create_loader("imagenet", str(data_imagenet_dir), "val", batch_size=2, image_size=24, num_shards=2, shard_id=r) for r in (0, 1)
    ]
    assert [r.num_images for r in ranks] == [3, 2] and [r.batches_per_epoch for r in ranks] == [2, 1]
    labels = [np.concatenate([b[1] for b in _batches(r)]) for r in ranks]
    assert sorted(np.concatenate(labels).tolist()) == [0, 0, 1, 1, 2]


def test_epochs_reshuffle_and_resume():
    sampler = EpochSampler(np.arange(50), shuffle=True, seed=4, num_shards=1, shard_id=0, pad=False, batch_size=8, drop_remainder=True)
    assert len(sampler) == 48
    epochs = [list(sampler) for _ in range(4)]  # MindSpore calls __iter__ once per epoch
    assert epochs[0] != epochs[1] and sorted(epochs[0]) != list(range(48))  # new order each epoch, remainder varies
    stream = sum(epochs, [])
    resumed = EpochSampler(
        np.arange(50), shuffle=True, seed=4, num_shards=1, shard_id=0, pad=False, batch_size=8, drop_remainder=True, start_step=7
    )
    assert list(resumed) + list(resumed) == stream[7 * 8 : 7 * 8 + 96]


def test_loader_resume_with_mixup():
    """A loader started at step 5 yields the batches (images and mixed targets) of the uninterrupted run."""
    kwargs = dict(batch_size=100, image_size=8, transform="eval", mixup_alpha=0.4, label_smoothing=0.1, seed=2)
    full = create_loader("digits", None, "train", **kwargs)
    assert full.batches_per_epoch == 14
    full.dataset.output_shapes()  # shape queries pull a batch through a copy: must not move the stream
    stream = list(full.dataset.create_tuple_iterator(num_epochs=2, output_numpy=True))
    resumed = create_loader("digits", None, "train", start_step=5, **kwargs)
    tail = list(resumed.dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))
    assert len(tail) == 14
    for (image, target), (image_r, target_r) in zip(stream[5:19], tail):
        np.testing.assert_array_equal(image, image_r)
        np.testing.assert_array_equal(target, target_r)


def test_same_seed_same_order(data_cifar10_dir):
    def stamps(seed):
        info = create_loader(
            "cifar10", str(data_cifar10_dir), "train", batch_size=10, image_size=32, transform="eval", num_samples=30, seed=seed
        )
        return _stamps(np.concatenate([b[0] for b in _batches(info)])).tolist()

    first = stamps(0)
    assert first == stamps(0) and first != stamps(1)


def test_mixup_targets():
    images = np.stack([np.full((3, 2, 2), v, np.float32) for v in (0.0, 1.0)])
    mix = BatchMixup(4, alpha=1.0, label_smoothing=0.1, seed=0)
    lam = mix.lam(0)
    assert 0 < lam < 1 and lam != mix.lam(1)
    mixed, targets = mix.mix(images, np.array([1, 3], np.int32), step=0)
    np.testing.assert_allclose(mixed[0], 1 - lam, rtol=1e-6)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0], [0.025, 0.025 + 0.9 * lam, 0.025, 0.025 + 0.9 * (1 - lam)], rtol=1e-5)


def test_rand_augment_from_mindcv():
    augment = rand_augment(2, 20, Inter.BICUBIC)
    assert augment.num_layers == 2 and {op.magnitude_std for op in augment.ops} == {0}
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    random.seed(0)  # mindcv's RandAugment draws from the global generators
    np.random.seed(0)
    outputs = [augment(image) for _ in range(32)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outputs)
    assert sum(not np.array_equal(o, image) for o in outputs) >= 16  # two ops at p=0.5 each: most images change


# ---------------------------------------------------------------------------------------- bad input


def test_cifar_missing_or_malformed(tmp_path, data_cifar10_dir):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        create_loader("cifar10", str(tmp_path / "nowhere"), "train", batch_size=8, image_size=32)
    (tmp_path / "pickles").mkdir()
    (tmp_path / "pickles" / "data_batch_1").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_1\.bin.*official binary release"):
        create_loader("cifar10", str(tmp_path / "pickles"), "train", batch_size=8, image_size=32)
    short = tmp_path / "short"
    short.mkdir()
    (short / "test_batch.bin").write_bytes((data_cifar10_dir / "test_batch.bin").read_bytes()[: 5000 * CIFAR10_RECORD])
    with pytest.raises(ValueError, match=r"test_batch\.bin' has 15365000 bytes, expected 30730000"):
        create_loader("cifar10", str(short), "test", batch_size=8, image_size=32)
    with pytest.raises(ValueError, match="needs data_dir"):
        create_loader("cifar100", None, "train", batch_size=8, image_size=32)


def test_folder_errors(tmp_path, data_imagenet_dir):
    _write_images(tmp_path / "inet" / "train", {"a": 2}, np.random.default_rng(4))
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        create_loader("imagenet", str(tmp_path / "inet"), "train", batch_size=1, image_size=24)
    (tmp_path / "inet" / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class folder '.*val/a' holds no images"):
        create_loader("imagenet", str(tmp_path / "inet"), "val", batch_size=1, image_size=24)
    _write_images(tmp_path / "inet" / "val" / "b", {"x": 1}, np.random.default_rng(5))
    (tmp_path / "inet" / "val" / "b" / "x" / "0.JPEG").rename(tmp_path / "inet" / "val" / "b" / "0.JPEG")
    (tmp_path / "inet" / "val" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"do not match the training split's 1 classes.*unexpected: \['b'\]"):
        create_loader("imagenet", str(tmp_path / "inet"), "val", batch_size=1, image_size=24)
    (tmp_path / "inet" / "val" / "b" / "0.JPEG").unlink()
    (tmp_path / "inet" / "val" / "b" / "x").rmdir()
    (tmp_path / "inet" / "val" / "b").rmdir()
    with pytest.raises(BadImageError, match=r"1 of 1 images cannot be decoded: '.*val/a/0\.png'.*strict_images false"):
        create_loader("imagenet", str(tmp_path / "inet"), "val", batch_size=1, image_size=24, strict_images=True)
    info = create_loader("imagenet", str(tmp_path / "inet"), "val", batch_size=1, image_size=24)
    with pytest.raises(RuntimeError, match=r"none of the 1 images of this split can be decoded"):
        _batches(info)
    with pytest.raises(ValueError, match="model has 1000 output classes but .* has 3; build the model with num_classes=3"):
        create_loader("imagenet", str(data_imagenet_dir), "train", batch_size=2, image_size=24, num_classes=1000)
    with pytest.raises(ValueError, match="model has 10 output classes but data has 3"):
        check_num_classes(10, 3, name="data")


def test_subset_errors(data_imagenet_dir):
    root = str(data_imagenet_dir)
    with pytest.raises(ValueError, match=r"few_shot=4 but class 2 \('n03'\) has only 3 training images; lower few_shot"):
        create_loader("imagenet", root, "train", batch_size=2, image_size=24, few_shot=4)
    with pytest.raises(ValueError, match="after the validation hold-out"):
        create_loader("imagenet", root, "train", batch_size=2, image_size=24, few_shot=3, val_split=0.5)
    with pytest.raises(ValueError, match="val_split=12 holds out 12 of 12"):
        create_loader("imagenet", root, "val", batch_size=2, image_size=24, val_split=12)
    with pytest.raises(ValueError, match="less than batch_size=64 with drop_remainder"):
        create_loader("imagenet", root, "train", batch_size=64, image_size=24)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        create_loader("mnist", None, "train", batch_size=2, image_size=24)
    with pytest.raises(ValueError, match="random crop needs resize_size >= image_size"):
        create_loader("digits", None, "train", batch_size=2, image_size=32, resize_size=16)


# ------------------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("transform", ["hyperrule", "seed"])
def test_train_augmentation_resumes_exactly(transform):
    """Random crop, flip, RandAugment and mixup are keyed by (seed, step, position): a loader started at
    step 5 yields the uninterrupted stream's batches bit for bit, whatever MindSpore's and Python's global seeds."""
    import mindspore.dataset as ds

    kw = dict(batch_size=50, image_size=32, transform=transform, mixup_alpha=0.2, seed=3, num_workers=2)

    def stream(start_step: int, global_seed: int, epochs: int):
        ds.config.set_seed(global_seed)
        random.seed(global_seed)
        np.random.seed(global_seed)
        info = create_loader("digits", None, "train", start_step=start_step, **kw)
        iterator = info.dataset.create_tuple_iterator(num_epochs=epochs, output_numpy=True)
        return [batch for _ in range(epochs) for batch in iterator], info.batches_per_epoch

    full, per_epoch = stream(0, 1, 2)
    resumed, _ = stream(5, 7, 1)
    assert len(resumed) == per_epoch == 28
    for step, (a, b) in enumerate(zip(full[5:], resumed), start=5):
        np.testing.assert_array_equal(a[0], b[0], err_msg=f"images of step {step}")
        np.testing.assert_array_equal(a[1], b[1], err_msg=f"targets of step {step}")
    # the augmentation is random all the same: the same records cropped differently in two epochs
    plain = create_loader("digits", None, "train", **{**kw, "transform": "eval", "mixup_alpha": 0.0, "image_size": 32})
    assert not np.array_equal(full[0][0], full[per_epoch][0]) and plain.batches_per_epoch == per_epoch


def test_train_augment_per_sample():
    from bit_zoo.data.transforms import TrainAugment, rand_augment

    image = np.random.default_rng(0).integers(0, 256, (37, 37, 3), dtype=np.uint8)
    augment = TrainAugment(image_size=32, hflip=True, randaugment=rand_augment(2, 20, Inter.BICUBIC), mean=(0.5,) * 3, std=(0.5,) * 3)
    outs = [augment.for_sample(image, step=s, position=p) for s in range(4) for p in range(4)]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    batch = augment.normalize(np.stack(outs))
    assert batch.shape == (16, 3, 32, 32) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[5], outs[5].transpose(2, 0, 1) / 127.5 - 1.0, rtol=1e-6, atol=1e-6)
    assert len({o.tobytes() for o in outs}) == len(outs)  # every (step, position) gets its own draw
    random.seed(5)  # the global generators mindcv's RandAugment would use play no part
    np.random.seed(5)
    np.testing.assert_array_equal(augment.for_sample(image, step=2, position=3), outs[2 * 4 + 3])


# ------------------------------------------------------------------------------ bad images, bad file systems


def _corrupt_folder(root, rng):
    _write_images(root / "train", {"a": 4, "b": 3}, rng)
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(rng.bytes(500))  # random bytes named .png
    return bad


def test_undecodable_image_is_skipped_replaced_and_counted(tmp_path, caplog):
    root = tmp_path / "folder"
    bad = _corrupt_folder(root, np.random.default_rng(6))
    kw = dict(batch_size=7, image_size=24, transform="eval", shuffle=False)
    with caplog.at_level("WARNING", logger="bit_zoo.data.sources"):
        info = create_loader("folder", str(root), "train", **kw)
        iterator = info.dataset.create_tuple_iterator(num_epochs=2, output_numpy=True)
        epochs = [list(iterator) for _ in range(2)]
    assert [len(e) for e in epochs] == [1, 1] and epochs[0][0][0].shape == (7, 3, 24, 24)  # batch shape and schedule hold
    images, labels = epochs[1][0]
    np.testing.assert_array_equal(images[1], images[2])  # a/1.png replaced by the next image in file order, a/2.png
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert len(info.bad_images) == 1 and list(info.bad_images.paths) == [str(bad)]
    warnings = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(warnings) == 1 and str(bad) in warnings[0]  # once, though the file was met twice


def test_strict_images(tmp_path):
    root = tmp_path / "folder"
    bad = _corrupt_folder(root, np.random.default_rng(7))
    with pytest.raises(BadImageError, match=rf"1 of 7 images cannot be decoded: '{bad}'"):
        create_loader("folder", str(root), "train", batch_size=7, image_size=24, strict_images=True)
    good = root / "train" / "a" / "0.JPEG"
    bad.write_bytes(good.read_bytes())
    info = create_loader("folder", str(root), "train", batch_size=7, image_size=24, transform="eval", strict_images=True)
    (root / "train" / "b" / "2.JPEG").write_bytes(b"broken after the check")
    with pytest.raises(RuntimeError):  # MindSpore wraps the source's error; the clean one is kept for the loop
        _batches(info)
    assert isinstance(info.bad_images.error, BadImageError) and "b/2.JPEG" in str(info.bad_images.error)


def test_changed_dataset_is_described(tmp_path):
    root = tmp_path / "folder"
    _write_images(root / "train", {"cat": 4, "dog": 3}, np.random.default_rng(8))
    kw = dict(batch_size=2, image_size=24)
    before = create_loader("folder", str(root), "train", **kw).fingerprint
    assert describe_change(before, create_loader("folder", str(root), "train", **kw).fingerprint) is None
    (root / "train" / "dog" / "1.png").unlink()
    after = create_loader("folder", str(root), "train", **kw)
    message = describe_change(before, after.fingerprint, after.class_names)
    assert "7 training images then, 6 now" in message and "class 'dog': 3 -> 2 images" in message and "--output_dir NEW" in message
    (root / "train" / "dog" / "9.png").write_bytes((root / "train" / "dog" / "0.JPEG").read_bytes())  # same counts, other file
    renamed = create_loader("folder", str(root), "train", **kw).fingerprint
    assert "the same counts but different files" in describe_change(before, renamed)


def test_symlink_loops_and_permission_errors_are_one_clear_error(tmp_path, monkeypatch):
    import os

    root = tmp_path / "folder"
    _write_images(root / "train", {"a": 2, "b": 2}, np.random.default_rng(9))
    (tmp_path / "self").symlink_to("self")
    with pytest.raises(ValueError, match=r"'.*self' is a symbolic link loop.*Remove or repoint it"):
        create_loader("folder", str(tmp_path / "self"), "train", batch_size=2, image_size=24)
    (root / "train" / "c").symlink_to("c")  # a class folder that loops
    with pytest.raises(ValueError, match=r"'.*train/c' is a symbolic link loop"):
        dataset_num_classes("folder", str(root))
    (root / "train" / "c").unlink()
    (root / "train" / "a" / "x.png").symlink_to("x.png")  # an image that loops
    with pytest.raises(ValueError, match=r"'.*train/a/x\.png' is a symbolic link loop"):
        create_loader("folder", str(root), "train", batch_size=2, image_size=24)
    (root / "train" / "a" / "x.png").unlink()

    real_scandir = os.scandir

    def denied(path="."):  # root ignores permissions, so the error is injected
        if str(path).endswith("/b"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(ValueError, match=r"cannot read '.*train/b': permission denied\. Make it readable"):
        create_loader("folder", str(root), "train", batch_size=2, image_size=24)


# ------------------------------------------------------------------------------ high bit depth


def _png16(path, samples: np.ndarray) -> None:
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit RGB): grey (H, W) or RGB (H, W, 3) uint16."""
    import struct
    import zlib

    h, w = samples.shape[:2]
    color_type = 0 if samples.ndim == 2 else 2
    raw = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    """16-bit grey and RGB PNGs, 32-bit integer and float TIFFs decode to the 8-bit image they hold (within
    rounding), in the folder datasets and in predict (one decode). PIL's convert("RGB") clips I;16/I/F at
    255: this 16-bit grey ramp came out 99 % white."""
    from bit_zoo.data.sources import decode_image

    rng = np.random.default_rng(4)
    grey8 = rng.integers(0, 256, (12, 16)).astype(np.uint8)
    rgb8 = rng.integers(0, 256, (12, 16, 3)).astype(np.uint8)
    expect_grey = np.repeat(grey8[..., None], 3, axis=2).astype(int)
    _png16(tmp_path / "grey16.png", grey8.astype(np.uint16) * 257)  # 8-bit v -> 16-bit v * 257: the same brightness
    _png16(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 256 + rng.integers(0, 256, rgb8.shape).astype(np.uint16))
    Image.fromarray(grey8.astype(np.int32) * 257).save(tmp_path / "grey32.tif")  # mode I
    Image.fromarray(grey8.astype(np.float32) / 255).save(tmp_path / "float.tif")  # mode F, [0, 1]
    assert Image.open(tmp_path / "grey16.png").mode == "I;16" and Image.open(tmp_path / "grey32.tif").mode == "I"
    for name, expected in (("grey16.png", expect_grey), ("grey32.tif", expect_grey), ("float.tif", expect_grey), ("rgb16.png", rgb8)):
        image = decode_image(str(tmp_path / name))
        assert image.dtype == np.uint8 and image.shape == (12, 16, 3), name
        assert np.abs(image.astype(int) - expected).max() <= 1, name
    # through the folder dataset: the 16-bit image and its 8-bit twin give the same batch
    root = tmp_path / "folder" / "train"
    (root / "a").mkdir(parents=True)
    Image.fromarray(grey8).save(root / "a" / "0_grey8.png")
    _png16(root / "a" / "1_grey16.png", grey8.astype(np.uint16) * 257)
    info = create_loader("folder", str(tmp_path / "folder"), "train", batch_size=2, image_size=16, transform="eval", shuffle=False)
    images, _ = next(info.dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))
    np.testing.assert_allclose(images[1], images[0], atol=2 / 255 * 2)  # normalised to [-1, 1]: 1 level = 2/255
