"""A p0 sweep from stored counts: 100 thresholds × 50,000 images × 3 σ with 1,000 classes.

Goal (issue 2): under 10 s on one core. The counts are synthetic but shaped like a denoised ImageNet
run (n0 = 100, n = 10,000, a dominant class and up to 24 runner-ups per image), written to a real run
directory first; the timer covers reading them back, summarising, and the sweep of both policies.

    python bench/sweep.py [--images 50000] [--thresholds 100] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# One core, one thread: set before numpy loads its BLAS.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from raysmooth import stats  # noqa: E402
from raysmooth.certificates import counts_view, sweep_certificates  # noqa: E402
from raysmooth.store import COUNTS_SCHEMA, RunStore, append_table, replace_text  # noqa: E402


def synthetic_counts_table(
    rng, run: RunStore, images: int, sigmas, num_classes: int, n0: int, n: int, width: int = 25
) -> pa.Table:
    """One row per (image, σ, phase), at most ``width`` nonzero classes per row."""
    tables = []
    labels = rng.integers(0, num_classes, images)
    for sigma in sigmas:
        # Higher σ: flatter vote. Candidate classes include the label most of the time.
        conc = np.full(width, 0.05 + 0.3 * sigma)
        conc[0] = 2.0 / sigma
        probs = rng.dirichlet(conc, size=images)
        cand = rng.integers(0, num_classes, size=(images, width))
        cand[:, 0] = np.where(rng.random(images) < 0.8, labels, cand[:, 0])
        for phase, samples in (("selection", n0), ("estimation", n)):
            counts = rng.multinomial(samples, probs)
            # Merge duplicate candidate ids and drop zeros via the sparse constructor.
            offsets = np.arange(images + 1, dtype=np.int64) * width
            rows = np.repeat(np.arange(images), width)
            flat_c, flat_n = cand.reshape(-1), counts.reshape(-1)
            order = np.lexsort((flat_c, rows))
            rows, flat_c, flat_n = rows[order], flat_c[order], flat_n[order]
            key = rows * num_classes + flat_c
            uniq, start = np.unique(key, return_index=True)
            summed = np.add.reduceat(flat_n, start)
            keep = summed > 0
            u_rows, u_cls, u_n = (uniq // num_classes)[keep], (uniq % num_classes)[keep], summed[keep]
            offsets = np.zeros(images + 1, dtype=np.int64)
            np.cumsum(np.bincount(u_rows, minlength=images), out=offsets[1:])
            table = pa.table(
                {
                    "run_id": [run.run_id] * images,
                    "config_hash": [run.manifest["config_hash"]] * images,
                    "model_id": ["synthetic-imagenet"] * images,
                    "seed": np.zeros(images, np.int64),
                    "alpha": np.full(images, 0.001),
                    "image_id": np.arange(images, dtype=np.int64),
                    "label": labels.astype(np.int32),
                    "sigma": np.full(images, sigma),
                    "phase": [phase] * images,
                    "round": np.zeros(images, np.int32),
                    "n": np.full(images, samples, np.int64),
                    "num_classes": np.full(images, num_classes, np.int32),
                    "classes": pa.ListArray.from_arrays(
                        pa.array(offsets.astype(np.int32)), pa.array(u_cls.astype(np.int32))
                    ),
                    "counts": pa.ListArray.from_arrays(
                        pa.array(offsets.astype(np.int32)), pa.array(u_n.astype(np.int64))
                    ),
                    "seq_continue": pa.nulls(images, pa.bool_()),
                },
                schema=COUNTS_SCHEMA,
            )
            tables.append(table)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--thresholds", type=int, default=100)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sigmas = (0.25, 0.5, 1.0)
    p0 = np.linspace(0.5, 0.99, args.thresholds)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunStore.create(Path(tmp) / "run", {"bench": "sweep", "images": args.images})
        for table in synthetic_counts_table(rng, run, args.images, sigmas, args.classes, 100, 10_000):
            append_table(run.root / "counts", table)
        size = sum(f.stat().st_size for f in (run.root / "counts").glob("*.parquet"))

        timings = {}
        t0 = time.perf_counter()
        counts = RunStore.open(run.root).read_counts()
        timings["read_counts_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        view = counts_view(counts)
        timings["align_s"] = time.perf_counter() - t0
        for policy in stats.POLICIES:
            t0 = time.perf_counter()
            prepared = stats.prepare_levels(view.levels, (policy,))
            timings[f"{policy}_summarise_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            sweep = stats.cascade_sweep(prepared, p0, 0.001, policy)
            timings[f"{policy}_sweep_s"] = time.perf_counter() - t0
            timings[f"{policy}_certified_at_p0_0.5"] = float(np.mean(sweep.prediction[0] >= 0))
        t0 = time.perf_counter()
        table = sweep_certificates(view, p0, [0.001], "strict")
        timings["strict_end_to_end_table_s"] = time.perf_counter() - t0
        timings["table_rows"] = table.num_rows

    total = timings["read_counts_s"] + timings["align_s"] + timings["strict_summarise_s"] + timings["strict_sweep_s"]
    result = {
        "benchmark": "p0 sweep from stored counts",
        "images": args.images,
        "sigmas": list(sigmas),
        "classes": args.classes,
        "thresholds": len(p0),
        "counts_on_disk_bytes": size,
        "strict_read_to_certificates_s": total,
        "goal_s": 10.0,
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in timings.items()},
        "cores": 1,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    replace_text(args.out / "sweep.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
