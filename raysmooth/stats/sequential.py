"""Sequential CERTIFY: the same certificates from fewer samples (docs/sequential.md).

Each (image, σ) is sampled in rounds of whole units and looked at only at pre-declared totals
N_1 < … < N_K = N_max (a doubling schedule). Look k has its own Clopper–Pearson level α_k with
Σ α_k = α (half of α on the last look), so by the union bound over the declared looks

    P(∃k: CP_lower(A_k, N_k, α_k) > p) ≤ α,

whatever rule decides when to stop: the certified lower bound is the running maximum of the per-look
bounds at the look where sampling stopped. The class ĉ comes from the n0 selection samples, never
from the estimation samples, and no α is spent on it. An image stops once every radius of the user's
grid is decided: certified, out of reach by a futility upper bound at level β (which only trades
cost for power, never validity), or infeasible at N_max. One lower bound serves every grid radius,
so the grid costs no α.

Decisions at the grid thresholds use integer critical counts computed once per run (``Design``), so
a decision never depends on the last ulp of an incomplete-beta inversion; the design is written to
the run's manifest. Everything is vectorised over images. numpy/scipy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from .bounds import cp_lower, cp_upper
from .certify import ABSTAIN, Certificates, Reason
from .checks import check_alpha, check_margin, check_sigma

__all__ = [
    "SPENDINGS",
    "STOP_REASONS",
    "Design",
    "Outcome",
    "look_schedule",
    "spend_alpha",
    "design",
    "decide",
    "replay",
    "sequential_certify",
    "crossing_probability",
]

SPENDINGS = ("half_final", "uniform")
STOP_REASONS = ("", "certified_all", "futile", "cap", "precision", "n_max")
_CERTIFIED_ALL, _FUTILE, _CAP, _PRECISION, _N_MAX = 1, 2, 3, 4, 5


def look_schedule(unit: int, n_max: int, ratio: float = 2.0) -> np.ndarray:
    """Cumulative sample counts at the looks: u·⌈ratio^k⌉ while below N_max, then N_max."""
    if unit < 1 or n_max < unit or n_max % unit:
        raise ValueError(f"n_max must be a positive multiple of the unit, got n_max={n_max}, unit={unit}")
    if not (math.isfinite(ratio) and ratio > 1):
        raise ValueError(f"the look ratio must be greater than 1, got {ratio}")
    looks: list[int] = []
    k = 0
    while True:
        n = unit * math.ceil(ratio**k - 1e-9)
        if n >= n_max:
            break
        if not looks or n > looks[-1]:
            looks.append(n)
        k += 1
    looks.append(n_max)
    return np.asarray(looks, dtype=np.int64)


def spend_alpha(alpha: float, num_looks: int, spending: str = "half_final") -> np.ndarray:
    """α_k per look: ``half_final`` gives α/2 to the last look and α/(2(K−1)) to each earlier one;
    ``uniform`` gives α/K to each. They sum to α."""
    check_alpha(alpha)
    if spending not in SPENDINGS:
        raise ValueError(f"alpha spending must be one of {SPENDINGS}, got {spending!r}")
    if num_looks == 1:
        return np.array([alpha])
    if spending == "uniform":
        return np.full(num_looks, alpha / num_looks)
    return np.append(np.full(num_looks - 1, alpha / (2 * (num_looks - 1))), alpha / 2)


@dataclass(frozen=True)
class Design:
    """Everything the rule needs for one σ, fixed before the first sample."""

    looks: np.ndarray  # (K,) N_k
    alphas: np.ndarray  # (K,) α_k
    alpha: float
    beta: float  # futility level; 0 disables futility stops
    radii: np.ndarray  # (m,) decision grid, ascending, starting at 0
    sigma: float  # the σ the noise had: thresholds p_j = Φ(r_j/σ)
    margin: float  # subtracted from every lower bound (lattice noise)
    lower_crit: np.ndarray  # (K, m): r_j certified at look k iff A_k ≥ lower_crit[k, j]
    upper_crit: np.ndarray  # (K, m): r_j out of reach at look k iff A_k ≤ upper_crit[k, j]
    precision: float | None = None  # mode ii: stop when the radius interval is at most this many σ wide
    r_cap: float | None = None  # mode ii: no need to resolve radii above this

    @property
    def num_looks(self) -> int:
        return len(self.looks)

    @property
    def thresholds(self) -> np.ndarray:
        return norm.cdf(self.radii / self.sigma)

    @property
    def feasible(self) -> int:
        """Index of the largest grid radius that all-success samples can certify at some look (−1: none)."""
        reachable = np.any(self.lower_crit <= self.looks[:, None], axis=0)
        return int(np.flatnonzero(reachable).max()) if reachable.any() else -1

    def to_dict(self) -> dict[str, Any]:
        return {
            "looks": self.looks.tolist(),
            "alphas": self.alphas.tolist(),
            "alpha": self.alpha,
            "beta": self.beta,
            "radii": self.radii.tolist(),
            "sigma": self.sigma,
            "margin": self.margin,
            "lower_crit": self.lower_crit.tolist(),
            "upper_crit": self.upper_crit.tolist(),
            "precision": self.precision,
            "r_cap": self.r_cap,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Design:
        return cls(
            looks=np.asarray(d["looks"], np.int64),
            alphas=np.asarray(d["alphas"], np.float64),
            alpha=float(d["alpha"]),
            beta=float(d["beta"]),
            radii=np.asarray(d["radii"], np.float64),
            sigma=float(d["sigma"]),
            margin=float(d["margin"]),
            lower_crit=np.asarray(d["lower_crit"], np.int64),
            upper_crit=np.asarray(d["upper_crit"], np.int64),
            precision=d.get("precision"),
            r_cap=d.get("r_cap"),
        )


def _first_reaching(bound, targets: np.ndarray, n: int) -> np.ndarray:
    """For each target, the first count A in [0, n] with ``bound(A) >= target`` (n + 1 where none), by
    bisection: ``bound`` (a Clopper–Pearson bound, increasing in A) is evaluated about log2(n) times per
    target instead of at all n + 1 counts, so n_max = 10^9 costs what 10^5 does (it needed 8 GB)."""
    lo = np.zeros(len(targets), np.int64)
    hi = np.full(len(targets), n + 1, np.int64)
    while np.any(lo < hi):
        mid = (lo + hi) // 2
        reached = np.asarray(bound(np.minimum(mid, n))) >= targets
        open_ = lo < hi
        hi = np.where(open_ & reached, mid, hi)
        lo = np.where(open_ & ~reached, mid + 1, lo)
    return lo


def design(
    alpha: float,
    unit: int,
    n_max: int,
    radii,
    sigma: float,
    *,
    ratio: float = 2.0,
    spending: str = "half_final",
    beta: float = 0.05,
    margin: float = 0.0,
    precision: float | None = None,
    r_cap: float | None = None,
) -> Design:
    """The look schedule, the per-look levels and the integer critical counts for one σ."""
    check_sigma(sigma)
    margin = check_margin(margin)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"the futility level beta must lie in [0, 1), got {beta}")
    given = np.asarray(radii, dtype=np.float64).ravel()
    if np.any(~np.isfinite(given)) or np.any(given < 0):
        raise ValueError(f"the radius grid must hold non-negative numbers, got {given.tolist()}")
    radii = np.unique(np.append(given, 0.0))
    if precision is not None and not precision > 0:
        raise ValueError(f"precision must be positive, got {precision}")
    if r_cap is not None and not r_cap > 0:
        raise ValueError(f"r_cap must be positive, got {r_cap}")
    looks = look_schedule(unit, n_max, ratio)
    alphas = spend_alpha(alpha, len(looks), spending)
    p = norm.cdf(radii / sigma)
    lower = np.empty((len(looks), len(radii)), np.int64)
    upper = np.empty((len(looks), len(radii)), np.int64)
    for k, (n, a_k) in enumerate(zip(looks, alphas)):
        # first A whose lower bound reaches p_j (n+1: none)
        lower[k] = _first_reaching(lambda a, n=n, a_k=a_k: cp_lower(a, n, a_k), p + margin, n)
        if beta > 0:  # last A whose upper bound stays below p_j
            upper[k] = _first_reaching(lambda a, n=n: cp_upper(a, n, beta / len(looks)), p, n) - 1
        else:
            upper[k] = -1
    return Design(
        looks,
        alphas,
        float(alpha),
        float(beta),
        radii,
        float(sigma),
        margin,
        lower,
        upper,
        None if precision is None else float(precision),
        None if r_cap is None else float(r_cap),
    )


@dataclass(frozen=True)
class Outcome:
    """The rule replayed on stored counts: one entry per (image, σ) pair."""

    stop_look: np.ndarray  # (M,) index of the look where sampling stopped (−1: not even one round)
    grid_index: np.ndarray  # (M,) largest certified grid index at that look (−1: none)
    lower: np.ndarray  # (M,) running maximum of the lower bounds (margin subtracted)
    upper: np.ndarray  # (M,) running minimum of the futility upper bounds
    reason: np.ndarray  # (M,) int8 codes of STOP_REASONS (0: still open)


def _state(d: Design, a: np.ndarray, k: int, prev: tuple | None, bounds: bool = True):
    """Fold look k (cumulative counts ``a``) into the running state (J, first ruled-out index, L, U).
    The grid decisions need only the integer critical counts; ``bounds`` adds the continuous L and U
    (for radii, and for mode ii)."""
    m = len(d.radii)
    certified = a[:, None] >= d.lower_crit[k][None, :]  # a lower set in j
    j_k = np.where(certified.any(axis=1), certified.sum(axis=1) - 1, -1)
    ruled_out = a[:, None] <= d.upper_crit[k][None, :]  # an upper set in j
    f_k = np.where(ruled_out.any(axis=1), m - ruled_out.sum(axis=1), m)
    n, a_k = d.looks[k], d.alphas[k]
    if bounds:
        lo = cp_lower(a, n, a_k) - d.margin
        hi = cp_upper(a, n, d.beta / d.num_looks) if d.beta > 0 else np.ones(len(a))
    else:
        lo, hi = np.zeros(len(a)), np.ones(len(a))
    if prev is None:
        return j_k, f_k, lo, hi
    j, f, low, up = prev
    return np.maximum(j, j_k), np.minimum(f, f_k), np.maximum(low, lo), np.minimum(up, hi)


def _stops(d: Design, state, k: int) -> np.ndarray:
    """Reason codes for stopping after look k (0: continue)."""
    j, f, low, up = state
    reason = np.zeros(len(j), np.int8)
    if d.precision is None:
        reason = np.where(j >= d.feasible, _CERTIFIED_ALL, reason)
        reason = np.where((reason == 0) & (j + 1 >= f), _FUTILE, reason)
    else:
        cap = norm.cdf(d.r_cap / d.sigma) if d.r_cap is not None else 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            width = norm.ppf(np.minimum(up, cap)) - norm.ppf(low)
        reason = np.where(up < 0.5, _FUTILE, reason)
        reason = np.where((reason == 0) & (low >= cap), _CAP, reason)
        reason = np.where((reason == 0) & (low >= 0.5) & (width <= d.precision), _PRECISION, reason)
    if k == d.num_looks - 1:
        reason = np.where(reason == 0, _N_MAX, reason)
    return reason


def decide(d: Design, history: np.ndarray) -> np.ndarray:
    """Whether to sample another round, for pairs whose cumulative counts at looks 1..k are the rows
    of ``history`` (M, k): the planner's question after each complete round."""
    history = np.atleast_2d(np.asarray(history, dtype=np.int64))
    if history.shape[1] > d.num_looks:
        raise ValueError(f"{history.shape[1]} looks decided, but the schedule has {d.num_looks}")
    state = None
    for k in range(history.shape[1]):
        state = _state(d, history[:, k], k, state, bounds=d.precision is not None)
    return _stops(d, state, history.shape[1] - 1) == 0


