"""Write scikit-learn's digits as image class folders, the layout of a dataset on disk or in a bucket.

    python scripts/digits_folders.py digits_png        # digits_png/{train,val}/<digit>/<index>.png

The same fixed 80/20 partition as `--dataset digits` (train: 1437 images, val: 360), the same
pixels (8x8 grey levels scaled to 0..255, as RGB PNG: lossless), so the quickstart configs run on
it with `--dataset folder --data_dir digits_png` (or the folder uploaded to object storage: README,
"Object storage"). Accuracies differ a little from `--dataset digits`: folders list images by name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from bit_zoo.data.sources import _digits_arrays, digits_partition


def write(root: Path) -> int:
    images, labels = _digits_arrays()
    train, val = digits_partition(labels)
    for split, rows in (("train", train), ("val", val)):
        for i in rows:
            path = root / split / str(labels[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(images[i])).save(path)
    return len(train) + len(val)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path, help="folder to create (train/ and val/ inside)")
    args = p.parse_args(argv)
    print(f"{write(args.output)} images written to {args.output}/train and {args.output}/val")


if __name__ == "__main__":
    main()
