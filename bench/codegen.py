"""Inductor's CUDA kernels for the compiled pairs, generated without a GPU, and what their layouts cost.

    python bench/codegen.py                  # ImageNet at 96 and 63, CIFAR at 1000; both GroupNorms and GELUs (~8 min)
    python bench/codegen.py --smoke          # the toy pair (a test of the script)
    python bench/codegen.py --keep-source D  # also each configuration's generated code, under D
    python bench/codegen.py --jobs 1         # one configuration at a time (default: one per core)
    python bench/codegen.py --table          # the results file as docs/performance.md's table

Each configuration (pair, batch, ``engine.group_norm``, whether the UNet's skip concatenations are
pinned channels_last, bench/layouts.py, ``engine.gelu`` and ``engine.attention``) is built as
``engine=gpu_compiled`` runs it (bf16, channels_last) on a pretend H100 (bench/fake_h100.py: fake CUDA tensors,
inductor's real lowering and scheduling, nothing compiled or run), in a process of its own. From the
generated code it counts, per sample, what the GPU profile cannot say by itself:
- strided gathers: elements a pointwise kernel reads with neighbouring threads at least 16 elements
  apart (a 32-byte sector per bf16 element read; the reads of a buffer laid out across the order the
  kernel walks);
- 64-bit indexing: elements of pointwise kernels that index with int64 (a tensor over 2^31 elements);
- transposing launches: kernels tiled in two dimensions whose full-size reads and writes walk memory
  along different axes (a copy between layouts);
- short-run reductions: bytes of reduction kernels that read their input in contiguous runs shorter
  than 128 bytes (PyTorch's GroupNorm statistics on channels_last activations read a group's 8 or 16
  channels, then jump a row);
- kernels still named for PyTorch's GroupNorm (with ``group_norm=channels_last``: inputs that were not
  channels_last, which the twin hands to PyTorch's own path);
- bytes: what inductor itself estimates each kernel moves (its ``kernel_num_gb``: every buffer the kernel
  is handed, read or written once, an in-place one twice), summed over the launches. Against the
  roofline's fused bound this says whether inductor's kernels are slow or simply move more.
Results go to bench/results/codegen.json, one entry per PyTorch version (replaced when rerun): the GPU
image's PyTorch and the project's pin generate different code for the same model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_runs import write_atomic  # noqa: E402

from raysmooth.config import GROUP_NORM_KINDS  # noqa: E402

OUT = ROOT / "bench" / "results" / "codegen.json"
GPU_RUNS = ROOT / "bench" / "results" / "gpu.json"  # the H100 profiles the generated code is checked against
GATHER_STRIDE = 16  # elements: 32 bytes of bf16, one memory sector per thread
SHORT_RUN_BYTES = 128  # a warp's coalesced read of 4-byte words; reductions reading shorter runs are counted
_AXES = {"x": "xnumel", "y": "ynumel", "r0_": "r0_numel"}
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "i64": 8, "i32": 4, "i1": 1}


@dataclass(frozen=True)
class Config:
    """One generated configuration: the pair at a batch, with the engine settings that change its code."""

    pair: str
    batch: int
    group_norm: str = "native"
    concat: str = "free"  # the UNet's skip concatenations left to inductor, or pinned channels_last
    gelu: str = "native"
    attention: str = "sdpa_cached"  # the compiled presets'

    def folder(self) -> str:
        """Where --keep-source puts its code: the pair, batch and GroupNorm, then each setting off its default."""
        parts = [self.pair, f"b{self.batch}", self.group_norm] + ["pinned"] * (self.concat == "pinned")
        parts += [f"gelu_{self.gelu}"] * (self.gelu != "native")
        parts += [f"attention_{self.attention}"] * (self.attention != "sdpa_cached")
        return "-".join(parts)


FULL = [Config("imagenet", b, gn) for b in (96, 63) for gn in GROUP_NORM_KINDS]
FULL += [Config("cifar10", 1000, gn) for gn in GROUP_NORM_KINDS]  # the presets' batch
# The skip concatenations pinned channels_last (bench/layouts.py): what bench/gpu.py's imagenet-concat measures.
FULL += [Config(p, b, gn, "pinned") for p, b in (("imagenet", 96), ("cifar10", 1000)) for gn in GROUP_NORM_KINDS]
# The classifiers' MLP GELU in the matmul's epilogue (raysmooth.models.mlp): what imagenet-gelu measures.
FULL += [Config(p, b, concat="pinned", gelu="epilogue") for p, b in (("imagenet", 96), ("cifar10", 1000))]
# With the epilogue, the compiled presets' setting since run 12, the GroupNorm twin: what imagenet-groupnorm measures.
FULL += [Config(p, b, "channels_last", "pinned", "epilogue") for p, b in (("imagenet", 96), ("cifar10", 1000))]
# BEiT's attention batched by head (raysmooth.models.attention): what imagenet-by-head measures.
FULL += [Config("imagenet", 96, concat="pinned", attention="sdpa_by_head")]
# The toy pair both ways, the second also with the GELU epilogue (a third process would cost CI half a minute;
# the epilogue touches only BEiT's MLP, the twin only the UNet's GroupNorms).
SMOKE = [Config("imagenet", 8, "native"), Config("imagenet", 8, "channels_last", gelu="epilogue")]


def _unit_variable(index: str) -> str | None:
    """The index variable a load or store walks memory along: the term with no coefficient."""
    index = re.sub(r"^tl\.broadcast_to\((.*), \[.*\]\)$", r"\1", index.strip())
    for term in index.split(" + "):
        bare = re.fullmatch(r"\(?((?:x|y|r0_)\d+)\)?", term.strip())
        if bare:
            return bare.group(1)
    return None


def _run_length(var: str, body: str, sizes: dict[str, int]) -> int:
    """How many consecutive elements ``var`` walks before it wraps: its modulus, or its axis's size when
    it is the axis itself; 1 when it steps only every few lanes (an ``index // k``)."""
    m = re.search(rf"^\s*{var} = (.*)$", body, re.M)
    d = m.group(1).strip() if m else ""
    if mod := re.fullmatch(r"\(?(x|y|r0_)index % (\d+)\)?", d):
        return int(mod.group(2))
    if whole := re.fullmatch(r"(x|y|r0_)index", d):
        return sizes.get(_AXES[whole.group(1)], 1)
    return 1


def kernel_table(kernels: dict[str, str], wrapper: str) -> list[dict]:
    """One row per generated Triton kernel: its launches in the wrapper, elements per launch, whether it
    is tiled in two dimensions, transposes or indexes with int64, its strided-gather loads (pointwise
    only), and for a reduction the contiguous run (bytes) it reads its first input in."""
    # Launches with their buffers; a kernel's own benchmark harness (``.run(*args``) is not one.
    calls = Counter(re.findall(r"^\s*(triton_\w+)\.run\((?!\*args)", wrapper, re.M))
    rows = []
    for name, source in kernels.items():
        body = source.split("@triton.jit", 1)[-1]
        # The kernel's code without its benchmark harness (which names the buffers' sizes) or its name:
        # inductor keeps one kernel per code, but the harness can tell apart launches of the same code.
        code = hashlib.sha1(body.split("\ndef get_args", 1)[0].replace(name, "kernel").encode()).hexdigest()
        sizes = {k: int(v) for k, v in re.findall(r"\b(xnumel|ynumel|r0_numel) = (\d+)", body)}
        tiled = "ynumel" in sizes
        gathers = []
        fastest = re.search(r"^\s*(x\d+) = \(?xindex % (\d+)\)?", body, re.M)
        if name.startswith("triton_poi") and not tiled and fastest:
            var = fastest.group(1)
            for index in re.findall(r"tl\.load\(\w+ \+ \((.*?)\), ", body):
                stride = re.search(rf"\b(\d+)\*{var}\b", index)
                if stride and int(stride.group(1)) >= GATHER_STRIDE:
                    gathers.append(index)
        # Full-size accesses (indexed by both tiled axes) walking along different axes: a transpose.
        accesses = re.findall(r"tl\.(?:load|store)\(\w+ \+ \((.*?)\), ", body)
        walks = {
            var.rstrip("0123456789")
            for index in accesses
            if tiled and re.search(r"\bx\d", index) and re.search(r"\by\d", index)
            if (var := _unit_variable(index))
        }
        run_bytes, along = None, None
        first = re.search(r"tl\.load\(in_ptr0 \+ \((.*?)\), ", body)
        if name.startswith(("triton_red", "triton_per")) and first and (var := _unit_variable(first.group(1))):
            dtype = re.search(r"'in_ptr0': '\*(\w+)'", source)
            run_bytes = _run_length(var, body, sizes) * _DTYPE_BYTES.get(dtype.group(1) if dtype else "bf16", 2)
            along = "outputs" if var.startswith("x") else "reduction"  # what neighbouring lanes step over
        num_gb = re.search(r"'kernel_num_gb': ([0-9.eE+-]+)", source)
        rows.append(
            dict(
                kernel=name,
                code=code,
                calls=calls[name],
                bytes=round(float(num_gb.group(1)) * 1e9) if num_gb else None,
                elements=sizes.get("xnumel", 1) * sizes.get("ynumel", 1) * sizes.get("r0_numel", 1),
                tiled=tiled,
                transposing=len(walks) > 1,
                int64="tl.int64" in body,
                reduction_run_bytes=run_bytes,
                reduction_reads_along=along,
                strided_loads=gathers,
            )
        )
    return rows


def _number(kernel: str) -> int:
    """The number inductor appends to a kernel's name, in the order it generated them."""
    tail = kernel.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def summarise(rows: list[dict], batch: int) -> dict:
    """Per-sample totals over a forward's launches, and the strided loads, largest first."""
    pointwise = [r for r in rows if r["kernel"].startswith("triton_poi")]
    strided = sorted(
        (r for r in pointwise if r["strided_loads"]), key=lambda r: r["calls"] * r["elements"], reverse=True
    )
    # One kernel per code under the name it was first generated with, as inductor names it without the
    # benchmark harness (a later launch of the same code may carry other fused operations' names).
    distinct: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: _number(r["kernel"])):
        distinct.setdefault(r.get("code", r["kernel"]), r["kernel"])
    names = list(distinct.values())
    return dict(
        kernels=len(names),
        launches=sum(r["calls"] for r in rows),
        transposing_launches=sum(r["calls"] for r in rows if r["transposing"]),
        strided_gather_elements_per_sample=sum(r["calls"] * r["elements"] * len(r["strided_loads"]) for r in strided)
        // batch,
        int64_pointwise_elements_per_sample=sum(r["calls"] * r["elements"] for r in pointwise if r["int64"]) // batch,
        native_group_norm_kernels=sum(1 for name in names if "native_group_norm" in name),
        kernel_bytes_per_sample=sum(r["calls"] * (r.get("bytes") or 0) for r in rows) // batch,
        kernels_without_bytes=sum(1 for r in rows if r.get("bytes") is None),
        short_run_reduction_bytes_per_sample=sum(
            r["calls"] * (r.get("bytes") or 0)
            for r in rows
            if r["reduction_run_bytes"] is not None and r["reduction_run_bytes"] < SHORT_RUN_BYTES
        )
        // batch,
        strided_loads=[
            dict(kernel=r["kernel"], calls=r["calls"], elements=r["elements"], index=r["strided_loads"])
            for r in strided
        ],
    )


