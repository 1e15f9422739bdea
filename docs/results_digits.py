"""Write docs/results-digits.md from real runs of the committed models (nothing typed by hand).

    python docs/results_digits.py [--workdir runs/docs]

Runs the default job and a second one at n=2000, copies their plots next to this file, and states
the multi-scale comparison with the numbers those runs produced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raysmooth.analysis import load_curves  # noqa: E402

RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def run(cmd: list[str]) -> tuple[str, float]:
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - start


def table_of(stdout: str) -> str:
    return "\n".join(ln for ln in stdout.splitlines() if ln.startswith("|"))


def mean_image_norm() -> float:
    """Mean L2 norm of the test split's images (to set beside the noise's, about 8 at σ=1)."""
    from raysmooth.data import load_dataset

    x = load_dataset("digits").images.reshape(359, -1)
    return float(np.linalg.norm(x, axis=1).mean())


def wrong_and_abstain(out: Path, source: str) -> tuple[float, float]:
    """Share of images certified with a wrong class, and share abstained, for one curve."""
    c = {c.source: c for c in load_curves(out)}[source]
    return float(np.mean(~c.correct & ~c.abstained)), float(np.mean(c.abstained))


def against_best_single(out: Path, model: str, radii: list[float]) -> str:
    """The strict cascade's certified accuracy beside the best single σ's, radius by radius."""
    curves = {c.source: c for c in load_curves(out)}
    casc = curves[f"{model}: cascade strict p0=0.5"].certified_accuracy(radii)
    singles = {s: curves[f"{model}: certify σ={s}"].certified_accuracy(radii) for s in ("0.25", "0.5", "1")}
    parts = []
    for i, r in enumerate(radii):
        best = max(singles, key=lambda s: singles[s][i])
        parts.append(f"{100 * casc[i]:.1f}% at r={r:g} against {100 * singles[best][i]:.1f}% (σ={best})")
    return "; ".join(parts)


def finding(out: Path) -> list[str]:
    """The multi-scale paper's claim, checked on one run: cascade clean accuracy near the smallest σ's,
    certificates at radii that only the largest σ reaches."""
    curves = {c.source: c for c in load_curves(out)}
    lines = []
    for model in ("dds", "dds_ft", "diffsmooth", "onestep"):
        small = curves.get(f"{model}: certify σ=0.25")
        large = curves.get(f"{model}: certify σ=1")
        mid = curves.get(f"{model}: certify σ=0.5")
        if not (small and large and mid):
            continue
        # Radii beyond what σ=0.5 certifies for any image can only come from σ=1.
        reach = float(np.max(mid.radius)) if len(mid.radius) else 0.0
        r_far = float(np.ceil((reach + 1e-9) * 4) / 4)
        casc = curves.get(f"{model}: cascade strict p0=0.5")
        if casc is None:
            continue
        lines.append(
            f"- **{model}, strict cascade p0=0.5**: clean accuracy {100 * casc.certified_accuracy([0])[0]:.1f}% "
            f"(σ=0.25 alone: {100 * small.certified_accuracy([0])[0]:.1f}%, σ=1.0 alone: "
            f"{100 * large.certified_accuracy([0])[0]:.1f}%); certified accuracy at r={r_far:g}, a radius σ=0.5 "
            f"never reaches here: {100 * casc.certified_accuracy([r_far])[0]:.1f}% (σ=1.0 alone: "
            f"{100 * large.certified_accuracy([r_far])[0]:.1f}%); ACR {casc.acr:.3f} (σ=0.25: {small.acr:.3f}, "
            f"σ=1.0: {large.acr:.3f})."
        )
    return lines


def audit_summary(out: Path, grid: list[float]) -> list[str]:
    """Sequential against fixed n = N_max on the same noise: samples and certified accuracy at the grid."""
    lines = [
        "| model | σ | mean n, fixed | mean n, sequential | × fewer | largest change in certified accuracy "
        "at a grid radius |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for run_dir in sorted(d for d in out.iterdir() if (d / "manifest.json").is_file()):
        curves = {c.source: c for c in load_curves(run_dir)}
        for sigma in ("0.25", "0.5", "1"):
            fixed, seq = curves.get(f"certify σ={sigma}"), curves.get(f"sequential σ={sigma}")
            if fixed is None or seq is None:
                continue
            diff = 100 * (seq.certified_accuracy(grid) - fixed.certified_accuracy(grid))
            worst = int(np.argmax(np.abs(diff)))
            lines.append(
                f"| {run_dir.name} | {sigma} | {np.mean(fixed.n_used):,.0f} | {np.mean(seq.n_used):,.0f} | "
                f"{np.mean(fixed.n_used) / np.mean(seq.n_used):.1f} | {diff[worst]:+.1f} points at "
                f"r={grid[worst]:g} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "docs")
    parser.add_argument("--reuse", action="store_true", help="rewrite the page from the runs already in --workdir")
    args = parser.parse_args()
    raysmooth = [sys.executable, "-m", "raysmooth.cli"]
    radii = ",".join(f"{r:g}" for r in RADII)
    default_out, big_out, audit_out = args.workdir / "default", args.workdir / "n2000", args.workdir / "audit"
    cmd1 = ["raysmooth", "certify", f"out={default_out}"]
    cmd2 = [
        "raysmooth",
        "certify",
        "smoothing.n0=100",
        "smoothing.n=2000",
        "compare=[toy_dds_ft,toy_diffsmooth,toy_onestep]",
        f"out={big_out}",
    ]
    cmd3 = [
        "raysmooth",
        "certify",
        "+experiment=sequential_digits",
        "smoothing.sequential.stop=never",
        "model=toy_dds",
        "compare=[toy_onestep]",
        f"out={audit_out}",
    ]
    timings = args.workdir / "timings.json"
    if args.reuse:  # the runs are resumable: certify again samples nothing and prints the same table
        t1, t2, t3 = json.loads(timings.read_text())
        out1, _ = run(raysmooth + cmd1[1:])
    else:
        for d in (default_out, big_out, audit_out):
            shutil.rmtree(d, ignore_errors=True)
        out1, t1 = run(raysmooth + cmd1[1:])
        _, t2 = run(raysmooth + cmd2[1:])
        _, t3 = run(raysmooth + cmd3[1:])
        timings.write_text(json.dumps([t1, t2, t3]))
    an2, _ = run(raysmooth + ["analyze", str(big_out), "--radii", radii])
    an3, _ = run(raysmooth + ["analyze", str(audit_out), "--radii", "0,0.25,0.5,0.75,1,1.25,1.5"])
    sweeps = {}
    for model in ("dds", "dds_ft", "onestep"):
        sw, _ = run(raysmooth + ["sweep", str(big_out / model), "--p0", "0.5:0.9:0.1", "--radii", "0,0.25,0.5,1,1.5"])
        sweeps[model] = table_of(sw)

    norm = mean_image_norm()
    wrong, _ = wrong_and_abstain(big_out, "dds: certify σ=1")
    wrong_ft, abstain_ft = wrong_and_abstain(big_out, "dds_ft: certify σ=1")
    best_ft = against_best_single(big_out, "dds_ft", [0.0, 0.25, 0.5, 0.75])
    docs = ROOT / "docs"
    shutil.copy(default_out / "certified_accuracy.png", docs / "results-digits-default.png")
    shutil.copy(big_out / "certified_accuracy.png", docs / "results-digits-n2000.png")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    text = f"""# Results on digits (embedded models)

