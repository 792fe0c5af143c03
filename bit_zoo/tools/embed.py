"""Pre-logits embeddings of every image of a dataset split, to an .npz with labels and file names.

    python -m bit_zoo.embed --checkpoint_path outputs/quickstart_digits_pretrain/best.ckpt --dataset digits --split train --output emb.npz
    python -m bit_zoo.embed -c configs/quickstart_digits.yaml --split val --output emb_val.npz

The embedding is BiT's pre-logits (the input of the classifier), one float32 row per image in the
split's order, with labels, record names and class names (see bit_zoo.data.embeddings for the
file). Resumable: a rerun after an interruption continues after the last complete chunk; a
complete output computed with the same settings is reused. Options are train.py's names; -c takes
a training config and uses the keys this tool takes.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from ..data.embeddings import compute_embeddings
from ..data.from_config import DataConfig, val_split_arg
from ._inference import model_from_options
from ..models.options import ModelConfig
from ..options import SystemConfig, at_least, option, parse_options
from ..utils.runner import run_cli

__all__ = ["EmbedConfig", "GROUPS", "parse", "main"]

PROG = "python -m bit_zoo.embed"
EMBED = ("embed",)


@dataclass
class EmbedConfig:
    output: str | None = option(None, ".npz to write", scripts=EMBED, required=True)
    save_every: int = option(20, "batches per resume chunk", check=at_least(1), scripts=EMBED)


GROUPS = [("system", SystemConfig), ("model", ModelConfig), ("data", DataConfig), ("embed", EmbedConfig)]


def parse(argv: list[str] | None):
    return parse_options(
        "embed", GROUPS, argv, prog=PROG, description=__doc__, config="YAML config (e.g. a training config of configs/: the keys this tool takes)",
        yaml_skip=lambda key: True,  # a training config's other keys (lr, steps, ...) are not this tool's
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> int:
    parsed = parse(argv)
    system, m, d, e = parsed["system"], parsed["model"], parsed["data"], parsed["embed"]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loaded = model_from_options(
        m, system, num_classes=0, eval_size=d.eval_size, image_size=d.image_size, eval_resize_size=d.eval_resize_size,
        interpolation=d.interpolation, mean=d.mean, std=d.std,
    )  # fmt: skip
    pp = loaded.preprocess
    arrays = compute_embeddings(
        loaded,
        dataset=d.dataset,
        data_dir=d.data_dir,
        split=d.split,
        output=e.output,
        classes=d.classes,
        val_split=val_split_arg(d.val_split),
        num_samples=d.num_samples,
        batch_size=d.batch_size,
        num_workers=d.num_workers,
        seed=system.seed,
        save_every=e.save_every,
        overwrite=system.overwrite,
        progress=system.progress,
    )
    n, dim = arrays["embeddings"].shape
    print(
        f"{e.output}: {n} embeddings of dimension {dim} ({d.dataset} {d.split}, {len(arrays['class_names'])} classes, "
        f"{loaded.source}, {pp.resize_size or pp.image_size}->{pp.image_size} px)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
