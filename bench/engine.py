"""Engine samples/s against a per-image loop written the way the reference codebases do it.

The loop (Cohen's ``_sample_noise``): for each image, repeat it along the batch, add noise, argmax,
then count the labels in a Python loop. The engine: units of many images packed into full batches,
noise in seeded blocks, bincount on the device. Same base classifier, batch size and threads.

Pairs: (a) digits-sized, a tiny diffusers UNet at 8×8 and a small timm net; (b) CIFAR-shaped, a
diffusers UNet at 32×32 and timm resnet18, random weights. On a GPU, fp32 and bf16 are both timed
and the share of the bf16 peak that the models' FLOPs reach is reported.

    python bench/engine.py [--pairs digits,cifar] [--threads 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysmooth.engine import EngineConfig, Replica  # noqa: E402
from raysmooth.models import ClassifierConfig, DenoiseThenClassify, DiffusionDenoiser, alphas_cumprod, linear_betas  # noqa: E402
from raysmooth.models.classifier import load_classifier  # noqa: E402
from raysmooth.units import WorkUnit  # noqa: E402

PAIRS = {
    "digits": dict(
        shape=(1, 8, 8),
        classes=10,
        images=16,
        n=1000,
        batch=500,
        unet=dict(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        ),
        classifier=dict(name="resnet18", num_classes=10, in_chans=1, input_size=(8, 8), mean=(0.5,), std=(0.5,)),
    ),
    "cifar": dict(
        shape=(3, 32, 32),
        classes=10,
        images=4,
        n=250,
        batch=100,
        unet=dict(
            sample_size=32,
            in_channels=3,
            out_channels=6,
            layers_per_block=2,
            block_out_channels=(64, 128, 128),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=32,
        ),
        classifier=dict(name="resnet18", num_classes=10, in_chans=3, input_size=(32, 32)),
    ),
}


def build(pair: dict, device: str) -> DenoiseThenClassify:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**pair["unet"]).eval().requires_grad_(False)
    den = DiffusionDenoiser(unet, alphas_cumprod(linear_betas(1000)))
    clf = load_classifier(ClassifierConfig(**pair["classifier"]))
    return DenoiseThenClassify(den, clf, pair["shape"]).to(device).eval()


def reference_loop(
    base, images, sigma: float, n: int, batch: int, num_classes: int, device: str, autocast=None
) -> float:
    """Per image: repeat along the batch, add noise, argmax, count in Python. Returns seconds."""
    start = time.perf_counter()
    with torch.no_grad(), autocast or torch.autocast("cpu", enabled=False):
        for x in images:
            counts = np.zeros(num_classes, dtype=int)
            remaining = n
            while remaining > 0:
                b = min(batch, remaining)
                remaining -= b
                xb = x.repeat((b, 1, 1, 1))
                noise = torch.randn_like(xb) * sigma
                sig = torch.full((b,), sigma, device=device)
                labels = base.logits(xb + noise, sig).argmax(1).cpu().numpy()
                for idx in labels:
                    counts[idx] += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def engine_run(base, images, sigma, n, batch, device, precision="fp32", compile_=False) -> float:
    rep = Replica(
        base,
        [sigma],
        run_seed=0,
        config=EngineConfig(batch_size=batch, noise_block=256, precision=precision, compile=compile_),
        device=device,
    )
    units = [WorkUnit(i, 0, "estimation", 0, n) for i in range(len(images))]
    imgs = {i: images[i] for i in range(len(images))}
    if compile_:
        rep.run(units[:1], imgs)  # compile outside the timer
    start = time.perf_counter()
    rep.run(units, imgs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def model_flops_per_sample(base, shape, device) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    x = torch.rand((2, *shape), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        base.logits(x, torch.full((2,), 0.5, device=device))
    return counter.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="digits,cifar")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time the engine under torch.compile")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for name in args.pairs.split(","):
        pair = PAIRS[name]
        base = build(pair, device)
        rng = np.random.default_rng(0)
        images = [
            torch.from_numpy(rng.random(pair["shape"], dtype=np.float32)).to(device) for _ in range(pair["images"])
        ]
        total = pair["images"] * pair["n"]
        # Warm both paths once (allocator, kernels).
        reference_loop(base, images[:1], 0.5, pair["batch"], pair["batch"], pair["classes"], device)
        engine_run(base, images[:1], 0.5, pair["batch"], pair["batch"], device)
        row = {
            "pair": name,
            "device": device,
            "threads": args.threads,
            "images": pair["images"],
            "n": pair["n"],
            "batch": pair["batch"],
            "samples": total,
        }
        t_loop = reference_loop(base, images, 0.5, pair["n"], pair["batch"], pair["classes"], device)
        t_eng = engine_run(base, images, 0.5, pair["n"], pair["batch"], device)
        row.update(loop_samples_per_s=total / t_loop, engine_samples_per_s=total / t_eng, speedup=t_loop / t_eng)
        if args.compile:
            t_c = engine_run(base, images, 0.5, pair["n"], pair["batch"], device, compile_=True)
            row.update(engine_compiled_samples_per_s=total / t_c, speedup_compiled=t_loop / t_c)
        flops = model_flops_per_sample(base, pair["shape"], device)
        row["model_gflops_per_sample"] = flops / 1e9 if flops else None
        if device == "cuda":
            t_bf = engine_run(base, images, 0.5, pair["n"], pair["batch"], device, precision="bf16")
            row["engine_bf16_samples_per_s"] = total / t_bf
            if flops and args.peak_tflops:
                row["bf16_share_of_peak"] = flops * total / t_bf / (args.peak_tflops * 1e12)
            row["gpu"] = torch.cuda.get_device_name()
        results.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {
        "benchmark": "engine vs per-image loop",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "results": results,
    }
    name = "engine_gpu.json" if device == "cuda" else "engine.json"
    (args.out / name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
