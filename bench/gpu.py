"""GPU benchmark: the engine on the papers' real architectures (random weights, nothing downloaded).

    bash bench/gpu.sh            # under 8 minutes on an H100; writes bench/results/gpu.json
    python bench/gpu_runs.py add OUT/gpu.json   # keep a run from a device machine as the next run
    bash bench/gpu.sh --sections all --budget-s 2000   # every section, about 30 minutes
    python bench/gpu.py --smoke  # the same code path on the CPU with toy sizes (a test of the script)

Pairs: CIFAR-10 (ADM 32×32 + ViT-B/16 at 224) and ImageNet (ADM-256 run at 224×224 + BEiT-L/16 at 512),
built by raysmooth.models.architectures from our ADM presets and timm. Sections (--sections, run in the
order given): the measured bf16 matrix-product rate (the real ceiling beside the datasheet peak); per
pair, bf16 in channels_last and contiguous layout, eager and compiled, interleaved; on the CIFAR pair,
125- against 10,000-sample units, lattice against Gaussian noise, the reference per-image loop against
the engine, and the host syncs inside a run; per pair, fp32 / bf16-mixed / bf16 eager, the measured
activation memory per sample against the meta-device memory model, and the batch engine.batch_size=auto
picks; where the ImageNet pair's time goes (its halves alone, CUDA kernels by kind with calls and time
per call, eager and compiled; the generated source of the compiled pair's slowest fused kernels, with
their launches and buffers' layouts, also with the UNet's skip concatenations pinned channels_last, the
layout the project's torch generates); BEiT's biased attention under each SDPA backend, as timm passes it
(eager and compiled) and as FlexAttention; the compiled pair with engine.attention=flex against SDPA,
engine.attention=sdpa_cached (BEiT's bias cached in aligned rows) against timm's per-forward bias,
engine.group_norm=channels_last (GroupNorm in the activations' layout) against PyTorch's, the skip
concatenations left to inductor against pinned (bench/layouts.py), with
engine.compile_mode=max-autotune-no-cudagraphs and with inductor's coordinate-descent tuning against
the default mode; inductor freezing. Rates are samples/s with FLOPs per sample counted by
torch.utils.flop_counter (attention included) and their share of the bf16 peak. Timings are medians of
interleaved repeats; every step is written to the JSON as soon as it is measured (and the section in
progress before it starts), so a run cut short keeps what it measured and says where it stopped.
Sections that would overrun --budget-s are skipped and listed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import platform
import re
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_runs import write_atomic  # noqa: E402
from layouts import pin_concatenations, pinned_concatenations  # noqa: E402
from reference_loop import reference_certify_counts  # noqa: E402

from raysmooth.engine import EngineConfig, Replica  # noqa: E402
from raysmooth.models.architectures import PAPER_PAIRS, paper_pair, toy_pair  # noqa: E402
from raysmooth.models.attention import (  # noqa: E402
    attend_by_head,
    relative_position_index,
    relative_position_score_mod,
)
from raysmooth.models.memory import estimate_memory  # noqa: E402
from raysmooth.units import WorkUnit  # noqa: E402

SIGMA = 0.5
# What the compiled rows take from the papers' preset: the settings that change speed (and gelu, on a GPU,
# the GELU's form), not the noise.
PRESET_FIELDS = ("precision", "channels_last", "compile", "compile_mode", "attention", "group_norm", "gelu")


def _engine_yaml(name: str, folder: Path) -> dict:
    """``folder/<name>.yaml`` with its defaults list followed (``_self_`` last unless placed)."""
    import yaml  # timm's own dependency: the device image has it, though not hydra

    own = yaml.safe_load((folder / f"{name}.yaml").read_text()) or {}
    defaults = own.pop("defaults", None) or []
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    merged: dict = {}
    for entry in defaults:
        merged |= own if entry == "_self_" else _engine_yaml(entry, folder)
    return merged


def preset_engine(name: str = "gpu_compiled", folder: Path = ROOT / "configs" / "engine") -> dict:
    """The speed settings ``engine=<name>`` runs with, read from its yaml (EngineConfig's defaults for
    what it leaves out), so a compiled row times what the presets run even after a GPU run has changed
    them (attention, compile_mode)."""
    cfg = _engine_yaml(name, folder)
    return {k: cfg.get(k, getattr(EngineConfig, k)) for k in PRESET_FIELDS}


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = "cpu" if args.smoke else "cuda"
        self.started = time.monotonic()
        self.best_cudnn_benchmark = False  # set by the ImageNet profile section
        self.ceiling: float | None = None  # TFLOP/s of a large bf16 matrix product, when measured
        self.preset = preset_engine()  # engine=gpu_compiled's speed settings: what the compiled rows run
        self.out = {
            "benchmark": "engine on the papers' architectures (random weights)",
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "sections": args.sections,
            "machine": platform.machine(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu (smoke test)",
            "peak_bf16_tflops": args.peak_tflops,
            "peak_source": args.peak_source,
            "engine_gpu_compiled": self.preset,
            "rows": [],
            "skipped": [],
            "errors": [],
        }
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            self.out["device_memory_gb"] = round(total / 1e9, 1)

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        self.out["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.args.out, self.out)  # after every row: a run killed at its time limit keeps a whole file

    def row(self, **kw) -> None:
        self.out["rows"].append(kw)
        print(json.dumps(kw), flush=True)
        self.save()

    def shares(self, flop_rate: float) -> dict:
        """A FLOP rate as a share of the datasheet peak, and of the measured matrix-product rate."""
        out = {"share_of_bf16_peak": round(flop_rate / (self.args.peak_tflops * 1e12), 4)}
        if self.ceiling:
            out["share_of_measured_matmul"] = round(flop_rate / (self.ceiling * 1e12), 4)
        return out

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def build(name: str, device: str, smoke: bool):
    """The pair with the papers' architectures, or (``smoke``) the same code path with toy sizes."""
    return toy_pair(name).to(device).eval() if smoke else paper_pair(name, device)


def flops_of(fn) -> float:
    """FLOPs of one call of ``fn`` (torch.utils.flop_counter: matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_sample(base, device: str) -> float:
    z = torch.rand((2, *base.input_shape), device=device)
    return flops_of(lambda: base(z, torch.full((2,), SIGMA, device=device))) / 2


def work(shape, images: int, n: int, unit: int, device: str, seed: int = 0):
    """``images`` random images, each with n samples in units of ``unit``."""
    g = torch.Generator().manual_seed(seed)
    imgs = {i: torch.rand(shape, generator=g) for i in range(images)}
    units = [
        WorkUnit(i, 0, "estimation", c, min(unit, n - c * unit)) for i in range(images) for c in range(-(-n // unit))
    ]
    return units, imgs


def timed(bench: Bench, replica: Replica, units, imgs) -> float:
    """Seconds for one ``replica.run``."""
    return timed_call(bench, lambda: replica.run(units, imgs))()


def timed_call(bench: Bench, fn):
    """``fn`` wrapped to return its wall time (inference mode, the device synchronised on both sides)."""

    def run() -> float:
        bench.sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn()
        bench.sync()
        return time.perf_counter() - t0

    return run


def interleaved(bench: Bench, cases: dict, repeats: int, warm_up: bool = True) -> dict:
    """{name: [seconds…]} measured round-robin (after one warm-up each, unless the caller has run them)."""
    times = {k: [] for k in cases}
    for fn in cases.values() if warm_up else ():
        fn()
    for _ in range(repeats):
        for k, fn in cases.items():
            times[k].append(fn())
    return times


def summary(samples: int, secs: list[float]) -> dict:
    rates = [samples / s for s in secs]
    return {"samples_per_s": round(statistics.median(rates), 1), "spread": [round(min(rates), 1), round(max(rates), 1)]}


def rates(bench: Bench, samples: int, secs: list[float], flops: float) -> dict:
    """samples/s (median and spread) and the share of the peak the median rate reaches."""
    return summary(samples, secs) | bench.shares(flops * statistics.median([samples / s for s in secs]))


def batch_for(bench: Bench, name: str) -> int:
    """The presets' batch: 96 for the ImageNet pair, 1000 for the CIFAR pair (8 in a smoke run)."""
    return 8 if bench.args.smoke else (96 if name == "imagenet" else 1000)


