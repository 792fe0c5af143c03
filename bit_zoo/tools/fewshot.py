"""Few-shot linear evaluation of frozen pre-logits, big_vision's ``fewshot_lsr`` protocol, in numpy.

    python -m bit_zoo.fewshot -c configs/quickstart_digits.yaml --shots 1 5 10 --crop_pct 1
    python -m bit_zoo.fewshot --model bit_m_r50x1 --pretrained true --dataset cifar10 --data_dir DIR --output_json fs.json

For each k in --shots and each seed 0..--seeds-1: per class, a seeded permutation of its training
images and its first k (so the 5-shot set contains the 1-shot one, as in big_vision); the
embeddings are standardised with the k-shot set's mean and std, a constant feature 100 is appended
(an almost unregularised bias), and ridge regression onto one-hot targets in {-1, 1} is solved in
closed form (l2 --l2_reg, default 2^10). Top-1 on the whole evaluation split; mean and standard
deviation over the seeds. Defaults are big_vision's: shots 1/5/10/25, 3 seeds, resize 256 then
center crop 224, pixels in [-1, 1]. Embeddings of each split are computed once and cached
(--cache_dir), so further runs (other shots, seeds, l2) take seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..utils.atomic import write_text_atomic
from ..utils.runner import run_cli
from ..data.from_config import val_split_arg
from .embed import add_data_args, compute_embeddings, parse_args, preprocess_overrides
from ..models.inference import Preprocess, add_model_args, model_from_args
from ..options import ToolParser, str2bool

__all__ = ["BIAS_CONSTANT", "ridge_fit", "ridge_accuracy", "fewshot_indices", "run_fewshot", "main"]

_logger = logging.getLogger("bit_zoo.tools.fewshot")

BIAS_CONSTANT = 100.0  # big_vision: a constant feature this large makes its weight (the bias) almost unregularised
DEFAULT_L2 = 2.0**10
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3


def ridge_fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2_reg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w, mean, std): closed-form ridge regression of one-hot {-1, 1} targets on standardised x plus a bias feature.

    Solves (X^T X + l2 I)^-1 X^T Y when N >= D, else X^T (X X^T + l2 I)^-1 Y (the same solution, cheaper
    for few shots), through an eigendecomposition, as big_vision does. float64 throughout.
    """
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + 1e-5
    x = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    targets = 2.0 * np.eye(num_classes)[np.asarray(y, np.int64)] - 1.0
    n, d = x.shape
    if n >= d:
        eigs, q = np.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ targets), q
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ targets, x.T @ q
    w = (lhs / (eigs + l2_reg)[None, :]) @ rhs
    return w, mean, std


