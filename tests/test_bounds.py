"""The bounds agree with statsmodels and scipy, and are exact at the edges."""

import numpy as np
import pytest
from scipy.stats import binomtest
from statsmodels.stats.proportion import multinomial_proportions_confint, proportion_confint

from raysmooth.stats import binomial_test_pvalue, cp_lower, cp_upper, goodman_upper, min_samples_to_certify


@pytest.fixture
def random_counts():
    rng = np.random.default_rng(1)
    n = rng.integers(1, 100_000, size=2_000)
    k = rng.integers(0, n + 1)
    # Make sure the edges are well represented.
    k[:200] = 0
    k[200:400] = n[200:400]
    alpha = 10 ** rng.uniform(-6, -0.5, size=len(n))
    return k, n, alpha


def test_clopper_pearson_matches_statsmodels_with_the_two_alpha_convention(random_counts):
    k, n, alpha = random_counts
    lo_ref, hi_ref = proportion_confint(k, n, alpha=2 * alpha, method="beta")
    np.testing.assert_allclose(cp_lower(k, n, alpha), lo_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(cp_upper(k, n, alpha), hi_ref, rtol=1e-9, atol=1e-12)


def test_clopper_pearson_is_exact_at_zero_and_all_successes():
    n = np.array([1, 10, 100, 100_000])
    alpha = 0.001
    assert np.all(cp_lower(0, n, alpha) == 0.0)
    assert np.all(cp_upper(n, n, alpha) == 1.0)
    # Closed forms at the edges: (k = n) lower bound alpha^(1/n); (k = 0) upper bound 1 - alpha^(1/n).
    np.testing.assert_allclose(cp_lower(n, n, alpha), alpha ** (1 / n), rtol=1e-12)
    np.testing.assert_allclose(cp_upper(0, n, alpha), 1 - alpha ** (1 / n), rtol=1e-10)


def test_clopper_pearson_rejects_impossible_counts():
    with pytest.raises(ValueError):
        cp_lower(11, 10, 0.01)
    with pytest.raises(ValueError):
        cp_upper(1, 10, 0.0)
    with pytest.raises(ValueError):
        cp_lower(0, 0, 0.01)


def test_goodman_upper_matches_statsmodels_for_every_cell():
    rng = np.random.default_rng(2)
    for _ in range(200):
        cells = rng.integers(3, 12)
        counts = rng.multinomial(rng.integers(50, 20_000), rng.dirichlet(np.ones(cells)))
        alpha = 10 ** rng.uniform(-5, -1.5)
        ref = multinomial_proportions_confint(counts, alpha=2 * alpha, method="goodman")[:, 1]
        ours = goodman_upper(counts, counts.sum(), alpha, cells)
        np.testing.assert_allclose(ours, ref, rtol=1e-10)


def test_binomial_test_pvalue_matches_scipy_binomtest():
    rng = np.random.default_rng(3)
    k1 = rng.integers(0, 300, size=500)
    k2 = rng.integers(0, 300, size=500)
    k1[k1 + k2 == 0] = 1
    ref = [binomtest(int(a), int(a + b), 0.5).pvalue for a, b in zip(k1, k2)]
    np.testing.assert_allclose(binomial_test_pvalue(k1, k2), ref, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("alpha", [0.1, 0.01, 0.001, 1e-6])
def test_min_samples_to_certify_is_the_first_n_whose_unanimous_bound_reaches_one_half(alpha):
    n = min_samples_to_certify(alpha)
    assert cp_lower(n, n, alpha) >= 0.5
    assert n == 1 or cp_lower(n - 1, n - 1, alpha) < 0.5


def test_ten_samples_at_alpha_one_in_a_thousand_cannot_certify():
    # locuslab/smoothing issue #8: n=10 with alpha=0.001 abstains on every input.
    assert min_samples_to_certify(0.001) == 10
    assert cp_lower(9, 9, 0.001) < 0.5


def test_fractional_counts_are_refused_by_every_bound():
    for bound in (cp_lower, cp_upper):
        with pytest.raises(ValueError, match="whole numbers"):
            bound(2.5, 10, 0.001)
        with pytest.raises(ValueError, match="whole numbers"):
            bound(2, 10.5, 0.001)
    with pytest.raises(ValueError, match="whole numbers"):
        binomial_test_pvalue(2.5, 3)