@functools.cache
def pair_flops(name: str, smoke: bool) -> float:
    """FLOPs per sample of a pair, counted on the meta device: nothing is allocated or run."""
    return flops_per_sample(build(name, "meta", smoke), "meta")


def compile_seconds(bench: Bench, replica: Replica, units, imgs) -> float:
    """The first call of a compiled replica (one unit, padded to the static batch shape) compiles it."""
    return round(timed(bench, replica, units[:1], imgs), 1)


def pair_section(bench: Bench, name: str, eager: bool = True, compiled: bool = False) -> None:
    args, dev = bench.args, bench.device
    base = build(name, dev, args.smoke)
    batch = batch_for(bench, name)
    flops = pair_flops(name, args.smoke)
    est = estimate_memory(build(name, "meta", args.smoke), torch.bfloat16)
    info = {
        "pair": name,
        "architectures": PAPER_PAIRS[name]["classifier"].name,
        "input_shape": list(base.input_shape),
        "gflops_per_sample": round(flops / 1e9, 2),
        "batch": batch,
        "memory_model_gb_per_sample_bf16": round(est.per_sample_bytes / 1e9, 4),
    }
    # One model per replica: a bf16 replica converts its model (weights and activations) to bf16.
    precisions = args.precisions.split(",") if eager else ["bf16"]
    replicas = {
        p: Replica(
            build(name, dev, args.smoke),
            [SIGMA],
            0,
            EngineConfig(batch_size=batch, precision=p, channels_last=True),
            device=dev,
        )
        for p in dict.fromkeys(precisions + ["bf16"])
    }
    # Measured activation memory per sample (bf16 eager), against the memory model.
    if dev == "cuda" and eager:
        peaks = []
        for b in (batch // 2, batch):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            units, imgs = work(base.input_shape, 1, b, b, dev)
            replicas["bf16"].run(units, imgs)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
        info["measured_gb_per_sample_bf16"] = round((peaks[1] - peaks[0]) / (batch - batch // 2) / 1e9, 4)
        info["measured_peak_gb_at_batch"] = round(peaks[1] / 1e9, 2)
    n_batches = 2 if name == "imagenet" else 3
    units, imgs = work(base.input_shape, 2, n_batches * batch // 2, batch, dev)
    samples = sum(u.n_samples for u in units)
    if eager:
        cases = {k: (lambda r=r: timed(bench, r, units, imgs)) for k, r in replicas.items()}
        times = interleaved(bench, cases, repeats=2 if name == "imagenet" else 3)
        for k, secs in times.items():
            bench.row(**info, precision=k, compiled=False, **rates(bench, samples, secs, flops))
    if compiled:
        # cuDNN autotuning as the profile section found best on this machine (off when it did not run).
        torch.backends.cudnn.benchmark = bench.best_cudnn_benchmark
        held = replicas.get(bench.preset["precision"])  # a model already in the preset's precision
        r = preset_replica(bench, name, base=held.base if held else None)
        compile_s = compile_seconds(bench, r, units, imgs)
        secs = [timed(bench, r, units, imgs) for _ in range(2 if name == "imagenet" else 3)]
        bench.row(
            **info,
            precision=r.config.precision,
            compiled=True,
            preset=preset_settings(r),
            cudnn_benchmark=bench.best_cudnn_benchmark,
            compile_seconds=compile_s,
            **rates(bench, samples, secs, flops),
        )
        torch.backends.cudnn.benchmark = False
    if dev == "cuda" and eager:
        t0 = time.perf_counter()
        auto = Replica(
            replicas["bf16"].base,
            [SIGMA],
            0,
            EngineConfig(batch_size="auto", precision="bf16", channels_last=True),
            device=dev,
        )
        bench.row(
            pair=name,
            auto_batch_size=auto.batch_size,
            probe_seconds=round(time.perf_counter() - t0, 1),
            memory_model_largest_batch=est.largest_batch(torch.cuda.mem_get_info()[1]),
        )
    del replicas, base
    if dev == "cuda":
        torch.cuda.empty_cache()


KERNEL_KINDS = (  # first match wins: (kind, substrings of the CUDA kernel name, lower case)
    ("fused (triton)", ("triton",)),
    ("attention", ("fmha", "flash", "attention", "efficient_attention")),
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("convolution", ("fprop", "conv", "implicit", "winograd", "dgrad")),
    ("matmul", ("gemm", "nvjet", "cutlass", "matmul", "addmm", "bmm")),
    ("normalisation", ("norm", "moments", "welford")),
    ("resize", ("upsample", "bicubic", "bilinear", "interp")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "copy", "cat", "reduce", "softmax", "silu", "gelu")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def matmul_ceiling(bench: Bench) -> None:
    """The measured bf16 matrix-product rate (8192^3, random data), the ceiling the peak share is read against."""
    n = 256 if bench.args.smoke else 8192
    a, b = (torch.randn((n, n), device=bench.device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    secs = []
    for _ in range(10):
        bench.sync()
        t0 = time.perf_counter()
        a @ b
        bench.sync()
        secs.append(time.perf_counter() - t0)
    tflops = 2 * n**3 / statistics.median(secs) / 1e12
    bench.ceiling = tflops
    bench.row(test=f"bf16 matrix product {n}^3, random data (median of 10)", tflops=round(tflops, 1))


def imagenet_profile(bench: Bench) -> None:
    """Where the ImageNet pair's time goes (bf16 eager): layout and cuDNN autotuning variants, the
    denoiser and classifier timed alone, and the CUDA kernels by kind over one batch."""
    args, dev = bench.args, bench.device
    name = "imagenet"
    batch = batch_for(bench, name)
    flops = pair_flops(name, args.smoke)

    def replica(cl: bool, b: int = batch, base=None) -> Replica:
        cfg = EngineConfig(batch_size=b, precision="bf16", channels_last=cl)
        return Replica(base if base is not None else build(name, dev, args.smoke), [SIGMA], 0, cfg, device=dev)

    cl, plain = replica(True), replica(False)
    shape = cl.base.input_shape
    big = replica(True, 8 if args.smoke else 128, base=cl.base)
    work_96 = work(shape, 2, batch, batch, dev)
    work_128 = work(shape, 2, big.batch_size, big.batch_size, dev)

    def case(r, w, flag):
        def fn():
            torch.backends.cudnn.benchmark = flag
            return timed(bench, r, *w)

        return fn

    cases = {
        "channels_last, cudnn heuristics": case(cl, work_96, False),
        "channels_last, cudnn.benchmark": case(cl, work_96, True),
        "contiguous, cudnn heuristics": case(plain, work_96, False),
        "contiguous, cudnn.benchmark": case(plain, work_96, True),
        "channels_last, cudnn.benchmark, batch 128": case(big, work_128, True),
    }
    times = interleaved(bench, cases, repeats=3)
    torch.backends.cudnn.benchmark = False
    results = {}
    for k, secs in times.items():
        results[k] = rates(bench, 2 * (big.batch_size if "128" in k else batch), secs, flops)
    bench.row(pair=name, test="bf16 eager variants (engine, 2 batches per timing)", batch=batch, **results)
    best = max(list(results)[:4], key=lambda k: results[k]["samples_per_s"])
    bench.best_cudnn_benchmark = "cudnn.benchmark" in best
    torch.backends.cudnn.benchmark = bench.best_cudnn_benchmark
    del plain, big
    if dev == "cuda":
        torch.cuda.empty_cache()
    # The two halves alone, at the batch and settings of the best variant above.
    base = cl.base
    z = torch.rand((batch, *shape), device=dev).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    sig = torch.full((batch,), SIGMA, device=dev)
    with torch.inference_mode():
        x = base.denoiser(z, sig, None)

    parts = {
        "denoiser": timed_call(bench, lambda: base.denoiser(z, sig, None)),
        "classifier": timed_call(bench, lambda: base.classifier(x)),
        "both": timed_call(bench, lambda: base(z, sig, None)),
    }
    part_times = interleaved(bench, parts, repeats=3)
    part_flops = {
        "denoiser": flops_of(lambda: base.denoiser(z[:2], sig[:2], None)) / 2,
        "classifier": flops_of(lambda: base.classifier(x[:2])) / 2,
    }
    part_flops["both"] = part_flops["denoiser"] + part_flops["classifier"]
    split = {}
    for k, secs in part_times.items():
        ms = statistics.median(secs) * 1e3
        split[k] = {
            "ms_per_batch": round(ms, 2),
            "gflops_per_sample": round(part_flops[k] / 1e9, 1),
            "tflops": round(part_flops[k] * batch / (ms / 1e3) / 1e12, 1),
        }
    bench.row(pair=name, test="halves alone (bf16, channels_last, one batch)", batch=batch, **split)
    bench.row(
        pair=name,
        test="CUDA kernel time by kind, one forward batch (bf16, channels_last)",
        batch=batch,
        **kernels_by_kind(bench, lambda: base(z, sig, None)),
    )


def kernels_by_kind(bench: Bench, forward) -> dict:
    """Device time of one call of ``forward`` (already warm), by kernel kind, and the largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    dev = bench.device
    activities = [ProfilerActivity.CUDA] if dev == "cuda" else [ProfilerActivity.CPU]
    with torch.inference_mode(), profile(activities=activities) as prof:
        forward()
        bench.sync()
    by_kind: dict[str, float] = {}
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        if dev != "cuda":
            us = ev.self_cpu_time_total
        if us <= 0:
            continue
        kind = kernel_kind(ev.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + us
        kernels.append((us, max(ev.count, 1), kind, ev.key[:120]))
    total = sum(by_kind.values()) or 1.0
    kernels.sort(reverse=True)
    # Calls and time per call: a kernel name can stand for many calls (inductor reuses a kernel for
    # every layer of one shape), and only the time per call can be set against the bytes one call moves.
    top = [
        {"share": round(us / total, 3), "calls": n, "ms_per_call": round(us / n / 1e3, 3), "kind": kind, "name": name}
        for us, n, kind, name in kernels[:20]
    ]
    return {
        "total_ms": round(total / 1e3, 2),
        "share_by_kind": {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": top,
    }


def profiled_preset(
    bench: Bench, name: str, keep_code: bool = False, pinned: bool = False
) -> tuple[Replica, int, float, list, dict]:
    """The pair as engine=gpu_compiled runs it: compiled on its first unit, then one batch of the
    compiled shape and layout profiled by kernel (``kernels_by_kind``). Returns the replica, its batch,
    the compile's seconds, inductor's generated modules (with ``keep_code``, compiled with inductor's
    cache off since a cache hit writes no code; else none) and the profile. ``pinned``: the skip
    concatenations pinned channels_last first (bench/layouts.py), the layout torch 2.14.1 gives them."""
    import torch._inductor.config as inductor
    from torch._inductor.utils import run_and_get_code

    dev = bench.device
    batch = batch_for(bench, name)
    r = preset_replica(bench, name)
    if pinned:
        pin_concatenations(r.base)
    units, imgs = work(r.base.input_shape, 1, batch, batch, dev)
    codes: list[str] = []
    if keep_code:
        with inductor.patch(fx_graph_cache=False):
            compile_s, codes = run_and_get_code(lambda: compile_seconds(bench, r, units, imgs))
    else:
        compile_s = compile_seconds(bench, r, units, imgs)
    with torch.inference_mode():  # the inputs as the engine makes them: another grad mode would recompile
        z = torch.rand((batch, *r.base.input_shape), device=dev).to(r.input_dtype)
        if dev == "cuda" and r.config.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        sig = torch.full((batch,), SIGMA, device=dev)
        r._forward(z, sig, None)  # the shape the engine compiled for
    return r, batch, compile_s, codes, kernels_by_kind(bench, lambda: r._forward(z, sig, None))


def compiled_profile(bench: Bench, name: str) -> None:
    """Where the compiled pair's time goes (as engine=gpu_compiled runs it): kernels by kind over one
    batch, inductor's fused kernels counted apart."""
    r, batch, compile_s, _, profile = profiled_preset(bench, name)
    bench.row(
        pair=name,
        test="kernel time by kind, one compiled forward batch (as engine=gpu_compiled)",
        batch=batch,
        preset=preset_settings(r),
        compile_seconds=compile_s,
        **profile,
    )


def generated_kernels(code: str) -> list[str]:
    """Names of the kernels inductor defined in one generated wrapper module, in order."""
    return re.findall(r"^(\w+) = async_compile\.\w+\(", code, re.M)


def kernel_report(code: str, name: str, max_chars: int = 8000) -> dict | None:
    """One generated kernel as inductor wrote it: its source, the wrapper lines that launch it, and the
    lines that allocate the buffers it is handed (their sizes and strides say which layouts it reads
    and writes). ``name`` may be cut short (the profiler's names are); None when no kernel matches."""
    full = next((k for k in generated_kernels(code) if k.startswith(name)), None)
    if full is None:
        return None
    body = re.search(rf"^{re.escape(full)} = async_compile\.\w+\(.*?'''(.*?)'''", code, re.S | re.M)
    source = body.group(1) if body else ""
    wrapper = re.split(r"^def (?:get_args|benchmark_compiled_module)\(", code, maxsplit=1, flags=re.M)[0]
    lines = [line.strip() for line in wrapper.splitlines()]
    launches = [line for line in lines if re.match(rf"{re.escape(full)}(\.run)?\(", line)]
    # The buffers of its launches, followed through reuses (bufA = bufB; del bufB  # reuse) back to
    # the line that allocated them (a library kernel's output by its metadata check); graph inputs by
    # their size-and-stride checks. The standalone harness at the end (random stand-ins) is left out.
    wanted, seen, buffers = set(re.findall(r"\b(?:buf\d+|arg\d+_\d+)\b", " ".join(launches))), set(), []
    while wanted - seen:
        buf = min(wanted - seen)
        seen.add(buf)
        for line in lines:
            if line.startswith(f"{buf} = "):
                buffers.append(line)
                rhs = line.split("=", 1)[1].strip()
                if rhs.startswith(("buf", "reinterpret_tensor(buf")):  # a reuse or a view, not a kernel's inputs
                    wanted |= set(re.findall(r"\bbuf\d+\b", rhs.split(";")[0]))
            elif line.startswith(f"assert_tensor_metadata({buf},") or (
                line.startswith("assert_size_stride") and re.search(rf"\b{buf}\b", line)
            ):
                buffers.append(line)
    if len(source) > max_chars:
        source = f"{source[:max_chars]}\n... ({len(source) - max_chars} more characters)"
    return {"kernel": full, "source": source, "launches": launches[:3], "buffers": list(dict.fromkeys(buffers))[:20]}


def kernel_sources(bench: Bench, name: str, top: int = 6, pinned: bool = False) -> None:
    """The compiled pair's slowest fused kernels as inductor generated them: run 9's largest (a
    GroupNorm-then-SiLU pass, 3 calls of 19.2 ms each, several times what its bytes take at the memory
    bandwidth) is to be read, not guessed at. Compiles with inductor's cache off (a cache hit writes
    no code), then profiles one batch; the row keeps that profile by kind too, so one compile answers
    both where the time goes and what the slowest kernels do. ``pinned``: see ``profiled_preset``."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    r, batch, compile_s, codes, profile = profiled_preset(bench, name, keep_code=True, pinned=pinned)
    graphs = counters["stats"]["unique_graphs"] - graphs  # 1: the profiled batch ran the code kept here
    slowest = [k for k in profile["top_kernels"] if k["kind"] == "fused (triton)"][:top]
    if not slowest:  # a CPU (--smoke): its profile does not name inductor's kernels; the first defined
        slowest = [{"name": k} for code in codes for k in generated_kernels(code)][:top]
    kernels = []
    for k in slowest:
        report = next((rep for code in codes if (rep := kernel_report(code, k["name"])) is not None), None)
        kernels.append({key: k[key] for key in ("name", "calls", "ms_per_call", "share") if key in k} | (report or {}))
    layout = ", skip concatenations pinned channels_last" if pinned else ""
    bench.row(
        pair=name,
        test=f"the slowest fused kernels' generated source, launches and buffers (as engine=gpu_compiled{layout})",
        batch=batch,
        preset=preset_settings(r),
        compile_seconds=compile_s,
        generated_modules=len(codes),
        graphs_compiled=graphs,
        pinned_concatenations=pinned_concatenations(r.base),
        **profile,
        kernels=kernels,
    )


SDPA_BACKENDS = ("default", "cudnn", "efficient", "flash", "math")  # default: what PyTorch picks itself


def sdpa_backend(name: str):
    """A context that lets scaled_dot_product_attention use only the named backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name == "default":
        return contextlib.nullcontext()
    kinds = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel([kinds[name]])


def attention_section(bench: Bench) -> None:
    """BEiT-L/512's attention, which takes a relative-position bias (1,025 tokens, 16 heads of 64): flash
    cannot take a bias, so PyTorch picks cuDNN or the memory-efficient kernel, and the eager profile
    (run 3) put attention at 8% of the time for 4.5% of the FLOPs. One BEiT-shaped call per backend,
    with and without the bias, with the bias in rows aligned to 16 elements, at 1,088 tokens, and as
    compiled FlexAttention (the dense bias read inside the kernel, or computed there from the token
    positions as engine.attention=flex does), each with its largest difference from the
    math backend (cuDNN's masked attention has had silent-wrong-result bugs); then the classifier alone
    under each backend that took the bias. All timed interleaved."""
    batch = batch_for(bench, "imagenet")
    heads, tokens, dim = (2, 17, 16) if bench.args.smoke else (16, 1025, 64)
    side = math.isqrt(tokens - 1)  # the patch window (32×32 at 512 px): a class token, then the patches
    window = (side, side)
    cases: dict[str, tuple] = {}  # name: (call returning the output, tokens, which exact output it must match)
    inputs = {}
    for n in (tokens, -(-tokens // 64) * 64):
        g = torch.Generator(device=bench.device).manual_seed(0)
        q, k, v = (torch.randn((batch, heads, n, dim), generator=g, device=bench.device).bfloat16() for _ in range(3))
        if n == tokens:  # BEiT's bias: a (distances, heads) table read at each pair's relative position
            table = torch.randn(((2 * side - 1) ** 2 + 3, heads), generator=g, device=bench.device).bfloat16()
            at = torch.arange(n, device=bench.device)
            bias = table[relative_position_index(window, at[:, None], at[None, :])].permute(2, 0, 1)[None]
        else:
            bias = torch.randn((1, heads, n, n), generator=g, device=bench.device).bfloat16()
        inputs[n] = (q, k, v, bias)
        for backend in SDPA_BACKENDS:
            cases[f"{backend}, {n} tokens, bias"] = (_sdpa(backend, q, k, v, bias), n, True)
            if n == tokens and backend != "math":
                cases[f"{backend}, {n} tokens, no bias"] = (_sdpa(backend, q, k, v, None), n, False)
        if n == tokens:
            aligned = torch.zeros((1, heads, n, -(-n // 16) * 16), device=bench.device, dtype=bias.dtype)
            aligned = aligned[..., :n].copy_(bias)  # a strided view with the same values
            for backend in ("default", "cudnn", "efficient"):
                cases[f"{backend}, {n} tokens, bias in aligned rows"] = (_sdpa(backend, q, k, v, aligned), n, True)
                # engine.attention=sdpa_by_head: the heads as SDPA's batch axis, the samples as its heads
                cases[f"{backend}, {n} tokens, bias in aligned rows, by head"] = (
                    _sdpa_by_head(backend, q, k, v, aligned),
                    n,
                    True,
                )
            # What the model really passes: timm makes the bias contiguous (rows of 1,025, not aligned)
            # and takes q, k, v as strided slices of one packed projection, (B, N, 3, H, D) permuted.
            # Eager and compiled (inductor adds its own copies for alignment): the compiled profile's
            # attention kernel against these says whether the bias, the q/k/v strides or neither costs.
            timm_bias = bias.contiguous()
            packed = torch.cat([t.transpose(1, 2).reshape(batch, n, heads * dim) for t in (q, k, v)], dim=-1)
            for backend in ("default", "cudnn", "efficient"):
                cases[f"{backend}, {n} tokens, timm's bias"] = (_sdpa(backend, q, k, v, timm_bias), n, True)
            cases[f"default, {n} tokens, timm's bias and q/k/v"] = (_timm_sdpa(packed, timm_bias, heads), n, True)
            cases[f"compiled, {n} tokens, timm's bias"] = (_sdpa("default", q, k, v, timm_bias, compiled=True), n, True)
            cases[f"compiled, {n} tokens, timm's bias and q/k/v"] = (
                _timm_sdpa(packed, timm_bias, heads, compiled=True),
                n,
                True,
            )
            cases[f"compiled, {n} tokens, aligned bias, timm's q/k/v"] = (
                _timm_sdpa(packed, aligned, heads, compiled=True),
                n,
                True,
            )
            # engine.attention=sdpa_by_head as the model calls it: the bare call by head took 2.13 ms
            # against 2.67 (run 12) but the compiled pair gained 1.005x; with timm's strided q/k/v and
            # the output merged for the projection, both orders, these say where the gain went.
            for by_head in (False, True):
                order = "by head" if by_head else "by sample"
                for compiled in (False, True):
                    how = "compiled" if compiled else "default"
                    cases[f"{how}, {n} tokens, aligned bias, timm's q/k/v, merged, {order}"] = (
                        _timm_sdpa(packed, aligned, heads, compiled=compiled, by_head=by_head, merged=True),
                        n,
                        True,
                    )
            cases[f"flex (compiled), {n} tokens, bias"] = (_flex(q, k, v, bias), n, True)
            score_mod = relative_position_score_mod(table, window)  # engine.attention=flex: no N×N tensor read
            cases[f"flex (compiled), {n} tokens, bias from positions"] = (_flex(q, k, v, None, score_mod), n, True)
    timers, failed, errors = {}, {}, {}
    for n, (q, k, v, bias) in inputs.items():
        exact = {True: _sdpa("math", q, k, v, bias)().float(), False: _sdpa("math", q, k, v, None)().float()}
        for key, (fn, size, with_bias) in cases.items():
            if size != n:
                continue
            try:
                out = fn()
            except Exception as exc:  # noqa: BLE001 - a backend that cannot take these inputs is a result here
                failed[key] = f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0][:120]
                continue
            timers[key] = timed_call(bench, fn)
            errors[key] = float((out.float() - exact[with_bias]).abs().max())
        del exact
    times = interleaved(bench, timers, repeats=5)
    res = {}
    for key, secs in times.items():
        seconds = statistics.median(secs)
        res[key] = {
            "ms": round(seconds * 1e3, 3),
            "tflops": round(4.0 * batch * heads * cases[key][1] ** 2 * dim / seconds / 1e12, 1),
            "max_abs_error_vs_math": round(errors[key], 5),  # bf16 outputs of N(0,1)-sized values
        }
    bench.row(
        pair="imagenet",
        test=f"BEiT attention call by SDPA backend (batch {batch}, {heads} heads of {dim}, bf16)",
        **res,
        unavailable=failed,
    )
    del inputs, cases, timers
    usable = [b for b in SDPA_BACKENDS if f"{b}, {tokens} tokens, bias" in res]
    classifier_by_backend(bench, batch, usable)


def classifier_by_backend(bench: Bench, batch: int, backends: list[str]) -> None:
    """The ImageNet classifier (BEiT-L/512, bf16 eager) alone on the denoiser's output size, per backend."""
    pair = build("imagenet", bench.device, bench.args.smoke)
    clf = pair.classifier.to(torch.bfloat16)
    x = torch.rand((batch, *pair.input_shape), device=bench.device).bfloat16()
    flops = flops_of(lambda: clf(x[:2])) / 2

    def classify(backend: str):
        def fn():
            with sdpa_backend(backend):
                clf(x)

        return fn

    times = interleaved(bench, {b: timed_call(bench, classify(b)) for b in backends}, repeats=3)
    res = {b: rates(bench, batch, secs, flops) for b, secs in times.items()}
    bench.row(pair="imagenet", test="classifier alone by SDPA backend (bf16 eager)", batch=batch, **res)


def _sdpa(backend: str, q, k, v, bias, compiled: bool = False):
    attend = (
        torch.compile(F.scaled_dot_product_attention, dynamic=False) if compiled else F.scaled_dot_product_attention
    )

    def fn():
        with sdpa_backend(backend), torch.inference_mode():
            return attend(q, k, v, attn_mask=bias)

    return fn


def _sdpa_by_head(backend: str, q, k, v, bias):
    """SDPA on (heads, samples, tokens, width) views with the bias (heads, 1, N, N), as
    engine.attention=sdpa_by_head calls it; the output in the usual (samples, heads, ...) order."""
    qh, kh, vh, bh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), bias.transpose(0, 1)

    def fn():
        with sdpa_backend(backend), torch.inference_mode():
            return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bh).transpose(0, 1)

    return fn


def _timm_sdpa(packed, bias, heads: int, compiled: bool = False, by_head: bool = False, merged: bool = False):
    """SDPA on q, k, v sliced from one packed (B, N, 3·H·D) projection as timm's BEiT slices them.
    ``by_head``: as engine.attention=sdpa_by_head calls it (heads as SDPA's batch axis, the bias
    (H, 1, N, N)). ``merged``: the output also laid out as (B, N, H·D) for the projection after it, as the
    model does (a copy unless SDPA wrote it in that order), returned as a (B, H, N, D) view of it."""

    def attend(qkv, mask):
        b, n, _ = qkv.shape
        parts = qkv.view(b, n, 3, heads, -1)
        if by_head:  # as the model calls it
            out = attend_by_head(parts, mask).transpose(1, 2)
        else:
            q, k, v = parts.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if merged:
            out = out.transpose(1, 2).reshape(b, n, -1).view(b, n, heads, -1).transpose(1, 2)
        return out

    call = torch.compile(attend, dynamic=False) if compiled else attend

    def fn():
        with torch.inference_mode():
            return call(packed, bias)

    return fn


def _flex(q, k, v, bias, score_mod=None):
    """BEiT's attention as FlexAttention: the per-head relative-position bias added to each score, read
    from the dense bias or computed by ``score_mod``."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    if score_mod is None:
        dense = bias[0]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + dense[h, q_idx, kv_idx]

    def fn():
        with torch.inference_mode():
            return flex(q, k, v, score_mod=score_mod)

    return fn


def layout_section(bench: Bench, name: str) -> None:
    """bf16 with channels_last against contiguous (PyTorch's default) layout, eager and compiled, timed
    interleaved."""
    args, dev = bench.args, bench.device
    batch = batch_for(bench, name)
    flops = pair_flops(name, args.smoke)
    bases = {cl: build(name, dev, args.smoke) for cl in (True, False)}

    def replica(cl: bool, compiled: bool) -> Replica:
        cfg = EngineConfig(batch_size=batch, precision="bf16", channels_last=cl, compile=compiled)
        return Replica(bases[cl], [SIGMA], 0, cfg, device=dev)

    replicas = {
        "eager, channels_last": replica(True, False),
        "eager, contiguous": replica(False, False),
        "compiled, channels_last": replica(True, True),
        "compiled, contiguous": replica(False, True),
    }
    n_batches = 2 if name == "imagenet" else 3
    units, imgs = work(bases[True].input_shape, 2, n_batches * batch // 2, batch, dev)
    samples = sum(u.n_samples for u in units)
    # Compile each compiled replica before the timed rounds.
    compile_s = {k: compile_seconds(bench, r, units, imgs) for k, r in replicas.items() if k.startswith("compiled")}
    cases = {k: (lambda r=r: timed(bench, r, units, imgs)) for k, r in replicas.items()}
    times = interleaved(bench, cases, repeats=3)
    res = {}
    for k, secs in times.items():
        res[k] = rates(bench, samples, secs, flops)
        if k in compile_s:
            res[k]["compile_seconds"] = compile_s[k]
    bench.row(pair=name, test="bf16 layout, eager and compiled (interleaved)", batch=batch, **res)


def freezing_section(bench: Bench, name: str) -> None:
    """Compiled with inductor's freezing (weights folded in as constants), contiguous layout (Dynamo's
    cache is fresh for each section, so this compiles anew); the comparison is with the layout
    section's compiled rows of this call (not interleaved)."""
    import torch._inductor.config as inductor

    args, dev = bench.args, bench.device
    batch = batch_for(bench, name)
    base = build(name, dev, args.smoke)
    flops = pair_flops(name, args.smoke)
    units, imgs = work(base.input_shape, 2, batch, batch, dev)
    samples = sum(u.n_samples for u in units)
    saved, inductor.freezing = inductor.freezing, True
    try:
        r = Replica(base, [SIGMA], 0, EngineConfig(batch_size=batch, precision="bf16", compile=True), device=dev)
        compile_s = compile_seconds(bench, r, units, imgs)
        secs = [timed(bench, r, units, imgs) for _ in range(3)]
    finally:
        inductor.freezing = saved
    res = rates(bench, samples, secs, flops)
    bench.row(
        pair=name, test="bf16 compiled, contiguous, inductor freezing", batch=batch, compile_seconds=compile_s, **res
    )


def preset_replica(bench: Bench, name: str, base=None, **engine) -> Replica:
    """A replica of the pair as ``engine=gpu_compiled`` runs it, with ``engine`` (EngineConfig fields)
    on top. Without ``base`` it gets its own model, so each compiles on its own."""
    cfg = EngineConfig(batch_size=batch_for(bench, name), **(bench.preset | engine))
    base = base if base is not None else build(name, bench.device, bench.args.smoke)
    return Replica(base, [SIGMA], 0, cfg, device=bench.device)


def preset_settings(r: Replica) -> dict:
    """The speed settings a replica really ran with (a failed compile leaves it eager and default)."""
    return {k: getattr(r.config, k) for k in PRESET_FIELDS}


def compare_compiled(bench: Bench, name: str, test: str, replicas: dict, **extra) -> None:
    """Compiled variants of a pair, each compiled first, then timed interleaved. Every variant after
    the first also gets its speed-up over the first (median and spread of per-repeat ratios; > 1:
    faster) and the labels it gives differently on the same noise."""
    batch = batch_for(bench, name)
    flops = pair_flops(name, bench.args.smoke)
    units, imgs = work(next(iter(replicas.values())).base.input_shape, 2, batch, batch, bench.device)
    samples = sum(u.n_samples for u in units)
    compile_s = {}
    for k, r in replicas.items():  # printed as they finish: a run killed in a long compile still says it
        compile_s[k] = compile_seconds(bench, r, units, imgs)
        print(f"   {name} {k}: compiled in {compile_s[k]} s", flush=True)
        bench.out.setdefault("compiles", []).append({"pair": name, "test": test, "variant": k, "seconds": compile_s[k]})
        bench.save()
    failed = [k for k, r in replicas.items() if not r.config.compile]  # went back to eager
    if failed:
        bench.row(pair=name, test=test, failed=f"torch.compile failed for {', '.join(failed)}; see the log")
        return
    counts = {k: r.run(units, imgs) for k, r in replicas.items()}  # also the timed rounds' warm-up
    cases = {k: (lambda r=r: timed(bench, r, units, imgs)) for k, r in replicas.items()}
    times = interleaved(bench, cases, repeats=3, warm_up=False)
    first = next(iter(replicas))
    res = {k: rates(bench, samples, secs, flops) | {"compile_seconds": compile_s[k]} for k, secs in times.items()}
    for k in list(replicas)[1:]:
        ratios = [a / b for a, b in zip(times[first], times[k], strict=True)]
        res[k]["speedup"] = {
            "median": round(statistics.median(ratios), 3),
            "spread": [round(min(ratios), 3), round(max(ratios), 3)],
        }
        res[k]["labels_differing"] = sum(int(np.abs(counts[k][u.key] - counts[first][u.key]).sum()) // 2 for u in units)
    bench.row(pair=name, test=test, batch=batch, of_samples=samples, **extra, **res)


def layers_of(r: Replica, class_name: str) -> int:
    """How many modules of a replica's model a speed setting switched to its class ``class_name``."""
    return sum(type(m).__name__ == class_name for m in r.base.modules())


def attention_kernel_section(bench: Bench, name: str = "imagenet") -> None:
    """The compiled pair with BEiT's attention as timm's SDPA call and as FlexAttention
    (engine.attention=flex: the bias computed inside the kernel)."""
    replicas = {kernel: preset_replica(bench, name, attention=kernel) for kernel in ("sdpa", "flex")}
    layers = layers_of(replicas["flex"], "FlexBeitAttention")
    test = "bf16 compiled, channels_last: BEiT attention as SDPA and as FlexAttention (interleaved)"
    compare_compiled(bench, name, test, replicas, flex_layers=layers)


def compile_mode_section(bench: Bench, name: str = "imagenet") -> None:
    """The compiled pair in torch.compile's default mode and in max-autotune without CUDA graphs
    (engine.compile_mode): inductor benchmarks Triton templates against the library kernels for every
    matmul and convolution at compile time and keeps the fastest. CUDA graphs would only save launch
    time, which is nothing beside a 0.6 s batch."""
    replicas = {
        mode: preset_replica(bench, name, compile_mode=mode) for mode in ("default", "max-autotune-no-cudagraphs")
    }
    test = "bf16 compiled, channels_last: torch.compile's default mode and max-autotune (interleaved)"
    compare_compiled(bench, name, test, replicas)


def cached_bias_section(bench: Bench, name: str = "imagenet") -> None:
    """The compiled pair (as the presets run it) with timm's per-forward BEiT bias against
    ``engine.attention=sdpa_cached`` (each layer's bias computed once per replica, in aligned rows).
    Compiled, each BEiT attention call took about 4.5 ms in run 5 against 2.53 ms for the same call
    alone with an aligned bias; this says whether the bias is what costs the difference."""
    replicas = {kernel: preset_replica(bench, name, attention=kernel) for kernel in ("sdpa", "sdpa_cached")}
    layers = layers_of(replicas["sdpa_cached"], "CachedBiasBeitAttention")
    test = "bf16 compiled, channels_last: BEiT's bias per forward (timm) against cached in aligned rows"
    compare_compiled(bench, name, test, replicas, cached_layers=layers)


def group_norm_section(bench: Bench, name: str = "imagenet") -> None:
    """The compiled pair (as the presets run it, the skip concatenations pinned as the project's torch
    lays them out) with PyTorch's GroupNorm against ``engine.group_norm=channels_last``. In the code
    inductor generates for a GPU (bench/codegen.py), PyTorch's GroupNorm leaves transposing kernels in the
    UNet's attention blocks and reads its statistics a group's few channels at a time (0.69 GB per
    ImageNet sample in runs shorter than 128 bytes; run 11 timed those passes at 42% of the bandwidth);
    the twin does neither. Run 10 measured an earlier twin on the free layout (1.013x, 0.975x)."""
    test = "PyTorch's GroupNorm against GroupNorm in the activations' layout"
    pinned_comparison(bench, name, "group_norm", ("native", "channels_last"), "ChannelsLastGroupNorm", test)


def pinned_comparison(bench: Bench, name: str, setting: str, kinds: tuple[str, str], twin: str, test: str) -> None:
    """The compiled pair as the presets run it, with the skip concatenations pinned as the project's
    torch lays them out (runs 10-11), and one engine setting each way: compiled, timed interleaved,
    with the labels the second gives differently."""
    replicas = {kind: preset_replica(bench, name, **{setting: kind}) for kind in kinds}
    for r in replicas.values():
        pinned = pin_concatenations(r.base)
    layers = layers_of(replicas[kinds[1]], twin)
    test = f"bf16 compiled, channels_last, skip concatenations pinned: {test}"
    compare_compiled(bench, name, test, replicas, pinned_concatenations=pinned, switched_layers=layers)


def gelu_section(bench: Bench, name: str = "imagenet") -> None:
    """timm's MLP against ``engine.gelu=epilogue``: the classifier's first MLP matmul and its GELU as one
    cuBLASLt call (bias and tanh GELU in the epilogue). In the code inductor generates, the GELU is a
    pass of its own over the MLP's widest activation: BEiT-L's 24 of them move 0.40 GB per sample, 11%
    of inductor's bytes (bench/codegen.py), and took 0.65 ms each in run 11. Whether the epilogue costs
    the matmul less than that, and how many labels the tanh form changes, is measured."""
    test = "timm's MLP against fc1 and GELU in one cuBLASLt call"
    pinned_comparison(bench, name, "gelu", ("native", "epilogue"), "EpilogueGeluMlp", test)


def by_head_section(bench: Bench, name: str = "imagenet") -> None:
    """BEiT's attention with the cached bias, batched by sample (``sdpa_cached``, the presets') against
    batched by head (``sdpa_by_head``). If the fused kernel walks (sample, head) pairs with the heads
    innermost, as such kernels usually do, it reads each head's bias once per sample: 3.3 GB per layer at
    96 samples, about the 1.1 ms the biased call took beyond the unbiased one (2.53 against 1.42 ms, run
    5). By head, a head's 2 MB of bias serves all its samples in turn, where L2 can hold it. Same values;
    measured here (run 12: 1.005x)."""
    test = "BEiT attention batched by sample against by head"
    pinned_comparison(bench, name, "attention", ("sdpa_cached", "sdpa_by_head"), "ByHeadBeitAttention", test)


def concat_layout_section(bench: Bench, name: str = "imagenet") -> None:
    """The compiled pair (as the presets run it) with the UNet's skip concatenations left to inductor
    and pinned to channels_last (bench/layouts.py). Under the GPU image's torch 2.11 the free ones are
    written channels-first and read back with strided gathers (112.6 M elements per ImageNet sample,
    bench/codegen.py); torch 2.14.1, the project's pin, generates the pinned code by itself. So the
    speed-up is what our pinned torch gains over the image's in these kernels, measured on the image."""
    replicas = {variant: preset_replica(bench, name) for variant in ("free", "pinned")}
    pinned = pin_concatenations(replicas["pinned"].base)
    test = "bf16 compiled, channels_last: the UNet's skip concatenations laid out by inductor against pinned"
    compare_compiled(bench, name, test, replicas, pinned_concatenations=pinned)


def coordinate_descent_section(bench: Bench, name: str = "imagenet") -> None:
    """The compiled pair (as the presets run it) with inductor's coordinate-descent tuning alone: block
    sizes tuned for its own Triton kernels (the fused norm, activation and layout passes, 36% of the
    compiled time in run 5), the library matmuls and convolutions left as they are. max-autotune does
    this too, but its template search over every matmul and convolution shape had not finished after
    8 minutes of compiling (run 6). Not an engine setting yet: the replica's compiled forward is
    replaced here, so the variant is measured before it is offered. Both replicas have their skip
    concatenations pinned (bench/layouts.py): the kernels worth tuning are those of the layout the
    project's torch generates, not the GPU image's strided gathers (runs 10-11)."""
    replicas = {variant: preset_replica(bench, name) for variant in ("default", "coordinate descent")}
    for r in replicas.values():
        pinned = pin_concatenations(r.base)
    tuned = replicas["coordinate descent"]
    if tuned.config.compile:
        tuned._forward = tuned._compiled(coordinate_descent_tuning=True)  # the engine's recipe, tuning on top
    test = (
        "bf16 compiled, channels_last, skip concatenations pinned: default against coordinate-descent "
        "tuning of inductor's kernels"
    )
    compare_compiled(bench, name, test, replicas, pinned_concatenations=pinned)


def cifar_extras(bench: Bench) -> None:
    """Unit size, lattice noise, the reference loop, and host syncs, on the CIFAR pair in bf16."""
    args, dev = bench.args, bench.device
    base = build("cifar10", dev, args.smoke)  # float32: the reference loop and the fp32 engine
    base16 = build("cifar10", dev, args.smoke)  # converted to bf16 by the first replica that holds it
    batch = 8 if args.smoke else 1000
    total = 40 if args.smoke else 20_000
    bf16 = Replica(base16, [SIGMA], 0, EngineConfig(batch_size=batch, precision="bf16", channels_last=True), device=dev)
    lattice = Replica(
        base16,
        [SIGMA],
        0,
        EngineConfig(batch_size=batch, precision="bf16", channels_last=True, noise="lattice", levels=255),
        device=dev,
    )
    small = work(base.input_shape, total // 125 if not args.smoke else 4, 125 if not args.smoke else 10, 125, dev)
    large = work(base.input_shape, 2, total // 2, 10_000, dev, seed=1)
    # Lattice noise needs images on the 8-bit grid.
    q_units, q_imgs = large[0], {i: (x * 255).round() / 255 for i, x in large[1].items()}
    cases = {
        "units_125": lambda: timed(bench, bf16, *small),
        "units_10000": lambda: timed(bench, bf16, *large),
        "gaussian": lambda: timed(bench, bf16, q_units, q_imgs),
        "lattice": lambda: timed(bench, lattice, q_units, q_imgs),
    }
    times = interleaved(bench, cases, repeats=2)
    res = {k: summary(sum(u.n_samples for u in (small if k == "units_125" else large)[0]), v) for k, v in times.items()}
    bench.row(
        pair="cifar10",
        test="unit size (bf16 eager)",
        units_125=res["units_125"],
        units_10000=res["units_10000"],
        ratio_125_over_10000=round(res["units_125"]["samples_per_s"] / res["units_10000"]["samples_per_s"], 3),
    )
    bench.row(
        pair="cifar10",
        test="lattice noise cost (bf16 eager)",
        gaussian=res["gaussian"],
        lattice=res["lattice"],
        ratio_lattice_over_gaussian=round(res["lattice"]["samples_per_s"] / res["gaussian"]["samples_per_s"], 3),
    )
    # The reference loop (fp32 as the reference runs it) against the engine, fp32 and bf16.
    images = [x.to(dev) for x in list(small[1].values())[: (2 if args.smoke else 8)]]
    n0, n = (4, 20) if args.smoke else (100, 1000)
    fp32 = Replica(base, [SIGMA], 0, EngineConfig(batch_size=batch, precision="fp32"), device=dev)
    units = [WorkUnit(i, 0, "selection", 0, n0) for i in range(len(images))] + [
        WorkUnit(i, 0, "estimation", 0, n) for i in range(len(images))
    ]
    imgs = {i: x for i, x in enumerate(images)}
    cases = {
        "reference_fp32": lambda: reference_certify_counts(base, images, SIGMA, n0, n, batch, dev),
        "engine_fp32": lambda: timed(bench, fp32, units, imgs),
        "engine_bf16": lambda: timed(bench, bf16, units, imgs),
    }
    times = interleaved(bench, cases, repeats=3)
    samples = len(images) * (n0 + n)
    res = {k: summary(samples, v) for k, v in times.items()}
    bench.row(
        pair="cifar10",
        test=f"reference loop vs engine (n0={n0}, n={n}, batch {batch})",
        **res,
        engine_fp32_over_reference=round(
            res["engine_fp32"]["samples_per_s"] / res["reference_fp32"]["samples_per_s"], 2
        ),
    )
    if dev == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                bf16.run(*large)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        bench.row(
            pair="cifar10",
            test="host syncs in one run of 20,000 samples (20 batches)",
            syncs=len(syncs),
            messages=sorted(set(syncs))[:5],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would run past this")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM 989, PCIe 756)")
    parser.add_argument("--peak-source", default="NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks the script, measures nothing")
    parser.add_argument("--precisions", default="fp32,bf16-mixed,bf16", help="eager precisions to compare")
    parser.add_argument(
        "--sections",
        default="ceiling,imagenet-layout,cifar10-layout,cifar10-extras,imagenet",
        help="comma-separated, run in this order (or all: about 30 minutes on an H100)",
    )
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device (use --smoke to check the script on a CPU)")
    bench = Bench(args)
    # name: (title, seconds it needs at least on an H100 (measured), callable)
    known = {
        "ceiling": ("bf16 matrix-product ceiling", 15, lambda: matmul_ceiling(bench)),
        "imagenet-layout": (
            "imagenet: layout, eager and compiled",
            230,
            lambda: layout_section(bench, "imagenet"),
        ),
        "cifar10-layout": ("cifar10: layout, eager and compiled", 110, lambda: layout_section(bench, "cifar10")),
        "cifar10-extras": (
            "cifar10: unit size, lattice noise, reference loop, syncs",
            60,
            lambda: cifar_extras(bench),
        ),
        "imagenet": ("imagenet: eager precisions, memory, auto batch", 60, lambda: pair_section(bench, "imagenet")),
        "cifar10": (
            "cifar10: eager precisions, memory, auto batch, bf16 compiled",
            120,
            lambda: pair_section(bench, "cifar10", compiled=True),
        ),
        "imagenet-profile": ("imagenet: where the time goes", 90, lambda: imagenet_profile(bench)),
        "imagenet-profile-compiled": (
            "imagenet: where the compiled time goes",
            130,
            lambda: compiled_profile(bench, "imagenet"),
        ),
        "imagenet-kernels": (
            "imagenet: the slowest fused kernels' generated source",
            150,  # a compile without inductor's cache (54-83 s in runs 7 and 5), one profiled batch
            lambda: kernel_sources(bench, "imagenet"),
        ),
        "imagenet-kernels-pinned": (
            "imagenet: the slowest fused kernels and the time by kind, skip concatenations pinned",
            150,  # as imagenet-kernels: one compile without inductor's cache (64-90 s in run 10)
            lambda: kernel_sources(bench, "imagenet", pinned=True),
        ),
        "imagenet-freezing": ("imagenet: compiled with freezing", 130, lambda: freezing_section(bench, "imagenet")),
        "imagenet-attention": ("imagenet: attention by SDPA backend", 90, lambda: attention_section(bench)),
        "imagenet-flex": (
            "imagenet: compiled, attention as SDPA and as FlexAttention",
            260,  # two compiles of the pair (92 and 83 s) and the timed rounds: 256 s in run 5
            lambda: attention_kernel_section(bench, "imagenet"),
        ),
        "imagenet-autotune": (
            "imagenet: compiled in the default mode and in max-autotune",
            560,  # run 6: max-autotune's compile alone ran past 500 s without finishing
            lambda: compile_mode_section(bench, "imagenet"),
        ),
        "imagenet-bias": (
            "imagenet: compiled, BEiT's bias per forward and cached in aligned rows",
            260,  # two compiles of the pair (83-92 s each in run 5) and the timed rounds
            lambda: cached_bias_section(bench, "imagenet"),
        ),
        "imagenet-groupnorm": (
            "imagenet: compiled, PyTorch's GroupNorm and GroupNorm in the activations' layout, concatenations pinned",
            200,  # two compiles of the pair (54-83 s each, runs 7 and 5) and the timed rounds
            lambda: group_norm_section(bench, "imagenet"),
        ),
        "cifar10-groupnorm": (
            "cifar10: compiled, PyTorch's GroupNorm and GroupNorm in the activations' layout, concatenations pinned",
            150,  # two compiles of the pair (49 s in run 4) and the timed rounds
            lambda: group_norm_section(bench, "cifar10"),
        ),
        "imagenet-gelu": (
            "imagenet: compiled, timm's MLP and its GELU in the matmul's epilogue, concatenations pinned",
            200,  # two compiles of the pair (54-90 s each, runs 7 and 10) and the timed rounds
            lambda: gelu_section(bench, "imagenet"),
        ),
        "imagenet-by-head": (
            "imagenet: compiled, BEiT's attention batched by sample and by head, concatenations pinned",
            200,  # two compiles of the pair (54-90 s each, runs 7 and 10) and the timed rounds
            lambda: by_head_section(bench, "imagenet"),
        ),
        "cifar10-gelu": (
            "cifar10: compiled, timm's MLP and its GELU in the matmul's epilogue, concatenations pinned",
            150,  # two compiles of the pair (49 s in run 4) and the timed rounds
            lambda: gelu_section(bench, "cifar10"),
        ),
        "imagenet-concat": (
            "imagenet: compiled, the skip concatenations laid out by inductor and pinned channels_last",
            200,  # two compiles of the pair (54-83 s each, runs 7 and 5) and the timed rounds
            lambda: concat_layout_section(bench, "imagenet"),
        ),
        "imagenet-coordesc": (
            "imagenet: compiled in the default mode and with coordinate-descent tuning, concatenations pinned",
            500,  # run 7: the tuned compile alone took 390 s (the default one 83 s), then the timed rounds
            lambda: coordinate_descent_section(bench, "imagenet"),
        ),
        "imagenet-compiled": (
            "imagenet: bf16 compiled",
            200,
            lambda: pair_section(bench, "imagenet", eager=False, compiled=True),
        ),
    }
    wanted = list(known) if args.sections == "all" else args.sections.split(",")
    unknown = [w for w in wanted if w not in known]
    if unknown:
        sys.exit(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(known)} or all")
    sections = [known[w] for w in wanted]
    for title, need, fn in sections:
        if bench.left() < need and not args.smoke:
            bench.out["skipped"].append(f"{title} (needs ~{need} s, {bench.left():.0f} s left)")
            bench.save()
            continue
        print(f"== {title} ({bench.left():.0f} s left)", flush=True)
        bench.out["in_progress"] = title  # a run killed at its limit still says where it stopped
        bench.save()
        # Every pair shares one forward code object: without a fresh Dynamo cache a variant of the same
        # structure would reuse an earlier section's compile (its compile time then says nothing), and
        # the versions would pile up towards the engine's recompile limit. A fresh cache per section
        # compiles each of its replicas for real (inductor's on-disk cache still saves repeats).
        torch._dynamo.reset()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - keep what the other sections measure
            bench.out["errors"].append(f"{title}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            bench.save()
            if bench.device == "cuda":
                torch.cuda.empty_cache()
    bench.out.pop("in_progress", None)
    bench.save()
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
