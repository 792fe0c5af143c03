"""Where the records come from: CIFAR binaries, class folders, scikit-learn digits.

A `Source` is one split as the upstream files lay it out: a label per record in reading order
and a builder that turns a sampler of record indices into a `mindspore.dataset` pipeline with the
columns ``image`` (HWC uint8 RGB) and ``label`` (int32). Subsets (few-shot, validation hold-out,
shards) are index lists handed to that sampler, so every subset is a plain, testable numpy array.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# fine_label_names.txt of cifar-100-binary, in label order.
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
    "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail "
    "snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout "
    "tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

# (record bytes, label byte offset, files per usage, records per file) of the official binary releases.
_CIFAR_LAYOUT = {
    "cifar10": dict(
        record=3073,
        label_offset=0,
        files={"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
        records={"train": 10000, "test": 10000},
        subdir="cifar-10-batches-bin",
        meta="batches.meta.txt",
        classes=CIFAR10_CLASSES,
    ),
    "cifar100": dict(
        record=3074,
        label_offset=1,  # byte 0 is the coarse label, byte 1 the fine label we train on
        files={"train": ["train.bin"], "test": ["test.bin"]},
        records={"train": 50000, "test": 10000},
        subdir="cifar-100-binary",
        meta="fine_label_names.txt",
        classes=CIFAR100_CLASSES,
    ),
}

DIGITS_TEST_FRACTION = 0.2
_DIGITS_PARTITION_SEED = 20_240_611  # fixed: the digits train/test partition never depends on `seed`


@dataclass
class Source:
    """One split of one dataset, before subsetting, sharding and transforms."""

    labels: np.ndarray  # int64 [num_records], in the order the reader yields records
    num_classes: int
    class_names: list[str] | None
    build: Callable  # (sampler, num_workers) -> mindspore Dataset with columns image, label
    description: str


def _require_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: '{path}' is not a directory. {fix}")
    return path


# --------------------------------------------------------------------------------------------- CIFAR


def _cifar_root(name: str, data_dir: str | None) -> Path:
    layout = _CIFAR_LAYOUT[name]
    if data_dir is None:
        raise ValueError(f"{name} needs data_dir: the folder holding the official binary files ({layout['subdir']}/).")
    root = _require_dir(Path(data_dir), f"{name} data_dir", f"Point data_dir at the extracted {layout['subdir']} folder.")
    # Accept the folder the archive was extracted into as well as the binaries folder itself.
    if (root / layout["subdir"]).is_dir() and not (root / layout["files"]["test"][0]).exists():
        root = root / layout["subdir"]
    return root


def _read_cifar_labels(name: str, root: Path, usage: str) -> np.ndarray:
    layout = _CIFAR_LAYOUT[name]
    files = [root / f for f in layout["files"][usage]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.suffix == ".bin")
        raise FileNotFoundError(
            f"{name} {usage} split: missing {', '.join(missing)} in '{root}' (found .bin files: {present or 'none'}). "
            f"data_dir must hold the official binary release ({layout['subdir']}: {', '.join(layout['files'][usage])}); "
            "the python-pickle and image-folder releases are not read by this loader."
        )
    labels = []
    for f in files:
        expected = layout["records"][usage] * layout["record"]
        size = f.stat().st_size
        if size != expected:
            raise ValueError(
                f"{name}: '{f}' has {size} bytes, expected {expected} ({layout['records'][usage]} records of "
                f"{layout['record']} bytes). The file is truncated or not from the official binary release; download it again."
            )
        records = np.memmap(f, dtype=np.uint8, mode="r", shape=(layout["records"][usage], layout["record"]))
        labels.append(np.asarray(records[:, layout["label_offset"]], dtype=np.int64))
    labels = np.concatenate(labels)
    num_classes = len(layout["classes"])
    if labels.max() >= num_classes:
        raise ValueError(f"{name}: label {labels.max()} in '{root}' is out of range for {num_classes} classes; is this the right dataset?")
    return labels


def _cifar_class_names(name: str, root: Path) -> list[str]:
    layout = _CIFAR_LAYOUT[name]
    meta = root / layout["meta"]
    if meta.is_file():
        names = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
        if len(names) == len(layout["classes"]):
            return names
    return list(layout["classes"])


def cifar_source(name: str, data_dir: str | None, usage: str) -> Source:
    import mindspore.dataset as ds

    root = _cifar_root(name, data_dir)
    labels = _read_cifar_labels(name, root, usage)

    def build(sampler, num_workers: int):
        if name == "cifar10":
            dataset = ds.Cifar10Dataset(str(root), usage=usage, sampler=sampler, num_parallel_workers=num_workers)
        else:
            dataset = ds.Cifar100Dataset(str(root), usage=usage, sampler=sampler, num_parallel_workers=num_workers)
            dataset = dataset.project(["image", "fine_label"]).rename(["fine_label"], ["label"])
        return dataset

    return Source(labels, len(_CIFAR_LAYOUT[name]["classes"]), _cifar_class_names(name, root), build, f"{name} {usage} ({root})")


# ------------------------------------------------------------------------------------ class folders


def class_folder_names(root: Path) -> list[str]:
    """The class folders under `root`, sorted by name: label i is the i-th folder."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"'{root}' has no class folders. Expected {root}/<class_name>/<image>.jpg (one folder per class).")
    return classes


