"""Nothing wrong ever looks right: what a careless or hostile user can do ends in one line and exit
status 2 (or cannot happen), with nothing lost and nothing counted twice."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from raysmooth import stats
from raysmooth.apps import certify_main
from raysmooth.cli import main as cli
from raysmooth.engine import EngineConfig, Replica
from raysmooth.errors import ConfigError, InputError, whole_number
from raysmooth.models import BaseClassifier, LinearBase
from raysmooth.store import RunStore, StoreError
from raysmooth.units import WorkUnit

from helpers import random_levels, write_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data=synthetic", "model=linear", "smoothing.n=40", "smoothing.n0=8", "ray.num_actors=1", "plot=false"]


pytestmark = pytest.mark.usefixtures("local_ray_per_module")


def _one_line(capsys) -> str:
    """The error as one line, last on stderr; before it at most the run's own progress log lines."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("raysmooth ") and ": error: " in lines[-1], lines
    assert all(" raysmooth INFO " in ln or " raysmooth WARNING " in ln for ln in lines[:-1]), lines
    return lines[-1]


# ---- numbers that must never be produced ------------------------------------------------------------
class NaNModel(BaseClassifier):
    num_classes, input_shape = 3, (1, 2, 2)

    def logits(self, z, sigma, aux_noise=None):
        return torch.full((len(z), 3), float("nan"))


def test_nan_logits_are_refused_not_counted_as_votes_for_class_zero():
    replica = Replica(NaNModel(), [0.25], 0, EngineConfig(batch_size=64))
    with pytest.raises(InputError, match=r"NaN or inf logits .* image 7 at σ=0.25"):
        replica.run([WorkUnit(7, 0, "estimation", 0, 100)], {7: np.full((1, 2, 2), 0.5, np.float32)})


def test_a_single_overflowing_sample_is_caught_too():
    class Overflow(NaNModel):
        def logits(self, z, sigma, aux_noise=None):
            out = torch.zeros((len(z), 3))
            out[z.flatten(1)[:, 0] > 1.5, 0] = float("inf")  # only far-out noise draws overflow
            return out

    replica = Replica(Overflow(), [1.0], 0, EngineConfig(batch_size=50))
    with pytest.raises(InputError, match="NaN or inf"):
        replica.run([WorkUnit(0, 0, "estimation", 0, 200)], {0: np.full((1, 2, 2), 0.9, np.float32)})


class WideModel(NaNModel):
    """Declares 3 classes but returns 5 logits: its votes for classes 3 and 4 would land in the next unit's row."""

    def logits(self, z, sigma, aux_noise=None):
        out = torch.zeros((len(z), 5))
        out[:, 4] = 1.0
        return out


def test_logits_wider_than_the_declared_classes_are_refused_not_counted_for_another_image():
    replica = Replica(WideModel(), [0.25], 0, EngineConfig(batch_size=64))
    images = {i: np.full((1, 2, 2), 0.5, np.float32) for i in (0, 1)}
    units = [WorkUnit(i, 0, "estimation", 0, 40) for i in (0, 1)]
    with pytest.raises(InputError, match=r"returned shape \(64, 5\) .* declared with 3 classes"):
        replica.run(units, images)


