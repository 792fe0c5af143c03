"""Write random images in the exact CIFAR-10/100 binary layout, for smoke-testing the recipes offline.

    python scripts/fake_cifar.py /tmp/fake_cifar10                 # cifar-10-batches-bin/ layout
    python scripts/fake_cifar.py /tmp/fake_cifar100 --cifar100     # cifar-100-binary/ layout

Full-size files (50,000 train / 10,000 test records) so the loaders accept them; pixels are
random, labels cycle through the classes. Accuracy on them means nothing: they only prove that a
config runs end to end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def write(root: Path, *, cifar100: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    label_bytes, classes = (2, 100) if cifar100 else (1, 10)
    out = root / ("cifar-100-binary" if cifar100 else "cifar-10-batches-bin")
    out.mkdir(parents=True, exist_ok=True)

    def records(n: int, offset: int) -> np.ndarray:
        rec = np.empty((n, label_bytes + 3072), np.uint8)
        fine = (np.arange(n) + offset) % classes
        rec[:, label_bytes - 1] = fine
        if cifar100:
            rec[:, 0] = fine // 5  # coarse label
        rec[:, label_bytes:] = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return rec

    if cifar100:
        records(50_000, 0).tofile(out / "train.bin")
        records(10_000, 0).tofile(out / "test.bin")
    else:
        for i in range(5):
            records(10_000, 10_000 * i).tofile(out / f"data_batch_{i + 1}.bin")
        records(10_000, 0).tofile(out / "test_batch.bin")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--cifar100", action="store_true")
    args = parser.parse_args()
    print(write(Path(args.root), cifar100=args.cifar100))


if __name__ == "__main__":
    main()