def profile_match(rows: list[dict], top_kernels: list[dict]) -> dict:
    """How many of a GPU profile's fused kernels the generated code has: the same fused operations
    (inductor's name without the number it appends) launched as often per batch; when several qualify,
    the nearest number. A check that the pretend device generates what the real one did."""
    generated = [(*r["kernel"].rsplit("_", 1), r["calls"]) for r in rows]  # (operations, number, launches)
    fused = [k for k in top_kernels if k.get("kind") == "fused (triton)"]
    offsets = []
    for k in fused:
        stem, number = k["name"].rsplit("_", 1)
        same = [abs(int(n) - int(number)) for s, n, calls in generated if s == stem and calls == k.get("calls")]
        if same:
            offsets.append(min(same))
    return dict(fused_kernels=len(fused), found=len(offsets), largest_number_offset=max(offsets, default=None))


def gpu_profiles(
    pair: str, batch: int, group_norm: str, attention: str, torch_version: str, concat: str, gelu: str
) -> list[dict]:
    """The compiled profiles in bench/results/gpu.json taken with this configuration's settings under
    this torch (another version names other kernels, so only the same one is a check): the same
    GroupNorm, attention and GELU, and the skip concatenations pinned exactly when they are here."""
    if not GPU_RUNS.exists():
        return []
    found = []
    for run in json.loads(GPU_RUNS.read_text()).get("runs", []):
        for row in run.get("rows", []):
            preset = row.get("preset") or {}
            if (
                run.get("torch") == torch_version
                and "top_kernels" in row
                and row.get("pair") == pair
                and row.get("batch") == batch
                and preset.get("compile")
                and preset.get("attention") == attention
                and preset.get("group_norm", "native") == group_norm
                and preset.get("gelu", "native") == gelu
                and bool(row.get("pinned_concatenations")) == (concat == "pinned")
            ):
                found.append(dict(run=run.get("run"), top_kernels=row["top_kernels"]))
    return found


