"""Back out each image's p_A from Cohen et al.'s published certify TSVs (locuslab/smoothing,
data/certify/…, n = 100,000, α = 0.001) into bench/data/cohen_pa.json, the input of
bench/sequential.py. Only these derived numbers are kept in this repository, with their source.

    python bench/derive_cohen_pa.py /path/to/a/checkout/of/locuslab/smoothing

The radius is σΦ⁻¹(p̲) with p̲ = CP_lower(A, 100,000, 0.001); the TSVs print it rounded, so A is the
count whose radius is nearest (p_A = A / 100,000; a saturated radius gives 1 − 10⁻⁵). Abstentions
carry no p_A (the simulation draws one); a wrong certified class is recorded as "wrong".
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysmooth.stats import cp_lower  # noqa: E402
from raysmooth.store import replace_text  # noqa: E402

N, ALPHA = 100_000, 0.001
SETTINGS = {
    "cifar10_sigma_0.25": ("cifar10/resnet110/noise_0.25/test/sigma_0.25", 0.25),
    "cifar10_sigma_0.50": ("cifar10/resnet110/noise_0.50/test/sigma_0.50", 0.50),
    "cifar10_sigma_1.00": ("cifar10/resnet110/noise_1.00/test/sigma_1.00", 1.00),
    "imagenet_sigma_0.25": ("imagenet/resnet50/noise_0.25/test/sigma_0.25", 0.25),
    "imagenet_sigma_0.50": ("imagenet/resnet50/noise_0.50/test/sigma_0.50", 0.50),
    "imagenet_sigma_1.00": ("imagenet/resnet50/noise_1.00/test/sigma_1.00", 1.00),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout (or bare git directory) of locuslab/smoothing")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "cohen_pa.json")
    args = parser.parse_args()
    counts = np.arange(N // 2, N + 1)
    lows = cp_lower(counts, N, ALPHA)
    git = ["git", f"--git-dir={args.checkout}"] if args.checkout.name == ".git" else ["git", "-C", str(args.checkout)]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    out = {
        "source": "https://github.com/locuslab/smoothing",
        "commit": commit,
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "n": N,
        "alpha": ALPHA,
        "settings": {},
    }
    for name, (rel, sigma) in SETTINGS.items():
        text = subprocess.run(
            git + ["show", f"HEAD:data/certify/{rel}"], capture_output=True, text=True, check=True
        ).stdout
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
        radii_table = sigma * norm.ppf(lows)
        p_a, status = [], []
        for r in rows:
            if int(r["predict"]) < 0:
                p_a.append(None)
                status.append("abstain")
                continue
            radius = float(r["radius"])
            a = counts[int(np.argmin(np.abs(radii_table - radius)))]
            p_a.append(1 - 1e-5 if a == N else a / N)
            status.append("correct" if int(r["correct"]) else "wrong")
        out["settings"][name] = {
            "file": f"data/certify/{rel}",
            "sigma": sigma,
            "images": len(rows),
            "p_a": p_a,
            "status": status,
        }
        print(f"{name}: {len(rows)} images, {status.count('abstain')} abstentions, {status.count('wrong')} wrong")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    replace_text(args.out, json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
