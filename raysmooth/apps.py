"""The hydra apps: ``certify``, ``sweep`` and ``finetune``.

``python jobs/certify.py …`` (also under ``ray job submit``) and ``raysmooth certify …`` run the same
``@hydra.main`` app, so overrides, ``-m`` multirun grids, ``--cfg job`` and the ``.hydra/`` records
(kept beside the results: ``OUT/.hydra/<time>/``) behave as hydra users expect. Before hydra runs,
the overrides are composed and validated once, so a mistake is one line with exit status 2 and
leaves no folder behind. User mistakes raised while running are one line too; a traceback means a
bug in raysmooth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .config import (
    CONFIG_DIR,
    CertifyCfg,
    FinetuneConfig,
    SweepCfg,
    compose,
    hydra_error_line,
    is_hydra_error,
    large_sigma_warning,
    lazy_cascade_note,
    load_model_option,
    override_text,
    parse_range,
    typed,
)
from .errors import ConfigError, RaySmoothError, one_line, os_error_text, printable_streams, reader_gone
from .signals import Terminated, sigterm_raises

__all__ = ["certify_main", "sweep_main", "finetune_main", "run_app", "sweep_report"]

log = logging.getLogger("raysmooth")

_HYDRA_FLAGS = {
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--help",
    "-h",
    "--hydra-help",
    "--resolve",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--shell-completion",
    "-sc",
}


def _is_multirun(argv: Sequence[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def _plain_overrides(argv: Sequence[str]) -> list[str] | None:
    """The overrides to validate before hydra runs; None when hydra is asked for something else (help,
    --cfg) or for a grid (multirun: ``_grid_jobs`` validates each of its jobs)."""
    if _is_multirun(argv) or any(a.split("=")[0] in _HYDRA_FLAGS for a in argv):
        return None
    return _job_overrides(argv)


def _job_overrides(argv: Sequence[str]) -> list[str]:
    """The overrides of the job's own config: neither hydra's flags nor its ``hydra.*`` settings."""
    return [a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith(("hydra.", "hydra/", "hydra="))]


_GRID_CHECKED = 500  # jobs of a -m grid validated before the first runs (each composes in a few ms)


def _grid_jobs(argv: Sequence[str]) -> list[list[str]]:
    """Each job's overrides of a ``-m`` grid, so that every job is validated before the first one runs
    (hydra composes a job only when its turn comes: a bad value in the last job was found hours later).
    Empty when hydra is asked for something else, or should report a malformed override itself."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not _is_multirun(argv) or any(a.split("=")[0] in _HYDRA_FLAGS for a in argv):
        return []
    try:
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(_job_overrides(argv)), None)
    except Exception:  # noqa: BLE001 - hydra reports a bad override itself
        return []
    return [job for batch in batches for job in batch][:_GRID_CHECKED]


def _flags_first(name: str, argv: list[str]) -> list[str]:
    """Hydra's flags (with their values) moved before the overrides, after checking them: argparse takes the
    overrides as one run of positionals, so ``a=1 -m b=2,3`` (flags among overrides) was "unrecognized
    arguments" under a usage screen; a flag that cannot work (``--cfg jb``, ``--foo``) is one line."""
    try:
        from hydra._internal.utils import get_args_parser
    except ImportError:  # a hydra that moved its parser: its own parsing, as before
        return argv
    parser = get_args_parser()
    options = {opt: action for action in parser._actions for opt in action.option_strings}
    flags, overrides, i = [], [], 0
    while i < len(argv):
        token, i = argv[i], i + 1
        if not token.startswith("-"):
            overrides.append(token)
            continue
        action = options.get(token)  # None: unknown, or --flag=value
        if action is not None and action.nargs is None and i == len(argv):
            overrides.append(token)  # its value is missing: last, so that argparse says so
        elif action is not None and i < len(argv) and (action.nargs is None or argv[i] in (action.choices or ())):
            flags += [token, argv[i]]  # a flag and its value (--info's value is optional: one of its choices)
            i += 1
        else:
            flags.append(token)
    reordered = [*flags, *overrides]

    def refuse(message: str) -> None:
        raise ConfigError(f"{message} (raysmooth {name} --help lists the flags; overrides are key=value)")

    parser.error = refuse  # type: ignore[method-assign]
    if not any(a in ("--version", "--shell-completion", "-sc") for a in flags):
        given = parser.parse_args(reordered)
        if sum(bool(v) for v in (given.run, given.multirun, given.cfg, given.info)) > 1:
            refuse("only one of --run, --multirun (-m), --cfg and --info can be given")
    return reordered


