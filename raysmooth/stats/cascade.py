"""The multi-scale cascade certificate (Jeong & Shin, NeurIPS'23), from per-σ counts.

Two policies (docs/methods.md §4.4):

``strict`` (default)
    A fixed α budget split over every bound the cascade may use: one-sided Clopper–Pearson lower
    bounds LB_k at α_A on every level and, on every level that can lie above a stopping level,
    Clopper–Pearson upper bounds on every class at α_B / C (Bonferroni), with
    K·α_A + (K−1)·α_B = α. Stop at the highest level with LB_k ≥ p0 and answer y = ĉ_k with
    R = min(σ_k(Φ⁻¹(LB_k) − Φ⁻¹(p0)), min_{j>k} σ_j(Φ⁻¹(p0) − Φ⁻¹(max_{c≠y} UB_j(c)))); abstain
    when no level stops or R ≤ 0. Provably valid at level α by a union bound.

``reference``
    What the paper's code computes (docs/methods.md §4.3): stage s (s = 0 the largest σ) at α/(s+1),
    outcomes class / undecided (abstain) / not confident (fall through), Goodman intervals on pooled
    counts for the off-class bound, and its branch for two or fewer cells. Reproduces published
    numbers; not provably valid at α (§4.4).

Both are evaluated for a whole grid of p0 at once: everything that does not depend on p0 is
computed once per α, and the decisions are array operations over (thresholds, images), looping only
over the K levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from .bounds import cp_lower, cp_upper, goodman_upper
from .certify import ABSTAIN, Certificates, Reason
from .checks import check_alpha, check_margin, check_p0
from .counts import SparseCounts, reference_groups

__all__ = [
    "Level",
    "CascadeSweep",
    "MissingLevelError",
    "POLICIES",
    "cascade_certify",
    "cascade_sweep",
    "level_stops",
    "prepare_levels",
]

POLICIES = ("strict", "reference")
_REFERENCE_RADIUS_CAP = 50.0  # the reference clips its off-class radius at 100 in [-1,1] units


@dataclass(frozen=True)
class Level:
    """Counts of every image at one σ: the n0 selection samples and the n estimation samples.

    ``present`` marks the images that were sampled at this σ (``None``: all). A lazy cascade run
    samples a lower σ only for images that the levels above left open.
    """

    sigma: float
    selection: SparseCounts
    estimation: SparseCounts
    present: np.ndarray | None = None

    def __post_init__(self) -> None:  # dense (images, classes) counts are taken too
        object.__setattr__(self, "selection", SparseCounts.of(self.selection))
        object.__setattr__(self, "estimation", SparseCounts.of(self.estimation))


class MissingLevelError(ValueError):
    """The certificate needs a level that was not sampled for some images (a lazy-cascade run asked
    for another p0, α or policy than it was run with)."""


@dataclass(frozen=True)
class CascadeSweep:
    """Cascade certificates for P thresholds × M images (rows follow ``p0``)."""

    p0: np.ndarray  # (P,)
    prediction: np.ndarray  # (P, M) int64, -1 = abstain
    radius: np.ndarray  # (P, M) float64, [0,1] pixel units
    reason: np.ndarray  # (P, M) int8 codes of ``Reason``
    level: np.ndarray  # (P, M) int64, index into ascending σ of the answering level, -1 if none
    p_lower: np.ndarray | None = None  # (P, M) lower bound on p_A at the answering level (NaN: none)

    def at(self, i: int) -> Certificates:
        return Certificates(
            self.prediction[i],
            self.radius[i],
            self.reason[i],
            self.level[i],
            None if self.p_lower is None else self.p_lower[i],
        )


@dataclass(frozen=True)
class _Prepared:
    """Everything about a cascade that does not depend on p0 or α (levels sorted by σ ascending)."""

    sigmas: np.ndarray  # (K,)
    num_classes: int
    c_hat: np.ndarray  # (K, M) selected class per level
    n: np.ndarray  # (K, M) estimation samples (1 where not sampled)
    n_a: np.ndarray  # (K, M) estimation count of the selected class
    present: np.ndarray  # (K, M) bool: sampled at this level
    other: dict  # (j, k) with j > k -> (M,) largest count at level j over classes != c_hat[k]
    groups: dict  # (j, k) with j > k -> (cells, largest group) of the reference's reduction
    policies: tuple[str, ...] = POLICIES  # the policies this summary was prepared for


def prepare_levels(levels: Sequence[Level], policies: Sequence[str] = POLICIES) -> _Prepared:
    """Summarise the counts once; sweeps over p0 and α reuse the summary."""
    if len(levels) == 0:
        raise ValueError("a cascade needs at least one σ level")
    levels = sorted(levels, key=lambda lv: lv.sigma)
    sigmas = np.array([lv.sigma for lv in levels], dtype=np.float64)
    if not np.all(np.isfinite(sigmas) & (sigmas > 0)) or len(np.unique(sigmas)) != len(sigmas):
        raise ValueError(f"σ levels must be positive and distinct, got {sigmas.tolist()}")
    m = levels[0].estimation.num_rows
    num_classes = levels[0].estimation.num_classes
    for lv in levels:
        for counts in (lv.selection, lv.estimation):
            if counts.num_rows != m:
                raise ValueError("every level must hold counts for the same images")
            if counts.num_classes != num_classes:
                raise ValueError("every level must use the same number of classes")
    present = np.stack([np.ones(m, bool) if lv.present is None else np.asarray(lv.present, bool) for lv in levels])
    c_hat = np.stack([lv.selection.argmax() for lv in levels])
    n = np.stack([lv.estimation.totals() for lv in levels])
    if np.any(n[present] < 1):
        raise ValueError("every sampled image needs at least one estimation sample")
    n = np.where(present, n, 1)
    n_a = np.where(present, np.stack([lv.estimation.count_of(c) for lv, c in zip(levels, c_hat)]), 0)
    other, groups = {}, {}
    for j in range(len(levels)):
        for k in range(j):
            if "strict" in policies:
                other[j, k] = np.where(present[j], levels[j].estimation.max_excluding(c_hat[k]), 0)
            if "reference" in policies:
                cells, largest = reference_groups(levels[j].estimation, c_hat[k])
                groups[j, k] = (np.where(present[j], cells, 1), np.where(present[j], largest, 0))
    return _Prepared(sigmas, num_classes, c_hat, n, n_a, present, other, groups, tuple(policies))


def _check(p0s: np.ndarray, alpha: float, policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    check_alpha(alpha)
    if p0s.ndim != 1 or len(p0s) == 0:
        raise ValueError("p0 must be a non-empty 1-d sequence")
    bad = ~((p0s >= 0.5) & (p0s < 1.0))  # NaN is bad too
    if bad.any():
        check_p0(p0s[bad][0])


def cascade_sweep(
    levels: Sequence[Level] | _Prepared,
    p0: Sequence[float] | float,
    alpha: float,
    policy: str = "strict",
    margin: float = 0.0,
) -> CascadeSweep:
    """Cascade certificates for every threshold in ``p0`` at failure probability ``alpha``.
    ``margin`` widens every bound (lower bounds down, upper bounds up) by the distance between the
    sampled and the certified smoothing distribution (lattice noise; 0 otherwise)."""
    p0s = np.atleast_1d(np.asarray(p0, dtype=np.float64))
    _check(p0s, alpha, policy)
    margin = check_margin(margin)
    prep = levels if isinstance(levels, _Prepared) else prepare_levels(levels, (policy,))
    if policy not in prep.policies:
        raise ValueError(
            f"these levels were summarised for the {', '.join(prep.policies)} policy; "
            f"prepare_levels(levels, policies=({policy!r},)) for {policy}"
        )
    if policy == "strict":
        return _strict(prep, p0s, float(alpha), margin)
    return _reference(prep, p0s, float(alpha), margin)


def cascade_certify(
    levels: Sequence[Level] | _Prepared, p0: float, alpha: float, policy: str = "strict", margin: float = 0.0
) -> Certificates:
    """Cascade certificates at one threshold."""
    return cascade_sweep(levels, [p0], alpha, policy, margin).at(0)


def _require(prep: _Prepared, k: int, open_: np.ndarray, p0s: np.ndarray) -> None:
    """Refuse to decide on a level that was not sampled for an image still open there."""
    needed = open_ & ~prep.present[k][None, :]
    if needed.any():
        rows, cols = np.nonzero(needed)
        raise MissingLevelError(
            f"σ={prep.sigmas[k]:g} was not sampled for {len(np.unique(cols))} image(s) that p0={p0s[rows[0]]:g} "
            "leaves open there; certificates at other thresholds need a run in full mode"
        )


def level_stops(
    selection: SparseCounts,
    estimation: SparseCounts,
    *,
    p0: float,
    alpha: float,
    policy: str,
    num_levels: int,
    level: int,
    margin: float = 0.0,
) -> np.ndarray:
    """Whether the cascade stops at ``level`` (index into ascending σ) for each image, from that level's
    counts alone: the lazy cascade samples the next σ down only where this is False."""
    _check(np.atleast_1d(np.float64(p0)), alpha, policy)
    margin = check_margin(margin)
    c_hat = selection.argmax()
    n = estimation.totals()
    n_a = estimation.count_of(c_hat)
    if policy == "strict":
        return cp_lower(n_a, n, alpha / (2 * num_levels - 1)) - margin >= p0
    alpha_k = alpha / (num_levels - level)
    return (cp_lower(n_a, n, alpha_k) - margin >= p0) | (cp_upper(n_a, n, alpha_k) + margin >= p0)


def _finish(p0s, chosen, radius, reason_if_chosen_abstains, abstain_reason, c_hat, lower) -> CascadeSweep:
    """Gather the chosen level's class and lower bound; turn non-positive results into abstentions."""
    k_levels, m = c_hat.shape
    answered = chosen >= 0

    def at_chosen(per_level: np.ndarray) -> np.ndarray:
        return np.take_along_axis(
            np.broadcast_to(per_level.T[None], (len(p0s), m, k_levels)), np.maximum(chosen, 0)[..., None], axis=2
        )[..., 0]

    cls = at_chosen(c_hat)
    certified = answered & ~reason_if_chosen_abstains
    reason = np.where(certified, Reason.NONE, np.where(answered, Reason.OFF_CLASS, abstain_reason))
    return CascadeSweep(
        p0=p0s,
        prediction=np.where(certified, cls, ABSTAIN),
        radius=np.where(certified, radius, 0.0),
        reason=reason.astype(np.int8),
        level=np.where(certified, chosen, -1),
        p_lower=np.where(answered, at_chosen(lower), np.nan),
    )


