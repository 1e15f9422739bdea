"""bench/codegen.py: inductor's CUDA kernels generated without a GPU, and the layout costs read from them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from codegen import Config, kernel_table, markdown_table, profile_match, summarise  # noqa: E402

# Two kernels as inductor writes them (trimmed): a GroupNorm-then-SiLU pass that reads a buffer laid out
# channels-first while it walks channels-last (neighbouring threads 12544 elements apart) and writes two
# outputs, and a cat tiled in two dimensions with 64-bit indices.
_GATHER = """
@triton.jit
def triton_poi_fused_convolution_native_group_norm_silu_7(in_ptr0, in_ptr1, in_ptr2, out_ptr1, xnumel, XBLOCK):
    xnumel = 924844032
    xoffset = tl.program_id(0) * XBLOCK
    xindex = xoffset + tl.arange(0, XBLOCK)[:]
    x0 = (xindex % 768)
    x1 = ((xindex // 768) % 12544)
    x2 = xindex // 9633792
    x3 = xindex
    tmp0 = tl.load(in_ptr0 + (x1 + 12544*x0 + 9633792*x2), None, eviction_policy='evict_last').to(tl.float32)
    tmp2 = tl.load(in_ptr1 + (32*x2 + (x0 // 24)), None, eviction_policy='evict_last')
    tmp11 = tl.load(in_ptr2 + (x0), None, eviction_policy='evict_last').to(tl.float32)
    tl.store(out_ptr1 + (x3), tmp0, None)
"""
_COALESCED = """
@triton.jit
def triton_poi_fused_add_silu_8(in_ptr0, in_ptr1, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xnumel = 1000
    x3 = xindex
    x0 = (xindex % 256)
    x2 = xindex // 12845056
    tmp0 = tl.load(in_ptr0 + (x3), None).to(tl.float32)
    tmp20 = tl.load(in_ptr1 + (x0 + 512*x2), None, eviction_policy='evict_last').to(tl.float32)
"""
_TILED = """
@triton.jit
def triton_poi_fused_cat_9(in_ptr0, out_ptr0, ynumel, xnumel, YBLOCK : tl.constexpr, XBLOCK : tl.constexpr):
    ynumel = 49152
    xnumel = 50176
    yindex = yoffset + tl.arange(0, YBLOCK)[:, None].to(tl.int64)
    xindex = xoffset + tl.arange(0, XBLOCK)[None, :].to(tl.int64)
    y0 = (yindex % 512)
    tmp5 = tl.load(in_ptr0 + (256*x2 + 12845056*y1 + (y0)), xmask)
    tl.store(out_ptr0 + (x2 + 50176*y3), tmp5, xmask)
"""
_WRAPPER = """
triton_poi_fused_convolution_native_group_norm_silu_7.run(buf1, buf2, buf3, buf4, 924844032, stream=stream0)
triton_poi_fused_add_silu_8.run(buf5, buf6, buf7, 1000, stream=stream0)
triton_poi_fused_add_silu_8.run(buf8, buf6, buf9, 1000, stream=stream0)
triton_poi_fused_cat_9.run(buf10, buf11, 49152, 50176, stream=stream0)
"""
KERNELS = {
    "triton_poi_fused_convolution_native_group_norm_silu_7": _GATHER,
    "triton_poi_fused_add_silu_8": _COALESCED,
    "triton_poi_fused_cat_9": _TILED,
}


def test_a_load_whose_neighbouring_threads_are_a_row_apart_is_a_strided_gather():
    rows = {r["kernel"]: r for r in kernel_table(KERNELS, _WRAPPER)}
    assert rows["triton_poi_fused_convolution_native_group_norm_silu_7"]["strided_loads"] == [
        "x1 + 12544*x0 + 9633792*x2"
    ]
    # contiguous reads, broadcast parameters and per-channel reads with a batch stride are not gathers
    assert rows["triton_poi_fused_add_silu_8"]["strided_loads"] == []


def test_launches_elements_tiling_and_64_bit_indexing_are_read_from_the_code():
    rows = {r["kernel"]: r for r in kernel_table(KERNELS, _WRAPPER)}
    assert [rows[k]["calls"] for k in KERNELS] == [1, 2, 1]
    assert rows["triton_poi_fused_cat_9"] | {"strided_loads": None, "code": None} == {
        "kernel": "triton_poi_fused_cat_9",
        "calls": 1,
        "bytes": None,  # trimmed: no inductor metadata
        "code": None,
        "elements": 49152 * 50176,
        "tiled": True,
        "transposing": True,  # it reads along y and writes along x
        "int64": True,
        "strided_loads": None,
        "reduction_run_bytes": None,
        "reduction_reads_along": None,
    }
    assert not rows["triton_poi_fused_add_silu_8"]["tiled"] and not rows["triton_poi_fused_add_silu_8"]["int64"]


# A pass tiled in two dimensions whose reads and writes both walk along y: tiled, not a transpose.
_TILED_IN_PLACE = """
@triton.jit
def triton_poi_fused_mean_rsqrt_silu_7(in_ptr0, out_ptr1, ynumel, xnumel, YBLOCK : tl.constexpr, XBLOCK : tl.constexpr):
    ynumel = 1024
    xnumel = 8
    x3 = xindex
    y2 = yindex // 128
    y4 = (yindex % 128)
    tmp0 = tl.load(in_ptr0 + (y4 + 128*x3 + 1024*y2), xmask).to(tl.float32)
    tl.store(out_ptr1 + (y4 + 128*x3 + 1024*y2), tmp40, xmask)
"""
# GroupNorm statistics of a channels_last (N, 224, 224, 256) activation, 8 channels per group, as
# PyTorch's GroupNorm gets them (each group's 8 channels, then a row further) and as the twin does
# (each channel's, neighbouring lanes on neighbouring channels).
_GROUP_STATS = """
    triton_meta={'signature': {'in_ptr0': '*bf16', 'out_ptr0': '*fp32'}},
)
@triton.jit
def triton_red_fused_native_group_norm_2(in_ptr0, out_ptr0, xnumel, r0_numel, XBLOCK, R0_BLOCK):
    xnumel = 3072
    r0_numel = 401408
    x0 = (xindex % 32)
    x1 = xindex // 32
        r0_2 = (r0_index % 8)
        r0_3 = r0_index // 8
        tmp0 = tl.load(in_ptr0 + (r0_2 + 8*x0 + 256*r0_3 + 12845056*x1), r0_mask & xmask, other=0.0)
"""
_CHANNEL_STATS = """
    triton_meta={'signature': {'in_ptr0': '*bf16', 'out_ptr0': '*fp32'}},
)
@triton.jit
def triton_red_fused_var_mean_2(in_ptr0, out_ptr0, xnumel, r0_numel, XBLOCK, R0_BLOCK):
    xnumel = 98304
    r0_numel = 12544
    x0 = (xindex % 256)
    x1 = xindex // 256
        r0_2 = r0_index
        tmp0 = tl.load(in_ptr0 + (x0 + 256*r0_2 + 3211264*x1), r0_mask & xmask, other=0.0)
"""


def test_a_tiled_pass_is_a_transpose_only_where_its_reads_and_writes_walk_different_axes():
    rows = {r["kernel"]: r for r in kernel_table(KERNELS | {"triton_poi_fused_mean_rsqrt_silu_7": _TILED_IN_PLACE}, "")}
    assert rows["triton_poi_fused_cat_9"]["tiled"] and rows["triton_poi_fused_cat_9"]["transposing"]
    assert rows["triton_poi_fused_mean_rsqrt_silu_7"]["tiled"]
    assert not rows["triton_poi_fused_mean_rsqrt_silu_7"]["transposing"]


def test_a_reductions_contiguous_run_is_read_from_the_index_its_lanes_step_over():
    """PyTorch's GroupNorm statistics read 16-byte runs (a group's 8 bf16 channels); the twin's read a
    whole row of 256 channels: only the first counts as a short-run reduction."""
    kernels = {"triton_red_fused_native_group_norm_2": _GROUP_STATS, "triton_red_fused_var_mean_2": _CHANNEL_STATS}
    wrapper = "".join(f"{k}.run(buf1, buf2, 1, 1, stream=stream0)\n" for k in kernels)
    rows = {r["kernel"]: r for r in kernel_table(kernels, wrapper)}
    group, channel = rows["triton_red_fused_native_group_norm_2"], rows["triton_red_fused_var_mean_2"]
    assert (group["reduction_run_bytes"], group["reduction_reads_along"]) == (16, "reduction")
    assert (channel["reduction_run_bytes"], channel["reduction_reads_along"]) == (512, "outputs")
    with_bytes = [dict(group, bytes=1000), dict(channel, bytes=3000)]
    assert summarise(with_bytes, batch=1)["short_run_reduction_bytes_per_sample"] == 1000


def test_the_summary_counts_per_sample_over_every_launch():
    s = summarise(kernel_table(KERNELS, _WRAPPER), batch=96)
    assert s["kernels"] == 3 and s["launches"] == 4 and s["transposing_launches"] == 1
    assert s["strided_gather_elements_per_sample"] == 924844032 // 96
    assert s["int64_pointwise_elements_per_sample"] == 49152 * 50176 // 96
    assert s["native_group_norm_kernels"] == 1
    assert [x["kernel"] for x in s["strided_loads"]] == ["triton_poi_fused_convolution_native_group_norm_silu_7"]


_IN_PLACE = """
@triton_heuristics.pointwise(
    size_hints={'x': 32768},
    inductor_meta={'grid_type': 'Grid1D', 'kernel_name': 'triton_poi_fused_silu_4', 'kernel_num_gb': 6.9632e-05},
)
@triton.jit
def triton_poi_fused_silu_4(in_out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xnumel = 17408
    x0 = xindex
    tmp0 = tl.load(in_out_ptr0 + (x0), None).to(tl.float32)
    tl.store(in_out_ptr0 + (x0), tmp1, None)

def get_args():
    arg_0 = rand_strided((8, 16, 8, 17), (2176, 1, 272, 16), device='cuda:0', dtype=torch.bfloat16)
    return arg_0, 17408,

def call(args):
    with torch.cuda._DeviceGuard(0):
        triton_poi_fused_silu_4.run(*args, stream=raw_stream0)
"""


def test_a_kernels_bytes_are_inductors_estimate_and_its_benchmark_harness_is_not_a_launch():
    wrapper = _IN_PLACE + "\ntriton_poi_fused_silu_4.run(buf3, 17408, stream=stream0)\n"
    (row,) = kernel_table({"triton_poi_fused_silu_4": _IN_PLACE}, wrapper)
    assert row["calls"] == 1  # the harness's .run(*args is the kernel's own benchmark, not the forward's
    assert row["bytes"] == 17408 * 2 * 2  # one bf16 buffer read and written in place
    s = summarise([row, dict(row, kernel="triton_poi_other", bytes=None)], batch=4)
    assert s["kernel_bytes_per_sample"] == 17408 and s["kernels_without_bytes"] == 1


def test_two_launches_of_one_kernel_code_that_its_benchmark_harness_told_apart_count_as_one_kernel():
    """With its byte estimates on, inductor gives each launch shape a harness of its own, so one code can
    come out under two names (the later with other fused operations in it); it is one kernel, named as
    inductor first named it."""
    first = _IN_PLACE.replace("silu_4", "native_group_norm_silu_4")
    second = _IN_PLACE.replace("silu_4", "var_mean_silu_9").replace("(2176, 1, 272, 16)", "(2176, 136, 1, 8)")
    kernels = {"triton_poi_fused_native_group_norm_silu_4": first, "triton_poi_fused_var_mean_silu_9": second}
    s = summarise(kernel_table(kernels, ""), batch=1)
    assert s["kernels"] == 1 and s["native_group_norm_kernels"] == 1


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path]:
    """The script end to end on the toy pair (a UNet with attention blocks and a small BEiT), run once
    for the tests below: its results entry and the folder of the code it kept."""
    tmp_path = tmp_path_factory.mktemp("codegen")
    out = tmp_path / "codegen.json"
    cmd = [sys.executable, str(ROOT / "bench" / "codegen.py"), "--smoke", "--out", str(out)]
    cmd += ["--keep-source", str(tmp_path / "code")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stderr[-2000:]
    (entry,) = json.loads(out.read_text()).values()
    return entry, tmp_path / "code"


def test_inductor_writes_cuda_kernels_for_the_toy_pair_without_a_gpu_and_the_groupnorm_twin_needs_no_transposes(
    smoke,
):
    """Both GroupNorms: PyTorch's, lowered for a GPU, copies the attention blocks' channels-last
    activations into the contiguous layout (kernels tiled to transpose); the twin normalises in place."""
    entry, code = smoke
    rows = {r["group_norm"]: r for r in entry["rows"]}
    assert rows.keys() == {"native", "channels_last"}
    for r in rows.values():
        assert r["kernels"] > 20 and r["launches"] >= r["kernels"] and r["strided_gather_elements_per_sample"] == 0
        assert r["kernels_without_bytes"] == 0 and r["kernel_bytes_per_sample"] > 0
    assert rows["native"]["native_group_norm_kernels"] > 0 and rows["native"]["transposing_launches"] > 0
    assert (
        rows["channels_last"]["native_group_norm_kernels"] == 0 and rows["channels_last"]["transposing_launches"] == 0
    )
    # The statistics over the bf16 activation: PyTorch's walk a group's few channels, then a row on; the
    # twin's walk the channels (its second step reduces the float32 per-channel statistics).
    for kind, along in (("native", "reduction"), ("channels_last", "outputs")):
        folder = code / Config(**{f: rows[kind][f] for f in Config.__dataclass_fields__}).folder()
        kernels = {f.stem: f.read_text() for f in folder.glob("triton_*.py")}
        stats = [r for r in kernel_table(kernels, "") if re.search(r"native_group_norm|var_mean", r["kernel"])]
        stats = [r for r in stats if r["reduction_reads_along"] and "'in_ptr0': '*bf16'" in kernels[r["kernel"]]]
        assert stats and {r["reduction_reads_along"] for r in stats} == {along}, kind
    # the generated code is kept: the wrapper launches CUDA kernels on a CUDA stream
    wrapper = (code / "imagenet-b8-native" / "wrapper.py").read_text()
    assert "empty_strided_cuda" in wrapper and ".run(" in wrapper
    assert len(list((code / "imagenet-b8-native").glob("triton_*.py"))) == rows["native"]["kernels"]
    # Inductor's byte estimate, checked where it is plain: a kernel that updates one bf16 buffer in place
    # (an activation) reads and writes each element once.
    in_place = [
        source
        for f in (code / "imagenet-b8-native").glob("triton_poi_*.py")
        if "(in_out_ptr0, xnumel, XBLOCK" in (source := f.read_text()) and "'in_out_ptr0': '*bf16'" in source
    ]
    assert in_place
    for source in in_place:
        ((row,),) = [kernel_table({"k": source}, "")]
        assert row["bytes"] == row["elements"] * 2 * 2


def test_with_the_gelu_epilogue_the_mlps_gelu_leaves_inductors_kernels_for_atens_fused_matmul(smoke):
    """engine.gelu=epilogue (the smoke run's second configuration): inductor hands fc1 and its GELU to
    ATen as one call per BEiT block (cuBLASLt's epilogue on a GPU), and no kernel of its own is left
    for the GELU, where timm's MLP has one that moves bytes."""
    entry, code = smoke
    rows = {r["gelu"]: r for r in entry["rows"]}
    assert rows.keys() == {"native", "epilogue"}
    fields = Config.__dataclass_fields__
    folders = {g: code / Config(**{f: r[f] for f in fields}).folder() for g, r in rows.items()}
    assert folders["epilogue"].name == "imagenet-b8-channels_last-gelu_epilogue"
    wrappers = {g: (f / "wrapper.py").read_text() for g, f in folders.items()}
    assert wrappers["epilogue"].count("torch.ops.aten._addmm_activation.default(") == 2  # the toy BEiT's two blocks
    assert "_addmm_activation" not in wrappers["native"]
    gelu_bytes = {
        g: sum(
            r["calls"] * r["bytes"]
            for r in kernel_table({f.stem: f.read_text() for f in folder.glob("triton_*gelu*.py")}, wrappers[g])
        )
        for g, folder in folders.items()
    }
    assert gelu_bytes["native"] > 0 and gelu_bytes["epilogue"] == 0


def test_a_gpu_profiles_fused_kernels_are_found_by_operations_and_launches_not_by_number():
    rows = kernel_table(KERNELS, _WRAPPER)
    profile = [
        {"kind": "fused (triton)", "name": "triton_poi_fused_add_silu_10", "calls": 2},  # numbered 8 here
        {"kind": "fused (triton)", "name": "triton_poi_fused_cat_9", "calls": 3},  # launched once here
        {"kind": "fused (triton)", "name": "triton_poi_fused_gelu_4", "calls": 1},  # not generated
        {"kind": "convolution", "name": "sm90_xmma_fprop_implicit_gemm", "calls": 28},  # a library kernel
    ]
    assert profile_match(rows, profile) == {"fused_kernels": 3, "found": 1, "largest_number_offset": 2}


def test_the_results_file_reads_as_the_docs_table_the_gpu_images_pytorch_first():
    row = dict(
        pair="imagenet",
        batch=96,
        group_norm="native",
        concat="pinned",
        gelu="epilogue",
        attention="sdpa_cached",
        kernels=160,
        launches=394,
        transposing_launches=16,
        strided_gather_elements_per_sample=0,
        int64_pointwise_elements_per_sample=141_600_000,
        kernel_bytes_per_sample=3_402_860_248,
        short_run_reduction_bytes_per_sample=689_042_501,
    )
    older = {k: v for k, v in row.items() if k != "short_run_reduction_bytes_per_sample"}  # before the count
    table = markdown_table({"2.14.1+cu130": {"rows": [row]}, "2.11.0+cu130": {"rows": [older]}}).splitlines()
    assert len(table) == 4 and table[0].count("|") == table[2].count("|") == table[3].count("|") == 15
    assert table[2].startswith("| 2.11.0 (GPU image) | imagenet | 96 |") and table[2].endswith("| 3.403 | — |")
    assert table[3] == (
        "| 2.14.1 (our pin) | imagenet | 96 | native | pinned | epilogue | sdpa_cached | 160 | 394 | 16 | 0.0 "
        "| 141.6 | 3.403 | 0.689 |"
    )


def test_an_out_file_in_a_folder_that_does_not_exist_is_one_line_before_anything_is_generated(tmp_path):
    out = tmp_path / "missing" / "codegen.json"
    cmd = [sys.executable, str(ROOT / "bench" / "codegen.py"), "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"--out {out}: the folder {out.parent} does not exist"
    assert not (tmp_path / "missing").exists()


def test_a_gpu_profile_is_checked_against_the_configuration_it_ran(tmp_path, monkeypatch):
    """A profile of the pinned layout (or of another GELU) says nothing about the free layout's code."""
    import codegen

    def row(pinned: int, gelu: str | None = None) -> dict:
        preset = dict(compile=True, attention="sdpa_cached", group_norm="native") | ({"gelu": gelu} if gelu else {})
        return dict(pair="imagenet", batch=96, preset=preset, top_kernels=[], pinned_concatenations=pinned)

    runs = [dict(run=9, torch="2.11.0", rows=[row(0)]), dict(run=11, torch="2.11.0", rows=[row(18)])]
    runs += [dict(run=12, torch="2.11.0", rows=[row(18, "epilogue")]), dict(run=13, torch="2.99", rows=[row(0)])]
    (tmp_path / "gpu.json").write_text(json.dumps({"runs": runs}))
    monkeypatch.setattr(codegen, "GPU_RUNS", tmp_path / "gpu.json")

    def found(concat: str, gelu: str = "native") -> list[int]:
        return [p["run"] for p in codegen.gpu_profiles("imagenet", 96, "native", "sdpa_cached", "2.11.0", concat, gelu)]

    assert (found("free"), found("pinned"), found("pinned", "epilogue")) == ([9], [11], [12])
