"""Pre-logits embeddings of every image of a dataset split, computed once into an .npz (resumable) and reused.

The embedding is BiT's pre-logits: the global average pool of the final GroupNorm+ReLU map (the
input of the classifier), one float32 row per image in the split's order. The .npz holds:

    embeddings  float32 [N, D]     labels   int64 [N] (after `classes` relabelling)
    files       str [N]            record names: image paths, "data_batch_1.bin#17", "sklearn-digits#5"
    indices     int64 [N]          record index in the split's source
    class_names str [C]            fingerprint   JSON of everything the numbers depend on
    complete    int8 = 1

Resumable: batches go to ``<output>.partial/chunk_*.npz`` (each written to a temporary name, then
renamed); a rerun after an interruption continues after the last complete chunk. The output
itself appears only when complete (temporary name, then rename, with complete=1), and a second
run with the same fingerprint reuses it instead of recomputing. :func:`cached_embeddings` keeps
one such file per model, preprocessing, data and split in a cache folder (the few-shot evaluation's).

The model is anything with the fields of bit_zoo.tools._inference.LoadedModel (model, preprocess,
name, source, weights); its network must have no classifier (num_classes=0).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np

from ..utils.atomic import atomic_path, write_text_atomic
from ..utils.lock import FolderLock
from ..utils.progress import Progress
from ..weights.loading import open_arrays
from ..weights.meta import META_KEY, decode_meta
from . import sources
from .loader import create_loader

__all__ = ["EMBED_FORMAT", "compute_embeddings", "cached_embeddings", "load_embeddings", "record_names", "weights_identity", "data_identity"]

_logger = logging.getLogger(__name__)

EMBED_FORMAT = 2  # 2: the fingerprint holds the weights' and the data's content


# ----------------------------------------------------------------------------------------------
# Record names


def record_names(dataset: str, data_dir: str | None, split: str, val_split: float, indices: np.ndarray) -> list[str]:
    """A readable name for each record index of a split: the file, or file#record for packed formats."""
    usage = "train" if split == "train" or (split == "val" and val_split) else split
    if dataset in ("folder", "imagenet"):
        splits = sources.resolve_folder_splits(dataset, data_dir)
        root = splits["train"] if usage == "train" else splits.get(usage)
        _, paths, _ = sources.scan_class_folders(root)
        return [paths[i] for i in indices]
    if dataset == "digits":
        _, labels = sources._digits_arrays()
        train, test = sources.digits_partition(labels)
        original = train if usage == "train" else test
        return [f"sklearn-digits#{original[i]}" for i in indices]
    layout = sources._CIFAR_LAYOUT[dataset]
    usage = "train" if usage == "train" else "test"
    files, per_file = layout["files"][usage], layout["records"][usage]
    return [f"{files[i // per_file]}#{i % per_file}" for i in indices]


# ----------------------------------------------------------------------------------------------
# Computing, with chunked resume