def ridge_accuracy(fit: tuple[np.ndarray, np.ndarray, np.ndarray], x_test: np.ndarray, y_test: np.ndarray) -> float:
    w, mean, std = fit
    x = np.pad((np.asarray(x_test, np.float64) - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
    return float(np.mean(np.argmax(x @ w, axis=1) == np.asarray(y_test)))


def fewshot_indices(labels: np.ndarray, num_classes: int, shots: int, seed: int, class_names=None) -> np.ndarray:
    """big_vision's draw: per class a permutation by default_rng(seed), its first `shots` (nested across shots)."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < shots:
            name = f" ('{class_names[c]}')" if class_names is not None else ""
            raise ValueError(f"{shots}-shot needs {shots} training images per class, but class {c}{name} has {len(members)}; lower --shots")
        picked.append(members[:shots])
    return np.concatenate(picked)


def run_fewshot(train: dict, test: dict, *, shots=DEFAULT_SHOTS, seeds: int = DEFAULT_SEEDS, l2_reg: float = DEFAULT_L2) -> dict:
    """{k: {"mean", "std", "per_seed"}} top-1 in percent, from embeddings dicts (embed.py's arrays)."""
    num_classes = len(train["class_names"])
    results = {}
    for k in shots:
        accs = []
        for seed in range(seeds):
            idx = fewshot_indices(train["labels"], num_classes, k, seed, train["class_names"])
            fit = ridge_fit(train["embeddings"][idx], train["labels"][idx], num_classes, l2_reg)
            accs.append(100.0 * ridge_accuracy(fit, test["embeddings"], test["labels"]))
        results[k] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "per_seed": accs}
    return results


def format_table(results: dict, *, title: str) -> str:
    lines = [title, f"{'shots':>5}  {'top-1 mean':>10}  {'std':>5}  per seed"]
    for k, r in results.items():
        lines.append(f"{k:>5}  {r['mean']:>9.2f}%  {r['std']:>5.2f}  " + " ".join(f"{a:.2f}" for a in r["per_seed"]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog="python -m bit_zoo.fewshot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    g = add_data_args(parser)
    g.add_argument("--train_split", default="train", choices=("train", "val", "test"), help="where the k shots are drawn")
    g.add_argument("--split", default="val", choices=("val", "test"), help="evaluation split (as validate.py)")
    g.add_argument(
        "--crop_pct", type=float, default=224 / 256, help="resize to eval_size / crop_pct, then center crop (big_vision: 256 -> 224)"
    )
    f = parser.add_argument_group("fewshot")
    f.add_argument("--shots", type=int, nargs="+", default=list(DEFAULT_SHOTS))
    f.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="number of seeds (0..seeds-1)")
    f.add_argument("--l2_reg", type=float, default=DEFAULT_L2)
    f.add_argument("--cache_dir", default="outputs/fewshot_cache", help="embeddings cache (one .npz per model, data and split)")
    f.add_argument("--output_json", default=None)
    f.add_argument("--overwrite", type=str2bool, default=False)
    parser.set_defaults(eval_size=224, interpolation="bilinear", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog="python -m bit_zoo.fewshot")


def _main(argv: list[str] | None) -> int:
    args = parse_args(build_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if any(k < 1 for k in args.shots) or args.seeds < 1 or not 0 < args.crop_pct <= 1:
        raise ValueError(f"--shots {args.shots} and --seeds {args.seeds} must be positive, --crop_pct {args.crop_pct} in (0, 1]")
    size = args.eval_size
    args.image_size = size
    loaded = model_from_args(args, num_classes=0)
    # The protocol's preprocessing, not the checkpoint's: resize to size / crop_pct, center crop, normalise.
    resize = args.eval_resize_size or (round(size / args.crop_pct) if args.crop_pct < 1 else None)
    loaded.preprocess = preprocess_overrides(Preprocess(size, resize), args)
    if resize is None:
        loaded.preprocess = replace(loaded.preprocess, resize_size=None)
    common = dict(
        dataset=args.dataset,
        data_dir=args.data_dir,
        classes=args.classes,
        val_split=val_split_arg(args.val_split),
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
        progress=args.progress,
    )
    embeddings = {}
    for role, split in (("train", args.train_split), ("test", args.split)):
        # What the numbers depend on (not the batch size, the workers or the progress bar).
        data_key = {k: common[k] for k in ("dataset", "data_dir", "classes", "val_split", "num_samples", "seed")}
        key = json.dumps([loaded.source, loaded.weights, loaded.name, str(loaded.preprocess), split, data_key], sort_keys=True, default=str)
        path = Path(args.cache_dir) / f"{split}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"
        embeddings[role] = compute_embeddings(loaded, split=split, output=path, overwrite=True, **common)
    results = run_fewshot(embeddings["train"], embeddings["test"], shots=args.shots, seeds=args.seeds, l2_reg=args.l2_reg)
    pp = loaded.preprocess
    title = (
        f"few-shot linear (ridge, l2={args.l2_reg:g}) on {args.dataset} {args.train_split} -> {args.split}"
        f"{f' classes {args.classes}' if args.classes is not None else ''}: {loaded.source} ({loaded.weights} weights), "
        f"{len(embeddings['train']['labels'])} train / {len(embeddings['test']['labels'])} eval images, "
        f"{pp.resize_size or pp.image_size}->{pp.image_size} px, {args.seeds} seeds"
    )
    print(format_table(results, title=title))
    if args.output_json:
        out = {
            "model": loaded.name,
            "checkpoint": loaded.source,
            "dataset": args.dataset,
            "classes": args.classes,
            "train_split": args.train_split,
            "eval_split": args.split,
            "l2_reg": args.l2_reg,
            "seeds": args.seeds,
            "preprocess": {"image_size": pp.image_size, "resize_size": pp.resize_size, "mean": pp.mean, "std": pp.std},
            "train_images": int(len(embeddings["train"]["labels"])),
            "eval_images": int(len(embeddings["test"]["labels"])),
            "results": {str(k): v for k, v in results.items()},
        }
        write_text_atomic(args.output_json, json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
