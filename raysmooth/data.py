"""Test sets as arrays in [0,1]: a registry of named loaders, and the subsampling of the papers.

``digits`` ships with scikit-learn (8×8 grey, 10 classes) and needs nothing on disk; ``synthetic``
is random images for tests and benchmarks. Every loader returns the same ``TestSet`` record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .errors import ConfigError

__all__ = ["TestSet", "register_dataset", "load_dataset", "list_datasets", "subsample", "digits_split"]

_DATASETS: dict[str, Callable[..., "TestSet"]] = {}


@dataclass(frozen=True)
class TestSet:
    """Images (N, C, H, W) float32 in [0,1], labels (N,), and the ids the results are keyed by."""

    __test__ = False  # not a pytest class

    name: str
    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray  # stable index of each image in the full split
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> "TestSet":
        return TestSet(self.name, self.images[rows], self.labels[rows], self.ids[rows], self.num_classes)


def register_dataset(fn: Callable[..., TestSet]) -> Callable[..., TestSet]:
    _DATASETS[fn.__name__] = fn
    return fn


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def subsample(data: TestSet, skip: int = 1, max_images: int | None = None, indices: Sequence[int] | None = None) -> TestSet:
    """Every ``skip``-th image (Cohen's --skip), then at most ``max_images``; or explicit ``indices``."""
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= len(data):
            raise ConfigError(f"data.indices must lie in [0, {len(data)}), got {list(indices)[:5]}…")
        if len(np.unique(idx)) != len(idx):
            raise ConfigError("data.indices lists an image twice")
        return data.take(idx)
    if skip < 1:
        raise ConfigError(f"data.skip must be at least 1, got {skip}")
    if max_images is not None and max_images < 1:
        raise ConfigError(f"data.max_images must be at least 1, got {max_images}")
    rows = np.arange(0, len(data), skip)
    if max_images is not None:
        rows = rows[:max_images]
    return data.take(rows)


def load_dataset(name: str, **kwargs) -> TestSet:
    if name not in _DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r}; choose one of {', '.join(list_datasets())}")
    return _DATASETS[name](**kwargs)


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """scikit-learn's digits in a fixed train/test split: images (N,1,8,8) in [0,1], labels, ids."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = (raw.images.astype(np.float32) / 16.0)[:, None]
    labels = raw.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return {"train": (images[train], labels[train], train), "test": (images[test], labels[test], test)}


@register_dataset
def digits(split: str = "test", **_: object) -> TestSet:
    """8×8 handwritten digits from scikit-learn; the test split is fixed (seed 0, 20%)."""
    parts = digits_split()
    if split not in parts:
        raise ConfigError(f"data.split must be train or test for digits, got {split!r}")
    images, labels, ids = parts[split]
    return TestSet(f"digits-{split}", images, labels, ids.astype(np.int64), 10)


@register_dataset
def synthetic(num_images: int = 16, shape: Sequence[int] = (1, 8, 8), num_classes: int = 10, seed: int = 0, **_: object) -> TestSet:
    """Random images and labels (tests and benchmarks)."""
    rng = np.random.default_rng(seed)
    images = rng.random((num_images, *shape), dtype=np.float32)
    labels = rng.integers(0, num_classes, num_images)
    return TestSet("synthetic", images, labels, np.arange(num_images, dtype=np.int64), num_classes)
