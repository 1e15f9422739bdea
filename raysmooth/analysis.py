"""Certified accuracy, ACR and abstention from certificates: tables and plots.

Reads our run directories and sweep directories, and the TSV files of the reference codebases
(``idx label predict radius correct …``), so published runs and ours compare in one table.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from .config import DEFAULT_RADII
from .errors import InputError, RaySmoothError
from .store import CERTIFICATES_SCHEMA, RunStore, read_table

log = logging.getLogger("raysmooth")

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
    n_used: np.ndarray | None = None  # samples drawn per image (None: not recorded)

    @property
    def sequential(self) -> bool:
        return self.source.split(": ")[-1].startswith("sequential")

    def certified_accuracy(self, radii: Sequence[float]) -> np.ndarray:
        return certified_accuracy(self.radius, self.correct, radii)

    @property
    def acr(self) -> float:
        """Average certified radius: mean of radius over correct predictions (others count 0)."""
        return float(np.mean(np.where(self.correct, self.radius, 0.0))) if len(self.radius) else float("nan")

    @property
    def abstention_rate(self) -> float:
        return float(np.mean(self.abstained)) if len(self.abstained) else float("nan")


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, radii: Sequence[float] | float) -> np.ndarray:
    """Fraction of images that are correct with radius ≥ r, for every r (abstentions count as wrong).
    The inputs are checked: one radius and one True/False per image (predictions passed for ``correct``
    would read as True wherever nonzero), finite, and numbers rather than text."""
    radius, correct = _numbers("radius", radius), np.asarray(correct)
    if radius.ndim != 1 or correct.shape != radius.shape:
        raise InputError(f"radius and correct need one value per image, got shapes {radius.shape} and {correct.shape}")
    if correct.dtype != bool and not np.isin(correct, (0, 1)).all():
        raise InputError("correct must be True or False per image (prediction == label), got other values")
    correct = correct.astype(bool)
    if np.isnan(radius).any():
        raise InputError(f"radius holds NaN for {int(np.isnan(radius).sum())} image(s)")
    r = np.atleast_1d(_numbers("radii", radii))
    if r.ndim != 1 or not np.isfinite(r).all() or (r < 0).any():  # as analyze --radii: no radius is negative
        raise InputError(f"radii must be finite non-negative numbers, got {radii!r}")
    if len(radius) == 0:
        return np.full(len(r), np.nan)
    return ((radius[None, :] >= r[:, None]) & correct[None, :]).mean(axis=1)


def _numbers(name: str, values: object) -> np.ndarray:
    """``values`` as float64, refusing text and bools, which numpy would read as numbers or fail on deep inside."""
    array = np.asarray(values)
    if array.dtype.kind not in "iuf":
        raise InputError(f"{name} must be numbers, got {values!r}" if array.size < 8 else f"{name} must be numbers")
    return array.astype(np.float64)


# ---- loading -------------------------------------------------------------------------------------
def _label(method: str, sigma: float, policy: str, p0: float, alpha: float, with_alpha: bool, model: str | None) -> str:
    if method == "cascade":
        text = f"cascade {policy} p0={p0:g}"
    else:
        text = f"{method} σ={sigma:g}"
    if with_alpha:
        text += f" α={alpha:g}"
    return f"{model} {text}" if model else text


def curves_from_certificates(table: pa.Table, prefix: str = "", with_alpha: bool = False) -> list[Curve]:
    """Split a certificates table into one curve per (model, method, σ, policy, p0, α); labels name α
    when the table holds several, or ``with_alpha`` (a sweep's, whose α is what it was run for)."""
    if table.num_rows == 0:
        return []
    cols = {
        k: np.asarray(table.column(k).to_pylist(), dtype=object)
        if k in ("model_id", "method", "policy")
        else table.column(k).to_numpy(zero_copy_only=False)
        for k in ("model_id", "method", "sigma", "policy", "p0", "alpha")
    }
    # NaN never equals itself; compare parameter columns through a NaN-free encoding.
    enc = {
        k: np.unique(np.nan_to_num(v, nan=-1.0) if v.dtype.kind == "f" else v.astype(str), return_inverse=True)[1]
        for k, v in cols.items()
    }
    keys = np.stack([enc[k] for k in ("model_id", "method", "sigma", "policy", "p0", "alpha")], axis=1)
    _, first, group = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    group = group.reshape(-1)
    radius = table.column("radius").to_numpy()
    correct = table.column("correct").to_numpy(zero_copy_only=False).astype(bool)
    abstained = table.column("prediction").to_numpy() < 0
    several_models = len(np.unique(cols["model_id"])) > 1
    several_alphas = with_alpha or len(np.unique(cols["alpha"])) > 1
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(len(first) + 1))
    # certify and sequential rows of one σ side by side (an audit run computes both on the same noise)
    family = {"certify": 0, "sequential": 0, "cascade": 1, "predict": 2}
    within = {"certify": 0, "sequential": 1}
    n_used = table.column("n_used").to_numpy(zero_copy_only=False) if "n_used" in table.column_names else None

    def sort_key(g: int):
        row = first[g]
        return (
            str(cols["model_id"][row]),
            family.get(cols["method"][row], 3),
            np.nan_to_num(cols["sigma"][row]),
            within.get(cols["method"][row], 0),
            str(cols["policy"][row]),
            np.nan_to_num(cols["p0"][row]),
            cols["alpha"][row],
        )

    curves = []
    for g in sorted(range(len(first)), key=sort_key):
        row = first[g]
        idx = order[bounds[g] : bounds[g + 1]]
        label = _label(
            cols["method"][row],
            cols["sigma"][row],
            cols["policy"][row],
            cols["p0"][row],
            cols["alpha"][row],
            several_alphas,
            cols["model_id"][row] if several_models else None,
        )
        used = None
        if n_used is not None:
            values = np.asarray(n_used[idx], dtype=np.float64)  # nulls (older tables) read as NaN
            used = values if np.all(np.isfinite(values)) else None
        curves.append(Curve(prefix + label, radius[idx], correct[idx], abstained[idx], used))
    return curves


