"""Certified accuracy, ACR and abstention from certificates: tables and plots.

Reads our run directories and sweep directories, and the TSV files of the reference codebases
(``idx label predict radius correct …``), so published runs and ours compare in one table.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from .errors import RaySmoothError
from .store import CERTIFICATES_SCHEMA, RunStore, read_table

__all__ = [
    "AnalysisError",
    "Curve",
    "load_curves",
    "curves_from_certificates",
    "certified_accuracy",
    "summarise",
    "format_markdown",
    "format_csv",
    "plot_curves",
    "DEFAULT_RADII",
]

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
TSV_COLUMNS = ("idx", "label", "predict", "radius", "correct")


class AnalysisError(RaySmoothError, ValueError):
    """Input that cannot be analysed (missing, malformed, empty)."""


@dataclass(frozen=True)
class Curve:
    """One certified classifier on one test set: the rows of one method and parameter setting."""

    source: str
    radius: np.ndarray  # [0,1] pixel units, 0 when abstaining
    correct: np.ndarray  # bool: certified class equals the label
    abstained: np.ndarray  # bool

    def certified_accuracy(self, radii: Sequence[float]) -> np.ndarray:
        return certified_accuracy(self.radius, self.correct, radii)

    @property
    def acr(self) -> float:
        """Average certified radius: mean of radius over correct predictions (others count 0)."""
        return float(np.mean(np.where(self.correct, self.radius, 0.0))) if len(self.radius) else float("nan")

    @property
    def abstention_rate(self) -> float:
        return float(np.mean(self.abstained)) if len(self.abstained) else float("nan")


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, radii: Sequence[float]) -> np.ndarray:
    """Fraction of images that are correct with radius ≥ r, for every r (abstentions count as wrong)."""
    radius = np.asarray(radius, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    r = np.asarray(radii, dtype=np.float64)
    if len(radius) == 0:
        return np.full(len(r), np.nan)
    return ((radius[None, :] >= r[:, None]) & correct[None, :]).mean(axis=1)


# ---- loading -------------------------------------------------------------------------------------
def _label(method: str, sigma: float, policy: str, p0: float, alpha: float, with_alpha: bool, model: str | None) -> str:
    if method == "cascade":
        text = f"cascade {policy} p0={p0:g}"
    else:
        text = f"{method} σ={sigma:g}"
    if with_alpha:
        text += f" α={alpha:g}"
    return f"{model} {text}" if model else text


def curves_from_certificates(table: pa.Table, prefix: str = "") -> list[Curve]:
    """Split a certificates table into one curve per (model, method, σ, policy, p0, α)."""
    if table.num_rows == 0:
        return []
    cols = {k: np.asarray(table.column(k).to_pylist(), dtype=object) if k in ("model_id", "method", "policy")
            else table.column(k).to_numpy(zero_copy_only=False)
            for k in ("model_id", "method", "sigma", "policy", "p0", "alpha")}
    # NaN never equals itself; compare parameter columns through a NaN-free encoding.
    enc = {k: np.unique(np.nan_to_num(v, nan=-1.0) if v.dtype.kind == "f" else v.astype(str), return_inverse=True)[1]
           for k, v in cols.items()}
    keys = np.stack([enc[k] for k in ("model_id", "method", "sigma", "policy", "p0", "alpha")], axis=1)
    _, first, group = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    group = group.reshape(-1)
    radius = table.column("radius").to_numpy()
    correct = table.column("correct").to_numpy(zero_copy_only=False).astype(bool)
    abstained = table.column("prediction").to_numpy() < 0
    several_models = len(np.unique(cols["model_id"])) > 1
    several_alphas = len(np.unique(cols["alpha"])) > 1
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(len(first) + 1))
    method_rank = {"certify": 0, "cascade": 1, "predict": 2}

    def sort_key(g: int):
        row = first[g]
        return (str(cols["model_id"][row]), method_rank.get(cols["method"][row], 3), np.nan_to_num(cols["sigma"][row]),
                str(cols["policy"][row]), np.nan_to_num(cols["p0"][row]), cols["alpha"][row])

    curves = []
    for g in sorted(range(len(first)), key=sort_key):
        row = first[g]
        idx = order[bounds[g] : bounds[g + 1]]
        label = _label(cols["method"][row], cols["sigma"][row], cols["policy"][row], cols["p0"][row], cols["alpha"][row],
                       several_alphas, cols["model_id"][row] if several_models else None)
        curves.append(Curve(prefix + label, radius[idx], correct[idx], abstained[idx]))
    return curves


def _read_tsv(path: Path) -> Curve:
    try:
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t"))
    except pa.ArrowInvalid as exc:
        raise AnalysisError(f"{path}: not a readable TSV file ({str(exc).splitlines()[0]})") from exc
    missing = [c for c in TSV_COLUMNS if c not in table.column_names]
    if missing:
        raise AnalysisError(
            f"{path}: missing column(s) {', '.join(missing)}; expected a header with {' '.join(TSV_COLUMNS)} "
            "(the certify output of locuslab/smoothing and its descendants)"
        )
    if table.num_rows == 0:
        raise AnalysisError(f"{path}: the table has no rows")
    try:
        predict = np.asarray(table.column("predict").to_numpy(zero_copy_only=False), dtype=np.int64)
        radius = np.asarray(table.column("radius").to_numpy(zero_copy_only=False), dtype=np.float64)
        correct = np.asarray(table.column("correct").to_numpy(zero_copy_only=False), dtype=np.int64)
        label = np.asarray(table.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
    except (ValueError, TypeError, pa.ArrowInvalid) as exc:
        raise AnalysisError(f"{path}: non-numeric values in predict, radius, correct or label ({exc})") from exc
    if np.any(~np.isfinite(radius)) or np.any(radius < 0):
        raise AnalysisError(f"{path}: column 'radius' holds negative or non-finite values")
    if np.any((correct != 0) & (correct != 1)):
        running = bool(np.all(np.diff(correct) >= 0))
        what = "a running total of correct predictions" if running else "values other than 0 and 1"
        raise AnalysisError(
            f"{path}: column 'correct' holds {what} (max {correct.max()}), as "
            "ethz-spylab/diffusion_denoised_smoothing's certify writes; per-image correctness is "
            "predict == label: rewrite the column that way and run again"
        )
    if np.any(correct.astype(bool) != (predict == label)):
        bad = int(np.sum(correct.astype(bool) != (predict == label)))
        raise AnalysisError(f"{path}: column 'correct' disagrees with predict == label on {bad} rows")
    return Curve(path.stem, radius, correct.astype(bool) & (predict >= 0), predict < 0)


def load_curves(path: Path | str, prefix: str = "") -> list[Curve]:
    """Curves from a run directory, a sweep directory or a reference-format TSV file."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path}: no such file or directory")
    if path.is_file():
        curve = _read_tsv(path)
        return [Curve(prefix + curve.source, curve.radius, curve.correct, curve.abstained)]
    if (path / RunStore.MANIFEST).is_file():
        table = RunStore.open(path).read_certificates()
        where = f"{path}/certificates"
    elif not any(path.glob("part-*.parquet")) and any((d / RunStore.MANIFEST).is_file() for d in path.iterdir() if d.is_dir()):
        # A folder of runs, as `raysmooth certify` writes one per model: every run, prefixed by its name.
        runs = sorted(d for d in path.iterdir() if (d / RunStore.MANIFEST).is_file())
        return [c for d in runs for c in load_curves(d, f"{prefix}{d.name}: ")]
    else:
        table = read_table(path, CERTIFICATES_SCHEMA)
        where = str(path)
    if table.num_rows == 0:
        raise AnalysisError(f"{where}: no certificates found (is this a raysmooth run or sweep directory?)")
    return curves_from_certificates(table, prefix)


