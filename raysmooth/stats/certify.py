"""CERTIFY and PREDICT of Cohen et al. (2019), from stored counts, vectorised over images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from .bounds import binomial_test_pvalue, cp_lower
from .checks import check_alpha, check_margin, check_sigma
from .counts import SparseCounts

__all__ = ["ABSTAIN", "Reason", "Certificates", "certify", "predict"]

ABSTAIN = -1


class Reason:
    """Why a certificate abstains; 0 means it did not. Stored by name in the certificates table."""

    NONE = 0
    BELOW_THRESHOLD = 1  # the lower bound on the candidate's probability is under 1/2 (or p0)
    UNDECIDED = 2  # reference cascade: a level could neither be trusted nor ruled out
    OFF_CLASS = 3  # cascade: a higher level might turn confident on another class
    NOT_SIGNIFICANT = 4  # PREDICT: the top two classes are not separated by the binomial test

    NAMES = ("", "below_threshold", "undecided", "off_class", "not_significant")


@dataclass(frozen=True)
class Certificates:
    """Per-image outcome of a certification: class or ``ABSTAIN``, radius in [0,1] pixel units."""

    prediction: np.ndarray  # int64, -1 = abstain
    radius: np.ndarray  # float64, 0 where abstaining
    reason: np.ndarray  # int8 codes of ``Reason``
    level: np.ndarray  # int64: index (ascending σ) of the level that answered, -1 if none
    p_lower: np.ndarray | None = None  # float64: the lower bound on p_A behind the answer (NaN: none)


def certify(
    selection: SparseCounts | np.ndarray,
    estimation: SparseCounts | np.ndarray,
    sigma: float,
    alpha: float,
    margin: float = 0.0,
) -> Certificates:
    """Cohen's CERTIFY: pick ĉ from the selection counts, bound its probability from the estimation
    counts, and certify radius σ·Φ⁻¹(p̲) when p̲ ≥ 1/2 (p̲ = 1/2 gives the class with radius 0).

    ``margin`` is subtracted from the lower bound first: how far the sampled distribution may be from
    the smoothing distribution the radius speaks of (lattice noise; 0 otherwise)."""
    check_alpha(alpha)
    check_sigma(sigma)
    check_margin(margin)
    selection, estimation = SparseCounts.of(selection), SparseCounts.of(estimation)
    if selection.num_rows != estimation.num_rows:
        raise ValueError("selection and estimation counts must cover the same images")
    if selection.num_classes != estimation.num_classes:  # as the cascade's levels: one classifier's classes
        raise ValueError(
            f"selection and estimation counts must use the same number of classes, got "
            f"{selection.num_classes} and {estimation.num_classes}"
        )
    c_hat = selection.argmax()
    n = estimation.totals()
    n_a = estimation.count_of(c_hat)
    lower = np.maximum(cp_lower(n_a, n, alpha) - margin, 0.0)
    ok = (lower >= 0.5) & (c_hat >= 0)
    radius = np.where(ok, sigma * norm.ppf(np.where(ok, lower, 0.5)), 0.0)
    return Certificates(
        prediction=np.where(ok, c_hat, ABSTAIN),
        radius=radius,
        reason=np.where(ok, Reason.NONE, Reason.BELOW_THRESHOLD).astype(np.int8),
        level=np.where(ok, 0, -1),
        p_lower=np.where(c_hat >= 0, lower, np.nan),
    )


def predict(counts: SparseCounts | np.ndarray, alpha: float) -> Certificates:
    """Cohen's PREDICT: the top class if the binomial test separates it from the runner-up at ``alpha``."""
    check_alpha(alpha)
    counts = SparseCounts.of(counts)
    c1, n1, _c2, n2 = counts.top2()
    ok = binomial_test_pvalue(n1, n2) <= alpha
    return Certificates(
        prediction=np.where(ok, c1, ABSTAIN),
        radius=np.zeros(counts.num_rows),
        reason=np.where(ok, Reason.NONE, Reason.NOT_SIGNIFICANT).astype(np.int8),
        level=np.where(ok, 0, -1),
        p_lower=np.full(counts.num_rows, np.nan),
    )
