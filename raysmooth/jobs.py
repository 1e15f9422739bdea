"""Entry points of the jobs: compose the hydra config, run, and turn user mistakes into one line.

``jobs/certify.py`` and ``raysmooth certify`` are the same job: both take hydra overrides
(``key=value``, ``group=option``) and run under ``ray job submit`` unchanged.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, RaySmoothError

__all__ = ["compose", "certify_main", "finetune_main", "sweep_main", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("raysmooth")


def _one_line(exc: BaseException) -> str:
    """Hydra's message and, where it wraps one, OmegaConf's reason, on one line."""
    text = _first_sentence(exc)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and type(cause).__module__.startswith(("omegaconf", "hydra")):
        text = f"{text.rstrip('.')}: {_first_sentence(cause)}"
    return text


def _first_sentence(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # OmegaConf puts the useful sentence first and the key path in a 'full_key:' line.
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
    head = next((ln for ln in lines if not ln.startswith(("full_key:", "object_type", "reference_type", "To append"))), type(exc).__name__)
    return f"{head} (key: {key})" if key and key not in head else head


def compose(config_name: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved config as a plain dict; a wrong key or value is a ConfigError naming it.

    For ``certify``: choosing a model on the command line without naming ``compare`` clears the
    default comparison models (``raysmooth certify model=mine`` certifies just that model).
    """
    overrides = list(overrides)
    if config_name == "certify" and any(o.startswith(("model=", "model.")) for o in overrides) \
            and not any(o.lstrip("+~").startswith("compare") for o in overrides):
        overrides.append("compare=[]")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (OmegaConfBaseException, ValueError, KeyError) as exc:  # hydra's own errors are ValueError/ConfigCompositionException
        raise ConfigError(_one_line(exc)) from None
    except Exception as exc:  # hydra.errors.* (missing group option, bad override syntax)
        if type(exc).__module__.startswith("hydra"):
            raise ConfigError(_one_line(exc)) from None
        raise
    return resolved  # type: ignore[return-value]


def _usage(job: str) -> str:
    lines = [f"usage: raysmooth {job} [--print-config] [key=value | group=option …]", "",
             f"Hydra overrides of configs/{job}.yaml; every key is typed and checked."]
    if job == "certify":
        lines.append("groups and options:")
        for group in ("data", "model", "smoothing", "engine", "ray"):
            options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
            lines.append(f"  {group}: {', '.join(options)}")
        lines.append("examples: raysmooth certify model=toy_onestep smoothing.n=2000 'smoothing.p0=[0.7]' out=/tmp/run")
    return "\n".join(lines)


def _failed(job: str, exc: BaseException, resume_hint: str) -> int:
    """One line on stderr and the exit status: 2 for a user mistake, 130 for an interrupt."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"raysmooth {job}: interrupted; {resume_hint}", file=sys.stderr)
        return 130
    text = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
    print(f"raysmooth {job}: error: {text}", file=sys.stderr)
    return 2


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s raysmooth %(levelname)s %(message)s", datefmt="%H:%M:%S")


def _job(job: str, argv: Sequence[str] | None, resume_hint: str, body) -> int:
    """What every job shares: --help, logging, and one line (exit 2 / 130) for a mistake or an interrupt."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(_usage(job))
        return 0
    _setup_logging()
    try:
        return body(argv)
    except (RaySmoothError, OSError, KeyboardInterrupt) as exc:
        return _failed(job, exc, resume_hint)


def certify_main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/certify.py [--print-config] key=value …``"""
    return _job("certify", argv, "run the same command again to resume", _certify)


def _certify(argv: list[str]) -> int:
    show = "--print-config" in argv
    overrides = [a for a in argv if a != "--print-config"]
    cfg = compose("certify", overrides)
    if show:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    from .runner import certify, report

    models = [cfg] + [_with_model(cfg, overrides, name) for name in cfg.get("compare", [])]
    names = [m["model"]["name"] for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"two models share a name (model.name): {names}")
    results = []
    for i, run_cfg in enumerate(models):
        log.info("certifying %s (%d of %d)", run_cfg["model"]["name"], i + 1, len(models))
        results.append(certify(run_cfg))
    out = Path(cfg["out"]).expanduser().resolve()
    plot = out / "certified_accuracy.png" if cfg.get("plot", True) else None
    markdown = report(results, cfg["radii"], cfg["report_methods"], plot, title=f"{cfg['data']['name']}")
    print(markdown)
    print()
    for r in results:
        print(f"{r.name}: {r.images} images, {r.rows_written} new counts rows, {r.seconds:.1f} s")
    print(f"output directory: {out}")
    for r in results:
        print(f"  {r.name}: counts table {r.counts_dir}, certificates table {r.certificates_dir}")
    if plot:
        print(f"plot: {plot}")
    return 0


def _with_model(cfg: dict[str, Any], overrides: list[str], name: str) -> dict[str, Any]:
    """The run config with model group option ``name`` (validated like any model config)."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("model", "compare"))]
    return {**cfg, "model": compose("certify", keep + [f"model={name}", "compare=[]"])["model"]}


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/finetune.py [key=value …]``: fine-tune a denoiser; prints where it went."""
    return _job("finetune", argv, "run the same command again to resume from the last checkpoint", _finetune)


def _finetune(argv: list[str]) -> int:
    from .finetune import FinetuneConfig, finetune

    folder = finetune(FinetuneConfig(**compose("finetune", argv)))
    print(f"fine-tuned denoiser: {folder}")
    print(f"use it with: raysmooth certify model=toy_dds model.denoiser.path={folder}")
    return 0


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/sweep.py run_dir=RUN_DIR p0=0.5:0.95:0.05 [alpha=[…]] [policy=strict]``"""
    return _job("sweep", argv, "run it again", _sweep)


def _sweep(argv: list[str]) -> int:
    from .analysis import curves_from_certificates, format_markdown
    from .cli import parse_range
    from .runner import run_sweep

    cfg = compose("sweep", argv)
    result = run_sweep(cfg["run_dir"], parse_range(str(cfg["p0"]), "p0"), cfg.get("alpha"), cfg["policy"])
    print(format_markdown(curves_from_certificates(result.table), cfg["radii"]))
    print(f"\n{result.settings} settings × {result.images} images from stored counts in {result.seconds:.2f} s")
    print(f"sweep certificates: {result.out_dir}")
    return 0