def test_an_unusable_device_is_one_config_error_naming_it():
    with pytest.raises(ConfigError, match="device 'tpu' cannot be used"):
        Replica(NaNModel(), [0.25], 0, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA GPU.*gpus_per_actor"):
            Replica(NaNModel(), [0.25], 0, device="cuda")


@pytest.mark.parametrize(
    "value,expected",
    [(1e5, 100_000), (np.int64(7), 7), (np.float32(3.0), 3), (2**70, 2**70), (np.array(4), 4), (torch.tensor(5), 5)],
)
def test_a_whole_number_given_as_any_numeric_type_is_taken(value, expected):
    assert whole_number("n", value) == expected


@pytest.mark.parametrize(
    "value", [100.5, float("nan"), float("inf"), True, np.bool_(True), "3", None, 0, -2, torch.tensor(2.5), np.ones(2)]
)
def test_anything_but_a_whole_number_of_at_least_one_is_refused_not_truncated(value):
    with pytest.raises(InputError, match="n must be a whole number of at least 1"):
        whole_number("n", value)


@pytest.mark.parametrize("sigma", [float("nan"), float("inf"), -0.5, 0.0])
def test_certify_refuses_a_sigma_that_is_not_a_positive_number(sigma):
    counts = stats.SparseCounts.from_dense(np.array([[990, 10]]))
    with pytest.raises(ValueError, match="sigma"):
        stats.certify(counts, counts, sigma, 0.001)


@pytest.mark.parametrize("p0", [float("nan"), float("inf"), 0.3, 1.0])
def test_the_cascade_refuses_a_threshold_outside_its_range(p0):
    levels, _ = random_levels(np.random.default_rng(0), 5, [0.25, 0.5], 4)
    with pytest.raises(ValueError, match=r"\[0.5, 1\)"):
        stats.cascade_sweep(levels, [0.5, p0], 0.001, "strict")


@pytest.mark.parametrize("alpha", [0.5, 0.6, 0.99])
def test_an_alpha_of_one_half_or_more_is_refused_since_its_bound_would_pass_the_frequency(alpha):
    counts = stats.SparseCounts.from_dense(np.array([[80, 20]]))
    assert stats.cp_lower(80, 100, alpha) > 0.79  # what such a "certificate" would claim: p_A about 80/100
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 0.5\)"):
        stats.certify(counts, counts, 0.25, alpha)


def test_the_job_refuses_an_alpha_of_one_half_or_more_before_it_samples(tmp_path, capsys):
    assert certify_main([*SMALL, "smoothing.alpha=0.6", f"out={tmp_path}"]) == 2
    assert "smoothing.alpha" in _one_line(capsys)
    assert not any(tmp_path.iterdir())


def test_a_budget_beyond_int64_is_refused_before_the_run_starts(tmp_path, capsys):
    """The stored counts are int64: a budget past them could never be stored."""
    assert certify_main([*SMALL, f"smoothing.n={2**63}", f"out={tmp_path}"]) == 2
    assert "smoothing.n must be below 2**63" in _one_line(capsys)


def test_a_model_with_one_class_is_refused_not_certified_as_class_zero_everywhere():
    one_logit = LinearBase(np.ones((1, 4)), np.zeros(1), (1, 2, 2))  # a binary classifier's single logit
    with pytest.raises(ConfigError, match=r"predicts 1 class; smoothing needs two or more.*\[0, z\]"):
        Replica(one_logit, [0.25], run_seed=0)


def test_a_summary_prepared_for_one_policy_refuses_the_other_in_words():
    levels, _ = random_levels(np.random.default_rng(0), 5, [0.25, 0.5], 4)
    prepared = stats.prepare_levels(levels, ("strict",))
    with pytest.raises(ValueError, match="summarised for the strict policy"):
        stats.cascade_sweep(prepared, [0.5], 0.001, "reference")


def test_the_radius_uses_the_sigma_the_noise_really_had(tmp_path):
    """σ = 0.12 is 0.11999999731779099 in float32, the noise's σ; the radius must not use the larger 0.12."""
    from raysmooth.certificates import counts_view, derive_certificates, noise_info

    levels, _ = random_levels(np.random.default_rng(3), 20, [0.12], 5, concentration=0.05)
    store = write_run(tmp_path / "run", levels, np.zeros(20, int))
    certs = derive_certificates(
        counts_view(store.read_counts()), alpha=0.001, methods=("certify",), noise=noise_info(store.manifest)
    )
    ok = certs.column("prediction").to_numpy() >= 0
    assert ok.any()
    applied = float(np.float32(0.12))
    radius = certs.column("radius").to_numpy()[ok]
    expect = applied * norm.ppf(certs.column("p_lower").to_numpy()[ok])
    assert np.allclose(radius, expect, rtol=0, atol=1e-15) and np.all(
        radius < 0.12 * norm.ppf(certs["p_lower"].to_numpy()[ok])
    )


