"""The GPU benchmark script keeps working between GPU sessions: its eager sections on the CPU (--smoke)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from raysmooth.config import compose
from raysmooth.models.architectures import toy_pair

ROOT = Path(__file__).resolve().parents[1]


def _smoke(tmp_path: Path, sections: str, timeout: int) -> dict:
    """bench/gpu.py --smoke on ``sections``: the JSON it wrote (the script must have exited cleanly)."""
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--sections", sections, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_the_gpu_benchmark_runs_its_eager_sections_on_the_cpu(tmp_path):
    result = _smoke(tmp_path, "ceiling,cifar10-extras,imagenet-profile,imagenet-attention,imagenet", timeout=300)
    assert result["errors"] == [] and result["skipped"] == []
    tests = [row.get("test", "") for row in result["rows"]]
    for expected in (
        "matrix product",
        "lattice noise",
        "reference loop",
        "eager variants",
        "halves alone",
        "by kind",
        "attention call by SDPA backend",
        "classifier alone by SDPA backend",
    ):
        assert any(expected in t for t in tests), f"no row for {expected!r}"
    attention = next(row for row in result["rows"] if "attention call" in row.get("test", ""))
    for case in ("bias", "bias from positions"):  # FlexAttention with the bias is the same attention
        flex = attention[f"flex (compiled), 17 tokens, {case}"]
        assert 0 < flex["max_abs_error_vs_math"] < 0.05 and flex["ms"] > 0
    by_head = attention["default, 17 tokens, bias in aligned rows, by head"]  # the heads as SDPA's batch axis
    assert 0 < by_head["max_abs_error_vs_math"] < 0.05 and by_head["ms"] > 0
    timm_cases = ("timm's bias", "timm's bias and q/k/v", "aligned bias, timm's q/k/v")
    for case in [f"default, 17 tokens, {timm_cases[1]}"] + [f"compiled, 17 tokens, {c}" for c in timm_cases]:
        # q, k, v sliced from one packed projection as timm does: the same attention as the plain call
        assert 0 < attention[case]["max_abs_error_vs_math"] < 0.05 and attention[case]["ms"] > 0
    for how in ("default", "compiled"):  # as the model calls it, merged for the projection, both orders
        for order in ("by sample", "by head"):
            case = attention[f"{how}, 17 tokens, aligned bias, timm's q/k/v, merged, {order}"]
            assert 0 < case["max_abs_error_vs_math"] < 0.05 and case["ms"] > 0
    profile = next(row for row in result["rows"] if "by kind" in row.get("test", ""))
    for kernel in profile["top_kernels"]:  # calls × time per call is the kernel's share of the batch
        spent = kernel["calls"] * kernel["ms_per_call"]
        assert kernel["calls"] >= 1
        # to the roundings: time per call and share to 3 decimals, the batch's total to 2
        slack = 5e-4 * (kernel["calls"] + profile["total_ms"]) + 5e-3 * kernel["share"] + 1e-9
        assert abs(spent - kernel["share"] * profile["total_ms"]) <= slack
    rates = [row for row in result["rows"] if row.get("precision") == "bf16" and not row.get("compiled")]
    assert rates and all(row["samples_per_s"] > 0 and "share_of_measured_matmul" in row for row in rates)


def test_the_gpu_benchmark_compares_compiled_variants_on_the_cpu(tmp_path):
    """BEiT's bias cached against timm's per-forward bias (and the other compiled comparisons): each
    variant compiled for real, timed interleaved, with its speed-up over the first and the labels it
    gives differently; the preset's own compiled row records the settings it ran (one smoke run: each
    compile costs seconds; the other comparisons share this code and are checked for what they hand it,
    below)."""
    sections = "imagenet-bias,imagenet-compiled,imagenet-kernels-pinned,imagenet-concat"
    result = _smoke(tmp_path, sections, timeout=600)
    assert result["errors"] == [], result["errors"]
    assert "in_progress" not in result  # only a run killed inside a section says where it stopped
    compiled = next(row for row in result["rows"] if row.get("compiled"))
    assert compiled["preset"] == result["engine_gpu_compiled"] == _gpu_script().preset_engine()
    cached = next(row for row in result["rows"] if "cached in aligned rows" in row.get("test", ""))
    assert cached["cached_layers"] == 2  # the smoke pair's two BEiT blocks
    # Each compile is recorded as it finishes, so a run killed in a later, longer compile still has it.
    variants = ["sdpa", "sdpa_cached", "free", "pinned"]
    assert [c["variant"] for c in result["compiles"]] == variants
    assert all(c["seconds"] > 0 for c in result["compiles"])  # real compiles, not a cached graph or eager
    first, other = cached["sdpa"], cached["sdpa_cached"]
    assert first["samples_per_s"] > 0 and other["samples_per_s"] > 0
    assert other["speedup"]["median"] > 0 and "speedup" not in first
    assert other["labels_differing"] == 0  # the same bias values give the same logits
    # The generated code of the preset's compile (inductor's cache off: a cache hit writes none), here
    # with the concatenations pinned, and the same batch's time by kind for bench/roofline.py.
    kernels = next(row for row in result["rows"] if "generated source" in row.get("test", ""))
    assert kernels["generated_modules"] >= 1 and kernels["kernels"]
    assert kernels["graphs_compiled"] == 1  # the profiled batch ran the code kept, not a recompile
    assert all(k["source"] and k["launches"] for k in kernels["kernels"])
    assert kernels["pinned_concatenations"] == 4 and "pinned" in kernels["test"]
    assert kernels["total_ms"] > 0 and abs(sum(kernels["share_by_kind"].values()) - 1) < 0.01
    concat = next(row for row in result["rows"] if "laid out by inductor against pinned" in row.get("test", ""))
    unet = next(m for m in toy_pair("imagenet").modules() if type(m).__name__ == "UNet2DModel")
    assert concat["pinned_concatenations"] == sum(len(b.resnets) for b in unet.up_blocks)  # each takes a concat
    assert concat["pinned"]["labels_differing"] == 0  # a layout, not a value, changes


def test_the_kernel_report_reads_a_generated_kernel_its_launch_and_its_buffers_layouts():
    """What imagenet-kernels keeps of inductor's code, checked on code inductor really wrote (on the CPU):
    a GroupNorm-then-SiLU kernel after a channels_last convolution, found by a name cut short as the
    profiler cuts it, with the library convolution that wrote its input, where its buffer chain leads."""
    from torch._inductor.utils import run_and_get_code

    gpu = _gpu_script()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU())
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        _, codes = run_and_get_code(torch.compile(model), x)
    (name,) = [k for k in gpu.generated_kernels(codes[0]) if "group_norm" in k]
    report = gpu.kernel_report(codes[0], name[:20])
    assert report["kernel"] == name
    assert "1e-05" in report["source"]  # GroupNorm's epsilon: the kernel's own code, not the wrapper's
    assert report["launches"] and all(line.startswith(name) for line in report["launches"])
    assert any("extern_kernels.convolution" in line for line in report["buffers"])
    assert not any("rand_strided" in line for line in report["buffers"])  # not the harness's stand-ins
    assert gpu.kernel_report(codes[0], "triton_no_such_kernel") is None
    assert gpu.kernel_report(codes[0], name, max_chars=100)["source"].endswith("more characters)")


def _smoke_bench(tmp_path: Path):
    gpu = _gpu_script()
    args = argparse.Namespace(
        smoke=True, budget_s=60.0, sections="", peak_tflops=989.0, peak_source="", out=tmp_path / "gpu.json"
    )
    return gpu, gpu.Bench(args)


def test_the_compiled_comparisons_hand_over_the_variants_they_name(tmp_path, monkeypatch):
    """FlexAttention, max-autotune, coordinate-descent tuning, the GroupNorm twin, the GELU epilogue and
    attention by head: each section is checked for the replicas it hands to the comparison the test above
    runs for real (max-autotune and coordinate descent tune nothing on a CPU, and every compile costs CI
    seconds; the twin's compiled values are tests/test_norms.py's)."""
    gpu, bench = _smoke_bench(tmp_path)
    handed, extra = {}, {}

    def compare(bench, name, test, replicas, **kw):
        handed.update(replicas)
        extra.update(kw)

    monkeypatch.setattr(gpu, "compare_compiled", compare)
    gpu.attention_kernel_section(bench, "imagenet")
    assert {k: r.config.attention for k, r in handed.items()} == {"sdpa": "sdpa", "flex": "flex"}
    assert extra["flex_layers"] == 2  # the smoke pair's two BEiT blocks switched
    handed.clear()
    gpu.compile_mode_section(bench, "imagenet")
    assert {k: r.config.compile_mode for k, r in handed.items()} == {
        "default": "default",
        "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
    }
    handed.clear()
    gpu.coordinate_descent_section(bench, "imagenet")
    default, tuned = handed["default"], handed["coordinate descent"]
    assert default.config.compile and tuned.config.compile and default.base is not tuned.base
    assert isinstance(tuned._forward, torch._dynamo.eval_frame.OptimizedModule)
    assert tuned._forward._orig_mod is tuned.base and tuned._forward is not default._forward
    assert extra["pinned_concatenations"] == 4  # tuned on the layout the project's torch generates
    assert {gpu.pinned_concatenations(r.base) for r in (default, tuned)} == {4}
    handed.clear()
    gpu.group_norm_section(bench, "imagenet")
    assert {k: r.config.group_norm for k, r in handed.items()} == {"native": "native", "channels_last": "channels_last"}
    assert extra["switched_layers"] > 0  # the toy UNet's GroupNorms
    assert {gpu.pinned_concatenations(r.base) for r in handed.values()} == {4}  # the project's torch's layout
    handed.clear()
    gpu.gelu_section(bench, "imagenet")
    assert {k: r.config.gelu for k, r in handed.items()} == {"native": "native", "epilogue": "epilogue"}
    assert extra["switched_layers"] == 2  # the smoke pair's two BEiT MLPs
    assert {gpu.pinned_concatenations(r.base) for r in handed.values()} == {4}
    handed.clear()
    gpu.by_head_section(bench, "imagenet")
    assert {k: r.config.attention for k, r in handed.items()} == {
        "sdpa_cached": "sdpa_cached",
        "sdpa_by_head": "sdpa_by_head",
    }
    assert extra["switched_layers"] == 2  # the smoke pair's two BEiT attention layers
    assert {gpu.pinned_concatenations(r.base) for r in handed.values()} == {4}


def _gpu_script():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    return gpu


def test_the_gpu_benchmark_reads_the_settings_hydra_composes_for_the_compiled_preset():
    """bench/gpu.py reads engine=gpu_compiled from its yaml without hydra (the GPU image has none); it
    must agree with what hydra composes, so its compiled rows time what the presets run."""
    gpu = _gpu_script()
    composed = compose("certify", ["engine=gpu_compiled"]).engine
    assert gpu.preset_engine() == {k: getattr(composed, k) for k in gpu.PRESET_FIELDS}


def test_a_preset_changed_after_a_gpu_run_is_what_the_benchmark_then_runs(tmp_path):
    gpu = _gpu_script()
    (tmp_path / "gpu.yaml").write_text("precision: bf16\ncompile: false\nattention: sdpa\n")
    (tmp_path / "fast.yaml").write_text("defaults:\n  - gpu\n  - _self_\ncompile: true\nattention: flex\n")
    (tmp_path / "parent_wins.yaml").write_text("defaults:\n  - _self_\n  - gpu\nattention: flex\n")
    fast = gpu.preset_engine("fast", tmp_path)
    assert fast["attention"] == "flex" and fast["compile"] is True and fast["precision"] == "bf16"
    assert fast["compile_mode"] == "default"  # left out: EngineConfig's default
    assert gpu.preset_engine("parent_wins", tmp_path)["attention"] == "sdpa"


def test_an_unknown_benchmark_section_is_one_line():
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--sections", "imagenet,bogus"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "unknown section(s) bogus; choose from ceiling, imagenet-layout, cifar10-layout, cifar10-extras, imagenet, "
        "cifar10, imagenet-profile, imagenet-profile-compiled, imagenet-kernels, imagenet-kernels-pinned, "
        "imagenet-freezing, "
        "imagenet-attention, imagenet-flex, imagenet-autotune, imagenet-bias, imagenet-groupnorm, "
        "cifar10-groupnorm, imagenet-gelu, imagenet-by-head, cifar10-gelu, imagenet-concat, imagenet-coordesc, "
        "imagenet-compiled or all"
    ]


def test_gpu_sh_without_torch_says_where_to_run_it(tmp_path):
    import os
    import shutil

    (tmp_path / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "gpu.sh", tmp_path / "bench" / "gpu.sh")  # a checkout without a venv
    fake = tmp_path / "bin" / "python3"  # a python3 that has neither torch nor timm
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:/usr/bin:/bin"}
    done = subprocess.run(["bash", str(tmp_path / "bench" / "gpu.sh")], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert "bench/gpu.sh: python3 cannot import torch and timm; run it where they are installed" in done.stderr


def test_pinning_the_skip_concatenations_hands_each_up_block_resnet_a_channels_last_input_and_changes_no_logit():
    """bench/layouts.py, the imagenet-concat variant: a stride order for inductor, never a value."""
    sys.path.insert(0, str(ROOT / "bench"))
    from layouts import pin_concatenations

    model = toy_pair("imagenet")
    torch.manual_seed(1)
    z = torch.randn(4, 3, 8, 8)
    sigma = torch.full((4,), 0.5)
    with torch.inference_mode():
        before = model(z, sigma)  # contiguous activations: eager, the pin copies them channels_last
        pinned = pin_concatenations(model)
        handed = []  # what each resnet's first layer, its GroupNorm, is handed
        for block in next(m for m in model.modules() if type(m).__name__ == "UNet2DModel").up_blocks:
            for resnet in block.resnets:
                resnet.norm1.register_forward_pre_hook(lambda m, args: handed.append(args[0]) and None)
        after = model(z, sigma)
    assert pinned == len(handed) == 4  # the toy UNet's two up blocks of two resnets, each after a concat
    assert all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in handed)
    torch.testing.assert_close(after, before)  # the convolutions sum in another order channels_last
