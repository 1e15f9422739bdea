"""How fast the papers' pairs could run on a GPU at best: a roofline model of every operator.

    python bench/roofline.py [--matmul-tflops 779] [--bandwidth-tbs 3.35] [--out bench/results/roofline.json]

The pair runs once on the meta device (shapes only, nothing allocated) in bf16 at the presets' batch
(96 for ImageNet, 1000 for CIFAR-10: a weight is read once per batch). Every operator the model calls
is recorded with its FLOPs (convolutions, linear layers, attention) and the bytes it must read and
write at least (its tensors once each). Three bounds on the time per sample follow, each a best case:

- ``eager``: one kernel per operator, each taking the longer of two times (its FLOPs at the matmul
  rate, its bytes at the memory bandwidth); a GroupNorm reads its input twice (statistics, then
  normalise).
- ``fused``: convolutions, matmuls and attention as library kernels (as inductor calls them), every
  elementwise operator fused away for free, and only the normalisations' passes left.
- ``compute``: FLOPs at the matmul rate and nothing else (what prologue fusion of the norms into the
  convolutions would at most reach).

The rates are inputs: by default the bf16 matrix product measured on the H100 (bench/results/gpu.json,
run 3) and the H100 SXM datasheet's 3.35 TB/s. Reading a measured rate against these bounds tells
which limit a gap belongs to; the share of peak is against 989 TFLOP/s as in bench/gpu.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_runs import runs_of, write_atomic  # noqa: E402

KINDS = {  # aten packet name -> kind; anything else that moves data is "elementwise"
    **dict.fromkeys(("conv2d", "convolution", "_convolution", "cudnn_convolution"), "convolution"),
    **dict.fromkeys(("linear", "addmm", "mm", "bmm", "baddbmm", "matmul"), "matmul"),
    **dict.fromkeys(
        (
            "scaled_dot_product_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_flash_attention",
        ),
        "attention",
    ),
    **dict.fromkeys(("group_norm", "native_group_norm"), "group_norm"),
    **dict.fromkeys(("layer_norm", "native_layer_norm"), "layer_norm"),
}
VIEWS = {  # operators that move no data (views and metadata), or eval-mode identities
    "view", "_unsafe_view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "slice",
    "select", "chunk", "split", "unbind", "flatten", "t", "alias", "detach", "dropout", "unflatten",
}  # fmt: skip


@dataclass
class Op:
    """One operator call: what it computes and the least it must move."""

    name: str
    kind: str
    part: str  # the top-level submodule it ran in (denoiser, classifier, ...)
    flops: float
    bytes_in: int
    bytes_out: int
    spatial: int  # H*W of a 4-d output (the UNet level), else 0


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's distinct elements: a broadcast (stride-0) view counts once."""
    distinct = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            distinct *= size
    return distinct * t.element_size()


def op_flops(name: str, kind: str, args: tuple, out) -> float:
    """FLOPs (a multiply-add is two) of the compute operators, from their shapes."""
    if kind == "convolution":
        w = args[1]
        return 2.0 * out.numel() * math.prod(w.shape[1:])
    if kind == "matmul":
        a = args[1] if name in ("addmm", "baddbmm") else args[0]  # those take the added term first
        return 2.0 * out.numel() * a.shape[-1]
    if kind == "attention":
        q, k = args[0], args[1]  # (..., L, E) and (..., S, E); the output is (..., L, Ev)
        return 2.0 * q.numel() * k.shape[-2] + 2.0 * out.numel() * k.shape[-2]
    return 0.0