@pytest.mark.parametrize("bad", ["nan", "", "abc", "1.5"])
@pytest.mark.parametrize("column", ["predict", "label"])
def test_analyze_refuses_a_tsv_with_a_bad_cell(tmp_path, capsys, bad, column):
    rows = {
        "idx": ["0", "1"],
        "label": ["1", "2"],
        "predict": ["1", "2"],
        "radius": ["0.5", "0.2"],
        "correct": ["1", "1"],
    }
    rows[column][1] = bad
    lines = ["\t".join(rows)] + ["\t".join(rows[c][i] for c in rows) for i in range(2)]
    path = tmp_path / "cert.tsv"
    path.write_text("\n".join(lines) + "\n")
    assert cli(["analyze", str(path)]) == 2
    assert column in _one_line(capsys)


def test_analyze_refuses_a_tsv_that_repeats_an_image(tmp_path, capsys):
    """Two shards that overlap, concatenated: the repeated image would count twice in every figure."""
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
    rows = ["0\t3\t3\t0.5\t1\t0:00:01", "1\t2\t-1\t0.0\t0\t0:00:01", "0\t3\t3\t0.5\t1\t0:00:01"]
    path = tmp_path / "cert.tsv"
    path.write_text("\n".join([header, *rows]) + "\n")
    assert cli(["analyze", str(path)]) == 2
    line = _one_line(capsys)
    assert "idx 0 appears 2 times (lines 2 and 4)" in line and "one row per image" in line
    path.write_text("\n".join([header, *rows[:2]]) + "\n")
    assert cli(["analyze", str(path)]) == 0


# ---- runs that must refuse, lock or clean up ----------------------------------------------------------
def test_a_second_run_into_a_locked_directory_is_refused_naming_the_holder(tmp_path, capsys):
    holder = RunStore.for_run(tmp_path / "linear", {"x": 1})
    try:
        with pytest.raises(StoreError, match=rf"in use by another run \(pid {os.getpid()} on"):
            RunStore.for_run(tmp_path / "linear", {"x": 1})
    finally:
        holder.release()
    RunStore.for_run(tmp_path / "linear", {"x": 1}).release()  # free again


def test_a_file_system_that_cannot_lock_runs_with_a_warning_not_refused_as_held(tmp_path, monkeypatch, caplog):
    """flock fails with ENOLCK or EOPNOTSUPP on some network and FUSE mounts: no run holds the folder,
    so 'in use by another run' would refuse every run there for ever."""
    import errno
    import fcntl

    def cannot_lock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", cannot_lock)
    with caplog.at_level("WARNING", logger="raysmooth"):
        RunStore.for_run(tmp_path / "linear", {"x": 1}).release()
    assert "this file system cannot lock files (No locks available); run one run in this folder" in caplog.text


def test_a_crashed_run_leaves_no_lock_behind(tmp_path):
    """The lock is an flock: the kernel drops it with the process, however the process ends."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from raysmooth.store import RunStore; "
        f"s = RunStore.for_run({str(tmp_path / 'run')!r}, {{'x': 1}}); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(StoreError, match="in use"):
        RunStore.for_run(tmp_path / "run", {"x": 1})
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    RunStore.for_run(tmp_path / "run", {"x": 1}).release()


def test_a_run_does_not_resume_on_a_folder_whose_image_ids_now_name_other_images(tmp_path, capsys):
    from PIL import Image

    tree = tmp_path / "images"
    for name in ("cat", "dog"):
        (tree / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tree / name / f"{i}.png")
    job = [
        *[a for a in SMALL if not a.startswith(("data=", "model="))],
        "data=imagenet",
        "data.name=image_folder",
        f"data.root={tree}",
        "data.skip=1",
        "+data.options.size=8",
        "model=linear",
        "model.input_shape=[3,8,8]",
        "model.options.num_classes=2",
        f"out={tmp_path / 'out'}",
    ]
    assert certify_main(job) == 0
    (tree / "cat" / "0.png").unlink()  # dog/0.png now has id 1, which the run stored for cat/1.png
    capsys.readouterr()
    assert certify_main(job) == 2
    assert "the test set is not the one this run started on" in _one_line(capsys)


def test_a_run_does_not_resume_with_model_files_that_changed(tmp_path, capsys):
    """A model fine-tuned again into the same folder: the stored counts were drawn by the old weights."""
    import shutil

    folder = shutil.copytree(ROOT / "raysmooth" / "embedded" / "digits" / "onestep", tmp_path / "onestep")
    job = [
        "model=toy_onestep",
        f"model.onestep.path={folder}",
        "data.max_images=2",
        "smoothing.n=40",
        "smoothing.n0=8",
        "ray.num_actors=1",
        "plot=false",
        f"out={tmp_path / 'out'}",
    ]
    assert certify_main(job) == 0
    assert certify_main(job) == 0  # the same files: resumes (nothing left to sample)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: a retrained model differs everywhere
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert certify_main(job) == 2
    assert "the files of model.onestep changed since this run started" in _one_line(capsys)


def test_two_jobs_into_one_directory_store_every_row_once(tmp_path, capsys):
    """The second job is refused while the first holds the directory; nothing is doubled."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    args = [sys.executable, "jobs/certify.py", *SMALL, "smoothing.n=60000", f"out={tmp_path}"]
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "linear" / ".lock").exists() or not (tmp_path / "linear" / ".lock").read_text():
        assert time.time() < deadline and first.poll() is None, first.stderr.read() if first.poll() is not None else ""
        time.sleep(0.2)
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=300) == 0
    assert second.returncode == 2 and "in use by another run" in second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith("raysmooth certify: error:")
    table = RunStore.open(tmp_path / "linear").read_counts()
    import pyarrow.parquet as pq

    raw = pq.read_table(tmp_path / "linear" / "counts")  # what DuckDB or polars would see
    assert raw.num_rows == table.num_rows == 16 * 3 * 2


