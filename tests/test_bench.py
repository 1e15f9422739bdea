"""The GPU benchmark script keeps working between GPU sessions: its eager sections on the CPU (--smoke)."""

import json
import subprocess
import sys
from pathlib import Path

from raysmooth.config import compose

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
    timm_cases = ("timm's bias", "timm's bias and q/k/v", "aligned bias, timm's q/k/v")
    for case in [f"default, 17 tokens, {timm_cases[1]}"] + [f"compiled, 17 tokens, {c}" for c in timm_cases]:
        # q, k, v sliced from one packed projection as timm does: the same attention as the plain call
        assert 0 < attention[case]["max_abs_error_vs_math"] < 0.05 and attention[case]["ms"] > 0
    profile = next(row for row in result["rows"] if "by kind" in row.get("test", ""))
    for kernel in profile["top_kernels"]:  # calls × time per call is the kernel's share of the batch
        spent = kernel["calls"] * kernel["ms_per_call"]
        assert kernel["calls"] >= 1
        assert abs(spent - kernel["share"] * profile["total_ms"]) <= 5e-4 * (kernel["calls"] + profile["total_ms"])
    rates = [row for row in result["rows"] if row.get("precision") == "bf16" and not row.get("compiled")]
    assert rates and all(row["samples_per_s"] > 0 and "share_of_measured_matmul" in row for row in rates)


def test_the_gpu_benchmark_compares_compiled_variants_on_the_cpu(tmp_path):
    """FlexAttention against SDPA, and max-autotune against the default mode: each compiled, timed
    interleaved, with its speed-up over the first and the labels it gives differently; the preset's own
    compiled row records the settings it ran (one smoke run: each compile costs seconds)."""
    result = _smoke(tmp_path, "imagenet-flex,imagenet-autotune,imagenet-coordesc,imagenet-compiled", timeout=600)
    assert result["errors"] == [], result["errors"]
    assert "in_progress" not in result  # only a run killed inside a section says where it stopped
    compiled = next(row for row in result["rows"] if row.get("compiled"))
    assert compiled["preset"] == result["engine_gpu_compiled"] == _gpu_script().preset_engine()
    flex = next(row for row in result["rows"] if "FlexAttention" in row.get("test", ""))
    tuned = next(row for row in result["rows"] if "max-autotune" in row.get("test", ""))
    descent = next(row for row in result["rows"] if "coordinate-descent" in row.get("test", ""))
    assert flex["flex_layers"] == 2  # the smoke pair's two BEiT blocks
    # Each compile is recorded as it finishes, so a run killed in a later, longer compile still has it.
    assert [c["variant"] for c in result["compiles"]] == [
        "sdpa",
        "flex",
        "default",
        "max-autotune-no-cudagraphs",
        "default",
        "coordinate descent",
    ]
    variants = ((flex, "sdpa", "flex"), (tuned, "default", "max-autotune-no-cudagraphs"))
    for row, first, other in (*variants, (descent, "default", "coordinate descent")):
        assert row[first]["samples_per_s"] > 0 and row[other]["samples_per_s"] > 0 and row[other]["compile_seconds"] > 0
        assert row[other]["speedup"]["median"] > 0 and "speedup" not in row[first]
        assert row[other]["labels_differing"] <= max(1, row["of_samples"] // 100)  # bf16 reordering: a rare flip


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
        "cifar10, imagenet-profile, imagenet-profile-compiled, imagenet-freezing, imagenet-attention, imagenet-flex, "
        "imagenet-autotune, imagenet-coordesc, imagenet-compiled or all"
    ]
