"""Where the records come from: CIFAR binaries, class folders, scikit-learn digits.

A `Source` is one split as the upstream files lay it out: a label per record in reading order
and a builder that turns a sampler of record indices into a `mindspore.dataset` pipeline with the
columns ``image`` (HWC uint8 RGB) and ``label`` (int32). Subsets (few-shot, validation hold-out,
shards) are index lists handed to that sampler, so every subset is a plain, testable numpy array.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils.remote import NOT_STAGED

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


class BadImageError(ValueError):
    """An image that cannot be decoded, with strict_images on."""


class BadImages:
    """The undecodable images a pipeline met: each named once in a warning, counted, shared by every
    copy MindSpore makes of the pipeline (deepcopy returns the same object).

    `error` holds the strict-mode failure: MindSpore re-raises a source's exception as a
    RuntimeError wrapped in its own call stack, so the training loop raises `error` instead.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.paths: dict[str, str] = {}  # path -> decoder message, in the order met
        self.error: BadImageError | None = None

    def __deepcopy__(self, memo) -> BadImages:
        return self

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, path: str, message: str) -> bool:
        """Record a bad image; True the first time this path is seen."""
        with self._lock:
            if path in self.paths:
                return False
            self.paths[path] = message
            return True


@dataclass
class Source:
    """One split of one dataset, before subsetting, sharding and transforms."""

    labels: np.ndarray  # int64 [num_records], in the order the reader yields records
    num_classes: int
    class_names: list[str] | None
    build: Callable  # (sampler, num_workers) -> mindspore Dataset with columns image, label
    description: str
    bad_images: BadImages = field(default_factory=BadImages)  # stays empty for CIFAR and digits
    record_names: list[str] | None = None  # file paths of a folder source (for the dataset fingerprint)
    record_root: Path | None = None  # the folder record_names are relative to (content_fingerprint reads the files)


