"""The invariants of the statistics, as plain ``ValueError``s: one check per parameter, used by every
function here and by the config layer (which names the key in its one-line message)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["check_alpha", "check_p0", "check_sigma", "check_margin", "whole_counts"]


def _real(x: object) -> float | None:
    """A finite number, or None. Text and bools are not numbers here, though float() takes them:
    p0="0.5" would be a threshold parsed from text and sigma=True a noise level of 1."""
    if isinstance(x, (str, bytes, bool)) or getattr(getattr(x, "dtype", None), "kind", "") == "b":
        return None
    try:
        value = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _shown(x: object) -> object:
    """A value as a message shows it: text quoted (so '0.5' reads as the string it is), numbers plain."""
    return repr(x) if isinstance(x, (str, bytes)) else x


def check_alpha(alpha: object) -> float:
    """A certificate's failure probability, in (0, 0.5): from 0.5 up a certificate is no more likely right
    than wrong, and its lower bound on p_A reaches the observed frequency (the median of the beta bound)."""
    value = _real(alpha)
    if value is None or not 0.0 < value < 0.5:
        raise ValueError(
            f"alpha must lie in (0, 0.5), got {_shown(alpha)}: it is the chance a certificate is wrong "
            "(0.001 is the usual); at 0.5 or more one is no more likely right than wrong"
        )
    return value


def check_p0(p0: object) -> float:
    """A cascade threshold in [0.5, 1)."""
    value = _real(p0)
    if value is None or not 0.5 <= value < 1.0:
        raise ValueError(f"p0 must lie in [0.5, 1), got {_shown(p0)}")
    return value


def check_sigma(sigma: object) -> float:
    """A noise level: positive and finite."""
    value = _real(sigma)
    if value is None or not value > 0:
        raise ValueError(f"sigma must be a positive finite number, got {_shown(sigma)}")
    return value


def check_margin(margin: object) -> float:
    """How far the sampled distribution may be from the certified one (lattice noise): in [0, 0.5)."""
    value = _real(margin)
    if value is None or not 0.0 <= value < 0.5:
        raise ValueError(f"the margin on p_A must lie in [0, 0.5), got {_shown(margin)}")
    return value


def whole_counts(values: object) -> np.ndarray:
    """Sample counts as int64, refusing what a cast would change without a word: 3.5 samples (cut to 3,
    and a bound of 2.5 successes is a number of no experiment), NaN, True/False, text."""
    array = np.asarray(values)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "f" and np.isfinite(array).all() and (array == np.round(array)).all():
        return array.astype(np.int64)
    raise ValueError(
        f"counts must be whole numbers of samples, got an array of {array.dtype}"
        + (" with fractions or NaN" if array.dtype.kind == "f" else "")
    )
