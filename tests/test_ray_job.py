"""End to end: `ray start --head`, `ray job submit jobs/certify.py`, read the Parquet tables, `ray stop`."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ray_bin() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else shutil.which("ray")


@pytest.fixture
def ray_head(tmp_path):
    ray_bin = _ray_bin()
    if ray_bin is None:
        pytest.skip("the ray CLI is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # The job's `python` must be this environment's, as it is on a cluster node that installed raysmooth.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    import ray

    if ray.is_initialized():
        ray.shutdown()
    import tempfile

    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # unix socket paths must stay under 108 bytes
    start = subprocess.run(
        [ray_bin, "start", "--head", "--port=0", "--dashboard-port=8265", "--num-cpus=2", "--num-gpus=0",
         "--object-store-memory=200000000", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        yield ray_bin, env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_the_certify_job_and_writes_parquet(ray_head, tmp_path):
    import pyarrow.parquet as pq

    ray_bin, env = ray_head
    out = tmp_path / "out"
    cmd = [ray_bin, "job", "submit", "--address", "http://127.0.0.1:8265", "--working-dir", str(ROOT),
           "--runtime-env-json", '{"excludes": [".venv", "runs", "bench/results", ".git"]}', "--",
           "python", "jobs/certify.py", "data=synthetic", "model=linear", "smoothing.n=200", "smoothing.n0=20",
           "ray.num_actors=1", "plot=false", f"out={out}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"output directory: {out}" in proc.stdout
    counts = pq.read_table(out / "linear" / "counts")
    assert counts.num_rows == 16 * 3 * 2
    certs = pq.read_table(out / "linear" / "certificates")
    assert certs.num_rows > 0
