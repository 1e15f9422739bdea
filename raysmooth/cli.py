"""The ``raysmooth`` command line.

User mistakes end in one line on stderr and exit status 2; a traceback means a bug in raysmooth.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import DEFAULT_RADII, SweepCfg, parse_floats
from .errors import RaySmoothError, UserError, printable_streams

__all__ = ["main", "build_parser"]


def _radii(text: str | None) -> list[float]:
    if text is None:
        return list(DEFAULT_RADII)
    radii = parse_floats(text, "--radii")
    if any(r < 0 for r in radii):
        raise UserError("--radii must be non-negative")
    return radii


# ---- analyze -------------------------------------------------------------------------------------
def _distinct_labels(paths: list[Path]) -> list[str]:
    """The shortest trailing parts that tell the paths apart: runs/a/dds and runs/b/dds are a/dds and b/dds."""
    for depth in range(1, max((len(p.parts) for p in paths), default=1) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import check_plot_path, format_csv, format_markdown, load_curves, plot_curves

    radii = _radii(args.radii)
    if args.plot:
        check_plot_path(args.plot)  # before anything is printed
    paths = list(dict.fromkeys(Path(p).resolve() for p in args.paths))  # a path named twice is read once
    labels = _distinct_labels(paths)
    curves = []
    for path, label in zip(paths, labels):
        curves += load_curves(path, f"{label}: " if len(paths) > 1 else "")
    print(
        format_csv(curves, radii) if args.format == "csv" else format_markdown(curves, radii),
        end="\n" if args.format == "markdown" else "",
    )
    if args.plot:
        plot_curves(curves, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


# ---- sweep ---------------------------------------------------------------------------------------
def _quote(value: str) -> str:
    """A hydra override value, quoted so that any path or range survives hydra's grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def cmd_sweep(args: argparse.Namespace) -> int:
    """The flags as overrides of the sweep job: ``raysmooth sweep`` and ``python jobs/sweep.py`` are one
    code path with one set of defaults (configs/sweep.yaml)."""
    from .apps import sweep_main

    overrides = [f"run_dir={_quote(args.run_dir)}"]
    if args.p0 is not None:
        overrides.append(f"p0={_quote(args.p0)}")
    if args.policy is not None:
        overrides.append(f"policy={args.policy}")
    if args.alpha:
        overrides.append(f"alpha=[{','.join(repr(a) for a in parse_floats(args.alpha, '--alpha'))}]")
    if args.radii:
        overrides.append(f"radii=[{','.join(repr(r) for r in _radii(args.radii))}]")
    return sweep_main(overrides)


