"""Sparse counts reduce exactly as their dense matrices do."""

import numpy as np
import pytest

from raysmooth.stats import SparseCounts, reference_groups


@pytest.fixture
def dense():
    rng = np.random.default_rng(4)
    d = rng.multinomial(200, rng.dirichlet(np.full(30, 0.2), size=500))
    d[0] = 0  # an empty row
    d[1, :] = 0
    d[1, [3, 7]] = 50  # a tie between two classes
    return d


def test_round_trip_through_dense(dense):
    assert np.array_equal(SparseCounts.from_dense(dense).to_dense(), dense)


def test_totals_argmax_and_top_two_match_dense(dense):
    s = SparseCounts.from_dense(dense)
    assert np.array_equal(s.totals(), dense.sum(1))
    c1, n1, c2, n2 = s.top2()
    nonempty = dense.sum(1) > 0
    assert np.array_equal(c1[nonempty], dense.argmax(1)[nonempty])  # ties to the lower class, as numpy
    assert c1[0] == -1 and n1[0] == 0
    ordered = -np.sort(-dense, axis=1)
    assert np.array_equal(n1, ordered[:, 0])
    assert np.array_equal(n2, ordered[:, 1])
    assert (c1[1], c2[1]) == (3, 7)


def test_count_of_and_max_excluding_match_dense(dense):
    s = SparseCounts.from_dense(dense)
    rng = np.random.default_rng(5)
    cls = rng.integers(0, dense.shape[1], size=len(dense))
    assert np.array_equal(s.count_of(cls), dense[np.arange(len(dense)), cls])
    masked = dense.copy()
    masked[np.arange(len(dense)), cls] = -1
    assert np.array_equal(s.max_excluding(cls), np.maximum(masked.max(1), 0))


def test_take_reorders_rows(dense):
    s = SparseCounts.from_dense(dense)
    rows = np.array([5, 0, 3, 3])
    assert np.array_equal(s.take(rows).to_dense(), dense[rows])


def test_from_flat_sorts_rows_and_refuses_a_class_twice():
    s = SparseCounts.from_flat([0, 3], [4, 1, 2], [1, 2, 3], 5)
    assert s.to_dense().tolist() == [[0, 2, 3, 0, 1]]
    with pytest.raises(ValueError):
        SparseCounts.from_flat([0, 2], [1, 1], [1, 2], 5)


@pytest.mark.parametrize("bad", [[[3.5, 1.0]], [[np.nan, 1.0]], [[True, False]], [["3", "1"]]])
def test_counts_that_a_cast_would_change_are_refused_not_cut(bad):
    """3.5 samples became 3 and True one sample, without a word."""
    with pytest.raises(ValueError, match="counts must be whole numbers of samples"):
        SparseCounts.from_dense(np.array(bad))
    with pytest.raises(ValueError, match="counts must be whole numbers of samples"):
        SparseCounts.from_coo([0, 0], [0, 1], np.array(bad)[0], 1, 2)
    assert SparseCounts.from_dense(np.array([[3.0, 1.0]])).to_dense().tolist() == [[3, 1]]


def _paper_reduction(counts: np.ndarray, c: int) -> list[int]:
    """docs/methods.md §4.3, transcribed literally: the oracle for the vectorised version."""
    counts = counts.copy()
    r = [counts[c]]
    counts[c] = 0
    pool = 0
    for value in sorted(counts, reverse=True):
        if value >= 5:
            r.append(value)
        else:
            pool += value
            if pool >= 5:
                r.append(pool)
                pool = 0
    if pool > 0:
        r[-1] += pool
    return r


def test_reference_groups_equal_the_papers_reduction(dense):
    rng = np.random.default_rng(6)
    # Many small counts exercise the pooling; some rows have only small counts.
    small = rng.multinomial(30, rng.dirichlet(np.full(40, 0.5), size=300))
    for d in (dense, small):
        s = SparseCounts.from_dense(d)
        exclude = rng.integers(0, d.shape[1], size=len(d))
        cells, largest = reference_groups(s, exclude)
        for i in range(len(d)):
            r = _paper_reduction(d[i], exclude[i])
            assert cells[i] == len(r)
            assert largest[i] == (max(r[1:]) if len(r) > 1 else 0)