def test_a_lazy_cascade_table_says_its_lower_sigma_rows_count_only_the_images_sent_down(tmp_path, capsys):
    assert certify_main([*SMALL, "smoothing.mode=cascade", f"out={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "| cascade strict p0=0.5 |" in out
    assert "a certify row below the largest σ counts only the images the cascade sent down" in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_job_stopped_by_a_signal_commits_its_finished_rows_and_says_how_to_resume(tmp_path, signum):
    """ray job stop, a scheduler's preemption: SIGTERM, then SIGKILL a few seconds later; the terminal or
    ssh session of a run closed: SIGHUP (which ended the run with its unflushed rows lost)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    args = [sys.executable, "jobs/certify.py", *SMALL, "data.options.num_images=400", "smoothing.n=100000"]
    args += ["flush_every=1000000", "flush_seconds=100000", f"out={tmp_path}"]  # no flush before the end
    args += ["progress_seconds=0.5"]  # the signal goes once a progress line shows images finished
    job = subprocess.Popen(  # SIGHUP as a shell leaves it, whatever this test runs under (nohup ignores it)
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    for line in job.stderr:  # the progress line once images are finished
        if re.search(r"progress: [1-9]\d*/400 images", line):
            break
    job.send_signal(signum)
    rest = job.stderr.read()
    assert job.wait(timeout=60) == 128 + signum, rest
    assert rest.strip().splitlines()[-1] == (
        f"raysmooth certify: terminated ({signum.name}); the rows finished so far are stored: run the same command "
        "again to resume"
    )
    assert "SIGTERM received" not in rest  # Ray's stack dump
    assert RunStore.open(tmp_path / "linear").read_counts().num_rows > 0


def test_a_terminal_that_cannot_write_sigma_gets_the_lines_not_a_traceback(tmp_path):
    """A latin-1 or ASCII locale: printing a σ (the final table of a run, an error) raised UnicodeEncodeError."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONIOENCODING": "ascii"}
    tsv = tmp_path / "cohen_σ_0.50.tsv"  # its name is the table's source column
    tsv.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:00:01\n", encoding="utf-8")
    cli = [sys.executable, "-m", "raysmooth.cli"]
    table = subprocess.run([*cli, "analyze", str(tsv)], env=env, capture_output=True, timeout=120)
    assert table.returncode == 0 and b"| cohen_?_0.50 |" in table.stdout, table.stderr[-2000:]
    error = subprocess.run([*cli, "certify", "smoothing.sigmas=[0.25,0.25]"], env=env, capture_output=True, timeout=120)
    assert error.returncode == 2 and error.stderr.strip().endswith(b"lists a ? twice: [0.25, 0.25]"), error.stderr


@pytest.mark.parametrize("enter", ["command", "after ray.init"])
def test_a_run_under_nohup_keeps_ignoring_sighup(enter):
    """`nohup raysmooth certify … &` must outlive its terminal: a hangup the caller ignores stays ignored."""
    from raysmooth.signals import raise_on_sigterm, sigterm_raises

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with sigterm_raises():
            if enter == "after ray.init":
                raise_on_sigterm()
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_hangup_raises_only_while_a_command_runs():
    from raysmooth.signals import Terminated, sigterm_raises

    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated) as caught, sigterm_raises():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler raises here, in the main thread
        assert caught.value.exit_status == 129 and caught.value.signal_name == "SIGHUP"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


