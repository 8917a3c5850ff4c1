"""A plug-in data set loader: `--data.dataset=examples.custom_dataset:stripes`.

A loader is called as `loader(root)` on every rank (`root` is `--data.root`, or None) and returns
`(images, labels)`: images as an array of shape (N, channels, size, size) (any numeric scale; the
framework normalises each channel with the pooled data's mean and standard deviation), labels as N
integers 0..K-1 (K = max + 1 classes). It must return the same data on every rank: read files or
generate from a fixed seed, never download on every rank. The framework then cuts test, validation
and KD shares and partitions the rest over clients from the run seed, as for built-in data sets.
"""

import numpy as np


def stripes(root: str | None, n: int = 2000, size: int = 8, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images of a bright stripe: class k is a horizontal stripe in row band k (no files needed)."""
    rng = np.random.default_rng(1234)
    labels = rng.integers(0, classes, size=n)
    images = rng.normal(0.0, 0.6, size=(n, 1, size, size)).astype(np.float32)
    band = size // classes
    for k in range(classes):
        images[labels == k, 0, k * band:(k + 1) * band, :] += 1.0
    return images, labels
