"""End to end: `ray start --head`, `ray job submit jobs/certify.py`, read the Parquet tables, stop the head.

The head runs with `--block` in its own process group, and teardown ends that group only: `ray stop`
would also kill any other Ray cluster on the machine.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ray_bin() -> str | None:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else shutil.which("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    ray_bin = _ray_bin()
    if ray_bin is None:
        pytest.skip("the ray CLI is not installed")
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # The job's `python` must be this environment's, as it is on a cluster node that installed raysmooth.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # unix socket paths must stay under 108 bytes
    # The head records its address in TEMP/ray, where RAY_TMPDIR=TEMP makes Ray look for "the" cluster.
    dashboard = _free_port()
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={_free_port()}",
            f"--dashboard-port={dashboard}",
            # Ports Ray otherwise fixes (52365, 10001): another Ray on the machine (a local `ray.init()`)
            # holding them leaves this head without a job agent ("No available agent to submit job").
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
            f"--temp-dir={temp}/ray",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except OSError:
                if head.poll() is not None or time.time() > deadline:
                    pytest.fail("the Ray head did not come up")
                time.sleep(1)
        yield ray_bin, env, url, temp
    finally:
        # --block: the head takes its cluster down with it, in 2 s; SIGTERM to the whole group instead made
        # every process wait out its own grace period (33 s). What is left of the group is killed after.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(ray_head, *overrides: str) -> subprocess.CompletedProcess:
    ray_bin, env, url, _ = ray_head
    cmd = [
        ray_bin,
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        '{"excludes": [".venv", "runs", "bench/results", ".git"]}',
        "--",
        "python",
        "jobs/certify.py",
        "data=synthetic",
        "model=linear",
        "ray.num_actors=1",
        "plot=false",
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_ray_job_submit_runs_the_certify_job_and_writes_parquet(ray_head, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    proc = _submit(ray_head, "smoothing.n=200", "smoothing.n0=20", f"out={out}")
    assert f"output directory: {out}" in proc.stdout
    counts = pq.read_table(out / "linear" / "counts")
    assert counts.num_rows == 16 * 3 * 2
    certs = pq.read_table(out / "linear" / "certificates")
    assert certs.num_rows > 0


@pytest.mark.slow
def test_ray_job_submit_runs_a_sequential_certification(ray_head, tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    _submit(
        ray_head,
        "smoothing.mode=sequential",
        "smoothing.n0=20",
        "smoothing.sequential.unit=100",
        "smoothing.sequential.n_max=800",
        f"out={out}",
    )
    counts = pq.read_table(out / "linear" / "counts")
    assert pc.max(counts["round"]).as_py() >= 1  # estimation came in rounds
    certs = pq.read_table(out / "linear" / "certificates").to_pylist()
    seq = [c for c in certs if c["method"] == "sequential"]
    assert len(seq) == 16 * 3
    assert all(c["n_used"] <= 20 + 800 for c in seq)  # n_used counts the n0 selection samples too


@pytest.mark.slow
def test_a_run_without_an_address_starts_its_own_cluster_beside_one_that_ray_start_began(ray_head, tmp_path):
    # ray.init() alone would join the head and then refuse the local CPU count ("When connecting to an
    # existing cluster, num_cpus and num_gpus must not be provided"): the run failed on such a machine.
    import pyarrow.parquet as pq

    _, env, _, temp = ray_head
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/certify.py", "data=synthetic", "model=linear", "ray.num_actors=1", "plot=false"]
    cmd += ["smoothing.n=100", "smoothing.n0=10", f"out={out}"]
    proc = subprocess.run(cmd, env={**env, "RAY_TMPDIR": temp}, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ray.address=auto joins that one" in proc.stderr
    assert pq.read_table(out / "linear" / "counts").num_rows == 16 * 3 * 2
