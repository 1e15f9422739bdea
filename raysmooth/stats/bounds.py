"""Exact one-sided binomial bounds and tests, vectorised over images.

Everything here is numpy/scipy only. Conventions follow docs/methods.md §1: a one-sided bound at level
``alpha`` holds with probability at least ``1 - alpha``; the reference codebases obtain the same numbers
by calling statsmodels' two-sided ``proportion_confint`` with ``2 * alpha``.
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

from .checks import check_alpha, whole_counts

__all__ = [
    "cp_lower",
    "cp_upper",
    "goodman_upper",
    "binomial_test_pvalue",
    "min_samples_to_certify",
]


def _broadcast(k, n, alpha):
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("counts must satisfy 0 <= k <= n")
    for counts in (k, n):
        whole_counts(counts)  # raises on 2.5 successes: a number of no experiment
    if np.any(n < 1):
        raise ValueError("the number of samples n must be at least 1")
    if not np.all((alpha > 0) & (alpha < 1)):  # NaN fails this too
        raise ValueError("alpha must lie in (0, 1)")
    return np.broadcast_arrays(k, n, alpha)


def cp_lower(k, n, alpha) -> np.ndarray:
    """One-sided Clopper–Pearson lower bound ``B⁻¹(alpha; k, n-k+1)``, exactly 0 at ``k = 0``."""
    k, n, alpha = _broadcast(k, n, alpha)
    with np.errstate(invalid="ignore"):
        # betaincinv(a, b, y) is the Beta(a, b) quantile; a = 0 is undefined, the bound is 0 there.
        lo = special.betaincinv(np.where(k > 0, k, 1.0), n - k + 1.0, alpha)
    return np.where(k > 0, lo, 0.0)


def cp_upper(k, n, alpha) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound ``B⁻¹(1-alpha; k+1, n-k)``, exactly 1 at ``k = n``."""
    k, n, alpha = _broadcast(k, n, alpha)
    with np.errstate(invalid="ignore"):
        hi = special.betaincinv(k + 1.0, np.where(k < n, n - k, 1.0), 1.0 - alpha)
    return np.where(k < n, hi, 1.0)


def goodman_upper(k, n, alpha, num_groups) -> np.ndarray:
    """Upper end of Goodman's (1965) simultaneous multinomial intervals for one cell.

    This is what statsmodels' ``multinomial_proportions_confint(counts, alpha=2*alpha, method="goodman")``
    returns for a cell with count ``k`` out of ``n`` when the table has ``num_groups`` cells. It is an
    asymptotic (chi-square) bound; only the ``reference`` cascade policy uses it.
    """
    k, n, alpha = _broadcast(k, n, alpha)
    g = np.asarray(num_groups, dtype=np.float64)
    chi2 = stats.chi2.ppf(1.0 - 2.0 * alpha / g, 1)
    p = k / n
    delta = chi2**2 + 4.0 * n * p * (1.0 - p) * chi2
    return (2.0 * n * p + chi2 + np.sqrt(delta)) / (2.0 * (chi2 + n))


def binomial_test_pvalue(k1, k2) -> np.ndarray:
    """Two-sided exact binomial test of ``k1`` successes in ``k1 + k2`` trials against p = 1/2.

    Equal to ``scipy.stats.binomtest(k1, k1 + k2, 0.5).pvalue``; for p = 1/2 the two-sided p-value is
    ``min(1, 2 * P[X <= min(k1, k2)])``, which vectorises.
    """
    k1 = np.asarray(k1, dtype=np.float64)
    k2 = np.asarray(k2, dtype=np.float64)
    if np.any(k1 < 0) or np.any(k2 < 0):
        raise ValueError("counts must be non-negative")
    for counts in (k1, k2):
        whole_counts(counts)
    m = k1 + k2
    if np.any(m < 1):
        raise ValueError("the binomial test needs at least one sample")
    lo = np.minimum(k1, k2)
    p = 2.0 * stats.binom.cdf(lo, m, 0.5)
    return np.minimum(p, 1.0)


def min_samples_to_certify(alpha: float, p0: float = 0.5) -> int:
    """Smallest n for which n out of n samples gives a lower bound at or above ``p0``.

    Below it CERTIFY must abstain on every input (locuslab/smoothing issue #8: n=10 at alpha=0.001).
    The lower bound at k = n is ``alpha ** (1/n)``.
    """
    check_alpha(alpha)
    if not 0 < p0 < 1:  # NaN fails this too
        raise ValueError("p0 must lie in (0, 1)")
    n = int(np.ceil(np.log(alpha) / np.log(p0)))
    while alpha ** (1.0 / n) < p0:  # guard the float edge
        n += 1
    return max(n, 1)
