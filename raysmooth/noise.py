"""Lattice noise: randomized smoothing that stays sound in floating point (docs/methods.md §8.2).

Voráček & Hein (ICLR'23) show that x + σε computed in floating point is not a Gaussian draw around x:
the rounding depends on x's low-order bits, and a classifier can read them, so a certified radius can
be false. Their remedy, which we implement: when the image lies on the grid (1/L)ℤ (8-bit images:
L = 255), draw the noise on the same grid as round(ε·L)/L from a sampler that uses nothing but
uniform random integers. Then x + noise = round_L(x + ε) exactly (integer arithmetic), so the
classifier sees a deterministic function of x + ε, and Cohen et al.'s theorem holds for the smoothed
version of f∘round_L, with no floating-point caveat.

The sampler inverts the cumulative distribution on integer thresholds T_j = ⌈2^B·Φ((j + ½)/(Lσ))⌉,
computed once in exact arithmetic (mpmath); a uniform B-bit integer U gives the lattice point
#{j : T_j ≤ U} − M. Its law differs from the ideal round(ε·L) by at most ``tv_per_coordinate`` in
total variation per pixel (threshold rounding plus the mass beyond ±M), so over d pixels by
d·tv_per_coordinate; certificates subtract that bound from the lower bound on p_A (it is about
1e-10 for ImageNet, so radii do not move, but the guarantee is exact). No torch here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["LATTICE_BITS", "LatticeTable", "lattice_table", "lattice_margin"]

LATTICE_BITS = 62  # uniform integers in [0, 2^62): int64 on every device
_TAIL_Z = 9.5  # Φ(−9.5) ≈ 1e-21 < 2^-62: lattice points beyond ±9.5σ carry no representable mass


@dataclass(frozen=True)
class LatticeTable:
    """Integer inverse-CDF table of round(ε·L) for ε ~ N(0, σ²) (pixel units in [0, 1])."""

    sigma: float
    levels: int
    bits: int
    offset: int  # M: the sampled index k ∈ [0, 2M] is the lattice point k − M
    thresholds: np.ndarray  # int64, (2M,), non-decreasing, in [0, 2^bits]
    tv_per_coordinate: float  # total-variation distance to the ideal rounded Gaussian, per pixel


@functools.lru_cache(maxsize=64)
def lattice_table(sigma: float, levels: int, bits: int = LATTICE_BITS) -> LatticeTable:
    """The sampler's table for noise level ``sigma`` on the grid (1/levels)ℤ, exact to 2^-bits."""
    import mpmath

    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    if not 1 <= levels <= 65535 or not 8 <= bits <= 62:
        raise ValueError(f"levels must lie in [1, 65535] and bits in [8, 62], got {levels}, {bits}")
    with mpmath.workdps(40):
        s = mpmath.mpf(sigma) * levels  # σ in lattice steps (the float64 σ exactly)
        m = int(math.ceil(_TAIL_Z * float(s))) + 1
        scale = mpmath.mpf(2) ** bits
        edges = [mpmath.ncdf((j - m + mpmath.mpf(1) / 2) / s) for j in range(2 * m)]
        thresholds = np.array([int(mpmath.ceil(scale * e)) for e in edges], dtype=np.int64)
        tail = 2 * mpmath.ncdf(-(m + mpmath.mpf(1) / 2) / s)
        # Each threshold is off by less than 2^-bits, which moves the mass of two neighbouring points;
        # the tails beyond ±M are lumped into the end points.
        tv = float((2 * m + 1) / scale + tail)
    return LatticeTable(float(sigma), int(levels), int(bits), m, thresholds, tv)


def lattice_margin(sigma: float, levels: int, dim: int, bits: int = LATTICE_BITS) -> float:
    """How much lower the true p_A can be than the sampled one: d pixels × the per-pixel distance."""
    return float(dim) * lattice_table(float(sigma), int(levels), bits).tv_per_coordinate