class OperatorTrace(TorchDispatchMode):
    """Records every operator call below it as an :class:`Op`."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.part = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        if name in VIEWS or name in ("to", "contiguous", "_to_copy") and not _moves(args, out):
            return out
        kind = KINDS.get(name, "elementwise")
        ins = {id(t): t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        first = outs[0] if outs else None
        self.ops.append(
            Op(
                name=name,
                kind=kind,
                part=self.part,
                flops=op_flops(name, kind, args, first),
                bytes_in=sum(tensor_bytes(t) for t in ins.values()),
                bytes_out=sum(tensor_bytes(t) for t in outs),
                spatial=int(first.shape[-1] * first.shape[-2]) if first is not None and first.dim() == 4 else 0,
            )
        )
        return out


def _moves(args: tuple, out) -> bool:
    """Whether a to/contiguous call made a new tensor (a cast or a layout change) rather than a no-op."""
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    return not (src is not None and isinstance(out, torch.Tensor) and out is src)


def trace(model: torch.nn.Module, inputs: tuple, parts: tuple[str, ...] = ("denoiser", "classifier")) -> list[Op]:
    """Run ``model(*inputs)`` (meta tensors) once and record its operators, each tagged with the
    top-level submodule in ``parts`` it ran in."""
    mode = OperatorTrace()
    hooks = []
    for name in parts:
        sub = getattr(model, name, None)
        if isinstance(sub, torch.nn.Module):
            hooks.append(sub.register_forward_pre_hook(lambda m, a, n=name: setattr(mode, "part", n)))
            hooks.append(sub.register_forward_hook(lambda m, a, o: setattr(mode, "part", "other")))
    try:
        with torch.inference_mode(), mode:
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return mode.ops


def op_seconds(op: Op, model: str, flop_rate: float, bandwidth: float) -> float:
    """The least time one operator can take under a model (see the module docstring)."""
    moved = op.bytes_in + op.bytes_out
    if op.kind in ("convolution", "matmul", "attention"):
        return op.flops / flop_rate if model == "compute" else max(op.flops / flop_rate, moved / bandwidth)
    if model == "compute":
        return 0.0
    if op.kind == "group_norm":  # statistics pass, then normalise: input read twice, output written once
        return (2 * op.bytes_in + op.bytes_out) / bandwidth
    if op.kind == "layer_norm":  # a row fits on one SM: read once, write once
        return moved / bandwidth
    return moved / bandwidth if model == "eager" else 0.0


def seconds_by(ops: list[Op], model: str, flop_rate: float, bandwidth: float, key, batch: int) -> dict[str, float]:
    """Seconds per sample at the ``model`` bound, summed over the operators grouped by ``key(op)``."""
    by: dict[str, float] = {}
    for op in ops:
        by[key(op)] = by.get(key(op), 0.0) + op_seconds(op, model, flop_rate, bandwidth) / batch
    return by


def bounds(ops: list[Op], batch: int, flop_rate: float, bandwidth: float, peak: float) -> dict:
    """Samples/s and share of the peak at each bound, with where the time goes (part and kind)."""
    flops = sum(op.flops for op in ops) / batch
    out: dict = {"gflops_per_sample": round(flops / 1e9, 2)}
    for model in ("eager", "fused", "compute"):
        by = seconds_by(ops, model, flop_rate, bandwidth, lambda op: f"{op.part}: {op.kind}", batch)
        secs = sum(by.values())
        out[model] = {
            "ms_per_sample": round(secs * 1e3, 3),
            "samples_per_s": round(1 / secs, 1),
            "share_of_bf16_peak": round(flops / secs / peak, 4),
            "time_share": {
                k: round(v / secs, 3) for k, v in sorted(by.items(), key=lambda kv: -kv[1]) if v / secs > 0.005
            },
        }
    return out


def unet_levels(ops: list[Op], batch: int, flop_rate: float, bandwidth: float) -> list[dict]:
    """The denoiser by spatial size: FLOPs and the fused bound's time, largest level first (where the
    norms' passes weigh most against the convolutions)."""
    levels: dict[int, list[Op]] = {}
    for op in ops:
        if op.part == "denoiser" and op.spatial >= 16:  # not the 1x1 shapes of the time embedding
            levels.setdefault(op.spatial, []).append(op)
    rows = []
    for spatial, group in sorted(levels.items(), reverse=True):
        fused = sum(op_seconds(op, "fused", flop_rate, bandwidth) for op in group) / batch
        compute = sum(op_seconds(op, "compute", flop_rate, bandwidth) for op in group) / batch
        rows.append(
            {
                "side": int(round(math.sqrt(spatial))),
                "gflops_per_sample": round(sum(op.flops for op in group) / batch / 1e9, 1),
                "fused_ms_per_sample": round(fused * 1e3, 3),
                "norm_share_of_fused": round(1 - compute / fused, 3) if fused else 0.0,
            }
        )
    return rows


BATCH = {"cifar10": 1000, "imagenet": 96}  # the presets' batches: weights are read once per batch


def pair_ops(name: str, batch: int | None = None) -> list[Op]:
    from raysmooth.models.architectures import paper_pair

    batch = batch or BATCH[name]
    model = paper_pair(name, "meta").to(torch.bfloat16)
    z = torch.empty((batch, *model.input_shape), device="meta", dtype=torch.bfloat16)
    sigma = torch.full((batch,), 0.5, device="meta")
    return trace(model, (z, sigma, None))


def measured_rates(runs: list[dict]) -> dict:
    """The best measured bf16 samples/s per "pair mode" (eager or compiled) over the runs of gpu.json.
    The compiled comparisons' variants count too (each row's test begins "bf16 compiled"; the variant is
    named with its test, since "pinned" or "sdpa_cached" alone says nothing)."""
    best: dict = {}
    for run in runs:
        for row in run.get("rows", []):
            cases = {k: v for k, v in row.items() if isinstance(v, dict) and "samples_per_s" in v}
            if row.get("precision") == "bf16" and "samples_per_s" in row:
                cases[("compiled" if row.get("compiled") else "eager") + ", channels_last"] = row
            variants = str(row.get("test", "")).startswith("bf16 compiled")
            for label, v in cases.items():
                mode = "compiled" if label.startswith("compiled") else "eager" if label.startswith("eager") else None
                if mode is None and variants:
                    mode, label = "compiled", f"{label} ({row['test']})"
                if mode and row.get("pair"):
                    key = f"{row['pair']} {mode}"
                    if v["samples_per_s"] > best.get(key, {}).get("samples_per_s", 0):
                        best[key] = {"samples_per_s": v["samples_per_s"], "run": run["run"], "case": label}
    return best