def _with_model_defaults(name: str, argv: list[str]) -> list[str]:
    """``raysmooth certify model=mine`` certifies just that model: choosing a model without naming
    ``compare`` clears the default comparison models."""
    chooses = [i for i, a in enumerate(argv) if a.lstrip("+").startswith(("model=", "model."))]
    if name == "certify" and chooses and not any(a.lstrip("+~").startswith("compare") for a in argv):
        return ["compare=[]", *argv]  # an override: run_app puts hydra's flags before every override
    return argv


def _failed(name: str, exc: BaseException) -> int:
    """One line on stderr and the exit status: 2 for a user mistake, 130 for an interrupt."""
    resume = {
        "certify": "run the same command again to resume",
        "finetune": "run the same command again to resume from the last checkpoint",
    }.get(name, "run it again")
    if isinstance(exc, BrokenPipeError):  # `raysmooth certify … | head`: what was stored stays
        return reader_gone()
    if isinstance(exc, KeyboardInterrupt):
        stored = {"certify": "the rows finished so far are stored: "}.get(name, "")
        what = f"terminated ({exc.signal_name})" if isinstance(exc, Terminated) else "interrupted"
        with contextlib.suppress(OSError):  # after a hangup the terminal may be gone
            print(f"raysmooth {name}: {what}; {stored}{resume}", file=sys.stderr)
        return exc.exit_status if isinstance(exc, Terminated) else 130
    if isinstance(exc, OSError):
        text = os_error_text(exc, resume)
    elif is_hydra_error(exc):
        text = hydra_error_line(exc, name)
    else:
        text = str(exc)
    print(f"raysmooth {name}: error: {one_line(text, 1000)}", file=sys.stderr)
    return 2


