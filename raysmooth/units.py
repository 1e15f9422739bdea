"""Work units and the seeds of their noise.

A unit asks for ``n_samples`` noisy draws of one image at one σ in one phase. Its noise comes from a
seed that is a stable hash of ``(run_seed, image_id, sigma_index, phase, chunk_index)``, so a unit's
counts never depend on which replica ran it, in which batch, or how often it was retried. Pure Python:
the driver plans units without importing torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["PHASES", "WorkUnit", "unit_seed", "block_seed", "split_budget", "budget_units"]

PHASES = ("selection", "estimation")
_MASK63 = (1 << 63) - 1


def _hash(*parts: object) -> int:
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK63


def unit_seed(run_seed: int, image_id: int, sigma_index: int, phase: str, chunk_index: int) -> int:
    """The seed of one unit's noise (63 bits)."""
    return _hash("raysmooth-unit-v1", run_seed, image_id, sigma_index, phase, chunk_index)


def block_seed(seed: int, block: int) -> int:
    """The seed of one fixed-size block of a unit's noise: blocks make the noise independent of the
    batch size, since a batch takes whole or partial blocks but never draws noise itself."""
    return _hash("raysmooth-block-v1", seed, block)


@dataclass(frozen=True, order=True)
class WorkUnit:
    """``n_samples`` draws of image ``image_id`` at σ number ``sigma_index`` in ``phase``."""

    image_id: int
    sigma_index: int
    phase: str
    chunk_index: int
    n_samples: int

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.n_samples < 1:
            raise ValueError(f"a unit needs at least one sample, got {self.n_samples}")

    @property
    def key(self) -> tuple[int, int, str, int]:
        return (self.image_id, self.sigma_index, self.phase, self.chunk_index)

    def seed(self, run_seed: int) -> int:
        return unit_seed(run_seed, self.image_id, self.sigma_index, self.phase, self.chunk_index)


def split_budget(n: int, chunk_size: int) -> list[int]:
    """Split a sample budget into chunks of ``chunk_size`` (the last one smaller)."""
    if n < 1 or chunk_size < 1:
        raise ValueError("the budget and the chunk size must be at least 1")
    full, rest = divmod(n, chunk_size)
    return [chunk_size] * full + ([rest] if rest else [])


def budget_units(n: int, chunk_size: int) -> int:
    """How many work units ``split_budget(n, chunk_size)`` makes, without making them."""
    return -(-n // chunk_size)