def test_the_directory_of_a_failed_start_takes_the_corrected_command(tmp_path, capsys):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert (
        certify_main(
            [
                *SMALL,
                "model=toy_onestep",
                "data=digits",
                "data.max_images=4",
                f"+model.onestep.checkpoint={bad}",
                f"out={tmp_path}",
            ]
        )
        == 2
    )
    assert "not a valid safetensors file" in _one_line(capsys)
    assert not (tmp_path / "onestep" / "manifest.json").exists()
    assert certify_main([*SMALL, "model=toy_onestep", "data=digits", "data.max_images=4", f"out={tmp_path}"]) == 0


def _checkpoint(tmp_path, kind):
    path = tmp_path / ("clf.pt" if "pt" in kind.split("_") else "clf.safetensors")
    if kind == "garbage_safetensors":
        path.write_bytes(os.urandom(256))
    elif kind == "garbage_pt":
        path.write_bytes(b"\x80\x02garbage" * 10)
    elif kind == "pt_custom_class":
        torch.save({"model": LinearBase(np.eye(2, 4), np.zeros(2), (1, 2, 2))}, path)
    elif kind == "wrong_keys":
        from safetensors.torch import save_file

        save_file({"conv.weight": torch.zeros(3, 3)}, str(path))
    return path


@pytest.mark.parametrize(
    "kind,message,where",
    [
        (
            "garbage_safetensors",
            "not a valid safetensors file",
            "model.onestep.checkpoint",
        ),  # its header: on the driver
        ("garbage_pt", "not a readable torch checkpoint", "on Ray worker"),
        ("pt_custom_class", "arbitrary pickled code", "on Ray worker"),
        ("wrong_keys", "does not fit the model", "on Ray worker"),
    ],
)
def test_a_checkpoint_that_cannot_be_loaded_is_one_line(tmp_path, capsys, kind, message, where):
    path = _checkpoint(tmp_path, kind)
    assert (
        certify_main(
            [
                *SMALL,
                "model=toy_onestep",
                "data=digits",
                "data.max_images=4",
                f"+model.onestep.checkpoint={path}",
                f"out={tmp_path / 'out'}",
            ]
        )
        == 2
    )
    err = _one_line(capsys)
    assert message in err and where in err


def test_an_empty_raysmooth_out_is_refused_not_runs_written_at_the_root(capsys, monkeypatch):
    """`export RAYSMOOTH_OUT=$SHARED` with $SHARED unset made the default out /digits."""
    monkeypatch.setenv("RAYSMOOTH_OUT", "")
    assert certify_main(SMALL) == 2
    assert "out=/synthetic is a folder at the file system's root because RAYSMOOTH_OUT is set but empty" in (
        _one_line(capsys)
    )
    assert not Path("/synthetic").exists()


def test_a_raysmooth_out_under_an_unexpanded_tilde_goes_home_not_to_a_folder_named_tilde(tmp_path, monkeypatch):
    """`export RAYSMOOTH_OUT="~/runs"` (quoted: no shell expands it) wrote the results under the home folder
    and hydra's records, and a later sweep's certificates, into a folder named "~" in the working directory."""
    from raysmooth.apps import sweep_main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAYSMOOTH_OUT", "~/runs")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert certify_main(SMALL) == 0
    run = tmp_path / "home" / "runs" / "synthetic" / "linear"
    assert (run / "manifest.json").is_file() and list((run.parent / ".hydra").glob("*/.hydra/config.yaml"))
    assert sweep_main(['run_dir="~/runs/synthetic/linear"', "p0=0.6"]) == 0
    assert list((run / "sweeps").glob("*/sweep.json")) and list((run / "sweeps" / ".hydra").iterdir())
    assert not (tmp_path / "work" / "~").exists()


