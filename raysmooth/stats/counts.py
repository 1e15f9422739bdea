"""Sparse per-image class counts and the vectorised reductions the certificates need.

A row holds the nonzero (class, count) pairs of one image at one (σ, phase). With 1,000 classes and
a denoised classifier that mostly agrees with itself, a row has a handful of entries, so everything
here works on the flat CSR arrays and never materialises an images × classes matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checks import whole_counts

__all__ = ["SparseCounts", "reference_groups"]


@dataclass(frozen=True)
class SparseCounts:
    """Class counts of ``num_rows`` images in CSR form.

    ``classes[offsets[i]:offsets[i+1]]`` and ``counts[...]`` are the nonzero entries of row i, with
    strictly increasing class ids. ``num_classes`` is the classifier's class count (needed for
    Bonferroni corrections even where most classes never occur).
    """

    offsets: np.ndarray  # int64, (rows + 1,)
    classes: np.ndarray  # int32, (nnz,)
    counts: np.ndarray  # int64, (nnz,)
    num_classes: int

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.classes):
            raise ValueError("offsets must start at 0 and end at the number of entries")
        if len(self.classes) != len(self.counts):
            raise ValueError("classes and counts must have the same length")
        if len(self.classes) and (self.classes.min() < 0 or self.classes.max() >= self.num_classes):
            raise ValueError(f"class ids must lie in [0, {self.num_classes})")
        if len(self.counts) and self.counts.min() < 0:
            raise ValueError("counts must be non-negative")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def of(cls, counts: SparseCounts | np.ndarray) -> SparseCounts:
        """``counts`` as SparseCounts: dense (images, classes) counts are converted, and one image's
        (classes,) vector is a batch of one, so the statistics take what a notebook naturally holds."""
        if isinstance(counts, SparseCounts):
            return counts
        dense = np.asarray(counts)
        return cls.from_dense(dense[None] if dense.ndim == 1 else dense)

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> SparseCounts:
        dense = whole_counts(dense)
        if dense.ndim != 2:
            raise ValueError("dense counts must be a 2-d array (images, classes)")
        rows, cols = np.nonzero(dense)
        offsets = np.zeros(dense.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=offsets[1:])
        return cls(offsets, cols.astype(np.int32), dense[rows, cols].astype(np.int64), dense.shape[1])

    @classmethod
    def from_flat(cls, offsets, classes, counts, num_classes: int) -> SparseCounts:
        """From flat CSR arrays in any within-row order: sorts by class and drops zero entries."""
        offsets = np.asarray(offsets, dtype=np.int64)
        rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        return cls.from_coo(rows, classes, counts, len(offsets) - 1, num_classes)

    @classmethod
    def from_coo(cls, rows, classes, counts, num_rows: int, num_classes: int) -> SparseCounts:
        """From (row, class, count) triplets in any order; rows without entries stay empty."""
        rows = np.asarray(rows, dtype=np.int64)
        classes = np.asarray(classes, dtype=np.int32)
        counts = whole_counts(counts)
        order = np.lexsort((classes, rows))
        keep = counts[order] > 0
        rows, classes, counts = rows[order][keep], classes[order][keep], counts[order][keep]
        if len(rows) > 1 and np.any((np.diff(rows) == 0) & (np.diff(classes) == 0)):
            raise ValueError("a class appears twice in one row")
        new_offsets = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=num_rows), out=new_offsets[1:])
        return cls(new_offsets, classes, counts, num_classes)

    # ---- basic views --------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def row_ids(self) -> np.ndarray:
        """Row index of every stored entry."""
        return np.repeat(np.arange(self.num_rows), np.diff(self.offsets))

    def totals(self) -> np.ndarray:
        """Samples per row (n)."""
        cumulative = np.concatenate(([0], np.cumsum(self.counts)))
        return cumulative[self.offsets[1:]] - cumulative[self.offsets[:-1]]

    def to_dense(self) -> np.ndarray:
        out = np.zeros((self.num_rows, self.num_classes), dtype=np.int64)
        out[self.row_ids, self.classes] = self.counts
        return out

    def take(self, rows: np.ndarray) -> SparseCounts:
        """The given rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = np.diff(self.offsets)[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = np.repeat(self.offsets[rows], lengths)
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
        idx = starts + within
        return SparseCounts(offsets, self.classes[idx], self.counts[idx], self.num_classes)

    # ---- reductions ---------------------------------------------------------------------------
    def _ranked(self) -> tuple[np.ndarray, np.ndarray]:
        """Entry order by (row, count descending, class ascending) and each entry's rank in its row."""
        rows = self.row_ids
        order = np.lexsort((self.classes, -self.counts, rows))
        rank = np.arange(len(order)) - np.repeat(self.offsets[:-1], np.diff(self.offsets))
        return order, rank

    def top2(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(class1, count1, class2, count2)`` per row; ties go to the lower class id.

        Missing entries are class -1 with count 0. ``class1`` is therefore ``argmax`` of the dense row,
        as ``numpy.argmax`` breaks ties (except that an all-zero row gives -1).
        """
        order, rank = self._ranked()
        rows = self.row_ids
        out = []
        for r in (0, 1):
            cls_ = np.full(self.num_rows, -1, dtype=np.int64)
            cnt = np.zeros(self.num_rows, dtype=np.int64)
            sel = order[rank == r]
            cls_[rows[sel]] = self.classes[sel]
            cnt[rows[sel]] = self.counts[sel]
            out += [cls_, cnt]
        return tuple(out)  # type: ignore[return-value]

    def argmax(self) -> np.ndarray:
        return self.top2()[0]

    def count_of(self, cls: np.ndarray) -> np.ndarray:
        """Count of class ``cls[i]`` in row i (0 where absent or ``cls[i] < 0``)."""
        cls = np.asarray(cls, dtype=np.int64)
        rows = self.row_ids
        hit = self.classes == cls[rows]
        out = np.zeros(self.num_rows, dtype=np.int64)
        out[rows[hit]] = self.counts[hit]
        return out

    def max_excluding(self, cls: np.ndarray) -> np.ndarray:
        """Largest count in row i over classes other than ``cls[i]`` (0 if there are none)."""
        c1, n1, _c2, n2 = self.top2()
        return np.where(c1 == np.asarray(cls), n2, n1)


def reference_groups(counts: SparseCounts, exclude: np.ndarray, min_count: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The multi-scale paper's count reduction (docs/methods.md §4.3), vectorised over rows.

    Excluding class ``exclude[i]``, the other counts of row i are sorted descending; each count of at
    least ``min_count`` is its own group; smaller counts are pooled in that order into a group whenever
    the pool reaches ``min_count``; a final remainder joins the last group emitted (the excluded class
    itself when none was). Returns ``(num_cells, largest_other_group)``, where ``num_cells`` counts the
    excluded class's cell too, as the reference's ``len(r)`` does. Zero counts never change a group.
    """
    exclude = np.asarray(exclude, dtype=np.int64)
    rows = counts.row_ids
    keep = counts.classes != exclude[rows]
    rows, vals = rows[keep], counts.counts[keep]
    m = counts.num_rows

    big = vals >= min_count
    n_big = np.bincount(rows[big], minlength=m)
    max_big = np.zeros(m, dtype=np.int64)
    np.maximum.at(max_big, rows[big], vals[big])
    min_big = np.full(m, np.iinfo(np.int64).max)
    np.minimum.at(min_big, rows[big], vals[big])

    # The small counts of each row, descending, padded with zeros into a (rows, width) matrix; the
    # pooling scan then runs over columns (at most ``width`` steps), not over rows.
    s_rows, s_vals = rows[~big], vals[~big]
    order = np.lexsort((-s_vals, s_rows))
    s_rows, s_vals = s_rows[order], s_vals[order]
    n_small = np.bincount(s_rows, minlength=m)
    width = int(n_small.max()) if m else 0
    start = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(n_small, out=start[1:])
    small = np.zeros((m, width), dtype=np.int64)
    small[s_rows, np.arange(len(s_rows)) - start[s_rows]] = s_vals

    pool = np.zeros(m, dtype=np.int64)
    n_pooled = np.zeros(m, dtype=np.int64)
    last_pooled = np.zeros(m, dtype=np.int64)
    max_pooled = np.zeros(m, dtype=np.int64)
    for col in range(width):
        pool += small[:, col]
        emit = pool >= min_count
        n_pooled += emit
        last_pooled = np.where(emit, pool, last_pooled)
        max_pooled = np.maximum(max_pooled, np.where(emit, pool, 0))
        pool = np.where(emit, 0, pool)

    rem = pool
    largest = np.where(
        n_pooled > 0,
        np.maximum(max_big, np.maximum(max_pooled, last_pooled + rem)),
        np.where(n_big > 0, np.maximum(max_big, min_big + rem), 0),
    )
    return 1 + n_big + n_pooled, largest
