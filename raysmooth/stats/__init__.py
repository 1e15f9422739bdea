"""Pure statistics of randomized smoothing: bounds, CERTIFY/PREDICT, the cascade, sweeps.

numpy and scipy only (no torch, no ray), so certificates can be recomputed anywhere from stored counts.
"""

from . import sequential  # noqa: E402 - the submodule, as stats.sequential
from .bounds import binomial_test_pvalue, cp_lower, cp_upper, goodman_upper, min_samples_to_certify
from .cascade import (
    POLICIES,
    CascadeSweep,
    Level,
    MissingLevelError,
    cascade_certify,
    cascade_sweep,
    level_stops,
    prepare_levels,
)
from .certify import ABSTAIN, Certificates, Reason, certify, predict
from .checks import check_alpha, check_p0, check_sigma
from .counts import SparseCounts, reference_groups

__all__ = [
    "ABSTAIN",
    "POLICIES",
    "CascadeSweep",
    "Certificates",
    "Level",
    "MissingLevelError",
    "Reason",
    "SparseCounts",
    "binomial_test_pvalue",
    "cascade_certify",
    "cascade_sweep",
    "check_alpha",
    "check_p0",
    "check_sigma",
    "certify",
    "cp_lower",
    "cp_upper",
    "goodman_upper",
    "level_stops",
    "min_samples_to_certify",
    "predict",
    "prepare_levels",
    "reference_groups",
    "sequential",
]
