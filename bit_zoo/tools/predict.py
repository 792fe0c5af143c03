"""Classify image files and folders: top-k labels and probabilities as a table, CSV or JSON.

    python -m bit_zoo.predict photos/ cat.jpg --checkpoint_path outputs/run/best.ckpt
    python -m bit_zoo.predict photos/ --model bit_m_r50x1.in21k_ft_in1k --pretrained true --topk 3 --output_csv preds.csv

Labels: the checkpoint's class names (train.py stores them), else ImageNet-1k names for a
1000-class head and ImageNet-21k names (Google's BiT-M order) for a 21843-class head (see labels.py).
Preprocessing: the checkpoint's (meta.json), else the weights record's; --image_size N evaluates
at N px instead (resize straight to it), and the first line on stderr names the size used. Folders are searched
recursively for image files; a file that cannot be decoded is reported and skipped. Exit status:
0 if at least one image was classified, 1 if none was, 2 for bad options.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np

from ..data.from_config import DataConfig
from ..data.sources import IMAGE_EXTENSIONS, decode_image
from ._inference import LoadedModel, model_from_options
from ..models.options import ModelConfig
from ..options import SystemConfig, at_least, option, parse_options
from ..utils.atomic import write_text_atomic
from ..utils.progress import Progress
from ..utils.runner import run_cli
from ..weights.labels import label_names

__all__ = ["PredictConfig", "GROUPS", "parse", "collect_images", "predict_files", "main"]

PROG = "python -m bit_zoo.predict"
PREDICT = ("predict",)

_logger = logging.getLogger("bit_zoo.tools.predict")


def collect_images(paths: list[str]) -> list[str]:
    """Files as given; folders searched recursively for image files (sorted). A missing path is an error."""
    files = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(
                str(Path(root) / name)
                for root, dirs, names in os.walk(path)
                for name in names
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
            )
            if not found:
                _logger.warning("%s: no image files (%s) in this folder", path, ", ".join(IMAGE_EXTENSIONS))
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_files(loaded: LoadedModel, files: list[str], *, topk: int = 5, batch_size: int = 16, progress: bool = True) -> dict:
    """{"predictions": [{file, indices, labels, probs}], "skipped": [{file, error}]} in file order."""
    model = loaded.model
    names = label_names(model.num_classes, loaded.class_names)
    k = min(topk, model.num_classes)
    predictions, skipped = [], []
    batch_files, batch = [], []

    def flush():
        if not batch:
            return
        probs = _softmax(model(ms.Tensor(np.stack(batch))).asnumpy().astype(np.float64))
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        for f, row, idx in zip(batch_files, probs, top):
            predictions.append(
                {"file": f, "indices": idx.tolist(), "labels": [names[i] for i in idx], "probs": [float(row[i]) for i in idx]}
            )
        batch_files.clear()
        batch.clear()

    for path in Progress(files, total=len(files), desc="predict", enabled=progress):
        try:
            image = decode_image(path)  # the folder datasets' decode: 16-bit images scaled, not clipped
        except Exception as error:  # noqa: BLE001 - PIL raises several unrelated types for unreadable files
            _logger.warning("skipped %s: cannot decode it as an image (%s)", path, error)
            skipped.append({"file": path, "error": str(error)})
            continue
        batch_files.append(path)
        batch.append(loaded.preprocess(image))
        if len(batch) == batch_size:
            flush()
    flush()
    return {"predictions": predictions, "skipped": skipped}


def _shown(name: str) -> str:
    """A file name for the terminal: bytes that are not UTF-8 (held as lone surrogates) shown as U+FFFD,
    which every UTF-8 stream can print; the CSV and JSON keep the real name."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def format_table(result: dict, *, width: int = 40) -> str:
    rows = [("file", "top-1", "prob", "top-k")]
    for p in result["predictions"]:
        rest = ", ".join(f"{lab[:24]} {pr:.3f}" for lab, pr in zip(p["labels"][1:], p["probs"][1:]))
        rows.append((_shown(p["file"]), p["labels"][0][:width], f"{p['probs'][0]:.4f}", rest))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in rows]
    for s in result["skipped"]:
        lines.append(f"{_shown(s['file'])}  SKIPPED: {_shown(s['error'])}")
    return "\n".join(lines)


def to_csv(result: dict, topk: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file"] + [c for i in range(1, topk + 1) for c in (f"label_{i}", f"prob_{i}", f"index_{i}")])
    for p in result["predictions"]:
        w.writerow([p["file"]] + [c for lab, pr, ix in zip(p["labels"], p["probs"], p["indices"]) for c in (lab, f"{pr:.6f}", ix)])
    return buf.getvalue()


@dataclass
class PredictConfig:
    topk: int = option(5, "labels shown per image", check=at_least(1), scripts=PREDICT)
    output_csv: str | None = option(None, "write predictions as CSV: file, label_i, prob_i, index_i", scripts=PREDICT)


GROUPS = [("system", SystemConfig), ("model", ModelConfig), ("data", DataConfig), ("predict", PredictConfig)]


def _paths(parser) -> None:
    parser.add_argument("paths", nargs="+", help="image files and folders (searched recursively)")


def parse(argv: list[str] | None):
    return parse_options("predict", GROUPS, argv, prog=PROG, description=__doc__, positionals=_paths)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> int:
    parsed = parse(argv)
    system, m, d, opts = parsed["system"], parsed["model"], parsed["data"], parsed["predict"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    files = collect_images(parsed.args.paths)
    loaded = model_from_options(m, system, image_size=d.image_size)
    if loaded.model.num_classes < 1:
        raise ValueError("the model has no classifier (0 classes): give a checkpoint with a head, or use python -m bit_zoo.embed")
    pp = loaded.preprocess
    print(
        f"{loaded.name} {loaded.source} ({loaded.weights} weights, {loaded.model.num_classes} classes) at "
        f"{pp.resize_size or pp.image_size}->{pp.image_size} px: {len(files)} file(s)",
        file=sys.stderr,
    )
    result = predict_files(loaded, files, topk=opts.topk, batch_size=d.batch_size, progress=system.progress)
    result.update(model=loaded.name, checkpoint=loaded.source, weights=loaded.weights, preprocess=vars(loaded.preprocess).copy())
    result["preprocess"].pop("_ops", None)
    n, s = len(result["predictions"]), len(result["skipped"])
    if system.output_json:
        write_text_atomic(system.output_json, json.dumps(result, indent=2))
    if opts.output_csv:
        # file names as the file system has them: one that is not UTF-8 keeps its bytes (JSON escapes it instead)
        write_text_atomic(opts.output_csv, to_csv(result, min(opts.topk, loaded.model.num_classes)), errors="surrogateescape")
    print(format_table(result))  # after the files: a table cut short (a closed pipe) loses nothing
    print(f"{n} image(s) classified, {s} skipped", file=sys.stderr)
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