def _numeric_column(table: pa.Table, name: str, path: Path, integer: bool) -> np.ndarray:
    """One column as float64 (or int64), refusing empty cells, text, NaN/inf and fractional integers."""
    col = table.column(name)
    if col.null_count:
        rows = np.flatnonzero(np.asarray(col.is_null().to_numpy(zero_copy_only=False)))[:3] + 2  # +header, 1-based
        raise AnalysisError(
            f"{path}: column {name!r} has {col.null_count} empty cell(s) (line(s) {', '.join(map(str, rows))})"
        )
    try:
        values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    except (ValueError, TypeError, pa.ArrowInvalid):
        sample = next((v for v in col.to_pylist() if not _is_number(v)), None)
        raise AnalysisError(f"{path}: column {name!r} holds non-numeric values (e.g. {sample!r})") from None
    bad = ~np.isfinite(values)
    if bad.any():
        raise AnalysisError(
            f"{path}: column {name!r} holds NaN or infinite values (line {int(np.flatnonzero(bad)[0]) + 2})"
        )
    if integer:
        frac = values != np.round(values)
        if frac.any():
            raise AnalysisError(f"{path}: column {name!r} must hold integers, got {values[frac][0]:g}")
        return values.astype(np.int64)
    return values


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _check_text(path: Path) -> None:
    """A TSV is UTF-8 text: binary, compressed or UTF-16 files are refused before parsing."""
    with open(path, "rb") as fh:
        head = fh.read(65536)
    try:
        head.decode("utf-8") if len(head) < 65536 else head[:-4].decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise AnalysisError(f"{path}: not a text TSV file (binary, compressed or not UTF-8)") from None
    if b"\x00" in head:
        raise AnalysisError(f"{path}: not a text TSV file (it holds NUL bytes)")


def _check_unique_ids(idx: np.ndarray, path: Path) -> None:
    """One row per image: a repeated idx (overlapping shards concatenated, a run appended twice) would
    count that image twice in every figure."""
    values, counts = np.unique(idx, return_counts=True)
    if np.all(counts == 1):
        return
    k = int(np.flatnonzero(counts > 1)[0])
    lines = np.flatnonzero(idx == values[k])[:2] + 2  # +header, 1-based
    raise AnalysisError(
        f"{path}: idx {values[k]} appears {counts[k]} times (lines {lines[0]} and {lines[1]}), and "
        f"{int(np.sum(counts - 1))} row(s) in all repeat an idx; a certify TSV holds one row per image "
        "(overlapping shards concatenated?)"
    )