def _fs_error(path, error: OSError) -> ValueError:
    """A file-system error met while reading a dataset, as one line with the fix."""
    if error.errno == errno.ELOOP:
        return ValueError(
            f"'{path}' is a symbolic link loop (it points back at itself through other links). "
            f"Remove or repoint it (ls -l '{path}'); bit_zoo follows links inside data_dir."
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return ValueError(
            f"cannot read '{path}': permission denied. Make it readable (chmod -R u+rX, or a+rX) or point data_dir elsewhere."
        )
    return ValueError(f"cannot read '{path}': {error.strerror or error}. Check the path and the file system.")


def _is_dir(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise _fs_error(path, e) from None
    return path.is_dir()


def _scandir(path: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(path))
    except OSError as e:
        raise _fs_error(path, e) from None


def _entry_is(entry: os.DirEntry, kind: str) -> bool:
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as e:
        raise _fs_error(entry.path, e) from None


def _require_dir(path: Path, what: str, fix: str) -> Path:
    if not _is_dir(path):
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
    classes = sorted(e.name for e in _scandir(root) if not e.name.startswith(".") and _entry_is(e, "dir"))
    if not classes:
        raise ValueError(f"'{root}' has no class folders. Expected {root}/<class_name>/<image>.jpg (one folder per class).")
    return classes


def scan_class_folders(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Class folders sorted by name, images sorted by path: (class_names, paths, labels).

    A folder holding remote.NOT_STAGED is a class a remote dataset's staging left out (see
    bit_zoo.utils.remote.stage): it keeps its label but contributes no images.
    """
    classes = class_folder_names(root)
    paths, labels = [], []
    for index, cls in enumerate(classes):
        if (root / cls / NOT_STAGED).exists():
            continue
        files = sorted(
            str(root / cls / e.name)
            for e in _scandir(root / cls)
            if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".") and _entry_is(e, "file")
        )
        if not files:
            raise ValueError(
                f"class folder '{root / cls}' holds no images ({', '.join(IMAGE_EXTENSIONS)}). "
                "Remove the empty folder or add its images: every class folder becomes a class."
            )
        paths += files
        labels += [index] * len(files)
    return classes, paths, np.asarray(labels, dtype=np.int64)


def to_rgb8(image) -> np.ndarray:
    """A PIL image as uint8 RGB (H, W, 3), every bit depth scaled into 0..255.

    PIL's convert("RGB") clips a 16-bit or 32-bit grayscale image (modes I;16*, I) and a float one
    (F) at 255 instead of scaling it: a 16-bit PNG became 99 % white. Those are scaled here: I;16
    and I by 65535 (their 16-bit range, values outside it clipped), F as [0, 1] when all its values
    lie there (the usual float-image convention), else as 0..255. 16-bit RGB(A) PNGs arrive from PIL
    already reduced to their high bytes, which is the right scaling; the other modes (L, P, LA,
    RGBA, CMYK, 1) go through convert("RGB").
    """
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
    elif mode == "F":
        gray = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if gray.size and gray.min() >= 0.0 and gray.max() <= 1.0:
            gray = gray * 255.0
        gray = np.clip(gray, 0, 255)
    else:
        return np.asarray(image.convert("RGB"))
    return np.repeat(np.rint(gray).astype(np.uint8)[..., None], 3, axis=2)


def decode_image(path: str) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3): the decode of the folder datasets and of predict."""
    from PIL import Image

    with Image.open(path) as image:
        return to_rgb8(image)



def _decode_error(path: str) -> str | None:
    """Why `path` cannot be decoded, or None."""
    try:
        decode_image(path)
    except Exception as error:  # noqa: BLE001 - PIL raises several unrelated types for corrupt files
        return f"{type(error).__name__}: {error}"
    return None


class _ImageFiles:
    """Random-access source for GeneratorDataset: decodes with PIL so a bad file is reported by path.

    An undecodable image is replaced by the next decodable image of the split in file order (its
    own label with it): the record count, the batch shapes and the step schedule stay as they
    were, the replacement is the same in every run and on resume, and the file is named once in a
    warning and counted in `bad`. With `strict` the first one stops the run instead.
    """

    def __init__(self, paths: list[str], labels: np.ndarray, *, strict: bool, bad: BadImages):
        self.paths = paths
        self.labels = labels.astype(np.int32)
        self.strict, self.bad = strict, bad

    def __len__(self) -> int:
        return len(self.paths)

    def _failed(self, path: str, message: str) -> None:
        if self.strict:
            self.bad.error = BadImageError(
                f"cannot decode image '{path}' ({message}). Delete or replace the file, "
                "or set strict_images false to skip undecodable images with a warning."
            )
            raise self.bad.error
        if self.bad.add(path, message):
            logger.warning(
                "skipping undecodable image '%s' (%s): the next decodable image in file order takes its place; delete or replace the file",
                path,
                message,
            )

    def __getitem__(self, index: int):
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            path = self.paths[candidate]
            try:
                return decode_image(path), self.labels[candidate]
            except Exception as error:  # noqa: BLE001 - PIL raises several unrelated types for corrupt files
                self._failed(path, f"{type(error).__name__}: {error}")
        raise BadImageError(f"none of the {len(self.paths)} images of this split can be decoded (first: '{self.paths[0]}').")


def check_images(paths: list[str], *, num_threads: int = 8) -> None:
    """Decode every image once, in parallel; raise BadImageError naming the undecodable ones.

    What strict_images runs before the first step, so a bad file costs no training time.
    """
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        errors = [(p, e) for p, e in zip(paths, pool.map(_decode_error, paths, chunksize=64)) if e is not None]
    if errors:
        listed = "; ".join(f"'{p}' ({e})" for p, e in errors[:5])
        raise BadImageError(
            f"{len(errors)} of {len(paths)} images cannot be decoded: {listed}{' ...' if len(errors) > 5 else ''}. "
            "Delete or replace them, or set strict_images false to skip undecodable images with a warning."
        )


def folder_source(root: Path, class_names: list[str] | None = None, *, strict_images: bool = False) -> Source:
    """Class folders under `root`. `class_names` fixes the label order (val must follow train).

    `strict_images` decodes every image up front and fails on the first undecodable one; without
    it such images are skipped with a warning (see `_ImageFiles`).
    """
    import mindspore.dataset as ds

    found, paths, labels = scan_class_folders(root)
    if class_names is not None and found != class_names:
        missing, extra = sorted(set(class_names) - set(found)), sorted(set(found) - set(class_names))
        raise ValueError(
            f"class folders of '{root}' do not match the training split's {len(class_names)} classes "
            f"(missing: {missing[:10] or 'none'}, unexpected: {extra[:10] or 'none'}). Every split needs the same class folders."
        )
    if strict_images:
        check_images(paths)
    bad = BadImages()

    def build(sampler, num_workers: int):
        return ds.GeneratorDataset(
            _ImageFiles(paths, labels, strict=strict_images, bad=bad),
            column_names=["image", "label"],
            sampler=sampler,
            num_parallel_workers=num_workers,
            python_multiprocessing=False,  # PIL decodes outside the GIL; threads avoid forking big processes
        )

    # the fingerprint names files relative to root: the same dataset staged elsewhere (a fresh node) resumes
    names = [os.path.relpath(p, root) for p in paths]
    return Source(labels, len(found), found, build, f"image folders ({root})", bad, names, root)


def resolve_folder_splits(name: str, data_dir: str | None) -> dict[str, Path]:
    """Split name -> class-folder root. A data_dir with no split folders is a single 'train' split."""
    if data_dir is None:
        raise ValueError(f"{name} needs data_dir: a folder with train/ and val/ class folders.")
    root = _require_dir(Path(data_dir), f"{name} data_dir", "Point data_dir at the dataset root.")
    splits = {s: root / s for s in ("train", "val", "test") if _is_dir(root / s)}
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
    description = f"{source.description}, classes {classes}"
    return Source(lut[source.labels], len(classes), names, build, description, source.bad_images, source.record_names, source.record_root)


# ------------------------------------------------------------------------------ dataset fingerprint


def fingerprint(source: Source, indices: np.ndarray) -> dict:
    """What a resumed run checks its data against: image count, per-class counts, a digest of the records."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(source.labels[indices]).tobytes())
    if source.record_names is not None:
        for i in indices:
            digest.update(source.record_names[i].encode("utf-8", "surrogateescape") + b"\0")
    else:
        digest.update(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    counts = np.bincount(source.labels[indices], minlength=source.num_classes)
    return {"images": int(len(indices)), "per_class": counts.tolist(), "digest": digest.hexdigest()[:16]}


CONTENT_SAMPLE = 16  # files read in full by content_fingerprint


def content_fingerprint(source: Source, indices: np.ndarray) -> str | None:
    """A digest of the split's file contents, cheap enough for every run: every file's size (one stat each)
    and the bytes of CONTENT_SAMPLE files spread over the split. None for sources without files (digits, CIFAR).

    Replacing an image almost always changes its size; a same-size edit is caught when the file is in the
    sample. Modification times are left out on purpose: staging a bucket onto a fresh node changes them all.
    """
    if source.record_names is None or source.record_root is None:
        return None
    digest = hashlib.sha256()
    order = np.sort(np.asarray(indices, dtype=np.int64))
    for i in order:
        path = source.record_root / source.record_names[i]
        try:
            size = path.stat().st_size
        except OSError:
            size = -1  # gone since the scan: the decode reports it; here it only changes the digest
        digest.update(f"{source.record_names[i]}\0{size}\0".encode("utf-8", "surrogateescape"))
    for i in order[np.linspace(0, len(order) - 1, min(CONTENT_SAMPLE, len(order))).astype(np.int64)] if len(order) else ():
        try:
            digest.update(hashlib.sha256((source.record_root / source.record_names[i]).read_bytes()).digest())
        except OSError:
            digest.update(b"unreadable")
    return digest.hexdigest()[:16]


def require_same_data(saved_meta: dict, fingerprint: dict, class_names: list[str] | None = None) -> None:
    """Raise ValueError saying what changed when a checkpoint's meta.json records other training data."""
    saved = saved_meta.get("data_fingerprint")
    change = describe_change(saved, fingerprint, class_names) if saved is not None else None
    if change:
        raise ValueError(change)


def describe_change(saved: dict, current: dict, class_names: list[str] | None = None) -> str | None:
    """None when the two fingerprints match; else one line saying what changed and how to continue."""
    if saved == current:
        return None
    what = []
    if saved.get("images") != current.get("images"):
        what.append(f"{saved.get('images')} training images then, {current.get('images')} now")
    before, after = saved.get("per_class") or [], current.get("per_class") or []
    if len(before) != len(after):
        what.append(f"{len(before)} classes then, {len(after)} now")
    else:
        changed = [(i, b, a) for i, (b, a) in enumerate(zip(before, after)) if b != a]
        names = class_names or [str(i) for i in range(len(after))]
        what += [f"class '{names[i]}': {b} -> {a} images" for i, b, a in changed[:5]]
        if len(changed) > 5:
            what.append(f"{len(changed) - 5} more classes changed")
    if not what and {k: v for k, v in saved.items() if k != "content"} == {k: v for k, v in current.items() if k != "content"}:
        if saved.get("content") is None or current.get("content") is None:  # not recorded then, or not checked now
            return None
        what.append("the same files, but their contents changed (file sizes, or the bytes of sampled files)")
        return (
            f"the training data changed since the checkpoint was written ({'; '.join(what)}). Restore the original "
            "files to resume exactly, start a new run (--output_dir NEW, or --overwrite true), or pass "
            "--check_data_content false to resume with the files as they are now."
        )
    if not what:
        what.append("the same counts but different files or order")
    return (
        f"the training data changed since the checkpoint was written ({'; '.join(what)}). "
        "Restore the original files to resume exactly (an undecodable image need not be deleted: it is skipped "
        "with a warning), or start a new run (--output_dir NEW, or --overwrite true)."
    )