def replay(
    d: Design, cumulative: np.ndarray, rounds: np.ndarray | None = None, stored_stop: np.ndarray | None = None
) -> Outcome:
    """Replay the rule on cumulative counts (M, K) of ĉ at the looks; ``rounds`` (M,) says how many
    looks were sampled (all by default). Where ``stored_stop`` (M,) gives the look at which the run
    stopped (from its stored decisions; −1 where unknown), that look is used: a decision is never
    re-taken, whatever a scipy build would compute today."""
    cumulative = np.atleast_2d(np.asarray(cumulative, dtype=np.int64))
    m_pairs, k_looks = cumulative.shape
    rounds = np.full(m_pairs, k_looks) if rounds is None else np.asarray(rounds, np.int64)
    states, reasons = [], []
    state = None
    for k in range(k_looks):
        state = _state(d, np.where(rounds > k, cumulative[:, k], 0), k, state)
        states.append(state)
        reasons.append(_stops(d, state, k))
    reason_at = np.stack(reasons)  # (K, M)
    looks = np.arange(k_looks)[:, None]
    stopping = (reason_at > 0) & (looks < rounds[None, :])
    first = np.where(stopping.any(axis=0), stopping.argmax(axis=0), rounds - 1)  # the rule's own stop
    if stored_stop is not None:
        stored_stop = np.asarray(stored_stop, np.int64)
        first = np.where(stored_stop >= 0, stored_stop, first)
    stop = np.where(rounds > 0, np.minimum(first, rounds - 1), -1)
    at = np.maximum(stop, 0)
    cols = np.arange(m_pairs)
    j = np.stack([s[0] for s in states])[at, cols]
    low = np.stack([s[2] for s in states])[at, cols]
    up = np.stack([s[3] for s in states])[at, cols]
    reason = np.where(stop >= 0, reason_at[at, cols], 0).astype(np.int8)
    return Outcome(
        stop, np.where(stop >= 0, j, -1), np.where(stop >= 0, low, 0.0), np.where(stop >= 0, up, 1.0), reason
    )