def _read_tsv(path: Path) -> Curve:
    _check_text(path)
    try:
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t"))
        names = list(table.column_names)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise AnalysisError(f"{path}: not a readable TSV file ({str(exc).splitlines()[0][:160]})") from None
    missing = [c for c in TSV_COLUMNS if c not in names]
    if missing:
        spaced = len(names) == 1 and all(c in names[0].split() for c in TSV_COLUMNS)
        headless = all(_is_number(n) for n in names)
        hint = (
            "; this header has them separated by spaces: the columns must be separated by tabs"
            if spaced
            else "; its first line is numbers, so the file has no header: add one naming its columns, tab-separated"
            if headless
            else ""
        )
        raise AnalysisError(
            f"{path}: missing column(s) {', '.join(missing)}; expected a header with {' '.join(TSV_COLUMNS)} "
            f"(the certify output of locuslab/smoothing and its descendants){hint}"
        )
    if table.num_rows == 0:
        raise AnalysisError(f"{path}: the table has no rows")
    idx = _numeric_column(table, "idx", path, integer=True)
    _check_unique_ids(idx, path)
    predict = _numeric_column(table, "predict", path, integer=True)
    radius = _numeric_column(table, "radius", path, integer=False)
    correct = _numeric_column(table, "correct", path, integer=True)
    label = _numeric_column(table, "label", path, integer=True)
    if np.any(radius < 0):
        raise AnalysisError(f"{path}: column 'radius' holds negative values")
    if np.any(label < 0):
        raise AnalysisError(f"{path}: column 'label' holds negative values")
    if np.any(predict < -1):
        raise AnalysisError(f"{path}: column 'predict' holds values below -1 (-1 means abstain)")
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
        raise AnalysisError(f"{path}: no such file or directory{RunStore.missing_hint(path)}")
    if path.is_file() and path.suffix == ".parquet":  # one part of a table: a run's rows span many
        run = path.parent.parent
        inside = (
            f"a part of the {path.parent.name} table of the run {run}" if (run / RunStore.MANIFEST).is_file() else ""
        )
        raise AnalysisError(
            f"{path} is {inside or 'a Parquet file'}; analyze takes a run directory, a sweep directory or a certify "
            f"TSV{f' (here: raysmooth analyze {run})' if inside else ''}"
        )
    if path.is_file() and path.name == RunStore.MANIFEST:
        raise AnalysisError(f"{path} is the manifest of the run {path.parent}; analyze the run itself")
    if path.is_file():
        curve = _read_tsv(path)
        return [Curve(prefix + curve.source, curve.radius, curve.correct, curve.abstained)]
    if (path / RunStore.MANIFEST).is_file():
        table = RunStore.open(path).read_certificates()
        where = f"{path}/certificates"
    elif not any(path.glob("part-*.parquet")) and (runs := RunStore.runs_below(path)):
        # A folder of runs, as `raysmooth certify` writes one per model (and `certify -m` one such folder
        # per value): every run, prefixed by its path below the folder.
        return [c for d in runs for c in load_curves(d, f"{prefix}{d.relative_to(path).as_posix()}: ")]
    elif not any(path.glob("part-*.parquet")) and any((d / "sweep.json").is_file() for d in path.iterdir()):
        # a run's sweeps/ folder: every sweep, prefixed by its folder's name
        sweeps = sorted(d for d in path.iterdir() if (d / "sweep.json").is_file())
        return [c for d in sweeps for c in load_curves(d, f"{prefix}{d.name}: ")]
    elif (path.parent / RunStore.MANIFEST).is_file() and path.name == "sweeps":
        raise AnalysisError(
            f"{path} holds no finished sweep of the run {path.parent} yet; `raysmooth sweep {path.parent}` "
            "writes one (its certificates are analysed here, the run's own with the run)"
        )
    elif (path.parent / RunStore.MANIFEST).is_file() and path.name != "certificates":
        # the counts (or another table) inside a run: its parts are not certificates, and not damaged
        raise AnalysisError(f"{path} is the {path.name} table of the run {path.parent}; analyze the run itself")
    else:
        table = read_table(path, CERTIFICATES_SCHEMA)
        where = str(path)
    if table.num_rows == 0:
        raise AnalysisError(f"{where}: no certificates found (is this a raysmooth run or sweep directory?)")
    return curves_from_certificates(table, prefix, with_alpha=(path / "sweep.json").is_file())


# ---- reporting -----------------------------------------------------------------------------------
def summarise(curves: Sequence[Curve], radii: Sequence[float]) -> list[dict]:
    rows = []
    for c in curves:
        rows.append(
            {
                "source": c.source,
                "images": len(c.radius),
                "certified_accuracy": c.certified_accuracy(radii),
                "acr": c.acr,
                "abstention": c.abstention_rate,
                "mean_n": float(np.mean(c.n_used)) if c.n_used is not None and len(c.n_used) else None,
                "median_n": float(np.median(c.n_used)) if c.n_used is not None and len(c.n_used) else None,
            }
        )
    return rows