def _keeps_working_directory() -> None:
    """Refuse ``hydra.job.chdir=true``: every relative path (``out``, ``data.root``, a checkpoint) means the
    directory the command ran in; with hydra's chdir a relative ``out`` landed in a new time-stamped
    folder under ``.hydra`` on every run, so no run could ever resume."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.get().job.chdir:
        raise ConfigError(
            "hydra.job.chdir=true is not supported: relative paths (out, data.root, checkpoints) are read from "
            "the directory the command runs in; drop it (an absolute out puts the results anywhere)"
        )


def run_app(name: str, task: Callable[[Any], int], argv: Sequence[str] | None = None) -> int:
    """Run ``task`` as the hydra app of ``configs/<name>.yaml`` with ``argv`` (overrides and hydra's
    flags); returns the exit status."""
    import hydra
    from omegaconf import DictConfig

    from .config import register_configs

    if not CONFIG_DIR.is_dir():  # a copy of the package without its checkout (a non-editable install)
        return _failed(
            name,
            ConfigError(
                f"the configs are not at {CONFIG_DIR}: the jobs run from a raysmooth checkout; install it from a "
                "clone with `pip install -e .` (or `make demo`)"
            ),
        )
    printable_streams()
    argv = _with_model_defaults(name, list(sys.argv[1:] if argv is None else argv))
    register_configs()
    plain = _plain_overrides(argv)
    _SWEPT[:] = _swept_keys(argv) if _is_multirun(argv) else []
    status: dict[str, Any] = {"code": 0, "error": None}

    @hydra.main(config_path=str(CONFIG_DIR), config_name=name, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        # Errors are kept, not raised: hydra would print its own "Error executing job" line first.
        try:
            _keeps_working_directory()
            status["code"] = max(status["code"], int(task(cfg) or 0))
        except (RaySmoothError, OSError, KeyboardInterrupt) as exc:
            status["error"] = status["error"] or exc
            if isinstance(exc, KeyboardInterrupt):
                raise

    saved_argv, saved_full = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    try:
        argv = _flags_first(name, argv)
        if plain is not None:
            compose(name, plain)  # validate once, before hydra creates any folder
        for i, job in enumerate(_grid_jobs(argv)):
            try:
                composed = compose(name, job)
            except ConfigError as exc:
                swept = " ".join(o for o in job if o.split("=")[0].lstrip("+~") in _SWEPT)
                raise ConfigError(f"{exc} (in the -m job {swept}; no job has run)") from None
            if i == 0 and name == "certify":
                _refuse_a_threshold_grid(composed)
        sys.argv = [f"raysmooth-{name}", *argv]
        os.environ["HYDRA_FULL_ERROR"] = "1"  # hydra raises; we print the one line
        with sigterm_raises():
            app()
        if status["error"] is not None:
            return _failed(name, status["error"])
    except SystemExit as exc:  # hydra's --help and --cfg end this way
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except (RaySmoothError, OSError, KeyboardInterrupt) as exc:
        return _failed(name, exc)
    except Exception as exc:
        if is_hydra_error(exc) or type(exc).__name__ in (
            "ConfigCompositionException",
            "OverrideParseException",
            "MissingConfigException",
        ):
            return _failed(name, ConfigError(hydra_error_line(exc, name)))
        raise
    finally:
        sys.argv = saved_argv
        if saved_full is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full
    return status["code"]


# ---- certify ---------------------------------------------------------------------------------------
_SWEPT: list[str] = []  # the keys a multirun varies (its jobs' folders are named by them)


_COUNT_FREE = {"smoothing.alpha", "smoothing.p0", "smoothing.policies", "radii", "report_methods", "plot"}


def _refuse_a_threshold_grid(cfg: CertifyCfg) -> None:
    """A -m grid over α or p0 alone in full mode would sample the same counts once per job (hours each on
    ImageNet): thresholds are swept from one run's stored counts. (Cascade and sequential runs choose
    what to sample by α and p0, so a grid over them does sample something different.)"""
    if _SWEPT and set(_SWEPT) <= _COUNT_FREE and cfg.smoothing.mode == "full":
        raise ConfigError(
            f"a -m grid over {', '.join(_SWEPT)} alone would sample the same counts once per job: certify once "
            "(any alpha and p0), then sweep the stored counts with raysmooth sweep OUT/MODEL --alpha A,B --p0 P,Q "
            "--policy strict|reference (no sampling); no job has run"
        )


def _swept_keys(argv: Sequence[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except Exception:  # noqa: BLE001 - hydra reports a bad override itself
        return []
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


_WithOut = TypeVar("_WithOut", CertifyCfg, FinetuneConfig)  # a job's config: it names its folder, ``out``


def _job_out(cfg: _WithOut) -> _WithOut:
    """In a multirun, each job writes to its own folder under ``out``, named by the values of the swept
    keys (``out/smoothing.n=40``): its runs (or fine-tuning checkpoint) would otherwise share one folder
    with a different config, and every job after the first was refused once the first had finished."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return cfg
    if hc.mode != RunMode.MULTIRUN:
        return cfg
    mine = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in _SWEPT]
    sub = (",".join(mine) or f"job{hc.job.num}").replace("/", "_")
    return dataclasses.replace(cfg, out=str(Path(cfg.out) / sub))


