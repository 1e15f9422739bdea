"""The certify job: data → plan → Ray actors → counts in the store → certificates → report.

Called by ``jobs/certify.py`` (hydra) and ``raysmooth certify``. Resuming is running the same config
into the same output directory: only the missing rows are planned.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import stats
from .certificates import counts_view, derive_certificates
from .data import TestSet, load_dataset, subsample, subsamples_itself
from .distributed import ActorSpec, Driver, FinishedRow, Planner, start_actors
from .engine import validate_sampling
from .errors import ConfigError, InputError, RaySmoothError
from .store import CERTIFICATES_SCHEMA, CountsRecord, RunStore

__all__ = ["certify", "CertifyResult", "run_sweep", "SweepResult", "counts_relevant_config", "model_kwargs", "load_test_set", "resolve_path"]

log = logging.getLogger("raysmooth")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CertifyResult:
    name: str
    out_dir: Path
    images: int
    rows_written: int
    seconds: float

    @property
    def counts_dir(self) -> Path:
        return self.out_dir / "counts"

    @property
    def certificates_dir(self) -> Path:
        return self.out_dir / "certificates"


def resolve_path(path: str | None) -> str | None:
    """A model or data path: absolute, relative to the working directory, or to the raysmooth checkout
    (so the committed embedded models are found from anywhere, also in a Ray job's working_dir)."""
    if path is None or "://" in path or Path(path).is_absolute():
        return path
    if Path(path).exists():
        return str(Path(path).resolve())
    candidate = REPO_ROOT / path
    return str(candidate) if candidate.exists() else path


def model_kwargs(model: dict[str, Any]) -> dict[str, Any]:
    """Builder arguments of ``create_base_classifier`` from the model config section."""
    base = model["base"]
    kw: dict[str, Any] = {"base": base, "input_shape": list(model["input_shape"])}

    def part(name: str, keys: tuple[str, ...]) -> dict[str, Any]:
        section = model.get(name)
        if not section:
            raise ConfigError(f"model.base={base} needs model.{name}")
        section = copy.deepcopy(dict(section))
        for key in keys:
            value = section.get(key)
            if not value or str(value).startswith("hf://"):
                continue
            section[key] = resolve_path(value)
            if not Path(section[key]).exists():  # say so now, not from inside a Ray actor
                raise ConfigError(f"model.{name}.{key}: {value} not found (relative paths are tried from the working "
                                  f"directory and from {REPO_ROOT}; see the comments in the model's config file)")
        return section

    if base in ("dds", "diffsmooth"):
        kw["denoiser"] = part("denoiser", ("path", "weights"))
        kw["classifier"] = part("classifier", ("checkpoint",))
    elif base == "plain":
        kw["classifier"] = part("classifier", ("checkpoint",))
    elif base == "onestep":
        kw["model"] = part("onestep", ("checkpoint",))
    kw.update(model.get("options") or {})
    return kw


def counts_relevant_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of the config that determines the counts: it defines a run directory's identity.
    Actor counts, batch sizes and the output path may change on resume."""
    return {
        "data": cfg["data"],
        "model": cfg["model"],
        "smoothing": cfg["smoothing"],
        "noise_block": cfg["engine"]["noise_block"],
        "precision": cfg["engine"]["precision"],
    }


def load_test_set(data: dict[str, Any]) -> TestSet:
    options = dict(data.get("options") or {})
    if subsamples_itself(data["name"]) and not data.get("indices"):
        options.update(skip=data.get("skip", 1), max_images=data.get("max_images"))
        return load_dataset(data["name"], split=data.get("split", "test"), root=resolve_path(data.get("root")), **options)
    full = load_dataset(data["name"], split=data.get("split", "test"), root=resolve_path(data.get("root")), **options)
    return subsample(full, data.get("skip", 1), data.get("max_images"), data.get("indices"))


def _check_smoothing(sm: dict[str, Any]) -> None:
    validate_sampling(list(sm["sigmas"]), sm["n0"], sm["n"])
    if len(set(sm["sigmas"])) != len(sm["sigmas"]):
        raise ConfigError(f"smoothing.sigmas lists a σ twice: {sm['sigmas']}")
    if not 0 < sm["alpha"] < 1:
        raise ConfigError(f"smoothing.alpha must lie in (0, 1), got {sm['alpha']}")
    if sm["mode"] not in ("full", "cascade"):
        raise ConfigError(f"smoothing.mode must be full or cascade, got {sm['mode']!r}")
    if sm["chunk"] < 1:
        raise ConfigError("smoothing.chunk must be at least 1")
    bad = [p for p in sm["p0"] if not 0.5 <= p < 1]
    if bad or not sm["p0"]:
        raise ConfigError(f"smoothing.p0 values must lie in [0.5, 1), got {sm['p0']}")
    bad_pol = [p for p in sm["policies"] if p not in stats.POLICIES]
    if bad_pol or not sm["policies"]:
        raise ConfigError(f"smoothing.policies must be among {stats.POLICIES}, got {sm['policies']}")
    if sm["mode"] == "cascade" and len(sm["sigmas"]) < 2:
        raise ConfigError("smoothing.mode=cascade needs two or more σ")
    if sm["n"] < stats.min_samples_to_certify(sm["alpha"]):
        log.warning("n=%d is below %d: at alpha=%g every image will abstain", sm["n"],
                    stats.min_samples_to_certify(sm["alpha"]), sm["alpha"])


class _Progress:
    """A tqdm bar on a terminal; plain log lines (every 10 s) in ``ray job logs`` and CI."""

    def __init__(self, total_images: int):
        self.total = total_images
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_images, unit="img", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, planner: Planner, elapsed: float) -> None:
        done = len(planner.finished_images)
        rate = planner.samples_done / max(elapsed, 1e-9)
        remaining = planner.samples_planned - planner.samples_done
        eta = remaining / rate if rate > 0 else float("nan")
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(f"{rate:,.0f} samples/s, ETA {eta:,.0f}s", refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last > 10 or done == self.total:
            self.last = time.monotonic()
            log.info("progress: %d/%d images, %s samples/s, ETA %s s", done, self.total, f"{rate:,.0f}",
                     "?" if not np.isfinite(eta) else f"{eta:,.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _connect(ray_cfg: dict[str, Any]) -> None:
    import ray

    if ray.is_initialized():
        return
    address = ray_cfg.get("address") or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = ray_cfg.get("local_cpus") or os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)


def _actor_spec(ray_cfg: dict[str, Any]) -> ActorSpec:
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = ray_cfg["cpus_per_actor"], ray_cfg["gpus_per_actor"]
    num = ray_cfg.get("num_actors")
    if num is None:
        if gpus > 0:
            num = int(resources.get("GPU", 0) // gpus)
        else:
            num = int(resources.get("CPU", 1) // max(cpus, 1e-9))
        num = max(1, num)
    if num < 1:
        raise ConfigError("ray.num_actors must be at least 1")
    return ActorSpec(num_actors=int(num), num_cpus=cpus, num_gpus=gpus, max_restarts=ray_cfg["max_restarts"])


def certify(cfg: dict[str, Any]) -> CertifyResult:
    """Run a certification as configured (a plain, resolved dict of ``CertifyCfg``)."""
    started = time.perf_counter()
    sm = cfg["smoothing"]
    _check_smoothing(sm)
    data = load_test_set(cfg["data"])
    if len(data) == 0:
        raise InputError("the test set is empty after subsampling")
    model = model_kwargs(cfg["model"])
    out = Path(cfg["out"]).expanduser().resolve() / cfg["model"]["name"]
    store = RunStore.create(out, counts_relevant_config(cfg), sigmas=list(sm["sigmas"]), n0=sm["n0"], n=sm["n"],
                            alpha=sm["alpha"], seed=sm["seed"], dataset=data.name, images=len(data))
    sigmas = sorted(float(s) for s in sm["sigmas"])  # index order = ascending σ: the cascade walks it down
    existing, decided, half_levels = _stored_progress(store, data, sigmas, sm)
    if existing:
        log.info("resuming %s: %d of %d rows already stored", out, len(existing), 2 * len(sigmas) * len(data))

    stops = _cascade_stops(sm, len(sigmas))

    def stop_rule(image: int, s: int, sel: np.ndarray, est: np.ndarray) -> bool:
        return bool(stops(stats.SparseCounts.from_dense(sel[None]), stats.SparseCounts.from_dense(est[None]), s)[0])

    planner = Planner(data.ids.tolist(), len(sigmas), sm["n0"], sm["n"], sm["chunk"], mode=sm["mode"],
                      stop_rule=stop_rule if sm["mode"] == "cascade" else None, existing=existing, decided=decided,
                      half_levels=half_levels)
    rows_written = 0
    if planner.has_work():
        rows_written = _sample(cfg, data, model, sigmas, store, planner)
    else:
        log.info("nothing to sample: every row is stored")

    # Certificates from the stored counts alone; append only the rows not yet there.
    view = counts_view(store.read_counts(), allow_missing=sm["mode"] == "cascade")
    p0s = sm["p0"] if sm["mode"] == "full" else sm["p0"][:1]
    policies = sm["policies"] if sm["mode"] == "full" else sm["policies"][:1]
    certs = derive_certificates(view, alpha=sm["alpha"], p0=p0s, policies=policies)
    _append_new_certificates(store, certs)
    return CertifyResult(cfg["model"]["name"], out, len(data), rows_written, time.perf_counter() - started)


def report(results: list[CertifyResult], radii: list[float], methods: list[str], plot_path: Path | None,
           title: str = "") -> str:
    """One markdown table (and plot) over the certificates of several runs."""
    from .analysis import curves_from_certificates, format_markdown, plot_curves

    curves = []
    for r in results:
        table = RunStore.open(r.out_dir).read_certificates()
        prefix = f"{r.name}: " if len(results) > 1 else ""
        curves += [c for c in curves_from_certificates(table, prefix) if c.source.removeprefix(prefix).split(" ")[0] in methods]
    if plot_path is not None:
        plot_curves(curves, plot_path, title=title)
    return format_markdown(curves, radii)


def _cascade_stops(sm: dict[str, Any], num_levels: int):
    """The lazy cascade's stop rule at the run's own p0 and policy (the first of each), for many
    images of one level at once."""
    def stops(selection: stats.SparseCounts, estimation: stats.SparseCounts, level: int) -> np.ndarray:
        return stats.level_stops(selection, estimation, p0=float(sm["p0"][0]), alpha=sm["alpha"],
                                 policy=sm["policies"][0], num_levels=num_levels, level=level)

    return stops


def _stored_progress(store: RunStore, data: TestSet, sigmas: list[float], sm: dict[str, Any]):
    """Keys of the rows already stored; in cascade mode also whether the cascade stops at each stored
    level (decided from the stored counts in one vectorised pass) and the counts of stored rows whose
    level misses its other phase (an interruption between the two)."""
    index = {s: i for i, s in enumerate(sigmas)}
    wanted = set(data.ids.tolist())
    existing = {(img, index[s], ph) for img, s, ph in store.completed_keys() if img in wanted and s in index}
    decided: dict[tuple[int, int], bool] = {}
    half_levels: dict = {}
    if sm["mode"] != "cascade" or not existing:
        return existing, decided, half_levels
    view = counts_view(store.read_counts(), allow_missing=True)
    stops = _cascade_stops(sm, len(sigmas))
    for level in view.levels:
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


class _ImageMap(Mapping):
    """image id → image, read through the test set (so lazy sets load each image once, when first
    shipped, and keep only the last few)."""

    def __init__(self, data: TestSet, keep: int = 64):
        self.data = data
        self.row = {int(i): r for r, i in enumerate(data.ids)}
        self.cache: dict[int, np.ndarray] = {}
        self.keep = keep

    def __getitem__(self, image_id: int) -> np.ndarray:
        if image_id not in self.cache:
            if len(self.cache) >= self.keep:
                self.cache.pop(next(iter(self.cache)))
            self.cache[image_id] = np.asarray(self.data.images[self.row[image_id]])
        return self.cache[image_id]

    def __iter__(self):
        return iter(self.row)

    def __len__(self) -> int:
        return len(self.row)


def _append_new_certificates(store: RunStore, certs) -> None:
    import pyarrow as pa

    old = store.read_certificates()
    if old.num_rows:
        def keys(t):
            cols = t.select(["image_id", "method", "sigma", "policy", "p0", "alpha"]).to_pydict()
            return list(zip(cols["image_id"], cols["method"], np.nan_to_num(cols["sigma"], nan=-1).tolist(), cols["policy"],
                            np.nan_to_num(cols["p0"], nan=-1).tolist(), cols["alpha"]))

        have = set(keys(old))
        mask = np.array([k not in have for k in keys(certs)], dtype=bool)
        certs = certs.filter(pa.array(mask))
    if certs.num_rows:
        store.append_certificates(certs.cast(CERTIFICATES_SCHEMA))


def _sample(cfg: dict[str, Any], data: TestSet, model: dict[str, Any], sigmas: list[float], store: RunStore,
            planner: Planner) -> int:
    import ray

    ray_cfg = cfg["ray"]
    _connect(ray_cfg)
    spec = _actor_spec(ray_cfg)
    engine = dict(cfg["engine"])
    threads = max(1, int(ray_cfg["cpus_per_actor"]))
    log.info("starting %d replica actor(s) (%g CPU, %g GPU each) for %d images × %d σ", spec.num_actors, spec.num_cpus,
             spec.num_gpus, len(data), len(sigmas))
    actors = start_actors(spec, model, sigmas, cfg["smoothing"]["seed"], engine, threads)
    try:
        info = ray.get(actors[0].describe.remote())
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, RaySmoothError):  # a model the actor could not build: the user's to fix
            raise type(cause)(str(cause)) from None
        raise
    from .engine import validate_images

    validate_images(data.images, data.labels, info["input_shape"], info["num_classes"], num_classes=data.num_classes)
    model_id = info["model_id"]
    images = _ImageMap(data)
    labels = {int(i): int(l) for i, l in zip(data.ids, data.labels)}
    sm = cfg["smoothing"]
    buffer: list[CountsRecord] = []
    state = {"written": 0, "last_flush": time.monotonic()}

    def flush() -> None:
        if buffer:
            store.append_counts(buffer, model_id=model_id, seed=sm["seed"], alpha=sm["alpha"])
            state["written"] += len(buffer)
            buffer.clear()
        state["last_flush"] = time.monotonic()

    def on_rows(rows: list[FinishedRow]) -> None:
        for r in rows:
            buffer.append(CountsRecord(r.image_id, labels[r.image_id], sigmas[r.sigma_index], r.phase, r.counts))
        if len(buffer) >= cfg["flush_every"] or time.monotonic() - state["last_flush"] > cfg["flush_seconds"]:
            flush()

    progress = _Progress(len(data))
    driver = Driver(actors, images, planner, on_rows=on_rows, max_in_flight_per_actor=ray_cfg["max_in_flight_per_actor"],
                    samples_per_task=ray_cfg["samples_per_task"], task_timeout_s=ray_cfg.get("task_timeout_s"),
                    progress=progress, give_up_after_s=ray_cfg.get("give_up_after_s", 600.0))
    try:
        driver.run()
    finally:
        flush()  # nothing finished is lost, whatever stopped the loop
        progress.close()
        for actor in actors:
            ray.kill(actor, no_restart=True)
    if driver.retried_units:
        log.info("%d units were re-run after actor failures", driver.retried_units)
    return state["written"]


@dataclass
class SweepResult:
    table: Any  # pyarrow.Table of certificates
    out_dir: Path
    settings: int
    images: int
    seconds: float


def run_sweep(run_dir: str | Path, p0: np.ndarray, alphas: list[float] | None, policy: str) -> SweepResult:
    """Cascade certificates for every (α, p0) from a run's stored counts; written as a new sweep
    directory under ``RUN_DIR/sweeps``. Never samples."""
    import json

    from .certificates import sweep_certificates
    from .store import append_table, config_hash

    if policy not in stats.POLICIES:
        raise ConfigError(f"policy must be one of {stats.POLICIES}, got {policy!r}")
    bad = [x for x in p0 if not 0.5 <= x < 1]
    if bad or len(p0) == 0:
        raise ConfigError(f"p0 values must lie in [0.5, 1), got {bad[0] if bad else 'none'}")
    bad = [a for a in alphas or [] if not 0 < a < 1]
    if bad:
        raise ConfigError(f"alpha must lie in (0, 1), got {bad[0]:g}")
    store = RunStore.open(run_dir)
    started = time.perf_counter()
    counts = store.read_counts()
    if not alphas:  # the α the run was certified at
        alphas = sorted(set(counts.column("alpha").to_pylist())) or [0.001]
    view = counts_view(counts)
    table = sweep_certificates(view, p0, alphas, policy)
    elapsed = time.perf_counter() - started
    params = {"p0": [float(x) for x in p0], "alpha": list(alphas), "policy": policy}
    out_dir = Path(run_dir) / "sweeps" / f"{time.strftime('%Y%m%d-%H%M%S')}-{config_hash(params)[:8]}"
    append_table(out_dir, table)
    (out_dir / "sweep.json").write_text(json.dumps({**params, "run_id": view.run_id, "images": len(view.image_ids),
                                                    "sigmas": view.sigmas}, indent=2))
    return SweepResult(table, out_dir, len(p0) * len(alphas), len(view.image_ids), elapsed)