Generated by `python docs/results_digits.py` at commit `{commit}` on {time.strftime("%Y-%m-%d")}
({os.cpu_count()} CPU cores, no GPU). Every number below was printed by the commands shown; the
models are the committed ones in `raysmooth/embedded/digits/` (each folder's card.json holds its
training config and test metrics). Test split: 359 images of scikit-learn's digits; α = 0.001; radii
are L2 in [0,1] pixel units. Certified accuracy in %.

## The default run (`raysmooth certify`, n0=20, n=250)

```
{" ".join(cmd1[:2])}
```

took {t1:.0f} s here (three models × 359 images × 3 σ on local Ray, two one-core actors): denoised
smoothing with the trained denoiser (`dds`), the same after diffusion fine-tuning (`dds_ft`), and the
one-step model (`onestep`).

{table_of(out1)}

![default run](results-digits-default.png)

## A second run at n = 2000, with DiffSmooth

```
{" ".join(cmd2[:5])} out={rel(big_out)}
raysmooth analyze {rel(big_out)} --radii {radii}
```

took {t2:.0f} s.

{table_of(an2)}

![n=2000](results-digits-n2000.png)

### Threshold sweeps from the stored counts (no new samples)

```
raysmooth sweep {rel(big_out)}/dds --p0 0.5:0.9:0.1
```

