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

import json
import logging
import sys
from dataclasses import dataclass

import numpy as np

from ..data.embeddings import cached_embeddings
from ..data.from_config import DataConfig, val_split_arg
from ..data.preprocess import Preprocess, resolve_data_config
from ._inference import model_from_options
from ..models.options import ModelConfig
from ..options import SystemConfig, at_least, each, option, parse_options, positive
from ..utils.atomic import write_text_atomic
from ..utils.runner import run_cli

__all__ = ["BIAS_CONSTANT", "FewshotConfig", "GROUPS", "parse", "protocol_preprocess", "ridge_fit", "ridge_accuracy", "fewshot_indices", "run_fewshot", "main"]

_logger = logging.getLogger("bit_zoo.tools.fewshot")

BIAS_CONSTANT = 100.0  # big_vision: a constant feature this large makes its weight (the bias) almost unregularised
DEFAULT_L2 = 2.0**10
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3
PROTOCOL_SIZE = 224  # big_vision's few-shot resolution, when neither eval_size nor image_size is given
PROG = "python -m bit_zoo.fewshot"
FEWSHOT = ("fewshot",)


def _crop_pct(v):
    return None if 0 < v <= 1 else "a fraction in (0, 1]"


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


@dataclass
class FewshotConfig:
    shots: list[int] = option(list(DEFAULT_SHOTS), "k: training images per class (one evaluation per k)", check=each(at_least(1)), scripts=FEWSHOT)
    seeds: int = option(DEFAULT_SEEDS, "number of seeds (0..seeds-1)", check=at_least(1), scripts=FEWSHOT)
    l2_reg: float = option(DEFAULT_L2, "ridge regularisation", check=positive, scripts=FEWSHOT)
    train_split: str = option("train", "where the k shots are drawn", choices=("train", "val", "test"), scripts=FEWSHOT)
    crop_pct: float = option(
        224 / 256, "resize to eval_size / crop_pct, then center crop (big_vision: 256 -> 224)", check=_crop_pct, scripts=FEWSHOT
    )
    cache_dir: str = option("outputs/fewshot_cache", "embeddings cache (one .npz per model, data and split)", scripts=FEWSHOT)


GROUPS = [("system", SystemConfig), ("model", ModelConfig), ("data", DataConfig), ("fewshot", FewshotConfig)]


def parse(argv: list[str] | None):
    return parse_options(
        "fewshot", GROUPS, argv, prog=PROG, description=__doc__, config="YAML config (e.g. a training config of configs/: the keys this tool takes)",
        yaml_skip=lambda key: True,  # a training config's other keys (lr, steps, few_shot, ...) are not this tool's
    )  # fmt: skip


def protocol_preprocess(d: DataConfig, crop_pct: float) -> Preprocess:
    """The protocol's preprocessing, not the checkpoint's: resize to size / crop_pct, center crop, normalise.

    The size: eval_size, else image_size (validate.py's rule), else big_vision's 224."""
    return resolve_data_config(
        eval_size=d.eval_size, image_size=d.image_size or PROTOCOL_SIZE, eval_resize_size=d.eval_resize_size, crop_pct=crop_pct,
        interpolation=d.interpolation, mean=d.mean, std=d.std,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> int:
    parsed = parse(argv)
    system, m, d, f = parsed["system"], parsed["model"], parsed["data"], parsed["fewshot"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pp = protocol_preprocess(d, f.crop_pct)
    loaded = model_from_options(m, system, num_classes=0, image_size=pp.image_size)
    loaded.preprocess = pp
    common = dict(
        dataset=d.dataset,
        data_dir=d.data_dir,
        classes=d.classes,
        val_split=val_split_arg(d.val_split),
        num_samples=d.num_samples,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        seed=system.seed,
        progress=system.progress,
    )
    embeddings = {role: cached_embeddings(loaded, split=split, cache_dir=f.cache_dir, **common) for role, split in (("train", f.train_split), ("test", d.split))}
    results = run_fewshot(embeddings["train"], embeddings["test"], shots=f.shots, seeds=f.seeds, l2_reg=f.l2_reg)
    title = (
        f"few-shot linear (ridge, l2={f.l2_reg:g}) on {d.dataset} {f.train_split} -> {d.split}"
        f"{f' classes {d.classes}' if d.classes is not None else ''}: {loaded.source} ({loaded.weights} weights), "
        f"{len(embeddings['train']['labels'])} train / {len(embeddings['test']['labels'])} eval images, "
        f"{pp.resize_size or pp.image_size}->{pp.image_size} px, {f.seeds} seeds"
    )
    print(format_table(results, title=title))
    if system.output_json:
        out = {
            "model": loaded.name,
            "checkpoint": loaded.source,
            "dataset": d.dataset,
            "classes": d.classes,
            "train_split": f.train_split,
            "eval_split": d.split,
            "l2_reg": f.l2_reg,
            "seeds": f.seeds,
            "preprocess": {"image_size": pp.image_size, "resize_size": pp.resize_size, "mean": pp.mean, "std": pp.std},
            "train_images": int(len(embeddings["train"]["labels"])),
            "eval_images": int(len(embeddings["test"]["labels"])),
            "results": {str(k): v for k, v in results.items()},
        }
        write_text_atomic(system.output_json, json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
