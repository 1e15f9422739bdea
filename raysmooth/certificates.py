"""Certificates from the counts table: the bridge between ``store`` and ``stats``.

Everything a certification run reports is recomputed here from stored counts alone, so a new p0, α
or policy never needs a single new sample. This module also holds what a run needs to resume (which
rows are stored, which cascade levels are decided) and the threshold sweep; it imports no torch.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import stats
from .store import CERTIFICATE_KEY, CERTIFICATES_SCHEMA, RunStore, StoreError, append_table, config_hash
from .units import PHASES

__all__ = [
    "CountsView",
    "NoiseInfo",
    "counts_view",
    "derive_certificates",
    "sweep_certificates",
    "noise_info",
    "stored_progress",
    "append_new_certificates",
    "run_sweep",
    "SweepResult",
]


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


@dataclass(frozen=True)
class NoiseInfo:
    """What the noise of a run really was, per configured σ: the σ applied (radii use it) and the
    margin on p_A between the sampled and the certified distribution (lattice noise)."""

    applied: dict[float, float]
    margin: dict[float, float]

    def sigma(self, s: float) -> float:
        return self.applied.get(float(s), float(np.float32(s)))

    def margin_of(self, s: float) -> float:
        return self.margin.get(float(s), 0.0)


def noise_info(manifest: dict | None) -> NoiseInfo:
    """From a manifest; runs written before these fields existed drew Gaussian noise scaled by float32(σ)."""
    manifest = manifest or {}
    noise = manifest.get("noise") or {}
    applied = {float(k): float(v) for k, v in (noise.get("applied_sigmas") or {}).items()}
    margin = {float(k): float(v) for k, v in (noise.get("margins") or {}).items()}
    return NoiseInfo(applied, margin)


def _sparse_rows(table: pa.Table, positions: np.ndarray, num_rows: int, num_classes: int) -> stats.SparseCounts:
    """The list columns of ``table`` as a SparseCounts of ``num_rows`` rows, row i of the table landing
    at ``positions[i]`` (other rows empty)."""
    classes = table.column("classes").combine_chunks()
    counts = table.column("counts").combine_chunks()
    offsets = classes.offsets.to_numpy()
    rows = np.repeat(np.asarray(positions, dtype=np.int64), np.diff(offsets))
    return stats.SparseCounts.from_coo(
        rows,
        classes.values.to_numpy()[offsets[0] : offsets[-1]],
        counts.values.to_numpy()[offsets[0] : offsets[-1]],
        num_rows,
        num_classes,
    )


def _one_value(table: pa.Table, col: str) -> Any:
    values = table.column(col).unique().to_pylist()
    if len(values) != 1:
        raise StoreError(f"the counts table mixes several values of {col}: {values[:5]}")
    return values[0]


def counts_view(table: pa.Table, allow_missing: bool = False) -> CountsView:
    """Align the rows of a counts table by image (round-0 rows: selection, and the estimation counts of
    full and cascade runs).

    Every image must have every (σ, phase) unless ``allow_missing`` (a lazy-cascade run), in which
    case levels carry a ``present`` mask and the cascade refuses thresholds that need what is absent.
    """
    if table.num_rows == 0:
        raise StoreError("the counts table is empty")
    for col in ("model_id", "num_classes", "run_id"):
        _one_value(table, col)
    if "round" in table.column_names:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(pc.fill_null(table.column("round"), 0), 0))
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
        levels.append(
            stats.Level(float(sigma), parts["selection"], parts["estimation"], present=None if have.all() else have)
        )
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


def _rows(
    view: CountsView,
    cert: stats.Certificates,
    *,
    method: str,
    sigma: float,
    policy: str,
    p0: float,
    alpha: float,
    n_used: np.ndarray,
    subset: np.ndarray | None = None,
    extra: dict | None = None,
) -> pa.Table:
    image_ids = view.image_ids if subset is None else view.image_ids[subset]
    labels = view.labels if subset is None else view.labels[subset]
    m = len(image_ids)
    sigmas = np.asarray(view.sigmas)
    answered = cert.level >= 0
    if method == "cascade":
        sigma_answered = np.where(answered, sigmas[np.maximum(cert.level, 0)], np.nan)
    else:
        sigma_answered = np.where(answered, sigma, np.nan)
    columns: dict[str, Any] = {
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
        "p_lower": np.full(m, np.nan) if cert.p_lower is None else np.asarray(cert.p_lower, dtype=np.float64),
        "n_used": np.asarray(n_used, dtype=np.int64),
    }
    columns.update(extra or {})
    arrays = []
    for f in CERTIFICATES_SCHEMA:
        value = columns.get(f.name)
        if value is None:
            arrays.append(pa.nulls(m, f.type))
        elif isinstance(value, pa.Array):
            arrays.append(value.cast(f.type))
        else:
            arrays.append(pa.array(value, f.type))
    return pa.Table.from_arrays(arrays, schema=CERTIFICATES_SCHEMA)


def _table(parts: list[pa.Table]) -> pa.Table:
    if not parts:
        return CERTIFICATES_SCHEMA.empty_table()
    return pa.concat_tables(parts).unify_dictionaries()


def _level_samples(level: stats.Level) -> np.ndarray:
    return level.selection.totals() + level.estimation.totals()


def _cascade_levels(view: CountsView, noise: NoiseInfo) -> list[stats.Level]:
    """The view's levels with the σ the noise really had: the cascade's radii are built from them."""
    return [stats.Level(noise.sigma(lv.sigma), lv.selection, lv.estimation, lv.present) for lv in view.levels]


def _cascade_samples(view: CountsView, cert: stats.Certificates) -> np.ndarray:
    """Samples a cascade certificate rests on: every level from the top down to the one that answered
    (all levels when it abstains), as a lazy run would draw them."""
    per_level = np.stack([_level_samples(lv) for lv in view.levels])  # (K, M)
    k = len(view.levels)
    lowest = np.where(cert.level >= 0, cert.level, 0)
    used = np.arange(k)[:, None] >= lowest[None, :]
    return (per_level * used).sum(axis=0)


def derive_certificates(
    view: CountsView,
    *,
    alpha: float,
    p0: Sequence[float] = (0.5,),
    policies: Sequence[str] = ("strict", "reference"),
    methods: Sequence[str] = ("certify", "predict", "cascade"),
    noise: NoiseInfo | None = None,
) -> pa.Table:
    """Single-σ CERTIFY and PREDICT at every σ, and the cascade at every (policy, p0) when K ≥ 2.
    Radii use the σ the noise really had (``noise``; float32(σ) for Gaussian noise by default)."""
    noise = noise or NoiseInfo({}, {})
    parts = []
    for level in view.levels:
        # A lazy cascade samples lower σ only for some images: single-σ certificates cover those.
        subset = None if level.present is None else np.flatnonzero(level.present)
        sel = level.selection if subset is None else level.selection.take(subset)
        est = level.estimation if subset is None else level.estimation.take(subset)
        used = sel.totals() + est.totals()
        if "certify" in methods:
            cert = stats.certify(sel, est, noise.sigma(level.sigma), alpha, margin=noise.margin_of(level.sigma))
            parts.append(
                _rows(
                    view,
                    cert,
                    method="certify",
                    sigma=level.sigma,
                    policy="",
                    p0=np.nan,
                    alpha=alpha,
                    n_used=used,
                    subset=subset,
                )
            )
        if "predict" in methods:
            # PREDICT draws its own n samples; the estimation counts are exactly such a draw.
            cert = stats.predict(est, alpha)
            parts.append(
                _rows(
                    view,
                    cert,
                    method="predict",
                    sigma=level.sigma,
                    policy="",
                    p0=np.nan,
                    alpha=alpha,
                    n_used=est.totals(),
                    subset=subset,
                )
            )
    if "cascade" in methods and len(view.levels) >= 2:
        parts += _cascade_rows(view, p0, [alpha], policies, noise)
    return _table(parts)


def _cascade_rows(
    view: CountsView, p0: Sequence[float], alphas: Sequence[float], policies: Sequence[str], noise: NoiseInfo
) -> list[pa.Table]:
    prepared = stats.prepare_levels(_cascade_levels(view, noise), policies)
    margin = max((noise.margin_of(s) for s in view.sigmas), default=0.0)
    parts = []
    for alpha in alphas:
        for policy in policies:
            sweep = stats.cascade_sweep(prepared, p0, alpha, policy, margin=margin)
            for i, threshold in enumerate(sweep.p0):
                cert = sweep.at(i)
                parts.append(
                    _rows(
                        view,
                        cert,
                        method="cascade",
                        sigma=np.nan,
                        policy=policy,
                        p0=float(threshold),
                        alpha=alpha,
                        n_used=_cascade_samples(view, cert),
                    )
                )
    return parts


def sweep_certificates(
    view: CountsView, p0: Sequence[float], alphas: Sequence[float], policy: str, noise: NoiseInfo | None = None
) -> pa.Table:
    """Cascade certificates for every (α, p0) of a grid; the counts are summarised once."""
    if len(view.levels) < 2:
        raise StoreError(f"a p0 sweep needs counts at two or more σ; this run has σ = {view.sigmas}")
    return _table(_cascade_rows(view, p0, alphas, (policy,), noise or NoiseInfo({}, {})))


# ---- what a resumed run finds ---------------------------------------------------------------------
def stored_progress(store: RunStore, image_ids: Sequence[int], sigmas: Sequence[float], stops=None):
    """Keys of the rows already stored as (image, σ index, phase); and, when ``stops`` (the lazy
    cascade's stop rule for a level: ``stops(selection, estimation, level) -> bool array``) is given,
    whether the cascade stops at each stored level, decided from the stored counts in one vectorised
    pass, plus the counts of stored rows whose level misses its other phase (an interruption between
    the two)."""
    index = {float(s): i for i, s in enumerate(sigmas)}
    wanted = set(int(i) for i in image_ids)
    existing = {
        (img, index[s], ph) for img, s, ph, rnd in store.completed_keys() if img in wanted and s in index and rnd == 0
    }
    decided: dict[tuple[int, int], bool] = {}
    half_levels: dict = {}
    if stops is None or not existing:
        return existing, decided, half_levels
    view = counts_view(store.read_counts(), allow_missing=True)
    for level in view.levels:
        if level.sigma not in index:
            continue
        k = index[level.sigma]
        present = np.ones(len(view.image_ids), bool) if level.present is None else level.present
        rows = np.flatnonzero(present)
        decision = stops(level.selection.take(rows), level.estimation.take(rows), k)
        decided.update({(int(view.image_ids[r]), k): bool(x) for r, x in zip(rows, decision)})
        for phase, counts in (("selection", level.selection), ("estimation", level.estimation)):
            half = np.flatnonzero(~present & (counts.totals() > 0))  # stored, but the other phase is not
            if len(half):
                dense = counts.take(half).to_dense()
                half_levels.update({(int(view.image_ids[r]), k, phase): dense[i] for i, r in enumerate(half)})
    return existing, decided, half_levels


def _key_tuples(table: pa.Table) -> list[tuple]:
    cols = table.select(list(CERTIFICATE_KEY)).to_pydict()
    cols["method"] = [str(x) for x in cols["method"]]
    cols["policy"] = [str(x) for x in cols["policy"]]
    for k in ("sigma", "p0"):
        cols[k] = np.nan_to_num(np.asarray(cols[k], dtype=np.float64), nan=-1).tolist()
    return list(zip(*(cols[k] for k in CERTIFICATE_KEY)))


def append_new_certificates(store: RunStore, certs: pa.Table) -> int:
    """Append the rows whose key is not stored yet; returns how many."""
    old = store.read_certificates()
    if old.num_rows:
        have = set(_key_tuples(old))
        mask = np.array([k not in have for k in _key_tuples(certs)], dtype=bool)
        certs = certs.filter(pa.array(mask))
    if certs.num_rows:
        store.append_certificates(certs)
    return certs.num_rows


# ---- threshold sweeps -------------------------------------------------------------------------------
@dataclass
class SweepResult:
    table: pa.Table  # certificates
    out_dir: Path
    settings: int
    images: int
    seconds: float


def run_sweep(run_dir: str | Path, p0: np.ndarray, alphas: Sequence[float] | None, policy: str) -> SweepResult:
    """Cascade certificates for every (α, p0) from a run's stored counts; written as a new sweep
    directory under ``RUN_DIR/sweeps``. Never samples. Parameters are validated by the caller
    (``config.validate_sweep``)."""
    store = RunStore.open(run_dir)
    started = time.perf_counter()
    counts = store.read_counts()
    if not alphas:  # the α the run was certified at
        alphas = sorted(set(counts.column("alpha").to_pylist())) or [0.001]
    view = counts_view(counts)
    table = sweep_certificates(view, p0, alphas, policy, noise_info(store.manifest))
    elapsed = time.perf_counter() - started
    params = {"p0": [float(x) for x in p0], "alpha": list(alphas), "policy": policy}
    out_dir = (
        Path(run_dir) / "sweeps" / f"{time.strftime('%Y%m%d-%H%M%S')}-{config_hash(params)[:8]}-{uuid.uuid4().hex[:4]}"
    )
    append_table(out_dir, table, {"run_id": view.run_id, "table": "sweep"})
    (out_dir / "sweep.json").write_text(
        json.dumps({**params, "run_id": view.run_id, "images": len(view.image_ids), "sigmas": view.sigmas}, indent=2)
    )
    return SweepResult(table, out_dir, len(p0) * len(alphas), len(view.image_ids), elapsed)
