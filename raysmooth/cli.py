"""The ``raysmooth`` command line.

User mistakes end in one line on stderr and exit status 2; a traceback means a bug in raysmooth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .errors import RaySmoothError

__all__ = ["main", "UserError", "parse_range", "parse_floats"]


class UserError(RaySmoothError, ValueError):
    """A mistake in what the user asked for on the command line; printed as one line."""


def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(np.isfinite(values)):
        raise UserError(f"{what} must be finite numbers, got {text!r}")
    return values


def parse_range(text: str, what: str) -> np.ndarray:
    """``START:STOP:STEP`` (STOP included when the grid lands on it) or a single value."""
    parts = text.split(":")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"{what} must be START:STOP:STEP or a number, got {text!r}") from None
    if len(nums) == 1:
        return np.asarray(nums)
    if len(nums) != 3:
        raise UserError(f"{what} must be START:STOP:STEP or a number, got {text!r}")
    start, stop, step = nums
    if step <= 0 or stop < start:
        raise UserError(f"{what}: need STEP > 0 and STOP >= START, got {text!r}")
    count = int(np.floor((stop - start) / step + 1e-9)) + 1
    return np.round(start + step * np.arange(count), 12)


def _radii(text: str | None) -> list[float]:
    from .analysis import DEFAULT_RADII

    if text is None:
        return list(DEFAULT_RADII)
    radii = parse_floats(text, "--radii")
    if any(r < 0 for r in radii):
        raise UserError("--radii must be non-negative")
    return radii


# ---- analyze -------------------------------------------------------------------------------------
def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import format_csv, format_markdown, load_curves, plot_curves

    radii = _radii(args.radii)
    curves = []
    for path in args.paths:
        prefix = f"{Path(path).name}: " if len(args.paths) > 1 else ""
        curves += load_curves(path, prefix)
    print(format_csv(curves, radii) if args.format == "csv" else format_markdown(curves, radii), end="\n" if args.format == "markdown" else "")
    if args.plot:
        plot_curves(curves, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


# ---- sweep ---------------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from .analysis import curves_from_certificates, format_markdown
    from .runner import run_sweep

    p0 = parse_range(args.p0, "--p0")
    alphas = parse_floats(args.alpha, "--alpha") if args.alpha else None
    radii = _radii(args.radii)
    result = run_sweep(args.run_dir, p0, alphas, args.policy)
    print(format_markdown(curves_from_certificates(result.table), radii))
    print(f"\n{result.settings} settings × {result.images} images from stored counts in {result.seconds:.2f} s", file=sys.stderr)
    print(f"sweep certificates: {result.out_dir}", file=sys.stderr)
    return 0


# ---- train-toy -----------------------------------------------------------------------------------
def cmd_train_toy(args: argparse.Namespace) -> int:
    import logging

    from .toy import EMBEDDED_DIR, ToyConfig, train_all

    logging.basicConfig(level=logging.INFO, format="%(asctime)s raysmooth %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out) if args.out else EMBEDDED_DIR
    cfg = ToyConfig(seed=args.seed)
    if args.quick:  # a smoke run: minutes become seconds, the models are poor
        cfg = ToyConfig(seed=args.seed, denoiser_steps=200, classifier_epochs=3, onestep_epochs=3)
    if out.exists() and any(out.iterdir()) and not args.overwrite and out != EMBEDDED_DIR:
        raise UserError(f"{out} is not empty; choose another --out or pass --overwrite")
    cards = train_all(cfg, out)
    print(json.dumps({name: {k: v for k, v in card.items() if k.startswith("test")} for name, card in cards.items()}, indent=2))
    print(f"models: {out}")
    return 0


# ---- convert-adm ---------------------------------------------------------------------------------
def cmd_convert_adm(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .models.adm import ADM_PRESETS, convert_adm_checkpoint

    cfg = ADM_PRESETS[args.preset]
    if args.image_size:
        cfg = replace(cfg, image_size=args.image_size)
    out = convert_adm_checkpoint(args.src, args.dst, cfg)
    print(f"diffusers folder: {out}")
    print(f"use it with: model.denoiser.path={out}")
    return 0


# ---- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysmooth", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"raysmooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("certify", help="certify a test set on Ray (hydra overrides: key=value …)", add_help=False)
    p.add_argument("overrides", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("raysmooth.jobs", fromlist=["certify_main"]).certify_main(a.overrides))

    p = sub.add_parser("finetune", help="fine-tune a denoiser with Brier + anti-consistency losses (hydra overrides)", add_help=False)
    p.add_argument("overrides", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("raysmooth.jobs", fromlist=["finetune_main"]).finetune_main(a.overrides))

    p = sub.add_parser("train-toy", help="train the embedded digits models (denoiser and classifiers)")
    p.add_argument("--out", help="folder for the models (default: the embedded ones in the package)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_train_toy)

    p = sub.add_parser("convert-adm", help="convert an OpenAI ADM .pt (improved-/guided-diffusion) to a diffusers folder")
    p.add_argument("src", metavar="IN.pt")
    p.add_argument("dst", metavar="OUT_DIR")
    p.add_argument("--preset", choices=("cifar10", "imagenet256"), required=True,
                   help="cifar10: cifar10_uncond_50M_500K.pt; imagenet256: 256x256_diffusion_uncond.pt")
    p.add_argument("--image-size", type=int, help="override the preset's image size (ADM is fully convolutional)")
    p.set_defaults(func=cmd_convert_adm)

    p = sub.add_parser("analyze", help="certified accuracy, ACR and abstention of runs or reference TSV files")
    p.add_argument("paths", nargs="+", metavar="PATH", help="run directory, sweep directory or certify TSV")
    p.add_argument("--radii", help="comma-separated radii (default 0,0.25,...,2)")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    p.add_argument("--plot", metavar="FILE.png", help="also draw certified accuracy against radius")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("sweep", help="cascade certificates for a grid of p0 from stored counts (no sampling)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--p0", required=True, help="START:STOP:STEP, e.g. 0.5:0.95:0.05")
    p.add_argument("--alpha", help="failure probability, or several comma-separated (default: the run's)")
    p.add_argument("--policy", choices=("strict", "reference"), default="strict")
    p.add_argument("--radii", help="comma-separated radii for the summary table")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command not in ("certify", "finetune"):  # only the hydra jobs take free-form overrides
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return int(args.func(args) or 0)
    except (RaySmoothError, FileNotFoundError, PermissionError) as exc:
        print(f"raysmooth {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raysmooth {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
