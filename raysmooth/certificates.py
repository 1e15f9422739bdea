"""Certificates from the counts table: the bridge between ``store`` and ``stats``.

Everything a certification run reports is recomputed here from stored counts alone, so a new p0, α
or policy never needs a single new sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from . import stats
from .store import CERTIFICATES_SCHEMA, PHASES, StoreError

__all__ = ["CountsView", "counts_view", "derive_certificates", "sweep_certificates"]


@dataclass(frozen=True)
class CountsView:
    """The counts table as aligned arrays: M images × K levels (σ ascending)."""

    run_id: str
    model_id: str
    image_ids: np.ndarray  # (M,)
    labels: np.ndarray  # (M,)
    levels: list[stats.Level]
    num_classes: int

    @property
    def sigmas(self) -> list[float]:
        return [lv.sigma for lv in self.levels]


def _sparse_rows(table: pa.Table, positions: np.ndarray, num_rows: int, num_classes: int) -> stats.SparseCounts:
    """The list columns of ``table`` as a SparseCounts of ``num_rows`` rows, row i of the table landing
    at ``positions[i]`` (other rows empty)."""
    classes = table.column("classes").combine_chunks()
    counts = table.column("counts").combine_chunks()
    offsets = classes.offsets.to_numpy()
    rows = np.repeat(np.asarray(positions, dtype=np.int64), np.diff(offsets))
    return stats.SparseCounts.from_coo(rows, classes.values.to_numpy()[offsets[0] : offsets[-1]],
                                       counts.values.to_numpy()[offsets[0] : offsets[-1]], num_rows, num_classes)


def counts_view(table: pa.Table, allow_missing: bool = False) -> CountsView:
    """Align the rows of a counts table by image.

    Every image must have every (σ, phase) unless ``allow_missing`` (a lazy-cascade run), in which
    case levels carry a ``present`` mask and the cascade refuses thresholds that need what is absent.
    """
    if table.num_rows == 0:
        raise StoreError("the counts table is empty")
    for col in ("model_id", "num_classes", "run_id"):
        values = table.column(col).unique().to_pylist()
        if len(values) != 1:
            raise StoreError(f"the counts table mixes several values of {col}: {values[:5]}")
    num_classes = int(table.column("num_classes")[0].as_py())
    image_col = table.column("image_id").to_numpy()
    image_ids = np.unique(image_col)
    m = len(image_ids)
    sigma_col = table.column("sigma").to_numpy()
    phase_col = np.asarray(table.column("phase").to_pylist())
    labels = np.full(m, -1, dtype=np.int64)
    labels[np.searchsorted(image_ids, image_col)] = table.column("label").to_numpy()

    levels, missing = [], []
    for sigma in np.unique(sigma_col):
        parts, have = {}, np.ones(m, bool)
        for phase in PHASES:
            rows = np.flatnonzero((sigma_col == sigma) & (phase_col == phase))
            positions = np.searchsorted(image_ids, image_col[rows])
            mask = np.zeros(m, bool)
            mask[positions] = True
            have &= mask
            if not mask.all():
                missing.append((float(sigma), phase, int(m - mask.sum())))
            parts[phase] = _sparse_rows(table.take(rows), positions, m, num_classes)
        levels.append(stats.Level(float(sigma), parts["selection"], parts["estimation"], present=None if have.all() else have))
    if missing and not allow_missing:
        desc = ", ".join(f"σ={s:g} {p}: {k} images" for s, p, k in missing[:4])
        raise StoreError(
            f"the counts are incomplete ({desc}); certificates need every σ and phase for every image "
            "(finish or resume the run; a cascade-mode run only covers its own p0)"
        )
    return CountsView(
        run_id=str(table.column("run_id")[0].as_py()),
        model_id=str(table.column("model_id")[0].as_py()),
        image_ids=image_ids,
        labels=labels,
        levels=levels,
        num_classes=num_classes,
    )


def _constant(value: str, m: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(np.zeros(m, dtype=np.int32), pa.array([value]))


def _rows(view: CountsView, cert: stats.Certificates, *, method: str, sigma: float, policy: str, p0: float, alpha: float,
          subset: np.ndarray | None = None) -> pa.Table:
    image_ids = view.image_ids if subset is None else view.image_ids[subset]
    labels = view.labels if subset is None else view.labels[subset]
    m = len(image_ids)
    sigmas = np.asarray(view.sigmas)
    answered = cert.level >= 0
    if method == "cascade":
        sigma_answered = np.where(answered, sigmas[np.maximum(cert.level, 0)], np.nan)
    else:
        sigma_answered = np.where(answered, sigma, np.nan)
    columns = {
        "run_id": _constant(view.run_id, m),
        "model_id": _constant(view.model_id, m),
        "image_id": image_ids,
        "label": labels.astype(np.int32),
        "method": _constant(method, m),
        "sigma": np.full(m, sigma),
        "policy": _constant(policy, m),
        "p0": np.full(m, p0),
        "alpha": np.full(m, alpha),
        "prediction": cert.prediction.astype(np.int64),
        "abstain_reason": pa.DictionaryArray.from_arrays(cert.reason.astype(np.int32), pa.array(stats.Reason.NAMES)),
        "radius": cert.radius.astype(np.float64),
        "correct": (cert.prediction == labels) & (cert.prediction >= 0),
        "sigma_answered": sigma_answered,
    }
    return pa.table({f.name: pa.array(columns[f.name], f.type) if not isinstance(columns[f.name], pa.Array) else columns[f.name] for f in CERTIFICATES_SCHEMA}, schema=CERTIFICATES_SCHEMA)


def _table(parts: list[pa.Table]) -> pa.Table:
    if not parts:
        return CERTIFICATES_SCHEMA.empty_table()
    return pa.concat_tables(parts).unify_dictionaries()


def derive_certificates(
    view: CountsView,
    *,
    alpha: float,
    p0: Sequence[float] = (0.5,),
    policies: Sequence[str] = ("strict", "reference"),
    methods: Sequence[str] = ("certify", "predict", "cascade"),
) -> pa.Table:
    """Single-σ CERTIFY and PREDICT at every σ, and the cascade at every (policy, p0) when K ≥ 2."""
    parts = []
    for level in view.levels:
        # A lazy cascade samples lower σ only for some images: single-σ certificates cover those.
        subset = None if level.present is None else np.flatnonzero(level.present)
        sel = level.selection if subset is None else level.selection.take(subset)
        est = level.estimation if subset is None else level.estimation.take(subset)
        if "certify" in methods:
            cert = stats.certify(sel, est, level.sigma, alpha)
            parts.append(_rows(view, cert, method="certify", sigma=level.sigma, policy="", p0=np.nan, alpha=alpha, subset=subset))
        if "predict" in methods:
            # PREDICT draws its own n samples; the estimation counts are exactly such a draw.
            cert = stats.predict(est, alpha)
            parts.append(_rows(view, cert, method="predict", sigma=level.sigma, policy="", p0=np.nan, alpha=alpha, subset=subset))
    if "cascade" in methods and len(view.levels) >= 2:
        prepared = stats.prepare_levels(view.levels, policies)
        for policy in policies:
            sweep = stats.cascade_sweep(prepared, p0, alpha, policy)
            for i, threshold in enumerate(sweep.p0):
                parts.append(
                    _rows(view, sweep.at(i), method="cascade", sigma=np.nan, policy=policy, p0=float(threshold), alpha=alpha)
                )
    return _table(parts)


def sweep_certificates(view: CountsView, p0: Sequence[float], alphas: Sequence[float], policy: str) -> pa.Table:
    """Cascade certificates for every (α, p0) of a grid; the counts are summarised once."""
    if len(view.levels) < 2:
        raise StoreError(f"a p0 sweep needs counts at two or more σ; this run has σ = {view.sigmas}")
    prepared = stats.prepare_levels(view.levels, (policy,))
    parts = []
    for alpha in alphas:
        sweep = stats.cascade_sweep(prepared, p0, alpha, policy)
        for i, threshold in enumerate(sweep.p0):
            parts.append(_rows(view, sweep.at(i), method="cascade", sigma=np.nan, policy=policy, p0=float(threshold), alpha=alpha))
    return _table(parts)