{sweeps["dds"]}

```
raysmooth sweep {rel(big_out)}/dds_ft --p0 0.5:0.9:0.1
```

{sweeps["dds_ft"]}

```
raysmooth sweep {rel(big_out)}/onestep --p0 0.5:0.9:0.1
```

{sweeps["onestep"]}

## Does the multi-scale finding hold here?

Jeong & Shin report that the cascade keeps clean accuracy near that of the smallest σ while it still
certifies radii that only the largest σ reaches. On these toy models, at n = 2000:

{chr(10).join(finding(big_out))}

Read together with the single-σ rows: at σ = 1.0 the 8×8 digits are mostly noise (mean ‖x‖ =
{norm:.1f} against a noise norm of about 8), and the trained denoiser-plus-classifier is *confidently
wrong* there: dds certifies {100 * wrong:.1f}% of the test images at σ = 1.0 with a wrong class. A
cascade that trusts the largest σ first inherits those confident errors, so the `dds` cascade's clean
accuracy falls towards that of σ = 1.0. Diffusion fine-tuning (Brier and anti-consistency losses,
`dds_ft`) teaches the largest σ to abstain where it would be wrong (dds_ft certifies {100 * wrong_ft:.1f}%
wrongly at σ = 1.0 and abstains on {100 * abstain_ft:.1f}%), the cascade falls through to the smaller σ,
and its clean accuracy returns to that of σ = 0.25. That part of the paper's finding holds here.

The other part does not: the fine-tuned σ = 1.0 certifies almost nothing, so the cascade gains no
radius that the single σ levels lack, and where σ = 0.5 clears p0 it certifies a smaller radius than
σ = 0.25 would have. Against the best single σ at each radius, the dds_ft strict cascade (p0 = 0.5)
gives {best_ft}. On 8×8 digits with this small denoiser, σ = 1.0 is past what can be
recovered; the paper's gains at large radii come from ImageNet-scale models, which these toy runs do
not stand in for. The one-step model needs no fine-tuning to abstain at σ = 1.0, and its cascade
likewise keeps σ = 0.25's clean accuracy.

## Sequential certification on the same noise (audit run)

```
{" ".join(cmd3[:6])} out={rel(audit_out)}
raysmooth analyze {rel(audit_out)}
```

took {t3:.0f} s. The audit mode samples every image to N_max = 4,000 in rounds of 125 and stores each
round, so the fixed-n certificate (`certify`, all 4,000 samples) and the sequential one (the stop rule
replayed on the stored rounds) come from the same noise:

{table_of(an3)}

{chr(10).join(audit_summary(audit_out, [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]))}

With N_max = 4,000 the savings are modest (docs/sequential.md: adaptivity pays most at the papers'
N_max = 100,000, where bench/sequential.py measures 5.6-41x on Cohen et al.'s models); certified
accuracy at the grid radii stays within the sampling noise of the fixed-n certificate.
"""
    page = docs / "results-digits.md"
    start, end = "<!-- FINETUNE:START -->", "<!-- FINETUNE:END -->"
    if page.exists() and start in page.read_text():  # keep the section docs/finetune_digits.py wrote
        old = page.read_text()
        text = text.rstrip() + "\n\n" + old[old.index(start) : old.index(end) + len(end)] + "\n"
    page.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