COMPUTE_KINDS = ("convolution", "matmul", "attention")


def pooled(kind: str) -> str:
    """A compute kind stays itself; everything else is pooled."""
    return kind if kind in COMPUTE_KINDS else "everything else"


def kernels_against_bound(
    ops: list[Op], traced_batch: int, name: str, runs: list[dict], flop_rate: float, bandwidth: float
) -> list[dict]:
    """Each measured CUDA-kernel profile of the pair in the runs of gpu.json (kernel time by kind over
    one batch), per sample against the bound of the same kind: the eager bound for an eager profile,
    the fused bound for a compiled one. Everything that is not a convolution, matmul or attention is
    pooled. Profiles written before they carried their batch take the batch of their run's other rows."""
    bound_s = {  # bound model -> pooled kind -> seconds per sample
        model: seconds_by(ops, model, flop_rate, bandwidth, lambda op: pooled(op.kind), traced_batch)
        for model in ("eager", "fused")
    }
    out = []
    for run in runs:
        rows = run.get("rows", [])
        batches = [r["batch"] for r in rows if r.get("pair") == name and isinstance(r.get("batch"), int)]
        for row in rows:
            if row.get("pair") != name or "share_by_kind" not in row or not batches:
                continue
            batch = row.get("batch", batches[0])
            model = "fused" if "compiled" in row["test"] else "eager"
            measured: dict[str, float] = {}
            for kind, share in row["share_by_kind"].items():
                measured[pooled(kind)] = measured.get(pooled(kind), 0.0) + share * row["total_ms"] / batch
            kinds = {}
            for key in (*COMPUTE_KINDS, "everything else"):
                m, b = measured.get(key, 0.0), bound_s[model].get(key, 0.0) * 1e3
                kinds[key] = {
                    "measured_ms_per_sample": round(m, 3),
                    "bound_ms_per_sample": round(b, 3),
                    "measured_over_bound": round(m / b, 2) if b else None,
                }
            out.append({"run": run["run"], "profile": row["test"], "batch": batch, "bound": model, "by_kind": kinds})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matmul-tflops", type=float, default=779.0, help="bf16 matmul rate (gpu.json run 3)")
    parser.add_argument("--bandwidth-tbs", type=float, default=3.35, help="HBM bandwidth (H100 SXM datasheet)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM datasheet)")
    parser.add_argument("--pairs", default="cifar10,imagenet")
    parser.add_argument(
        "--gpu-json",
        type=Path,
        default=ROOT / "bench" / "results" / "gpu.json",
        help="measured runs to read against the bounds: the kept file, or one fresh run of bench/gpu.py",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "roofline.json")
    args = parser.parse_args()
    rate, bw, peak = args.matmul_tflops * 1e12, args.bandwidth_tbs * 1e12, args.peak_tflops * 1e12
    runs = runs_of(json.loads(args.gpu_json.read_text())) if args.gpu_json.exists() else []
    measured = measured_rates(runs)
    result = {
        "benchmark": "roofline bounds of the papers' pairs (a model from operator shapes, not a measurement)",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "assumes": {
            "matmul_tflops": args.matmul_tflops,
            "matmul_source": "bf16 8192^3 matrix product measured on an H100 80GB HBM3 (bench/results/gpu.json run 3)",
            "bandwidth_tbs": args.bandwidth_tbs,
            "bandwidth_source": "H100 SXM datasheet (HBM3)",
            "peak_bf16_tflops": args.peak_tflops,
            "precision": "bf16 weights and activations",
        },
        "pairs": {},
    }
    for name in args.pairs.split(","):
        ops = pair_ops(name)
        row = {"batch": BATCH[name], **bounds(ops, BATCH[name], rate, bw, peak)}
        if name == "imagenet":
            row["denoiser_levels"] = unet_levels(ops, BATCH[name], rate, bw)
        for mode in ("eager", "compiled"):
            m = measured.get(f"{name} {mode}")
            if m:
                m = dict(m, share_of_bf16_peak=round(row["gflops_per_sample"] * 1e9 * m["samples_per_s"] / peak, 4))
                m["of_its_bound"] = round(
                    m["samples_per_s"] / row["eager" if mode == "eager" else "fused"]["samples_per_s"], 3
                )
                row[f"measured_best_{mode}"] = m
        row["kernels_against_bound"] = kernels_against_bound(ops, BATCH[name], name, runs, rate, bw)
        result["pairs"][name] = row
        print(json.dumps({name: row}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, result)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