def _strict(prep: _Prepared, p0s: np.ndarray, alpha: float, margin: float) -> CascadeSweep:
    k_levels, m = prep.c_hat.shape
    alpha_a = alpha_b = alpha / (2 * k_levels - 1)
    z0 = norm.ppf(p0s)[:, None]  # (P, 1)
    lb = np.maximum(cp_lower(prep.n_a, prep.n, alpha_a) - margin, 0.0)  # (K, M)
    z_lb = norm.ppf(lb)
    # Off-class bound of level j for answer ĉ_k: Bonferroni over all C classes, and only the largest
    # count other than ĉ_k matters because the CP upper bound grows with the count.
    z_ub = {
        jk: norm.ppf(np.minimum(cp_upper(o, prep.n[jk[0]], alpha_b / prep.num_classes) + margin, 1.0))
        for jk, o in prep.other.items()
    }

    chosen = np.full((len(p0s), m), -1, dtype=np.int64)
    radius = np.zeros((len(p0s), m))
    for k in range(k_levels - 1, -1, -1):
        _require(prep, k, chosen < 0, p0s)
        stop = (chosen < 0) & (lb[k][None, :] >= p0s[:, None])
        r = prep.sigmas[k] * (z_lb[k][None, :] - z0)
        for j in range(k + 1, k_levels):
            r = np.minimum(r, prep.sigmas[j] * (z0 - z_ub[j, k][None, :]))
        radius = np.where(stop, r, radius)
        chosen = np.where(stop, k, chosen)
    return _finish(p0s, chosen, radius, radius <= 0, Reason.BELOW_THRESHOLD, prep.c_hat, lb)


