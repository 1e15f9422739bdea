"""What Ray costs: the pipeline with one actor against the bare engine, and two actors against one.

Same units, same model (a small diffusers UNet + timm ResNet pair at 8×8, random weights saved to a
temporary folder and loaded the way a run loads them), one torch thread per actor and for the bare
engine. Goals (issue 4): one actor ≥ 0.95 of the engine's samples/s; two one-core actors ≥ 1.8× one.

    python bench/ray_overhead.py [--images 24] [--n 4000] [--task-samples 1000] [--out bench/results]
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def save_models(root: Path) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors.torch import save_file

    from raysmooth.models import ClassifierConfig
    from raysmooth.models.classifier import create_timm_model

    torch.manual_seed(0)
    UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).save_pretrained(root / "den" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "den" / "scheduler")
    clf = dict(name="resnet18", num_classes=10, in_chans=1, input_size=[8, 8], mean=[0.5], std=[0.5])
    save_file(create_timm_model(ClassifierConfig(**clf)).state_dict(), str(root / "clf.safetensors"))
    return {
        "base": "dds",
        "input_shape": [1, 8, 8],
        "denoiser": {"path": str(root / "den")},
        "classifier": {**clf, "checkpoint": str(root / "clf.safetensors")},
    }


def plan(images: int, n: int):
    from raysmooth.distributed import Planner

    return Planner(list(range(images)), 1, n0=100, n=n, chunk=1000)


def bare_engine(model: dict, imgs: dict, images: int, n: int, batch: int) -> float:
    import torch

    from raysmooth.engine import EngineConfig, Replica
    from raysmooth.models import create_base_classifier

    torch.set_num_threads(1)
    kw = dict(model)
    rep = Replica(create_base_classifier(kw.pop("base"), **kw), [0.5], 0, EngineConfig(batch_size=batch))
    p = plan(images, n)
    units = p.take(10**12)
    rep.run(units[:2], imgs)  # warm-up
    start = time.perf_counter()
    rep.run(units, imgs)
    return sum(u.n_samples for u in units) / (time.perf_counter() - start)


def pipeline(model: dict, imgs: dict, images: int, n: int, batch: int, actors: int, task_samples: int) -> float:
    import ray

    from raysmooth.distributed import ActorSpec, Driver, start_actors

    handles = start_actors(ActorSpec(actors, 1, 0, -1), model, [0.5], 0, {"batch_size": batch, "device": "cpu"}, 1)
    ray.get([h.describe.remote() for h in handles])  # models loaded before the clock starts
    warm = plan(actors, 2 * batch)
    Driver(handles, imgs, warm, on_rows=lambda rows: None, samples_per_task=2 * batch).run()
    p = plan(images, n)
    start = time.perf_counter()
    Driver(handles, imgs, p, on_rows=lambda rows: None, samples_per_task=task_samples, max_in_flight_per_actor=2).run()
    rate = p.samples_done / (time.perf_counter() - start)
    for h in handles:
        ray.kill(h, no_restart=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--task-samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    import ray

    rng = np.random.default_rng(0)
    imgs = {i: rng.random((1, 8, 8), dtype=np.float32) for i in range(args.images)}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_models(Path(tmp))
        engine = bare_engine(model, imgs, args.images, args.n, args.batch)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        one = pipeline(model, imgs, args.images, args.n, args.batch, 1, args.task_samples)
        two = pipeline(model, imgs, args.images, args.n, args.batch, 2, args.task_samples)
        ray.shutdown()
    result = {
        "benchmark": "ray overhead",
        "model": "dds: diffusers UNet (32,64; attention) + timm resnet18, 8x8 grey, random weights",
        "images": args.images,
        "n_per_image": args.n,
        "batch": args.batch,
        "samples_per_task": args.task_samples,
        "threads_per_replica": 1,
        "engine_samples_per_s": engine,
        "one_actor_samples_per_s": one,
        "two_actors_samples_per_s": two,
        "one_actor_vs_engine": one / engine,
        "goal_one_actor_vs_engine": 0.95,
        "two_actors_vs_one": two / one,
        "goal_two_actors_vs_one": 1.8,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from raysmooth.store import replace_text

    replace_text(args.out / "ray_overhead.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
