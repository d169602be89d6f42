"""Cut the bundled Fashion-MNIST subset out of the official files.

Usage: python scripts/make_example_data.py [../shared/datasets/fashion-mnist/fashion-mnist.npz]

Takes the first 600 training and 200 test images of every class (6,000 / 2,000 images),
in the official order, and writes them as uint8 to edgeprune/data/fashion_mnist_subset.npz.
The result is deterministic, so rerunning it reproduces the committed file byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 600
TEST_PER_CLASS = 200
OUT = Path(__file__).resolve().parent.parent / "edgeprune" / "data" / "fashion_mnist_subset.npz"


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    chosen = [np.flatnonzero(labels == label)[:per_class] for label in range(10)]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/fashion-mnist/fashion-mnist.npz")
    full = np.load(source)
    train = first_per_class(full["y_train"], TRAIN_PER_CLASS)
    test = first_per_class(full["y_test"], TEST_PER_CLASS)
    with open(OUT, "wb") as handle:
        np.savez_compressed(
            handle,
            x_train=full["x_train"][train],
            y_train=full["y_train"][train],
            x_test=full["x_test"][test],
            y_test=full["y_test"][test],
        )
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