def _reference(prep: _Prepared, p0s: np.ndarray, alpha: float, margin: float) -> CascadeSweep:
    k_levels, m = prep.c_hat.shape
    z0 = norm.ppf(p0s)[:, None]
    chosen = np.full((len(p0s), m), -1, dtype=np.int64)
    undecided = np.zeros((len(p0s), m), dtype=bool)
    radius = np.zeros((len(p0s), m))
    lowers = np.zeros((k_levels, m))
    for k in range(k_levels - 1, -1, -1):
        alpha_k = alpha / (k_levels - k)  # stage s = K-1-k is tested at α/(s+1)
        lo = np.maximum(cp_lower(prep.n_a[k], prep.n[k], alpha_k) - margin, 0.0)
        hi = np.minimum(cp_upper(prep.n_a[k], prep.n[k], alpha_k) + margin, 1.0)
        lowers[k] = lo
        open_ = (chosen < 0) & ~undecided
        _require(prep, k, open_, p0s)
        stop = open_ & (lo[None, :] >= p0s[:, None])
        undecided |= open_ & ~stop & (hi[None, :] >= p0s[:, None])
        r = prep.sigmas[k] * (norm.ppf(lo)[None, :] - z0)
        r_neg = np.full(r.shape, _REFERENCE_RADIUS_CAP)
        for j in range(k + 1, k_levels):
            cells, largest = prep.groups[j, k]
            p_b = np.where(
                cells >= 3,
                goodman_upper(largest, prep.n[j], alpha_k, np.maximum(cells, 3)),
                # Two or fewer cells: the reference bounds the level's *own* candidate ĉ_j (§4.4 item 5).
                1.0 - cp_lower(prep.n_a[j], prep.n[j], alpha_k),
            )
            p_b = np.minimum(p_b + margin, 1.0)
            with np.errstate(divide="ignore"):
                r_neg = np.minimum(r_neg, prep.sigmas[j] * (z0 - norm.ppf(p_b)[None, :]))
        radius = np.where(stop, np.minimum(r, r_neg), radius)
        chosen = np.where(stop, k, chosen)
    abstain_reason = np.where(undecided, Reason.UNDECIDED, Reason.BELOW_THRESHOLD)
    return _finish(p0s, chosen, radius, radius < 0, abstain_reason, prep.c_hat, lowers)