def sequential_certify(
    c_hat: np.ndarray,
    cumulative: np.ndarray,
    d: Design,
    rounds: np.ndarray | None = None,
    stored_stop: np.ndarray | None = None,
) -> tuple[Certificates, Outcome]:
    """Certificates of a sequential run: ĉ from the selection counts, the rule replayed on the
    cumulative counts of ĉ at the looks. Certified iff the integer decisions certify r = 0; the radius
    is σΦ⁻¹(L) (continuous, valid), never below the grid radius the decisions certified."""
    out = replay(d, cumulative, rounds, stored_stop)
    ok = (out.grid_index >= 0) & (np.asarray(c_hat) >= 0) & (out.stop_look >= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        continuous = d.sigma * norm.ppf(np.clip(out.lower, 0.0, 1.0))
    if d.precision is not None:
        ok = (out.lower >= 0.5) & (np.asarray(c_hat) >= 0) & (out.stop_look >= 0)
        floor = np.zeros(len(ok))
    else:
        floor = d.radii[np.maximum(out.grid_index, 0)]
    radius = np.where(ok, np.maximum(np.nan_to_num(continuous, nan=0.0, neginf=0.0), floor), 0.0)
    cert = Certificates(
        prediction=np.where(ok, c_hat, ABSTAIN),
        radius=radius,
        reason=np.where(ok, Reason.NONE, Reason.BELOW_THRESHOLD).astype(np.int8),
        level=np.where(ok, 0, -1),
        p_lower=np.where(out.stop_look >= 0, out.lower, np.nan),
    )
    return cert, out


def crossing_probability(p: float, looks, alphas) -> float:
    """P(∃k: CP_lower(A_k, N_k, α_k) > p) for A_k ~ Bin(N_k, p) with independent increments, exactly, by
    dynamic programming over the counts at the looks: the largest chance that any stopping rule on
    this schedule certifies a bound above the true p (the type-I error)."""
    from scipy.signal import fftconvolve
    from scipy.stats import binom

    looks, alphas = np.asarray(looks, np.int64), np.asarray(alphas, np.float64)
    alive = np.array([1.0])  # distribution of A over the paths that have not crossed yet
    crossed, prev = 0.0, 0
    for n, a_k in zip(looks, alphas):
        step = binom.pmf(np.arange(n - prev + 1), n - prev, p)
        alive = np.clip(fftconvolve(alive, step)[: n + 1], 0.0, None)
        lows = cp_lower(np.arange(n + 1), n, a_k)
        over = lows > p
        crossed += float(alive[over].sum())
        alive = np.where(over, 0.0, alive)
        prev = n
    return crossed