# ---- reporting -----------------------------------------------------------------------------------
def summarise(curves: Sequence[Curve], radii: Sequence[float]) -> list[dict]:
    rows = []
    for c in curves:
        rows.append({
            "source": c.source,
            "images": len(c.radius),
            "certified_accuracy": c.certified_accuracy(radii),
            "acr": c.acr,
            "abstention": c.abstention_rate,
        })
    return rows


def format_markdown(curves: Sequence[Curve], radii: Sequence[float]) -> str:
    head = ["source", "images"] + [f"r={r:g}" for r in radii] + ["ACR", "abstain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in summarise(curves, radii):
        cells = [row["source"], str(row["images"])] + [f"{100 * a:.1f}" for a in row["certified_accuracy"]]
        cells += [f"{row['acr']:.3f}", f"{100 * row['abstention']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(curves: Sequence[Curve], radii: Sequence[float]) -> str:
    out = io.StringIO()
    out.write("source,radius,certified_accuracy\n")
    for row in summarise(curves, radii):
        source = row["source"]
        if any(ch in source for ch in ',"\n'):
            source = '"' + source.replace('"', '""') + '"'
        for r, a in zip(radii, row["certified_accuracy"]):
            out.write(f"{source},{r:g},{a:.6f}\n")
    return out.getvalue()


def plot_curves(curves: Sequence[Curve], path: Path | str, title: str = "") -> Path:
    """Certified accuracy against radius as PNG: one panel per model (the part of a source before
    ': '), single-σ curves solid, strict cascades dashed, reference cascades dotted."""
    import matplotlib

    matplotlib.use("Agg")  # headless; never TkAgg
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.parent and not path.parent.exists():
        raise AnalysisError(f"{path}: the folder {path.parent} does not exist")
    panels: dict[str, list[Curve]] = {}
    for c in curves:
        group, _, label = c.source.rpartition(": ")
        panels.setdefault(group, []).append(Curve(label, c.radius, c.correct, c.abstained))
    top = max((float(np.max(c.radius)) for c in curves if len(c.radius)), default=1.0)
    grid = np.linspace(0.0, max(top * 1.05, 0.1), 400)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110, squeeze=False, sharey=True)
    for ax, (group, members) in zip(axes[0], panels.items()):
        colors = plt.get_cmap("tab10")
        for i, c in enumerate(members):
            style = ":" if "reference" in c.source else "--" if c.source.startswith("cascade") else "-"
            ax.plot(grid, c.certified_accuracy(grid), style, color=colors(i % 10), label=c.source, linewidth=1.6)
        ax.set_xlabel("L2 radius (pixels in [0, 1])")
        ax.set_title(group or title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("certified accuracy")
    if title and len(panels) > 1:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f"_{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
