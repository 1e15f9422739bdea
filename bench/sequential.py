"""Sequential certification against fixed n, simulated on Cohen et al.'s published models.

    python bench/sequential.py [--reps 20] [--out bench/results]

Per-image p_A comes from Cohen et al.'s certify TSVs (bench/data/cohen_pa.json, made by
bench/derive_cohen_pa.py from locuslab/smoothing; ImageNet ResNet-50 and CIFAR-10 ResNet-110 at
σ = 0.25, 0.5, 1.0). Each image is replayed `reps` times: n0 selection samples over (top class,
runner-up, the rest) with masses (p_A, 0.8(1−p_A), the remainder); abstentions draw p_A ~ U(0.30, 0.50)
and keep the top class the most likely one (runner-up min(0.8(1−p_A), 0.9·p_A)); a certified class
that was wrong has the label on the runner-up. Fixed n = 100,000 and 10,000 use
Cohen's CERTIFY (n0 = 100); the sequential rule (raysmooth.stats.sequential, n0 = 64, u = 125,
N_max = 100,000, doubling looks, half of α on the last, futility β = 0.05) decides at the radii of
Cohen's tables. α = 0.001. Samples per image include the selection samples.

Goal (issue 11): against fixed n = 100,000 on every setting, ≥ 5× fewer samples on average and certified
accuracy within 1% (relative) at every radius of the tables; ≥ 30× on ImageNet σ = 0.25.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysmooth.stats import cp_lower  # noqa: E402
from raysmooth.stats import sequential as sq  # noqa: E402
from raysmooth.store import replace_text  # noqa: E402

ALPHA = 0.001
TABLE_RADII = {  # the radii of Cohen et al.'s tables, per setting
    "cifar10_sigma_0.25": [0.0, 0.25, 0.5, 0.75, 1.0],
    "cifar10_sigma_0.50": [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5],
    "cifar10_sigma_1.00": [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0],
    "imagenet_sigma_0.25": [0.0, 0.5, 1.0],
    "imagenet_sigma_0.50": [0.0, 0.5, 1.0, 1.5, 2.0],
    "imagenet_sigma_1.00": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0],
}


def trials(setting: dict, reps: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p_A, the runner-up's mass and whether the top class is the label, for every (image, repetition)."""
    p_a = np.array([np.nan if p is None else p for p in setting["p_a"]], dtype=np.float64)
    top_is_label = np.array([s != "wrong" for s in setting["status"]])
    p_a = np.tile(p_a, reps)
    top_is_label = np.tile(top_is_label, reps)
    abstain = np.isnan(p_a)
    p_a[abstain] = rng.uniform(0.30, 0.50, abstain.sum())
    p_b = np.where(abstain, np.minimum(0.8 * (1 - p_a), 0.9 * p_a), 0.8 * (1 - p_a))
    return p_a, p_b, top_is_label


def select(p_a: np.ndarray, p_b: np.ndarray, n0: int, rng) -> np.ndarray:
    """Whether the selection samples pick the top class (else the runner-up)."""
    probs = np.stack([p_a, p_b, np.clip(1 - p_a - p_b, 0, 1)], axis=1)
    counts = np.stack([rng.multinomial(n0, p / p.sum()) for p in probs])
    return counts[:, 0] >= counts[:, 1]


def fixed(p_a, p_b, top_is_label, sigma, n, rng):
    picked_top = select(p_a, p_b, 100, rng)
    p = np.where(picked_top, p_a, p_b)
    lower = cp_lower(rng.binomial(n, p), n, ALPHA)
    ok = lower >= 0.5
    radius = np.where(ok, sigma * norm.ppf(np.where(ok, lower, 0.5)), 0.0)
    correct = ok & (picked_top == top_is_label)
    return radius, correct, np.full(len(p_a), 100 + n)


def sequential(p_a, p_b, top_is_label, sigma, radii, rng, beta=0.05):
    d = sq.design(ALPHA, 125, 100_000, radii, sigma, beta=beta)
    picked_top = select(p_a, p_b, 64, rng)
    p = np.where(picked_top, p_a, p_b)
    increments = np.diff(np.concatenate([[0], d.looks]))
    cumulative = np.cumsum(rng.binomial(increments[None, :], p[:, None]), axis=1)
    cert, out = sq.sequential_certify(np.zeros(len(p), np.int64), cumulative, d)
    correct = (cert.prediction >= 0) & (picked_top == top_is_label)
    return cert.radius, correct, 64 + d.looks[out.stop_look]


def accuracy(radius, correct, radii):
    return [float(np.mean(correct & (radius >= r))) for r in radii]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--data", type=Path, default=Path(__file__).parent / "data" / "cohen_pa.json")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    source = json.loads(args.data.read_text())
    rng = np.random.default_rng(0)
    rows = []
    started = time.perf_counter()
    for name, radii in TABLE_RADII.items():
        setting = source["settings"][name]
        sigma = setting["sigma"]
        p_a, p_b, top = trials(setting, args.reps, rng)
        results = {
            "fixed n=100,000": fixed(p_a, p_b, top, sigma, 100_000, rng),
            "fixed n=10,000": fixed(p_a, p_b, top, sigma, 10_000, rng),
            "sequential": sequential(p_a, p_b, top, sigma, radii, rng),
        }
        base_acc = accuracy(*results["fixed n=100,000"][:2], radii)
        base_mean = float(np.mean(results["fixed n=100,000"][2]))
        for method, (radius, correct, used) in results.items():
            acc = accuracy(radius, correct, radii)
            rel = [(a - b) / b for a, b in zip(acc, base_acc) if b > 0.005]
            rows.append(
                {
                    "setting": name,
                    "sigma": sigma,
                    "images": setting["images"],
                    "method": method,
                    "radii": radii,
                    "certified_accuracy_pct": [round(100 * a, 1) for a in acc],
                    "mean_n": round(float(np.mean(used))),
                    "median_n": round(float(np.median(used))),
                    "times_fewer_than_fixed_100k": round(base_mean / float(np.mean(used)), 1),
                    "worst_relative_change_pct": round(100 * min(rel), 2) if rel else 0.0,
                }
            )
            print(
                f"{name:20s} {method:16s} {' '.join(f'{100 * a:5.1f}' for a in acc)}  mean n {np.mean(used):9,.0f}  "
                f"median {np.median(used):8,.0f}  ×{rows[-1]['times_fewer_than_fixed_100k']:5.1f}  "
                f"worst Δ {rows[-1]['worst_relative_change_pct']:+.2f}%",
                flush=True,
            )
    seq = [r for r in rows if r["method"] == "sequential"]
    goal = {
        "at_least_5x_everywhere": all(r["times_fewer_than_fixed_100k"] >= 5 for r in seq),
        "within_1pct_relative_everywhere": all(r["worst_relative_change_pct"] >= -1.0 for r in seq),
        "imagenet_0.25_at_least_30x": next(r for r in seq if r["setting"] == "imagenet_sigma_0.25")[
            "times_fewer_than_fixed_100k"
        ]
        >= 30,
    }
    out = {
        "benchmark": "sequential certification vs fixed n, simulated on Cohen et al.'s published certify TSVs",
        "data": {k: source[k] for k in ("source", "commit", "method")},
        "alpha": ALPHA,
        "reps": args.reps,
        "goal": goal,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": platform.machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    replace_text(args.out / "sequential.json", json.dumps(out, indent=2) + "\n")
    print(json.dumps(goal))


if __name__ == "__main__":
    main()
