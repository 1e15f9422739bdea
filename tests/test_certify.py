"""CERTIFY and PREDICT: against an independent per-image reference, and against a linear classifier
whose smoothed probability Φ(d/σ) and certified radius d are known in closed form."""

import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from raysmooth.stats import ABSTAIN, SparseCounts, certify, predict


def _two_class(k1: np.ndarray, n: int) -> SparseCounts:
    return SparseCounts.from_dense(np.stack([n - k1, k1], axis=1))


def test_certify_matches_a_per_image_reference():
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.full(10, 0.2), size=400)
    sel = rng.multinomial(100, probs)
    est = rng.multinomial(2000, probs)
    sigma, alpha = 0.5, 0.001
    cert = certify(SparseCounts.from_dense(sel), SparseCounts.from_dense(est), sigma, alpha)
    for i in range(len(probs)):
        c = int(sel[i].argmax())
        lo = proportion_confint(est[i, c], 2000, alpha=2 * alpha, method="beta")[0]
        if lo < 0.5:
            assert cert.prediction[i] == ABSTAIN and cert.radius[i] == 0
        else:
            assert cert.prediction[i] == c
            assert cert.radius[i] == pytest.approx(sigma * norm.ppf(lo), rel=1e-9, abs=1e-12)


def test_a_certificate_at_a_smaller_alpha_never_claims_more_than_at_a_larger_one():
    """What lets a sweep over α choose after the fact at the largest α swept (docs/methods.md §4.5): from
    the same counts, the class is the same and bound and radius only grow with α."""
    rng = np.random.default_rng(9)
    probs = rng.dirichlet(np.full(10, 0.3), size=500)
    sel = SparseCounts.from_dense(rng.multinomial(100, probs))
    est = SparseCounts.from_dense(rng.multinomial(1000, probs))
    certs = [certify(sel, est, 0.5, a) for a in (1e-5, 1e-3, 0.01, 0.1)]
    for small, large in zip(certs, certs[1:]):
        assert np.all(small.p_lower <= large.p_lower) and np.all(small.radius <= large.radius)
        certified = small.prediction != ABSTAIN
        assert np.array_equal(small.prediction[certified], large.prediction[certified])


def test_predict_matches_a_per_image_binomial_test():
    rng = np.random.default_rng(8)
    probs = rng.dirichlet(np.full(6, 0.5), size=300)
    est = rng.multinomial(200, probs)
    out = predict(SparseCounts.from_dense(est), 0.01)
    for i in range(len(est)):
        top = np.argsort(-est[i], kind="stable")[:2]
        n1, n2 = est[i, top[0]], est[i, top[1]]
        expect = top[0] if binomtest(int(n1), int(n1 + n2), 0.5).pvalue <= 0.01 else ABSTAIN
        assert out.prediction[i] == expect


def test_predict_abstains_on_a_tie():
    out = predict(SparseCounts.from_dense(np.array([[500, 500, 0]])), 0.001)
    assert out.prediction[0] == ABSTAIN


def test_linear_classifier_lower_bound_covers_the_true_probability_at_rate_one_minus_alpha():
    # f(x) = 1[w·x + b > 0] under N(0, σ²I): P[f = 1] = Φ(d/σ) with d the signed distance.
    rng = np.random.default_rng(9)
    sigma, alpha, n, trials = 0.5, 0.05, 500, 40_000
    d = 0.3
    p = norm.cdf(d / sigma)
    k_sel = rng.binomial(100, p, size=trials)
    k_est = rng.binomial(n, p, size=trials)
    cert = certify(_two_class(k_sel, 100), _two_class(k_est, n), sigma, alpha)
    # A certificate is wrong when it names class 0 or a radius beyond the distance d.
    wrong = (cert.prediction == 0) | ((cert.prediction == 1) & (cert.radius > d))
    slack = 4 * np.sqrt(alpha * (1 - alpha) / trials)
    assert wrong.mean() <= alpha + slack
    # ... and Clopper–Pearson is not needlessly loose: the failure rate is of the order of alpha.
    assert wrong.mean() >= alpha / 3


def test_linear_classifier_predict_names_the_wrong_class_at_rate_at_most_alpha():
    # Just above the decision boundary p_A = Φ(d/σ) is barely above ½: the hardest case for PREDICT,
    # whose two-sided test then names class 0 about α/2 of the time and never more than α.
    rng = np.random.default_rng(11)
    sigma, alpha, n, trials = 0.5, 0.05, 500, 40_000
    p = norm.cdf(0.001 / sigma)
    out = predict(_two_class(rng.binomial(n, p, size=trials), n), alpha)
    wrong = (out.prediction == 0).mean()
    slack = 4 * np.sqrt(alpha / 2 * (1 - alpha / 2) / trials)
    assert wrong <= alpha / 2 + slack
    assert wrong >= alpha / 4
    # Far from the boundary it answers: the test is not just abstaining.
    far = predict(_two_class(rng.binomial(n, norm.cdf(0.5 / sigma), size=1_000), n), alpha)
    assert (far.prediction == 1).mean() > 0.99


