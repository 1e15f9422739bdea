"""Builders shared by the tests: synthetic counts with known probabilities, and run directories."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from raysmooth.stats import Level, SparseCounts
from raysmooth.store import CountsRecord, RunStore


def multinomial_counts(rng: np.random.Generator, probs: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Dense (M, C) counts, one multinomial draw of n samples per row of ``probs``."""
    probs = np.atleast_2d(probs)
    return rng.multinomial(n, probs)


def random_levels(
    rng: np.random.Generator,
    m: int,
    sigmas: Sequence[float],
    num_classes: int,
    n0: int = 100,
    n: int = 1000,
    concentration: float = 0.3,
) -> tuple[list[Level], np.ndarray]:
    """Levels whose per-image class probabilities are Dirichlet draws (peaked, with a long tail)."""
    levels, probs = [], []
    for _ in sigmas:
        p = rng.dirichlet(np.full(num_classes, concentration), size=m)
        probs.append(p)
    for sigma, p in zip(sigmas, probs):
        levels.append(
            Level(
                sigma, SparseCounts.from_dense(rng.multinomial(n0, p)), SparseCounts.from_dense(rng.multinomial(n, p))
            )
        )
    return levels, np.stack(probs)


def write_run(
    root: Path,
    levels: Sequence[Level],
    labels: np.ndarray,
    *,
    alpha: float = 0.001,
    seed: int = 0,
    config: dict | None = None,
) -> RunStore:
    """A run directory whose counts table holds ``levels``; image ids are 0..M-1."""
    config = config or {"test": True, "sigmas": [lv.sigma for lv in levels]}
    store = RunStore.create(root, config)
    records = []
    for lv in levels:
        for phase, counts in (("selection", lv.selection), ("estimation", lv.estimation)):
            dense = counts.to_dense()
            for i in range(counts.num_rows):
                records.append(CountsRecord(i, int(labels[i]), lv.sigma, phase, dense[i]))
    # Commit in several files, as a run does.
    half = len(records) // 2
    store.append_counts(records[:half], model_id="synthetic", seed=seed, alpha=alpha)
    store.append_counts(records[half:], model_id="synthetic", seed=seed, alpha=alpha)
    return store


def imagenet_stand_in_overrides(tmp_path: Path) -> list[str]:
    """Overrides that satisfy an ImageNet preset's file checks with empty stand-ins (nothing is loaded)."""
    from safetensors.numpy import save_file

    (tmp_path / "val").mkdir()
    (tmp_path / "adm").mkdir()
    save_file({"stand_in": np.zeros(1, np.float32)}, str(tmp_path / "beit.safetensors"))
    return [
        f"data.root={tmp_path / 'val'}",
        f"model.denoiser.path={tmp_path / 'adm'}",
        f"model.classifier.checkpoint={tmp_path / 'beit.safetensors'}",
    ]