SEQUENTIAL_NOTE = (
    "Sequential rows stop sampling once the decision grid is settled: their certified accuracy is comparable "
    "with fixed n at the grid radii, their ACR is not (radii between grid points are conservative)."
)


def _columns(radii: Sequence[float]) -> list[float]:
    """The radii a table reports, in order, each once (however the caller listed them)."""
    return sorted(set(radii))


def format_markdown(curves: Sequence[Curve], radii: Sequence[float]) -> str:
    """The table; with sequential rows, samples per image beside it and one line on how to read it."""
    radii = _columns(radii)
    samples = any(c.sequential for c in curves)
    head = ["source", "images"] + [f"r={r:g}" for r in radii] + ["ACR", "abstain"]
    head += ["mean n", "median n"] if samples else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in summarise(curves, radii):
        cells = [row["source"], str(row["images"])] + [f"{100 * a:.1f}" for a in row["certified_accuracy"]]
        cells += [f"{row['acr']:.3f}", f"{100 * row['abstention']:.1f}%"]
        if samples:
            cells += ["–" if row["mean_n"] is None else f"{row[k]:,.0f}" for k in ("mean_n", "median_n")]
        lines.append("| " + " | ".join(cells) + " |")
    if samples:
        lines += ["", SEQUENTIAL_NOTE]
    return "\n".join(lines)


def format_csv(curves: Sequence[Curve], radii: Sequence[float]) -> str:
    radii = _columns(radii)
    out = io.StringIO()
    out.write("source,radius,certified_accuracy\n")
    for row in summarise(curves, radii):
        source = row["source"]
        if any(ch in source for ch in ',"\n'):
            source = '"' + source.replace('"', '""') + '"'
        for r, a in zip(radii, row["certified_accuracy"]):
            out.write(f"{source},{r:g},{a:.6f}\n")
    return out.getvalue()


def check_plot_path(path: Path | str) -> Path:
    """Where a plot can go: a *.png file name in a folder that exists and can be written."""
    path = Path(path)
    if path.is_dir():
        raise AnalysisError(
            f"{path}: is a folder; give a file name for the plot, e.g. {path / 'certified_accuracy.png'}"
        )
    if path.parent and not path.parent.is_dir():
        raise AnalysisError(f"{path}: the folder {path.parent} does not exist")
    if path.suffix.lower() != ".png":
        raise AnalysisError(f"{path}: the plot is a PNG file; name it *.png")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise AnalysisError(f"{path}: cannot write there (permission denied)")
    return path


LEGEND_MAX = 20  # curves per panel that a legend can name legibly


def plot_curves(curves: Sequence[Curve], path: Path | str, title: str = "") -> Path:
    """Certified accuracy against radius as PNG: one panel per model (the part of a source before
    ': '), single-σ curves solid, strict cascades dashed, reference cascades dotted."""
    import matplotlib

    matplotlib.use("Agg")  # headless; never TkAgg
    import matplotlib.pyplot as plt

    path = check_plot_path(path)
    panels: dict[str, list[Curve]] = {}
    for c in curves:
        group, _, label = c.source.rpartition(": ")
        panels.setdefault(group, []).append(Curve(label, c.radius, c.correct, c.abstained))
    top = max((float(np.max(c.radius)) for c in curves if len(c.radius)), default=1.0)
    grid = np.linspace(0.0, max(top * 1.05, 0.1), 400)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110, squeeze=False, sharey=True)
    for ax, (group, members) in zip(axes[0], panels.items()):
        colors = plt.get_cmap("tab10")
        crowded = len(members) > LEGEND_MAX
        for i, c in enumerate(members):
            style = ":" if "reference" in c.source else "--" if c.source.startswith("cascade") else "-"
            width, alpha = (0.6, 0.4) if crowded else (1.6, 1.0)
            ax.plot(
                grid, c.certified_accuracy(grid), style, color=colors(i % 10), label=c.source, lw=width, alpha=alpha
            )
        ax.set_xlabel("L2 radius (pixels in [0, 1])")
        ax.set_title(group or title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if crowded:  # a legend of thousands of lines (a sweep's settings) overflowed the figure for minutes
            note = f"{len(members):,} curves: no legend past {LEGEND_MAX} (--format csv has every one)"
            ax.text(0.98, 0.98, note, transform=ax.transAxes, ha="right", va="top", fontsize=7)
            log.warning("plot: %s%s", f"{group}: " if group else "", note)
        else:
            ax.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("certified accuracy")
    if title and len(panels) > 1:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f"_{path.name}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AnalysisError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return path