def _partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def load_embeddings(path: str | Path) -> dict | None:
    """The arrays of a complete embeddings file, or None if it is absent or incomplete."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - a truncated zip raises BadZipFile, EOFError, OSError or ValueError
        _logger.warning("%s is unreadable (%s): computing it again", path, e)
        return None
    if int(arrays.get("complete", 0)) != 1:
        return None
    arrays["fingerprint"] = json.loads(str(arrays["fingerprint"]))
    return arrays


def _write_npz(path: Path, arrays: dict) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def compute_embeddings(loaded: Any, *, output: str | Path, **options) -> dict:
    """Embed every image of the split into `output` (or reuse it when complete); return its arrays.

    Options: dataset, data_dir, split, classes, val_split, num_samples, batch_size, num_workers, seed,
    save_every, overwrite, progress (see _compute_embeddings). The model must have no classifier
    (num_classes=0): its forward is the pre-logits. One process writes an output at a time (a lock
    file beside it): two runs into one file would interleave their chunks.
    """
    output = Path(output)
    with FolderLock(output.parent, prog="embed", name=f".{output.name}.lock", label=f"{output}", option="--output"):
        return _compute_embeddings(loaded, output=output, **options)


def weights_identity(loaded: Any) -> dict:
    """What the weights behind `loaded` are, by content rather than by path.

    A bit_zoo file: its digest (checked when it was loaded; it covers every entry and meta.json). Other
    files: size, modification time and inode (a file replaced or rewritten at the same path differs).
    Pretrained weights: the record's file and sha256. A random initialisation: the seed does it.
    """
    source = loaded.source
    if source.startswith("pretrained:"):
        record = loaded.model.weights
        return {"record": record.filename, "sha256": record.sha256 or record.sha256_prefix} if record is not None else {}
    if source.startswith("random-init:"):
        return {}
    st = os.stat(source)
    fmt, reader = open_arrays(source)
    with reader:
        meta = decode_meta({META_KEY: reader[META_KEY]}) if META_KEY in reader else None
    if meta and meta.get("digest"):
        return {"digest": meta["digest"]}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def data_identity(data_dir: str | None) -> str | None:
    """A digest of every file's name, size and modification time under data_dir (None: built-in data such as digits)."""
    if not data_dir:
        return None
    h = hashlib.sha256()
    root = Path(data_dir)
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue
            st = os.stat(os.path.join(folder, name))
            h.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _compute_embeddings(
    loaded: Any,
    *,
    dataset: str,
    data_dir: str | None,
    split: str,
    output: str | Path,
    classes: list[int] | None = None,
    val_split: float | int = 0,
    num_samples: int | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    seed: int = 0,
    save_every: int = 20,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    model, pp = loaded.model, loaded.preprocess
    if model.num_classes != 0:
        raise ValueError("compute_embeddings needs a model built with num_classes=0 (its forward is then the pre-logits)")
    fingerprint = {
        "format": EMBED_FORMAT,
        "model": loaded.name,
        "checkpoint": loaded.source,
        "weights": loaded.weights,
        # the numbers depend on the weights' content, not on their path: a checkpoint replaced in place is another model
        "weights_content": weights_identity(loaded),
        "preprocess": asdict(pp),
        "dataset": dataset,
        "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
        "data_content": data_identity(data_dir),
        "split": split,
        "classes": list(classes) if classes is not None else None,
        "val_split": val_split,
        "num_samples": num_samples,
        "seed": seed,
    }
    fingerprint = json.loads(json.dumps(fingerprint))  # the form it has after a round trip through the file (lists, not tuples)
    existing = load_embeddings(output)
    if existing is not None:
        if existing["fingerprint"] == fingerprint:
            _logger.info("%s is complete for this model and split: reused", output)
            return existing
        if not overwrite:
            before = existing["fingerprint"]
            differ = sorted(k for k in {*before, *fingerprint} if before.get(k) != fingerprint.get(k))
            raise ValueError(
                f"{output} holds embeddings of another model, data or preprocessing (they differ in: {', '.join(differ)}); "
                "pass --overwrite true to replace it, or choose another --output"
            )
    info = create_loader(
        dataset,
        data_dir,
        split,
        batch_size=batch_size,
        image_size=pp.image_size,
        resize_size=pp.resize_size,
        transform="eval",
        interpolation=pp.interpolation,
        mean=pp.mean,
        std=pp.std,
        val_split=val_split,
        num_samples=num_samples,
        shuffle=False,
        drop_remainder=False,
        seed=seed,
        num_workers=num_workers,
        classes=classes,
    )
    parts = _partial_dir(output)
    stamp = parts / "fingerprint.json"
    if parts.is_dir() and (not stamp.is_file() or json.loads(stamp.read_text()) != {**fingerprint, "batch_size": batch_size}):
        _logger.info("%s belongs to another run: discarded", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp, json.dumps({**fingerprint, "batch_size": batch_size}))
    done = 0
    while (parts / f"chunk_{done:05d}.npz").is_file():
        done += 1
    if done:
        _logger.info("resuming %s after %d complete chunk(s) (%d batches)", output, done, done * save_every)

    batches = info.dataset
    skip = done * save_every
    if skip:
        batches = batches.skip(skip)
    total = max(info.batches_per_epoch - skip, 0)
    chunk_emb, chunk_lab = [], []
    chunk = done
    model.set_train(False)
    for images, labels in Progress(
        batches.create_tuple_iterator(num_epochs=1, output_numpy=True), total=total, desc=f"embed {split}", enabled=progress
    ):
        chunk_emb.append(model(ms.Tensor(images)).asnumpy().astype(np.float32))
        chunk_lab.append(np.asarray(labels, dtype=np.int64))
        if len(chunk_emb) == save_every:
            _write_npz(parts / f"chunk_{chunk:05d}.npz", {"embeddings": np.concatenate(chunk_emb), "labels": np.concatenate(chunk_lab)})
            chunk, chunk_emb, chunk_lab = chunk + 1, [], []
    if chunk_emb:
        _write_npz(parts / f"chunk_{chunk:05d}.npz", {"embeddings": np.concatenate(chunk_emb), "labels": np.concatenate(chunk_lab)})
        chunk += 1

    embs, labs = [], []
    for i in range(chunk):
        with np.load(parts / f"chunk_{i:05d}.npz", allow_pickle=False) as z:
            embs.append(z["embeddings"])
            labs.append(z["labels"])
    embeddings = np.concatenate(embs) if embs else np.zeros((0, model.num_features), np.float32)
    labels = np.concatenate(labs) if labs else np.zeros((0,), np.int64)
    if len(embeddings) != len(info.indices):
        raise RuntimeError(
            f"{len(embeddings)} embeddings for {len(info.indices)} images of the split: the chunks in {parts} do not match the data; delete that folder and run again"
        )
    arrays = {
        "embeddings": embeddings,
        "labels": labels,
        "files": np.asarray(record_names(dataset, data_dir, split, val_split, info.indices), dtype=str),
        "indices": np.asarray(info.indices, dtype=np.int64),
        "class_names": np.asarray(info.class_names or [str(i) for i in range(info.num_classes)], dtype=str),
        "fingerprint": np.asarray(json.dumps(fingerprint, sort_keys=True)),
        "complete": np.asarray(1, dtype=np.int8),
    }
    _write_npz(output, arrays)
    shutil.rmtree(parts)
    _logger.info("wrote %s: %d embeddings of dimension %d", output, *embeddings.shape)
    arrays["fingerprint"] = fingerprint
    return arrays


def cached_embeddings(loaded: Any, *, split: str, cache_dir: str | Path, **data) -> dict:
    """compute_embeddings into `cache_dir`, one file per model, preprocessing, data and split (reused when complete).

    `data`: compute_embeddings' keyword arguments; the batch size, the workers and the progress bar
    do not change the numbers, so they are not part of the file's name."""
    key_data = {k: data.get(k) for k in ("dataset", "data_dir", "classes", "val_split", "num_samples", "seed")}
    key = json.dumps([loaded.source, loaded.weights, loaded.name, str(loaded.preprocess), split, key_data], sort_keys=True, default=str)
    path = Path(cache_dir) / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
    return compute_embeddings(loaded, split=split, output=path, overwrite=True, **data)