def test_out_naming_a_run_directory_is_refused_not_a_new_run_started_inside_it(tmp_path, capsys):
    """To resume runs/digits/dds the command takes out=runs/digits; out=runs/digits/dds would start a
    new run from nothing in runs/digits/dds/dds."""
    RunStore.create(tmp_path / "dds", {"x": 1})
    before = sorted(p.name for p in (tmp_path / "dds").iterdir())
    assert certify_main([*SMALL, f"out={tmp_path / 'dds'}"]) == 2
    assert (
        f"is a run directory, and out is the folder that holds one run directory per model (out/<model.name>); "
        f"to resume it, give out={tmp_path} (with model.name=dds)" in _one_line(capsys)
    )
    assert certify_main([*SMALL, f"out={tmp_path / 'dds' / 'counts' / 'x'}"]) == 2
    assert f"inside the run directory {tmp_path / 'dds'}" in _one_line(capsys)
    assert sorted(p.name for p in (tmp_path / "dds").iterdir()) == before


def test_the_resume_hint_for_a_grid_jobs_run_directory_is_an_override_hydra_reads(tmp_path, capsys):
    """A -m job's folder is named like smoothing.n=40, which hydra reads only quoted."""
    import shlex

    from raysmooth.config import compose

    run = tmp_path / "smoothing.n=40" / "linear"
    RunStore.create(run, {"x": 1})
    assert certify_main([*SMALL, f'out="{run}"']) == 2
    hint = _one_line(capsys).split("to resume it, give ")[1]
    words = shlex.split(hint.replace(" (with ", " ").rstrip(")"))
    assert compose("certify", [*SMALL, *words]).out == str(run.parent)


def test_hydra_changing_the_working_directory_is_refused_not_a_run_that_never_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # with hydra's chdir a relative out landed in a new .hydra/<time>/ folder each run
    assert certify_main([*SMALL, "hydra.job.chdir=true", "out=runs"]) == 2
    assert "hydra.job.chdir=true is not supported" in _one_line(capsys)
    assert not list(tmp_path.rglob("manifest.json"))


def test_the_package_without_its_checkout_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    from raysmooth import apps

    monkeypatch.setattr(apps, "CONFIG_DIR", tmp_path / "site-packages" / "configs")  # as a plain `pip install .`
    assert certify_main([*SMALL, f"out={tmp_path}"]) == 2
    assert "the jobs run from a raysmooth checkout; install it from a clone with `pip install -e .`" in _one_line(
        capsys
    )


def test_a_bad_batch_size_is_refused_before_any_actor_starts(tmp_path, capsys):
    assert certify_main([*SMALL, "engine.batch_size=0", f"out={tmp_path}"]) == 2
    assert "engine.batch_size" in _one_line(capsys)
    assert not any(tmp_path.iterdir())


def test_more_actors_than_the_local_cluster_holds_are_refused_not_waited_for(tmp_path, capsys):
    assert certify_main([*SMALL, "ray.cpus_per_actor=1000", f"out={tmp_path}"]) == 2
    line = _one_line(capsys)
    assert "ray.num_actors=1 with 1000 CPU each needs 1000 CPU(s); this local Ray cluster has" in line, line