def test_predict_on_a_three_class_tie_answers_at_rate_at_most_alpha():
    # p = (0.45, 0.45, 0.10): g has no top class, so any answer is one PREDICT must avoid but at rate α;
    # which class is runner-up is itself decided by the samples.
    rng = np.random.default_rng(12)
    alpha, n, trials = 0.05, 400, 40_000
    out = predict(SparseCounts.from_dense(rng.multinomial(n, [0.45, 0.45, 0.10], size=trials)), alpha)
    answered = (out.prediction != ABSTAIN).mean()
    assert answered <= alpha + 4 * np.sqrt(alpha * (1 - alpha) / trials)
    assert answered >= alpha / 2


def test_linear_classifier_radius_approaches_the_distance_from_below_as_n_grows():
    rng = np.random.default_rng(10)
    sigma, d = 0.25, 0.4
    p = norm.cdf(d / sigma)
    medians = []
    for n in (100, 10_000, 1_000_000):
        k = rng.binomial(n, p, size=2_000)
        cert = certify(_two_class(np.full(2_000, 100), 100), _two_class(k, n), sigma, 0.001)
        medians.append(np.median(cert.radius))
    assert medians[0] < medians[1] < medians[2] < d
    assert medians[2] > 0.97 * d


@pytest.mark.parametrize("as_given", [str, lambda v: str(v).encode(), lambda v: True, lambda v: np.bool_(True)])
def test_parameters_given_as_text_or_bools_are_not_numbers(as_given):
    """float() reads "0.7" and True; a threshold parsed from text or a σ of True is a caller's mistake."""
    from raysmooth.stats.checks import check_alpha, check_p0, check_sigma

    for check, valid in ((check_alpha, 0.01), (check_p0, 0.7), (check_sigma, 1.0)):
        assert check(valid) == valid and check(np.float32(valid)) == pytest.approx(valid)
        with pytest.raises(ValueError, match="must"):
            check(as_given(valid))


def test_certify_refuses_selection_and_estimation_counts_of_different_classifiers():
    two, three = SparseCounts.from_dense(np.array([[90, 10]])), SparseCounts.from_dense(np.array([[90, 10, 0]]))
    with pytest.raises(ValueError, match="same number of classes, got 2 and 3"):
        certify(two, three, 0.5, 0.001)


def test_certify_refuses_bad_parameters():
    s = SparseCounts.from_dense(np.array([[3, 1]]))
    with pytest.raises(ValueError):
        certify(s, s, 0.5, 1.5)
    with pytest.raises(ValueError):
        certify(s, s, -0.5, 0.01)


def test_dense_counts_certify_and_predict_as_their_sparse_form():
    """A notebook holds counts as an (images, classes) array, or one image's (classes,) vector: both were
    an AttributeError from deep inside (no num_rows, no top2)."""
    rng = np.random.default_rng(11)
    probs = rng.dirichlet(np.full(5, 0.3), size=50)
    sel, est = rng.multinomial(50, probs), rng.multinomial(500, probs)
    sparse = certify(SparseCounts.from_dense(sel), SparseCounts.from_dense(est), 0.5, 0.001)
    dense = certify(sel, est, 0.5, 0.001)
    assert np.array_equal(dense.prediction, sparse.prediction) and np.array_equal(dense.radius, sparse.radius)
    one = certify(sel[3], est[3], 0.5, 0.001)
    assert one.prediction.tolist() == [sparse.prediction[3]] and one.radius.tolist() == [sparse.radius[3]]
    assert np.array_equal(predict(est, 0.01).prediction, predict(SparseCounts.from_dense(est), 0.01).prediction)
    with pytest.raises(ValueError, match="whole numbers"):
        certify(sel + 0.5, est, 0.5, 0.001)


def test_the_readme_stats_example_certifies_what_scipy_says(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- example: stats -->\s*```python\n(.*?)```", text, flags=re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    cert = scope["cert"]
    lower = proportion_confint(980, 1000, alpha=2 * 0.001, method="beta")[0]
    assert cert.prediction.tolist() == [1, ABSTAIN]
    assert cert.radius.tolist() == pytest.approx([0.5 * norm.ppf(lower), 0.0], rel=1e-9)
    assert capsys.readouterr().out.strip()