# ---- train-toy -----------------------------------------------------------------------------------
def cmd_train_toy(args: argparse.Namespace) -> int:
    import logging

    from .toy import EMBEDDED_DIR, ToyConfig, train_all

    logging.basicConfig(level=logging.INFO, format="%(asctime)s raysmooth %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out) if args.out else EMBEDDED_DIR
    cfg = ToyConfig(seed=args.seed)
    if args.quick:  # a smoke run: minutes become seconds, the models are poor
        cfg = ToyConfig(seed=args.seed, denoiser_steps=200, classifier_epochs=3, onestep_epochs=3)
    embedded = out.resolve() == EMBEDDED_DIR.resolve()
    if out.exists() and any(out.iterdir()) and not args.overwrite and not embedded:
        raise UserError(f"{out} is not empty; choose another --out or pass --overwrite")
    if embedded and (args.quick or args.seed != 0) and not args.overwrite:
        # the committed models are the full recipe at seed 0: anything else would replace what every
        # default run (and the recorded results) uses
        recipe = "--quick (smoke-test models)" if args.quick else f"--seed {args.seed}"
        raise UserError(
            f"{recipe} would replace the embedded models that raysmooth certify runs by default; give --out DIR, "
            "or --overwrite to replace them"
        )
    cards = train_all(cfg, out)
    print(
        json.dumps(
            {name: {k: v for k, v in card.items() if k.startswith("test")} for name, card in cards.items()}, indent=2
        )
    )
    print(f"models: {out}")
    return 0


# ---- convert-adm ---------------------------------------------------------------------------------
def cmd_convert_adm(args: argparse.Namespace) -> int:
    from .config import override_text
    from .models.adm import ADM_PRESETS, convert_adm_checkpoint

    out = convert_adm_checkpoint(args.src, args.dst, ADM_PRESETS[args.preset])
    print(f"diffusers folder: {out}")
    print(f"use it with: {override_text('model.denoiser.path', out)}")
    return 0


def _hydra_app(name: str):
    def run(args: argparse.Namespace) -> int:
        from . import apps

        return {"certify": apps.certify_main, "finetune": apps.finetune_main}[name](args.overrides)

    return run


def _sentence(text: str) -> str:
    """A subcommand's one-line help as the start of its --help description."""
    return text[0].upper() + text[1:]


# ---- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysmooth",
        description="Certify the L2 robustness of image classifiers with randomized smoothing and diffusion "
        "denoised smoothing. `raysmooth certify` with no arguments certifies the digits test split with the "
        "embedded models; `raysmooth COMMAND --help` says more.",
    )
    parser.add_argument("--version", action="version", version=f"raysmooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "certify", help="certify a test set on Ray (hydra app: key=value …, -m for grids, --help)", add_help=False
    )
    p.add_argument("overrides", nargs=argparse.REMAINDER)
    p.set_defaults(func=_hydra_app("certify"))

    p = sub.add_parser(
        "finetune", help="fine-tune a denoiser with Brier + anti-consistency losses (hydra app)", add_help=False
    )
    p.add_argument("overrides", nargs=argparse.REMAINDER)
    p.set_defaults(func=_hydra_app("finetune"))

    what = "train the embedded digits models (denoiser and classifiers)"
    p = sub.add_parser("train-toy", help=what, description=_sentence(what) + " on the CPU, from a seed.")
    p.add_argument("--out", help="folder for the models (default: the embedded ones in the package)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the training order (default 0)")
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_train_toy)

    what = "convert an OpenAI ADM .pt (improved-/guided-diffusion) to a diffusers folder"
    p = sub.add_parser("convert-adm", help=what, description=_sentence(what) + " (the .pt is read as weights only).")
    p.add_argument("src", metavar="IN.pt", help="the OpenAI checkpoint")
    p.add_argument("dst", metavar="OUT_DIR", help="the diffusers folder to write (model.denoiser.path)")
    p.add_argument(
        "--preset",
        choices=("cifar10", "imagenet256"),
        required=True,
        help="cifar10: cifar10_uncond_50M_500K.pt; imagenet256: 256x256_diffusion_uncond.pt",
    )
    p.set_defaults(func=cmd_convert_adm)

    what = "certified accuracy, ACR and abstention of runs or reference TSV files"
    p = sub.add_parser("analyze", help=what, description=_sentence(what) + ", as a table (and a plot).")
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="run directory, folder of runs, sweep directory or certify TSV"
    )
    p.add_argument("--radii", help="comma-separated radii (default 0,0.25,...,2)")
    p.add_argument(
        "--format",
        choices=("markdown", "csv"),
        default="markdown",
        help="a markdown table (default), or csv rows of source,radius,certified_accuracy",
    )
    p.add_argument("--plot", metavar="FILE.png", help="also draw certified accuracy against radius")
    p.set_defaults(func=cmd_analyze)

    defaults = SweepCfg()
    what = (
        "certificates for a grid of p0 and α (the cascade; each σ's CERTIFY at every α) from stored counts (no "
        "sampling); the same job as python jobs/sweep.py"
    )
    p = sub.add_parser("sweep", help=what, description=_sentence(what) + ".")
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="a certify run's directory (smoothing.mode=full: counts at every σ)"
    )
    p.add_argument("--p0", help=f"START:STOP:STEP, one value, or several comma-separated (default {defaults.p0})")
    p.add_argument("--alpha", help="failure probability, or several comma-separated (default: the run's)")
    p.add_argument("--policy", choices=("strict", "reference"), help=f"(default {defaults.policy})")
    p.add_argument("--radii", help="comma-separated radii for the summary table (default 0,0.25,…,2)")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    printable_streams()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("certify", "finetune"):  # the hydra apps get their arguments in the order given
        return _hydra_app(argv[0])(argparse.Namespace(overrides=argv[1:]))  # each says its own errors
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "sweep":  # key=value is the form of python jobs/sweep.py, which README names beside it
        overrides = [a for a in [args.run_dir, *extra] if "=" in a and not Path(a).exists()]
        if overrides:
            parser.error(
                f"raysmooth sweep takes RUN_DIR and flags (raysmooth sweep RUN_DIR --p0 0.6 --alpha 0.001), "
                f"not key=value overrides ({' '.join(overrides)}); those are for python jobs/sweep.py"
            )
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (RaySmoothError, OSError, KeyboardInterrupt) as exc:
        from .apps import _failed  # one mapping from what stopped a command to its line and exit status

        return _failed(args.command, exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