def test_a_local_ray_that_does_not_start_is_one_line_that_says_what_to_try(tmp_path, capsys, monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()

    def slow_start(*args, **kwargs):
        raise TimeoutError("The current node timed out during startup")

    monkeypatch.setattr(ray, "init", slow_start)
    assert certify_main([*SMALL, f"out={tmp_path}"]) == 2
    err = _one_line(capsys)
    assert "could not start or reach a local Ray cluster" in err and "ray stop" in err


def test_a_job_with_a_sigma_in_what_looks_like_0_255_units_runs_and_says_so(tmp_path, capsys):
    assert certify_main([*SMALL, "smoothing.sigmas=[64]", f"out={tmp_path}"]) == 0
    err = capsys.readouterr().err
    assert err.count("divide it by 255") == 1, err


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing listens there


def test_a_cluster_address_where_nothing_listens_is_one_line_at_once(tmp_path, capsys, monkeypatch):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init would retry for minutes"))
    port = _closed_port()
    assert certify_main([*SMALL, f"ray.address=127.0.0.1:{port}", f"out={tmp_path}"]) == 2
    err = _one_line(capsys)
    assert f"could not reach the Ray cluster at 127.0.0.1:{port}: nothing answers" in err


def test_an_address_ray_resolves_itself_is_left_to_ray():
    from raysmooth.distributed.session import unreachable

    assert unreachable("auto") is None and unreachable("local") is None
    assert unreachable("http://127.0.0.1:1") is None  # a dashboard address: Ray's to judge
    assert "nothing answers" in unreachable(f"ray://127.0.0.1:{_closed_port()}")


@pytest.mark.parametrize("target", ["folder", "/sys/raysmooth-plot.png", "missing/plot.png", "plot.jpg"])
def test_analyze_plot_to_a_place_it_cannot_write_is_one_line(tmp_path, capsys, target):
    levels, _ = random_levels(np.random.default_rng(1), 8, [0.25, 0.5], 4)
    store = write_run(tmp_path / "run", levels, np.zeros(8, int))
    from raysmooth.certificates import counts_view, derive_certificates

    store.append_certificates(derive_certificates(counts_view(store.read_counts()), alpha=0.001))
    (tmp_path / "folder").mkdir()
    plot = target if target.startswith("/") else str(tmp_path / target)
    assert cli(["analyze", str(tmp_path / "run"), "--plot", plot]) == 2
    _one_line(capsys)
    assert capsys.readouterr().out == ""  # nothing printed before the refusal
    assert not list(tmp_path.rglob("*.tmp.png")) and not list(Path("/sys").glob("*raysmooth*"))


def test_a_cifar_batch_that_is_not_a_dict_is_one_line(tmp_path, capsys):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    assert (
        certify_main(
            [
                *SMALL,
                "data=cifar10",
                f"data.root={tmp_path}",
                "model=linear",
                "model.input_shape=[3,32,32]",
                f"out={tmp_path / 'out'}",
            ]
        )
        == 2
    )
    assert "holds a list, not a dict" in _one_line(capsys)


def test_terminal_escape_codes_never_reach_our_messages(tmp_path):
    from raysmooth.errors import ModelLoadError
    from raysmooth.models.checkpoints import load_state_dict_file

    path = _checkpoint(tmp_path, "pt_custom_class")
    with pytest.raises(ModelLoadError) as info:
        load_state_dict_file(path)
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_pickle_would_run_a_command_is_refused_by_name_and_never_runs_it(tmp_path):
    """Found by hand: torch 2.14 words a blocked function ("unsupported GLOBAL posix.system whose module
    posix is blocked") unlike a class, and the refusal read as a damaged file."""
    from raysmooth.errors import ModelLoadError
    from raysmooth.models.checkpoints import load_state_dict_file

    marker = tmp_path / "ran"
    torch.save({"weight": _RunsACommand(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match=r"refused: the checkpoint holds a \S*system object.*arbitrary pickled"):
        load_state_dict_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_convert_adm_has_no_image_size_option_that_could_not_work(capsys):
    with pytest.raises(SystemExit) as info:
        cli(["convert-adm", "in.pt", "out", "--preset", "cifar10", "--image-size", "64"])
    assert info.value.code == 2
    assert "--image-size" in capsys.readouterr().err


def test_a_damaged_part_file_is_named_with_what_to_do(tmp_path, capsys):
    levels, _ = random_levels(np.random.default_rng(2), 6, [0.25, 0.5], 4)
    write_run(tmp_path / "run", levels, np.zeros(6, int))
    part = sorted((tmp_path / "run" / "counts").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:40])
    assert cli(["sweep", str(tmp_path / "run"), "--p0", "0.5"]) == 2
    err = _one_line(capsys)
    assert part.name in err and "move it aside" in err and "sampled again with the same noise" in err


def test_staging_files_of_a_crash_are_cleaned_by_the_next_run(tmp_path):
    levels, _ = random_levels(np.random.default_rng(2), 6, [0.25], 4)
    store = write_run(tmp_path / "run", levels, np.zeros(6, int))
    stale = tmp_path / "run" / "counts" / "_staging-dead.parquet.tmp"
    stale.write_bytes(b"half a file")
    RunStore.for_run(tmp_path / "run", store.manifest["config"]).release()
    assert not stale.exists()


def test_a_full_disk_is_one_line_that_keeps_the_stored_rows_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """ENOSPC mid-run (a 40-hour run filling its volume): the half-written part is removed, the line names
    the table and says to free space and resume; the resumed run gives the uninterrupted run's rows."""
    import errno

    import pyarrow.parquet as pq

    from raysmooth import store as store_module

    job = [*SMALL, "flush_every=10", "ray.samples_per_task=100"]
    assert certify_main([*job, f"out={tmp_path / 'whole'}"]) == 0
    writes = {"left": 2}
    real_write = pq.write_table

    def fill_the_disk(table, where, **kwargs):
        writes["left"] -= 1
        if writes["left"] < 0:
            where.write(b"PAR1 half a part")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, **kwargs)

    monkeypatch.setattr(store_module.pq, "write_table", fill_the_disk)
    capsys.readouterr()
    assert certify_main([*job, f"out={tmp_path / 'full'}"]) == 2
    err = _one_line(capsys)
    assert str(tmp_path / "full" / "linear" / "counts") in err and "no space left" in err.lower(), err
    assert "free some space and run the same command again to resume" in err, err
    assert not list((tmp_path / "full" / "linear" / "counts").glob("_staging-*"))
    assert len(RunStore.open(tmp_path / "full" / "linear").read_counts()) > 0  # what was stored is kept
    monkeypatch.setattr(store_module.pq, "write_table", real_write)
    assert certify_main([*job, f"out={tmp_path / 'full'}"]) == 0
    columns = ["image_id", "sigma", "phase", "round", "n", "classes", "counts"]
    order = [(c, "ascending") for c in columns[:4]]
    resumed = RunStore.open(tmp_path / "full" / "linear").read_counts().select(columns).sort_by(order)
    whole = RunStore.open(tmp_path / "whole" / "linear").read_counts().select(columns).sort_by(order)
    assert resumed.equals(whole)


@pytest.mark.parametrize(
    "changed, hint",
    [
        (
            ["smoothing.alpha=0.01"],
            "raysmooth sweep {out} --alpha 0.01 --p0 0.5,0.8 --policy strict (and --policy reference)",
        ),
        (
            ["smoothing.p0=[0.6,0.7]", "smoothing.policies=[reference]"],
            "--alpha 0.001 --p0 0.6,0.7 --policy reference ",
        ),
        (["smoothing.n=400"], None),  # other counts: nothing to sweep
        (["smoothing.alpha=0.01", "smoothing.n=400"], None),
        (["smoothing.sigmas=[0.5]", "smoothing.alpha=0.01"], "raysmooth sweep {out} --alpha 0.01 certifies"),  # one σ
    ],
)
def test_a_full_run_asked_again_at_another_alpha_or_p0_is_pointed_at_the_sweep(tmp_path, changed, hint):
    """Certifying the same counts at α = 0.01 was refused as 'another config' with the advice to use a new
    directory, which samples every image again; a sweep of the stored counts answers it."""
    from raysmooth import runner
    from raysmooth.config import compose

    base = ["data=synthetic", "model=linear", f"out={tmp_path}", *[c for c in changed if "sigmas" in c]]
    with runner._run_store(tmp_path / "linear", compose("certify", base)) as store:
        store.commit_manifest()
    with pytest.raises(StoreError, match="another config") as info:
        runner._run_store(tmp_path / "linear", compose("certify", base + changed))
    if hint is None:
        assert "sweep" not in str(info.value)
    else:
        assert hint.format(out=tmp_path / "linear") in str(info.value) and "nothing needs sampling" in str(info.value)