def one(config: Config, smoke: bool, keep: Path | None) -> dict:
    """Generate one configuration (this process is patched for good: run it in a process of its own)."""
    import torch
    import torch._inductor.config as inductor
    from fake_h100 import capture, fake_cuda, generate
    from layouts import pin_concatenations
    from torch._subclasses.fake_tensor import FakeTensorMode

    from raysmooth.models.architectures import paper_pair, toy_pair
    from raysmooth.models.attention import set_attention
    from raysmooth.models.mlp import set_gelu
    from raysmooth.models.norms import set_group_norm

    pair, batch, group_norm, concat, gelu, attention = astuple(config)
    start = time.perf_counter()
    model = (toy_pair(pair) if smoke else paper_pair(pair, "meta")).to("meta")
    model = model.eval().to(torch.bfloat16).to(memory_format=torch.channels_last)
    set_attention(model, attention)
    set_group_norm(model, group_norm)
    set_gelu(model, gelu)
    if concat == "pinned":
        pin_concatenations(model)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_cuda(model, mode)
    with mode:
        z = torch.empty((batch, *model.input_shape), device="cuda", dtype=torch.bfloat16)
        z = z.contiguous(memory_format=torch.channels_last)
        sigma = torch.full((batch,), 0.5, device="cuda")
    gm, example_inputs = capture(model, z, sigma, None)
    with inductor.patch(benchmark_kernel=True):  # each kernel's metadata then carries its bytes
        code = generate(gm, example_inputs)
    wrapper = "\n".join(code.wrappers)
    if keep is not None:
        folder = keep / config.folder()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "wrapper.py").write_text(wrapper)
        for name, source in code.kernels.items():
            (folder / f"{name}.py").write_text(source)
    rows = kernel_table(code.kernels, wrapper)
    profiles = [] if smoke else gpu_profiles(pair, batch, group_norm, attention, torch.__version__, concat, gelu)
    matches = [dict(run=p["run"], **profile_match(rows, p["top_kernels"])) for p in profiles]
    return dict(
        **asdict(config),
        precision="bf16",
        channels_last=True,
        seconds=round(time.perf_counter() - start, 1),
        matmul_padding_questions=len(code.pad_questions),
        gpu_profiles_matched=matches,
        **summarise(rows, batch),
    )


