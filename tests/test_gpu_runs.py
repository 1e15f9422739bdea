"""bench/gpu_runs.py keeps GPU benchmark runs apart, numbered, each with the commit it measured."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_runs  # noqa: E402

FRESH = {
    "benchmark": "engine on the papers' architectures (random weights)",
    "when": "2026-11-26 18:00:00",
    "sections": "ceiling",
    "device": "NVIDIA H100 80GB HBM3",
    "peak_bf16_tflops": 989.0,
    "rows": [{"test": "bf16 matrix product 8192^3", "tflops": 770.0}],
    "skipped": [],
    "errors": [],
    "elapsed_s": 20.0,
}


def test_a_fresh_run_becomes_the_next_numbered_run_with_its_commit():
    kept = {"benchmark": "b", "note": "kept", "runs": [{"run": 1, "rows": []}, {"run": 4, "rows": []}]}
    merged = gpu_runs.append_run(FRESH, kept, "abc1234")
    assert merged["note"] == "kept" and [r["run"] for r in merged["runs"]] == [1, 4, 5]
    new = merged["runs"][-1]
    assert new["commit"] == "abc1234" and new["sections"] == "ceiling" and new["rows"] == FRESH["rows"]


def test_the_first_run_starts_the_file_with_the_peak_it_was_read_against():
    merged = gpu_runs.append_run(FRESH, {}, "abc1234")
    assert merged["peak_bf16_tflops"] == 989.0 and merged["runs"][0]["run"] == 1


def test_a_file_of_runs_is_not_a_run():
    with pytest.raises(ValueError, match="not a single run"):
        gpu_runs.append_run({"runs": [], "rows": []}, {}, "abc1234")


def test_runs_of_reads_the_kept_file_and_a_fresh_run_alike():
    assert [r["run"] for r in gpu_runs.runs_of({"runs": [{"run": 2}]})] == [2]
    (fresh,) = gpu_runs.runs_of(FRESH)
    assert fresh["run"] == "new" and fresh["rows"] == FRESH["rows"]


def test_adding_a_run_from_the_command_line_rewrites_the_kept_file(tmp_path):
    result, kept = tmp_path / "out.json", tmp_path / "gpu.json"
    result.write_text(json.dumps(FRESH))
    kept.write_text(json.dumps({"benchmark": "b", "runs": [{"run": 1, "rows": []}]}))
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_runs.py"), "add", str(result), "--into", str(kept)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    runs = json.loads(kept.read_text())["runs"]
    assert [r["run"] for r in runs] == [1, 2] and runs[1]["commit"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_adding_a_file_that_is_not_a_run_is_one_line(tmp_path):
    result = tmp_path / "out.json"
    result.write_text(json.dumps({"runs": []}))
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_runs.py"), "add", str(result), "--into", str(tmp_path / "k.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "not a single run" in done.stderr and not (tmp_path / "k.json").exists()


def test_a_run_killed_inside_a_section_keeps_its_compiles_and_where_it_stopped():
    killed = FRESH | {
        "rows": [],
        "compiles": [{"pair": "imagenet", "variant": "default", "seconds": 91.0}],
        "in_progress": "imagenet: compiled in the default mode and in max-autotune",
    }
    new = gpu_runs.append_run(killed, {}, "abc1234")["runs"][-1]
    assert new["compiles"] == killed["compiles"] and new["in_progress"] == killed["in_progress"]