def scan_class_folders(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Class folders sorted by name, images sorted by path: (class_names, paths, labels)."""
    classes = class_folder_names(root)
    paths, labels = [], []
    for index, cls in enumerate(classes):
        files = sorted(
            str(root / cls / e.name)
            for e in os.scandir(root / cls)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")
        )
        if not files:
            raise ValueError(
                f"class folder '{root / cls}' holds no images ({', '.join(IMAGE_EXTENSIONS)}). "
                "Remove the empty folder or add its images: every class folder becomes a class."
            )
        paths += files
        labels += [index] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


class _ImageFiles:
    """Random-access source for GeneratorDataset: decodes with PIL so a bad file is reported by path."""

    def __init__(self, paths: list[str], labels: np.ndarray):
        self.paths = paths
        self.labels = labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        path = self.paths[index]
        # Unreadable images fail the run, naming the file: silently skipping would change the
        # number of images and the class balance behind the reported accuracy.
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except Exception as error:  # PIL raises several unrelated types for corrupt files
            raise RuntimeError(f"cannot decode image '{path}': {error}. Delete or replace the file.") from error
        return array, self.labels[index]


def folder_source(root: Path, class_names: list[str] | None = None) -> Source:
    """Class folders under `root`. `class_names` fixes the label order (val must follow train)."""
    import mindspore.dataset as ds

    found, paths, labels = scan_class_folders(root)
    if class_names is not None and found != class_names:
        missing, extra = sorted(set(class_names) - set(found)), sorted(set(found) - set(class_names))
        raise ValueError(
            f"class folders of '{root}' do not match the training split's {len(class_names)} classes "
            f"(missing: {missing[:10] or 'none'}, unexpected: {extra[:10] or 'none'}). Every split needs the same class folders."
        )

    def build(sampler, num_workers: int):
        return ds.GeneratorDataset(
            _ImageFiles(paths, labels),
            column_names=["image", "label"],
            sampler=sampler,
            num_parallel_workers=num_workers,
            python_multiprocessing=False,  # PIL decodes outside the GIL; threads avoid forking big processes
        )

    return Source(labels, len(found), found, build, f"image folders ({root})")


def resolve_folder_splits(name: str, data_dir: str | None) -> dict[str, Path]:
    """Split name -> class-folder root. A data_dir with no split folders is a single 'train' split."""
    if data_dir is None:
        raise ValueError(f"{name} needs data_dir: a folder with train/ and val/ class folders.")
    root = _require_dir(Path(data_dir), f"{name} data_dir", "Point data_dir at the dataset root.")
    splits = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if name == "imagenet":
        missing = [s for s in ("train", "val") if s not in splits]
        if missing:
            raise FileNotFoundError(
                f"imagenet data_dir '{root}' has no {' or '.join(m + '/' for m in missing)} folder. Expected "
                f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (validation images sorted into class folders)."
            )
        return splits
    return splits if "train" in splits else {"train": root}


# ------------------------------------------------------------------------------------------- digits


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 grey levels 0..16 -> uint8 RGB; the transforms upsample to the model's input size.
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target.astype(np.int64)


def digits_partition(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified 80/20 train/test partition of scikit-learn's digits (same for every seed)."""
    rng = np.random.default_rng(_DIGITS_PARTITION_SEED)
    test = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.append(members[: int(round(len(members) * DIGITS_TEST_FRACTION))])
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(labels)), test), test


def digits_source(usage: str) -> Source:
    import mindspore.dataset as ds

    images, labels = _digits_arrays()
    train, test = digits_partition(labels)
    keep = train if usage == "train" else test
    images, labels = images[keep], labels[keep]

    def build(sampler, num_workers: int):
        return ds.NumpySlicesDataset(
            (images, labels.astype(np.int32)), column_names=["image", "label"], sampler=sampler, num_parallel_workers=1
        )

    return Source(labels, 10, [str(i) for i in range(10)], build, f"scikit-learn digits {usage} partition")


# ------------------------------------------------------------------------------------ class subsets


def check_classes(classes, num_classes: int, description: str) -> list[int]:
    """A class subset as a list of distinct label ids of a `num_classes`-class dataset, or a clear error."""
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError(f"classes=[] selects nothing from {description}; list label ids, or leave classes unset for all.")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are out of range for {description}, which has labels 0..{num_classes - 1}.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes={classes} lists a label twice; list each label id once.")
    return classes


def select_classes(source: Source, classes) -> Source:
    """The records of `classes` only, relabelled 0..len(classes)-1 in the order given.

    Records of other classes get label -1 and are never sampled (`create_loader` starts from the
    records with a label >= 0). The labels are remapped in the pipeline too, so a model sees
    exactly len(classes) classes: the subset is a dataset of its own, as for BiT's transfer tasks.
    """
    classes = check_classes(classes, source.num_classes, source.description)
    lut = np.full(source.num_classes, -1, dtype=np.int64)
    lut[classes] = np.arange(len(classes))
    inner = source.build

    def build(sampler, num_workers: int):
        def remap(label):
            return np.asarray(lut[label], dtype=label.dtype)

        return inner(sampler, num_workers).map(operations=remap, input_columns="label")

    names = [source.class_names[c] for c in classes] if source.class_names else None
    return Source(lut[source.labels], len(classes), names, build, f"{source.description}, classes {classes}")
