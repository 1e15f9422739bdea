"""The engine against the reference codebases' per-image loop, on the embedded digits models (CPU).

    python bench/engine.py [--repeats 7] [--images 16] [--out bench/results]

For each of dds, diffsmooth and onestep (the committed models, as `raysmooth certify` loads them)
and two budgets (the embedded default n0=20, n=250; and n0=100, n=1000), both sides produce the
selection and estimation counts of the same images with the same model, batch size and threads:
the reference loop (bench/reference_loop.py) image by image, with its own n0 pass; the engine with
every image's units packed into full batches, eager and with engine.compile=true (inductor, weights
frozen; the one-time compile is reported beside, not timed; the padding of the last batch is).
Repeats are interleaved (reference, engine, compiled, …) and the result is the median of the
per-repeat ratios with its spread. The lattice-noise row
measures what sound sampling costs on the same runs. GPU numbers: bench/gpu.sh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from reference_loop import reference_certify_counts  # noqa: E402

from raysmooth.config import compose, resolve_model_paths  # noqa: E402
from raysmooth.data import load_dataset  # noqa: E402
from raysmooth.engine import EngineConfig, Replica  # noqa: E402
from raysmooth.models import create_base_classifier, model_sections  # noqa: E402
from raysmooth.store import replace_text  # noqa: E402
from raysmooth.units import WorkUnit  # noqa: E402

SIGMA = 0.5
MODELS = {"dds": "toy_dds", "diffsmooth": "toy_diffsmooth", "onestep": "toy_onestep"}
BUDGETS = [(20, 250), (100, 1000)]


def embedded(name: str):
    cfg = compose("certify", [f"model={name}"])
    base_name, kwargs = model_sections(dataclasses.asdict(resolve_model_paths(cfg.model)))
    return create_base_classifier(base_name, **kwargs).eval(), cfg.model.batch_size


def engine_seconds(replica: Replica, images: dict, n0: int, n: int) -> float:
    units = [WorkUnit(i, 0, "selection", 0, n0) for i in images] + [WorkUnit(i, 0, "estimation", 0, n) for i in images]
    start = time.perf_counter()
    replica.run(units, images)
    return time.perf_counter() - start


def ratio_summary(ref: list[float], eng: list[float], samples: int) -> dict:
    ratios = [r / e for r, e in zip(ref, eng)]
    return {
        "reference_samples_per_s": round(samples / statistics.median(ref)),
        "engine_samples_per_s": round(samples / statistics.median(eng)),
        "speedup_median": round(statistics.median(ratios), 3),
        "speedup_spread": [round(min(ratios), 3), round(max(ratios), 3)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    digits = load_dataset("digits")
    images = {i: digits.images[i] for i in range(args.images)}
    tensors = [torch.from_numpy(digits.images[i]) for i in range(args.images)]
    rows = []
    for label, config in MODELS.items():
        base, batch = embedded(config)
        gaussian = Replica(base, [SIGMA], 0, EngineConfig(batch_size=batch))
        lattice = Replica(base, [SIGMA], 0, EngineConfig(batch_size=batch, noise="lattice", levels=16))
        # engine.compile=true: its own copy of the model (inductor folds the weights in), compiled once.
        compiled = Replica(embedded(config)[0], [SIGMA], 0, EngineConfig(batch_size=batch, compile=True))
        compile_seconds = engine_seconds(compiled, {0: images[0]}, 1, 1)
        for n0, n in BUDGETS:
            samples = args.images * (n0 + n)
            reference_certify_counts(base, tensors[:2], SIGMA, n0, n, batch, "cpu")  # warm every path
            engine_seconds(gaussian, images, n0, n)
            engine_seconds(compiled, images, n0, n)
            ref, eng, comp, lat = [], [], [], []
            for _ in range(args.repeats):
                ref.append(reference_certify_counts(base, tensors, SIGMA, n0, n, batch, "cpu"))
                eng.append(engine_seconds(gaussian, images, n0, n))
                comp.append(engine_seconds(compiled, images, n0, n))
                lat.append(engine_seconds(lattice, images, n0, n))
            row = {
                "model": label,
                "n0": n0,
                "n": n,
                "images": args.images,
                "batch": batch,
                **ratio_summary(ref, eng, samples),
                **{f"compiled_{k}": v for k, v in ratio_summary(ref, comp, samples).items() if "reference" not in k},
                "compile_seconds_once": round(compile_seconds, 1),
            }
            lat_ratio = [e / x for e, x in zip(eng, lat)]
            row["lattice_over_gaussian_median"] = round(statistics.median(lat_ratio), 3)
            row["lattice_over_gaussian_spread"] = [round(min(lat_ratio), 3), round(max(lat_ratio), 3)]
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "benchmark": "engine vs the reference per-image loop (with its n0 pass), embedded digits models",
        "goal": "engine >= 1.5x the reference loop on dds, diffsmooth and onestep (median of interleaved repeats)",
        "sides": "reference: bench/reference_loop.py, eager; engine: engine.compile=false; compiled_*: "
        "engine.compile=true (inductor, frozen weights; the padded last batch is timed, the one-time compile is not)",
        "sigma": SIGMA,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    replace_text(args.out / "engine.json", json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