def certify_task(dcfg: Any) -> int:
    """The certify job on a composed config: every model of ``model`` + ``compare``, one report."""
    from .runner import certify, report

    cfg = _job_out(typed(dcfg, "certify"))
    if warning := large_sigma_warning(cfg.smoothing.sigmas):
        log.warning("smoothing.sigmas: %s", warning)
    if note := lazy_cascade_note(cfg.smoothing):
        log.warning("smoothing.mode=cascade %s", note)
    models = [cfg] + [dataclasses.replace(cfg, model=load_model_option(n)) for n in cfg.compare]
    names = [m.model.name for m in models]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        given = ["model"] + [f"compare's {c}" for c in cfg.compare]
        which = ", ".join(g for g, n in zip(given, names) if n in twice)
        raise ConfigError(
            f"the models to certify share the name {', '.join(twice)} ({which}); each one's results go to a "
            "folder of that name: list each model once (compare holds the models beside model=…)"
        )
    results = []
    for i, run_cfg in enumerate(models):
        log.info("certifying %s (%d of %d)", run_cfg.model.name, i + 1, len(models))
        results.append(certify(run_cfg))
    out = Path(cfg.out).expanduser().resolve()
    plot = out / "certified_accuracy.png" if cfg.plot else None
    markdown = report(results, cfg.radii, cfg.report_methods, plot, title=cfg.data.name)
    print(markdown)
    if cfg.smoothing.mode == "cascade" and "certify" in cfg.report_methods:
        print(
            "\n(smoothing.mode=cascade: a certify row below the largest σ counts only the images the cascade sent "
            "down to that σ, its `images`; compare the cascade with the largest σ's row, or run smoothing.mode=full)"
        )
    print()
    for r in results:
        print(f"{r.name}: {r.images} images, {r.rows_written} new counts rows, {r.seconds:.1f} s")
    print(f"output directory: {out}")
    for r in results:
        print(f"  {r.name}: counts table {r.counts_dir}, certificates table {r.certificates_dir}")
    if plot:
        print(f"plot: {plot}")
    return 0


def certify_main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/certify.py [key=value …]`` and ``raysmooth certify [key=value …]``."""
    return run_app("certify", certify_task, argv)


# ---- sweep -----------------------------------------------------------------------------------------
def sweep_report(cfg: SweepCfg) -> int:
    """Certificates for a grid of p0 and α from a run's stored counts: the table on stdout,
    where the certificates went on stderr. ``raysmooth sweep`` and ``jobs/sweep.py`` both end here."""
    from .analysis import curves_from_certificates, format_markdown
    from .certificates import run_sweep

    result = run_sweep(cfg.run_dir, parse_range(str(cfg.p0), "p0"), cfg.alpha, cfg.policy)
    if result.partial or (result.run_images and result.images < result.run_images):  # running, or stopped
        of = f" of its {result.run_images}" if result.run_images else ""
        log.warning(
            "the run has all its counts for %d%s images (it is still running, or was stopped): these certificates "
            "cover those %d only%s; the certify command that started the run finishes it",
            result.images,
            of,
            result.images,
            f", not the {result.partial} with only some of their counts" if result.partial else "",
        )
    print(format_markdown(curves_from_certificates(result.table, with_alpha=True), cfg.radii))
    settings = f"{result.settings} setting{'s' if result.settings != 1 else ''}"
    alphas = ", ".join(f"{a:g}" for a in result.alphas)
    print(
        f"\n{settings} (α = {alphas}, {result.policy}) × {result.images} images from stored counts in "
        f"{result.seconds:.2f} s",
        file=sys.stderr,
    )
    print(f"sweep certificates: {result.out_dir}", file=sys.stderr)
    return 0


def sweep_task(dcfg: Any) -> int:
    return sweep_report(typed(dcfg, "sweep"))


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/sweep.py run_dir=RUN_DIR p0=0.5:0.95:0.05 [alpha=[…]] [policy=strict]``"""
    return run_app("sweep", sweep_task, argv)


# ---- finetune --------------------------------------------------------------------------------------
def finetune_task(dcfg: Any) -> int:
    from .finetune import finetune

    cfg = _job_out(typed(dcfg, "finetune"))
    if warning := large_sigma_warning(cfg.sigmas):
        log.warning("sigmas: %s", warning)
    folder = finetune(cfg)
    print(f"fine-tuned denoiser: {folder}")
    print(f"use it with: raysmooth certify model=toy_dds {override_text('model.denoiser.path', folder)}")
    return 0


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/finetune.py [key=value …]``: fine-tune a denoiser; prints where it went."""
    return run_app("finetune", finetune_task, argv)
