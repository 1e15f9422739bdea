"""The certify job: typed config → test set → plan → Ray replicas → counts in the store → certificates.

Each step lives with its own kind (``config``, ``data``, ``distributed``, ``store``, ``certificates``);
this module only puts them in order. Resuming is running the same config into the same output
directory: only the missing rows are planned. The run directory is locked for the run's lifetime,
and a new run's manifest is written only once every replica has started, so a failed start leaves
nothing that blocks the corrected command.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import stats
from .certificates import (
    NoiseInfo,
    append_new_certificates,
    counts_view,
    derive_certificates,
    noise_info,
    stored_progress,
)
from .config import (
    DEFAULT_BATCH_SIZE,
    IDENTITY_ABSENT,
    IDENTITY_NAMES,
    CertifyCfg,
    counts_relevant_config,
    model_fingerprints,
    resolve_model_paths,
)
from .data import fingerprint, load_test_set
from .errors import ConfigError, InputError, ModelLoadError
from .store import COMPACT_ABOVE, RunStore

__all__ = ["certify", "CertifyResult", "report", "run_noise", "engine_settings"]

log = logging.getLogger("raysmooth")


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


def engine_settings(cfg: CertifyCfg) -> dict:
    """What each replica's ``EngineConfig`` gets: the engine section, with the batch size resolved
    (engine.batch_size, else the model's own, else the engine default; ``auto`` probes the device)."""
    engine = dataclasses.asdict(cfg.engine)
    engine["batch_size"] = cfg.engine.batch_size or cfg.model.batch_size or DEFAULT_BATCH_SIZE
    return engine


def run_noise(cfg: CertifyCfg, sigmas: Sequence[float]) -> NoiseInfo:
    """The σ each level's noise really has, and the margin on p_A (lattice noise), for this config."""
    if cfg.engine.noise == "lattice":
        from .noise import lattice_margin

        dim = int(np.prod(cfg.model.input_shape))
        return NoiseInfo(
            {float(s): float(s) for s in sigmas},
            {float(s): lattice_margin(float(s), cfg.engine.levels, dim) for s in sigmas},
        )
    return NoiseInfo({float(s): float(np.float32(s)) for s in sigmas}, {})


def _manifest_noise(cfg: CertifyCfg, noise: NoiseInfo) -> dict:
    return {
        "kind": cfg.engine.noise,
        "levels": cfg.engine.levels if cfg.engine.noise == "lattice" else None,
        "applied_sigmas": {repr(k): v for k, v in noise.applied.items()},
        "margins": {repr(k): v for k, v in noise.margin.items()},
    }


def certify(cfg: CertifyCfg) -> CertifyResult:
    """Run a certification as configured (a typed, validated ``CertifyCfg``)."""
    from .distributed import Planner

    started = time.perf_counter()
    sm = cfg.smoothing
    data = load_test_set(cfg.data)
    if len(data) == 0:
        raise InputError("the test set is empty after subsampling")
    shape = tuple(int(s) for s in data.images.shape[1:])
    if shape != tuple(cfg.model.input_shape):  # said before the replicas start (seconds to minutes each)
        raise ConfigError(
            f"model.input_shape is {list(cfg.model.input_shape)} but data={cfg.data.name} gives images of "
            f"(C, H, W) = {shape}: set model.input_shape={list(shape)} if the model takes them, or choose its data"
        )
    model = resolve_model_paths(cfg.model)
    from .models import check_base_config, model_sections

    base, sections = model_sections(model)
    check_base_config(base, **sections)  # on the driver, before any actor starts
    out = Path(cfg.out).expanduser().resolve() / cfg.model.name
    sigmas = sorted(float(s) for s in sm.sigmas)  # index order = ascending σ: the cascade walks it down
    noise = run_noise(cfg, sigmas)
    identity = {"data_fingerprint": fingerprint(data)}  # what a resume must find unchanged (the manifest's)
    if prints := model_fingerprints(model):
        identity["model_fingerprints"] = prints
    if sm.mode == "sequential":
        return _certify_sequential(cfg, data, model, out, sigmas, noise, started, identity)
    if sm.n < stats.min_samples_to_certify(sm.alpha):
        log.warning(
            "n=%d is below %d: at alpha=%g every image will abstain",
            sm.n,
            stats.min_samples_to_certify(sm.alpha),
            sm.alpha,
        )

    with _run_store(out, cfg) as store:
        _check_same_inputs(store, identity)
        stop_rule = _cascade_rule(cfg, len(sigmas), noise) if sm.mode == "cascade" else None
        existing, decided, half = stored_progress(store, data.ids.tolist(), sigmas, stop_rule)
        if existing:
            log.info("resuming %s: %d of %d rows already stored", out, len(existing), 2 * len(sigmas) * len(data))

        def one_image_rule(image: int, s: int, sel: np.ndarray, est: np.ndarray) -> bool:
            return bool(
                stop_rule(stats.SparseCounts.from_dense(sel[None]), stats.SparseCounts.from_dense(est[None]), s)[0]
            )

        planner = Planner(
            data.ids.tolist(),
            len(sigmas),
            sm.n0,
            sm.n,
            sm.chunk,
            mode=sm.mode,
            stop_rule=one_image_rule if stop_rule else None,
            existing=existing,
            decided=decided,
            half_levels=half,
        )
        rows_written = 0
        if planner.has_work():
            rows_written = _sample(cfg, model, data, sigmas, store, planner, noise, identity)
        else:
            log.info("nothing to sample: every row is stored")

        # Certificates from the stored counts alone; append only the rows not yet there.
        _say_finishing(store)
        view = counts_view(store.read_counts(), allow_missing=sm.mode == "cascade", sigmas=sigmas)
        p0s = sm.p0 if sm.mode == "full" else sm.p0[:1]
        policies = sm.policies if sm.mode == "full" else sm.policies[:1]
        certs = derive_certificates(
            view, alpha=sm.alpha, p0=p0s, policies=policies, noise=noise_info(store.manifest, store.manifest_path)
        )
        append_new_certificates(store, certs)
        store.compact()
    return CertifyResult(cfg.model.name, out, len(data), rows_written, time.perf_counter() - started)


def _say_finishing(store: RunStore) -> None:
    """A long run's last minute (reading thousands of count files, certifying, compacting) is not silent."""
    files = store.live_parts("counts")
    if files > COMPACT_ABOVE:
        log.info("certifying from the stored counts (%d files), then compacting them into one", files)


def sequential_designs_for(cfg: CertifyCfg, sigmas: Sequence[float], noise: NoiseInfo) -> dict:
    """One design per σ (look schedule, levels, integer critical counts), made once per run."""
    sq = cfg.smoothing.sequential
    radii = sq.radii if sq.radii is not None else cfg.radii
    return {
        float(s): stats.sequential.design(
            cfg.smoothing.alpha,
            sq.unit,
            sq.n_max,
            radii,
            noise.sigma(s),
            ratio=sq.look_ratio,
            spending=sq.alpha_spending,
            beta=sq.futility_beta,
            margin=noise.margin_of(s),
            precision=sq.precision,
            r_cap=sq.r_cap,
        )
        for s in sigmas
    }


def _certify_sequential(
    cfg: CertifyCfg, data, model, out: Path, sigmas: list[float], noise: NoiseInfo, started: float, identity: dict
) -> CertifyResult:
    """smoothing.mode=sequential: rounds decided by the rule; the designs live in the manifest, so a
    resumed run decides with exactly the critical counts it started with."""
    from .certificates import sequential_certificates, sequential_designs, sequential_progress
    from .distributed import SequentialPlanner

    sm, sq = cfg.smoothing, cfg.smoothing.sequential
    with _run_store(out, cfg) as store:
        _check_same_inputs(store, identity)
        designs = sequential_designs(store.manifest, store.manifest_path) or sequential_designs_for(cfg, sigmas, noise)
        resume = sequential_progress(store, data.ids.tolist(), sigmas, designs)
        if resume:
            log.info("resuming %s: %d (image, σ) pairs already started", out, len(resume))

        def select(counts: np.ndarray) -> int:  # ĉ: the most frequent class of the selection samples
            return int(np.argmax(counts))

        def rule(s: int, history: list[int]) -> bool:
            return bool(stats.sequential.decide(designs[sigmas[s]], np.asarray([history]))[0])

        planner = SequentialPlanner(
            data.ids.tolist(),
            len(sigmas),
            sm.n0,
            sm.chunk,
            designs[sigmas[0]].looks,
            sq.unit,
            select=select,
            rule=rule,
            audit=sq.stop == "never",
            resume=resume,
        )
        rows_written = 0
        if planner.has_work():
            extra = {
                **identity,
                "sequential": {
                    "looks": designs[sigmas[0]].looks.tolist(),
                    "alphas": designs[sigmas[0]].alphas.tolist(),
                    "audit": sq.stop == "never",
                    "designs": {repr(s): d.to_dict() for s, d in designs.items()},
                },
            }
            rows_written = _sample(cfg, model, data, sigmas, store, planner, noise, extra)
        else:
            log.info("nothing to sample: every round is stored")
        _say_finishing(store)
        certs = sequential_certificates(store.read_counts(), designs, audit=sq.stop == "never")
        append_new_certificates(store, certs)
        store.compact()
    return CertifyResult(cfg.model.name, out, len(data), rows_written, time.perf_counter() - started)


def _cascade_rule(cfg: CertifyCfg, num_levels: int, noise: NoiseInfo):
    """The lazy cascade's stop rule at the run's own p0 and policy (the first of each), for many
    images of one level at once."""
    sm = cfg.smoothing
    margin = max(noise.margin.values(), default=0.0)

    def stops(selection: stats.SparseCounts, estimation: stats.SparseCounts, level: int) -> np.ndarray:
        return stats.level_stops(
            selection,
            estimation,
            p0=float(sm.p0[0]),
            alpha=sm.alpha,
            policy=sm.policies[0],
            num_levels=num_levels,
            level=level,
            margin=margin,
        )

    return stops


_THRESHOLDS = ("alpha", "p0", "policies")  # smoothing keys a full run's counts do not depend on


def _run_store(out: Path, cfg: CertifyCfg) -> RunStore:
    """The run directory for ``cfg``'s counts; a refused resume names the keys as the user sets them, and
    says when a sweep of the stored counts answers what was asked."""
    identity = counts_relevant_config(cfg)
    return RunStore.for_run(
        out,
        identity,
        names=IDENTITY_NAMES,
        absent=IDENTITY_ABSENT,
        advice=functools.partial(_sweep_instead, out, identity),
    )


def _sweep_instead(out: Path, identity: dict, stored: dict) -> str | None:
    """A full run asked again at another α, p0 or policy needs no new samples: the sweep command that
    answers it from the stored counts (``stored``: the run's config), else None."""
    if not isinstance(stored.get("smoothing"), dict):
        return None

    def without_thresholds(config: dict) -> dict:
        smoothing = {k: v for k, v in config["smoothing"].items() if k not in _THRESHOLDS}
        return {**config, "smoothing": smoothing}

    smoothing = identity["smoothing"]
    if smoothing["mode"] != "full" or without_thresholds(stored) != without_thresholds(identity):
        return None
    p0 = ",".join(f"{p:g}" for p in smoothing["p0"])
    first, *others = smoothing["policies"]
    sweep = f"raysmooth sweep {shlex.quote(str(out))} --alpha {smoothing['alpha']:g}"
    also = ""
    if len(smoothing["sigmas"]) > 1:  # one σ has no cascade: its sweep is over α alone
        sweep += f" --p0 {p0} --policy {first}"
        also = "".join(f" (and --policy {p})" for p in others)
    return (
        f"α, p0 and the policy do not change a full run's counts, so nothing needs sampling again: {sweep}{also} "
        "certifies from the stored ones (or certify into a new out)"
    )


def _check_same_inputs(store: RunStore, identity: dict) -> None:
    """A resumed run's stored rows are keyed by image id and were drawn by the run's model: refuse to
    resume on a test set whose ids name other images, or with model files that changed (runs from before
    a fingerprint was recorded are not checked for it)."""
    manifest = store.manifest or {}
    stored = manifest.get("data_fingerprint")
    if stored is not None and stored != identity["data_fingerprint"]:
        raise InputError(
            f"{store.root}: the test set is not the one this run started on (files added, removed or renamed under "
            "data.root, or other images), so its stored image ids would name other images; restore the test set "
            "to resume, or certify into a new out"
        )
    then, now = manifest.get("model_fingerprints"), identity.get("model_fingerprints", {})
    changed = sorted(k for k, v in then.items() if v != now.get(k)) if isinstance(then, dict) else []
    if changed:
        raise InputError(
            f"{store.root}: the files of model.{changed[0]} changed since this run started (retrained or "
            "fine-tuned again into the same folder?), so its stored counts were drawn by another model; restore "
            "those files to resume, or certify into a new out"
        )


class _ImageMap:
    """image id → image, read through the test set (so lazy sets load each image once, when first
    shipped, and keep only the last few)."""

    def __init__(self, data, keep: int = 64):
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

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.row

    def __iter__(self):
        return iter(self.row)

    def __len__(self) -> int:
        return len(self.row)


def _sample(
    cfg: CertifyCfg,
    model,
    data,
    sigmas: list[float],
    store: RunStore,
    planner,
    noise: NoiseInfo,
    manifest_extra: dict | None = None,
) -> int:
    from .distributed import actor_spec, connect, runtime_env_for, sample_counts, start_replicas, stop_actors
    from .engine import validate_images

    ry, sm = cfg.ray, cfg.smoothing
    connect(ry.address, ry.local_cpus, runtime_env_for(model.base))
    spec = actor_spec(ry.num_actors, ry.cpus_per_actor, ry.gpus_per_actor, ry.max_restarts)
    threads = max(1, int(ry.cpus_per_actor))
    replicas = start_replicas(
        spec, dataclasses.asdict(model), sigmas, sm.seed, engine_settings(cfg), threads, give_up_s=ry.give_up_after_s
    )
    actors, infos = replicas.actors, replicas.infos
    info = infos[0]
    try:
        validate_images(
            data.images, data.labels, info["input_shape"], info["num_classes"], num_classes=data.num_classes
        )
    except BaseException:
        stop_actors(replicas.all())
        raise
    batch_sizes = sorted({i["batch_size"] for i in infos})
    log.info(
        "%d replica(s) on %s, %s samples per batch",
        len(infos),
        ", ".join(sorted({i["device"] for i in infos})),
        "/".join(map(str, batch_sizes)),
    )
    _note_other_devices(store, {i["device"] for i in infos})
    store.commit_manifest(
        sigmas=sigmas,
        n0=sm.n0,
        n=sm.n,
        alpha=sm.alpha,
        seed=sm.seed,
        dataset=data.name,
        images=len(data),
        model_id=info["model_id"],
        noise=_manifest_noise(cfg, noise),
        engine={"batch_sizes": batch_sizes, "devices": sorted({i["device"] for i in infos})},
        **(manifest_extra or {}),
    )
    labels = {int(i): int(lab) for i, lab in zip(data.ids, data.labels)}
    result = sample_counts(
        actors,
        _ImageMap(data),
        labels,
        sigmas,
        planner,
        store,
        model_id=info["model_id"],
        seed=sm.seed,
        alpha=sm.alpha,
        ray_cfg=ry,
        flush_every=cfg.flush_every,
        flush_seconds=cfg.flush_seconds,
        progress_seconds=cfg.progress_seconds,
        joining=replicas.joining,
        check_joined=functools.partial(_same_replica, info),
    )
    return result.rows_written


def _note_other_devices(store: RunStore, devices: set[str]) -> None:
    """CPU and CUDA generators draw different noise from one seed, and their arithmetic differs in the
    last bits: a run resumed on the other kind of device gets counts that are no longer one device's."""
    then = ((store.manifest or {}).get("engine") or {}).get("devices")
    kinds = {str(d).split(":")[0] for d in devices}
    if isinstance(then, list) and then and {str(d).split(":")[0] for d in then} != kinds:
        log.warning(
            "this run started on %s and goes on on %s: the rows drawn now come from that device's noise generator "
            "and arithmetic (which differs in the last bits, as between precisions), so the counts mix two devices'; "
            "resume on the kind of device it started on to keep them one device's",
            "/".join(sorted(map(str, then))),
            "/".join(sorted(devices)),
        )


def _same_replica(first: dict, joined: dict) -> None:
    """A replica that joins late must be the model the run was started with (its manifest says so)."""
    keys = ("num_classes", "input_shape", "model_id", "applied_sigmas")
    differ = [k for k in keys if joined.get(k) != first.get(k)]
    if differ:
        raise ModelLoadError(
            f"a replica that joined late reports another model ({differ[0]}: {joined.get(differ[0])} there, "
            f"{first.get(differ[0])} on the others); every node must load the same files"
        )


def report(
    results: list[CertifyResult], radii: list[float], methods: list[str], plot_path: Path | None, title: str = ""
) -> str:
    """One markdown table (and plot) over the certificates of several runs."""
    from .analysis import curves_from_certificates, format_markdown, plot_curves

    curves = []
    for r in results:
        table = RunStore.open(r.out_dir).read_certificates()
        prefix = f"{r.name}: " if len(results) > 1 else ""
        wanted = set(methods) | {"sequential"}  # a sequential run's own rows are always its report
        curves += [
            c for c in curves_from_certificates(table, prefix) if c.source.removeprefix(prefix).split(" ")[0] in wanted
        ]
    if plot_path is not None:
        plot_curves(curves, plot_path, title=title)
    return format_markdown(curves, radii)