def markdown_table(results: dict) -> str:
    """bench/results/codegen.json as the table in docs/performance.md, the GPU image's PyTorch first."""
    head = (
        "| PyTorch | pair | batch | `group_norm` | skip concatenations | `gelu` | `attention` | kernels | launches "
        "| transposing launches | strided gathers (M elements/sample) | int64 indexing (M elements/sample) "
        "| inductor's bytes (GB/sample) | reductions' short-run bytes (GB/sample) |"
    )
    lines = [head, "|---|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for version in sorted(results, key=lambda v: [int(p) for p in re.findall(r"\d+", v.split("+")[0])]):
        label = f"{version.split('+')[0]} ({'GPU image' if version.startswith('2.11') else 'our pin'})"
        for r in results[version]["rows"]:
            short = r.get("short_run_reduction_bytes_per_sample")
            lines.append(
                f"| {label} | {r['pair']} | {r['batch']} | {r['group_norm']} | {r['concat']} | {r['gelu']} "
                f"| {r['attention']} | {r['kernels']} | {r['launches']} | {r['transposing_launches']} "
                f"| {r['strided_gather_elements_per_sample'] / 1e6:.1f} "
                f"| {r['int64_pointwise_elements_per_sample'] / 1e6:.1f} | {r['kernel_bytes_per_sample'] / 1e9:.3f} "
                f"| {'—' if short is None else f'{short / 1e9:.3f}'} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the toy pair at batch 8 (a test of the script)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--keep-source", type=Path, default=None, metavar="DIR")
    ap.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="configurations generated at once (default: one per core)"
    )
    ap.add_argument("--one", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    ap.add_argument("--table", action="store_true", help="print --out's results as a markdown table and stop")
    args = ap.parse_args()
    if args.table:
        if not args.out.is_file():
            sys.exit(f"--out {args.out}: no results file (run bench/codegen.py first)")
        print(markdown_table(json.loads(args.out.read_text())))
        return
    if args.one:
        print(json.dumps(one(Config(**json.loads(args.one)), args.smoke, args.keep_source)))
        return

    if not args.out.parent.is_dir():
        sys.exit(f"--out {args.out}: the folder {args.out.parent} does not exist")
    if args.jobs < 1:
        sys.exit(f"--jobs {args.jobs}: at least 1")
    import torch

    def generate(config: Config) -> subprocess.CompletedProcess:
        cmd = [sys.executable, __file__, "--one", json.dumps(asdict(config))]
        cmd += ["--smoke"] * args.smoke + (["--keep-source", str(args.keep_source)] if args.keep_source else [])
        return subprocess.run(cmd, capture_output=True, text=True)

    # Each configuration runs in a process of its own (the patches are for good); they are independent,
    # so they run side by side, and are reported in their fixed order as they finish.
    configs = SMOKE if args.smoke else FULL
    rows = []
    with ThreadPoolExecutor(min(args.jobs, len(configs))) as pool:
        for c, done in zip(configs, pool.map(generate, configs)):
            what = (
                f"{c.pair} batch {c.batch:3d} group_norm={c.group_norm:13s} concat={c.concat:6s} "
                f"gelu={c.gelu:8s} attention={c.attention:12s}"
            )
            if done.returncode != 0:
                sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{what}: {r['kernels']} kernels, "
                f"{r['transposing_launches']} transposing launches, strided gathers "
                f"{r['strided_gather_elements_per_sample'] / 1e6:.1f} M elements/sample, int64 indexing "
                f"{r['int64_pointwise_elements_per_sample'] / 1e6:.1f} M elements/sample, "
                f"{r['kernel_bytes_per_sample'] / 1e9:.3f} GB/sample in its kernels ({r['seconds']} s)",
                flush=True,
            )
            for m in r["gpu_profiles_matched"]:
                print(
                    f"   GPU run {m['run']}: {m['found']} of its {m['fused_kernels']} profiled fused kernels generated "
                    f"(same fused operations and launches; numbers at most {m['largest_number_offset']} apart)"
                )
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    import diffusers
    import timm
    import triton

    results[torch.__version__] = dict(
        command=" ".join(["python", "bench/codegen.py", *sys.argv[1:]]),
        python=sys.executable,  # the GPU image's torch runs from an environment of its own
        versions=dict(
            torch=torch.__version__, triton=triton.__version__, diffusers=diffusers.__version__, timm=timm.__version__
        ),
        device="a pretend NVIDIA H100 80GB HBM3 (bench/fake_h100.py)",
        rows=rows,
    )
    write_atomic(args.out, results)
    print(f"wrote {args.out} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
