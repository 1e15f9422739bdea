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
from .errors import one_line
from .store import (
    CERTIFICATE_KEY,
    CERTIFICATES_SCHEMA,
    RunStore,
    StoreError,
    append_table,
    config_hash,
    replace_text,
)
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
    "sequential_designs",
    "sequential_certificates",
    "sequential_progress",
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


def noise_info(manifest: dict | None, where: object = "the manifest") -> NoiseInfo:
    """From a manifest; runs written before these fields existed drew Gaussian noise scaled by float32(σ)."""
    manifest = manifest or {}
    noise = manifest.get("noise") or {}
    try:
        applied = {float(k): float(v) for k, v in (noise.get("applied_sigmas") or {}).items()}
        margin = {float(k): float(v) for k, v in (noise.get("margins") or {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise StoreError(
            f"{where}: damaged: its noise is {one_line(noise, 120)}, not the σ and margins it records"
        ) from None
    return NoiseInfo(applied, margin)


def run_sigmas(manifest: dict | None, where: object = "the manifest") -> list[float] | None:
    """The run's σ list from its manifest (None for runs that predate it); a damaged one is refused, since
    the certificates take their levels from it."""
    value = (manifest or {}).get("sigmas")
    if value is None:
        return None
    sigmas = None
    if isinstance(value, list) and value:
        try:
            sigmas = [float(s) for s in value]
        except (TypeError, ValueError):
            pass
    if sigmas is None or not all(np.isfinite(s) and s > 0 for s in sigmas):
        raise StoreError(f"{where}: damaged: its sigmas are {one_line(value, 120)}, not a list of positive numbers")
    return sigmas


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


def counts_view(table: pa.Table, allow_missing: bool = False, sigmas: Sequence[float] | None = None) -> CountsView:
    """Align the rows of a counts table by image (round-0 rows: selection, and the estimation counts of
    full and cascade runs).

    Every image must have every (σ, phase) unless ``allow_missing`` (a lazy-cascade run), in which
    case levels carry a ``present`` mask and the cascade refuses thresholds that need what is absent.
    ``sigmas``, the run's σ list, makes a σ that no stored row has a level of absent images: a lazy
    cascade that never fell to its lowest σ is still a K-level cascade (its α budget depends on K).
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
    for sigma in np.unique(np.concatenate([sigma_col, np.asarray(sigmas or [], np.float64)])):
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
    alpha: float,
    policy: str = "",  # cascade rows only
    p0: float = np.nan,  # cascade rows only
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


def _cascade_levels(view: CountsView, noise: NoiseInfo) -> list[stats.Level]:
    """The view's levels with the σ the noise really had: the cascade's radii are built from them."""
    return [stats.Level(noise.sigma(lv.sigma), lv.selection, lv.estimation, lv.present) for lv in view.levels]


def _cascade_samples(per_level: np.ndarray, cert: stats.Certificates) -> np.ndarray:
    """Samples a cascade certificate rests on: every level (rows of ``per_level``) from the top down to
    the one that answered (all levels when it abstains), as a lazy run would draw them."""
    lowest = np.where(cert.level >= 0, cert.level, 0)
    used = np.arange(len(per_level))[:, None] >= lowest[None, :]
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
    per_level = np.stack([lv.selection.totals() + lv.estimation.totals() for lv in view.levels])  # (K, M)
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
                        n_used=_cascade_samples(per_level, cert),
                    )
                )
    return parts


def sweep_certificates(
    view: CountsView, p0: Sequence[float], alphas: Sequence[float], policy: str, noise: NoiseInfo | None = None
) -> pa.Table:
    """Each σ's CERTIFY at every α, and the cascade at every (α, p0) of a grid (the counts are summarised
    once): an α the run was not certified at is answered from its counts too, never by sampling again.
    A run of one σ has no cascade: its sweep is over α alone."""
    noise = noise or NoiseInfo({}, {})
    single = [derive_certificates(view, alpha=a, methods=("certify",), noise=noise) for a in alphas]
    cascade = _cascade_rows(view, p0, alphas, (policy,), noise) if len(view.levels) >= 2 else []
    return _table(single + cascade)


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
    run_images: int | None = None  # the images the run was started on (its manifest)
    partial: int = 0  # images with only some of their counts, left out
    policy: str = "strict"  # the cascade's; "one σ, no cascade" for a run of one σ
    alphas: Sequence[float] = ()  # the α swept


def complete_images(table: pa.Table, sigmas: Sequence[float] | None = None) -> tuple[pa.Table, int]:
    """The round-0 rows of the images that have both phases at every σ of the run (``sigmas``, else those
    in the table), and how many images have only some: a run still going, or stopped, is swept over its
    finished images. Without the run's σ list a σ no image reached yet would silently drop out of the
    cascade."""
    import pyarrow.compute as pc

    if "round" in table.column_names:
        table = table.filter(pc.equal(pc.fill_null(table.column("round"), 0), 0))
    if table.num_rows == 0:
        raise StoreError("the counts table is empty")
    sigma_col = table.column("sigma").to_numpy()
    levels = np.unique(np.asarray(sigmas if sigmas else sigma_col, dtype=np.float64))
    level = np.searchsorted(levels, sigma_col).clip(0, len(levels) - 1)
    known = np.isclose(levels[level], sigma_col, rtol=0, atol=1e-12)
    estimation = np.asarray(table.column("phase").to_pylist()) == "estimation"
    image_col = table.column("image_id").to_numpy()
    pairs = np.unique(np.stack([image_col[known], 2 * level[known] + estimation[known]]), axis=1)
    images, have = np.unique(pairs[0], return_counts=True)
    complete = images[have == 2 * len(levels)]
    if len(complete) == 0:
        raise StoreError(
            f"no image has all its counts yet (both phases at σ = {', '.join(f'{s:g}' for s in levels)}); "
            "finish or resume the run"
        )
    keep = np.isin(image_col, complete)
    partial = len(np.unique(image_col)) - len(complete)
    return (table if keep.all() else table.filter(pa.array(keep))), partial


def run_sweep(run_dir: str | Path, p0: np.ndarray, alphas: Sequence[float] | None, policy: str) -> SweepResult:
    """Cascade certificates for every (α, p0), and each σ's CERTIFY at every α, from a run's stored
    counts; written as a new sweep directory under ``RUN_DIR/sweeps``. Never samples. Parameters are
    validated by the caller (``config.validate_sweep``)."""
    store = RunStore.open(run_dir)
    mode = ((store.manifest.get("config") or {}).get("smoothing") or {}).get("mode")
    if mode == "sequential":
        raise StoreError(
            f"{run_dir} is a sequential run: each image stopped sampling when a rule that spent the run's own α "
            "over its looks had decided it, so its counts answer no other α, and each σ is sampled on its own, "
            "with no cascade to sweep over p0 (run smoothing.mode=full for threshold sweeps)"
        )
    if mode == "cascade":
        raise StoreError(
            f"{run_dir} is a lazy cascade run (smoothing.mode=cascade): it sampled a lower σ only where its own "
            "p0 left an image open, so its counts certify no other threshold (run smoothing.mode=full for "
            "threshold sweeps)"
        )
    started = time.perf_counter()
    sigmas = run_sigmas(store.manifest, store.manifest_path)
    counts, partial = complete_images(store.read_counts(), sigmas)
    if not alphas:  # the α the run was certified at
        alphas = counts.column("alpha").to_pylist() or [0.001]
    # One setting per distinct value: a repeated α or p0 would pool its rows twice into one summary.
    alphas, p0 = sorted({float(a) for a in alphas}), np.unique(np.asarray(p0, dtype=np.float64))
    view = counts_view(counts, sigmas=sigmas)
    cascade = len(view.levels) >= 2
    if not cascade:  # one σ: the thresholds and the policy sweep nothing, α alone is swept
        p0 = np.array([])
    table = sweep_certificates(view, p0, alphas, policy, noise_info(store.manifest, store.manifest_path))
    elapsed = time.perf_counter() - started
    params = {"p0": [float(x) for x in p0], "alpha": list(alphas), "policy": policy if cascade else None}
    out_dir = (
        store.root / "sweeps" / f"{time.strftime('%Y%m%d-%H%M%S')}-{config_hash(params)[:8]}-{uuid.uuid4().hex[:4]}"
    )
    append_table(out_dir, table, {"run_id": view.run_id, "table": "sweep"})
    replace_text(  # last, and whole: a sweep folder without its sweep.json is one a crash cut short
        out_dir / "sweep.json",
        json.dumps({**params, "run_id": view.run_id, "images": len(view.image_ids), "sigmas": view.sigmas}, indent=2),
    )
    run_images = store.manifest.get("images")
    run_images = run_images if isinstance(run_images, int) and not isinstance(run_images, bool) else None
    settings = len(alphas) * max(len(p0), 1)  # one σ: α alone
    shown = policy if cascade else "one σ, no cascade"
    return SweepResult(table, out_dir, settings, len(view.image_ids), elapsed, run_images, partial, shown, alphas)


# ---- sequential runs ------------------------------------------------------------------------------
def sequential_designs(manifest: dict | None, where: object = "the manifest") -> dict[float, stats.sequential.Design]:
    """The designs (look schedule, levels, critical counts) a sequential run recorded per σ; a damaged
    record is refused in one line (a resumed run must decide with exactly these counts)."""
    try:
        designs = ((manifest or {}).get("sequential") or {}).get("designs") or {}
        return {float(k): stats.sequential.Design.from_dict(v) for k, v in designs.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise StoreError(
            f"{where}: damaged: its sequential designs do not read ({type(exc).__name__}: {one_line(exc, 80)}); "
            "they hold the critical counts the run decides with"
        ) from None


@dataclass(frozen=True)
class _SequentialLevel:
    """One σ of a sequential run, aligned by image: the selection counts and the per-round counts of ĉ."""

    sigma: float
    selection: stats.SparseCounts  # (M, C)
    c_hat: np.ndarray  # (M,)
    per_round: np.ndarray  # (M, K) count of ĉ in each stored round (0 where none)
    samples: np.ndarray  # (M, K) samples in each stored round
    rounds: np.ndarray  # (M,) rounds stored (contiguous from 1)
    stored_stop: np.ndarray  # (M,) first stored round (0-based) after which the run stopped; −1 if none
    totals: stats.SparseCounts  # (M, C) the estimation counts of every stored round, summed


def _sequential_levels(table: pa.Table, designs: dict[float, stats.sequential.Design]):
    import pyarrow.compute as pc

    table = table.filter(pc.is_valid(table.column("image_id")))
    num_classes = int(table.column("num_classes")[0].as_py())
    image_col = table.column("image_id").to_numpy()
    image_ids = np.unique(image_col)
    labels = np.full(len(image_ids), -1, np.int64)
    labels[np.searchsorted(image_ids, image_col)] = table.column("label").to_numpy()
    sigma_col = table.column("sigma").to_numpy()
    phase_col = np.asarray(table.column("phase").to_pylist())
    round_col = np.asarray(pc.fill_null(table.column("round"), 0).to_numpy())
    flag_col = np.asarray(table.column("seq_continue").to_pylist(), dtype=object)
    m = len(image_ids)
    levels = []
    for sigma, design in sorted(designs.items()):
        k_looks = design.num_looks
        sel_rows = np.flatnonzero((sigma_col == sigma) & (phase_col == "selection"))
        selection = _sparse_rows(table.take(sel_rows), np.searchsorted(image_ids, image_col[sel_rows]), m, num_classes)
        c_hat = selection.argmax()
        est = np.flatnonzero((sigma_col == sigma) & (phase_col == "estimation") & (round_col >= 1))
        pos = np.searchsorted(image_ids, image_col[est])
        rnd = round_col[est].astype(np.int64) - 1
        if len(rnd) and rnd.max() >= k_looks:
            raise StoreError(f"σ={sigma:g}: a stored round lies beyond the run's {k_looks} looks")
        rows = _sparse_rows(table.take(est), np.arange(len(est)), len(est), num_classes)
        per_round = np.zeros((m, k_looks), np.int64)
        samples = np.zeros((m, k_looks), np.int64)
        per_round[pos, rnd] = rows.count_of(c_hat[pos])
        samples[pos, rnd] = rows.totals()
        stored = np.zeros((m, k_looks), bool)
        stored[pos, rnd] = True
        rounds = np.where(stored.all(axis=1), k_looks, np.argmin(stored, axis=1))  # contiguous prefix
        stop_flags = np.zeros((m, k_looks), bool)
        stop_flags[pos, rnd] = np.array([f is False for f in flag_col[est]], dtype=bool)
        stored_stop = np.where(stop_flags.any(axis=1), np.argmax(stop_flags, axis=1), -1)
        flat = pos.astype(np.int64)[rows.row_ids] * num_classes + rows.classes
        keys, inverse = np.unique(flat, return_inverse=True)
        summed = np.bincount(inverse.reshape(-1), weights=rows.counts, minlength=len(keys)).astype(np.int64)
        totals = stats.SparseCounts.from_coo(keys // num_classes, keys % num_classes, summed, m, num_classes)
        levels.append(_SequentialLevel(float(sigma), selection, c_hat, per_round, samples, rounds, stored_stop, totals))
    return image_ids, labels, num_classes, levels


def sequential_certificates(table: pa.Table, designs: dict[float, stats.sequential.Design], *, audit: bool) -> pa.Table:
    """Certificates of a sequential run from its stored rounds: the rule replayed (with the stored
    decisions, so nothing is re-decided), and in audit mode also CERTIFY on every round, which is
    fixed n = N_max on the same noise."""
    import logging

    if table.num_rows == 0:
        raise StoreError("the counts table is empty")
    image_ids, labels, num_classes, levels = _sequential_levels(table, designs)
    view = CountsView(
        str(table.column("run_id")[0].as_py()),
        str(table.column("model_id")[0].as_py()),
        image_ids,
        labels,
        [],
        num_classes,
    )
    parts = []
    for level in levels:
        d = designs[level.sigma]
        cumulative = np.cumsum(level.per_round, axis=1)
        cert, out = stats.sequential.sequential_certify(level.c_hat, cumulative, d, level.rounds, level.stored_stop)
        rule_only = stats.sequential.replay(d, cumulative, level.rounds)
        differ = (level.stored_stop >= 0) & (rule_only.stop_look != out.stop_look)
        if differ.any():
            logging.getLogger("raysmooth").warning(
                "σ=%g: replaying the stop rule on %d pair(s) gives another stop than the one stored; the stored "
                "decisions are used (the run's own)",
                level.sigma,
                int(differ.sum()),
            )
        tau = np.maximum(out.stop_look, 0)
        used_est = np.where(out.stop_look >= 0, np.cumsum(level.samples, axis=1)[np.arange(len(tau)), tau], 0)
        grid = np.where(out.grid_index >= 0, d.radii[np.maximum(out.grid_index, 0)], np.nan)
        extra = {
            "rounds": np.where(out.stop_look >= 0, out.stop_look + 1, 0).astype(np.int32),
            "grid_radius": grid,
            "stop_reason": pa.DictionaryArray.from_arrays(
                out.reason.astype(np.int32), pa.array(stats.sequential.STOP_REASONS)
            ),
        }
        parts.append(
            _rows(
                view,
                cert,
                method="sequential",
                sigma=level.sigma,
                alpha=d.alpha,
                n_used=level.selection.totals() + used_est,
                extra=extra,
            )
        )
        if audit:
            fixed = stats.certify(level.selection, level.totals, d.sigma, d.alpha, margin=d.margin)
            parts.append(
                _rows(
                    view,
                    fixed,
                    method="certify",
                    sigma=level.sigma,
                    alpha=d.alpha,
                    n_used=level.selection.totals() + level.totals.totals(),
                )
            )
    return _table(parts)


def sequential_progress(
    store: RunStore, image_ids: Sequence[int], sigmas: Sequence[float], designs: dict[float, stats.sequential.Design]
):
    """What a resumed sequential run finds, per (image, σ index): (ĉ or None, cumulative counts of ĉ at
    the stored looks, selection stored?, the stored decision after the last stored round)."""
    table = store.read_counts()
    resume: dict[tuple[int, int], tuple] = {}
    if table.num_rows == 0:
        return resume
    index = {float(s): i for i, s in enumerate(sigmas)}
    ids, _labels, _c, levels = _sequential_levels(table, {s: designs[s] for s in sigmas if s in designs})
    wanted = set(int(i) for i in image_ids)
    cols = table.select(["image_id", "sigma", "phase"]).to_pydict()
    sel_keys = {(i, s) for i, s, ph in zip(cols["image_id"], cols["sigma"], cols["phase"]) if ph == "selection"}
    flags = _last_flags(table)
    for level in levels:
        s = index[level.sigma]
        cumulative = np.cumsum(level.per_round, axis=1)
        for r, image in enumerate(ids.tolist()):
            if image not in wanted:
                continue
            has_sel = (image, level.sigma) in sel_keys
            k = int(level.rounds[r])
            if not has_sel and k == 0:
                continue
            resume[(image, s)] = (
                int(level.c_hat[r]) if has_sel else None,
                cumulative[r, :k].tolist(),
                has_sel,
                flags.get((image, level.sigma, k)),
            )
    return resume


def _last_flags(table: pa.Table) -> dict[tuple[int, float, int], bool | None]:
    cols = table.select(["image_id", "sigma", "phase", "round", "seq_continue"]).to_pydict()
    return {
        (i, s, r): f
        for i, s, ph, r, f in zip(cols["image_id"], cols["sigma"], cols["phase"], cols["round"], cols["seq_continue"])
        if ph == "estimation"
    }
