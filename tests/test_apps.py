"""One front end: the hydra apps behind `raysmooth certify|sweep|finetune` and `python jobs/*.py`,
typed configs checked once at the edge, and a torch-free path for the statistics commands."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raysmooth.apps import certify_main
from raysmooth.config import CertifyCfg, compose
from raysmooth.errors import ConfigError
from raysmooth.store import RunStore

from helpers import random_levels, write_run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data=synthetic", "model=linear", "smoothing.n=40", "smoothing.n0=8", "ray.num_actors=1", "plot=false"]


pytestmark = pytest.mark.usefixtures("local_ray_per_module")


def _run(args, **kw):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300, **kw)


def test_the_script_and_the_command_are_one_hydra_app():
    script = _run(["jobs/certify.py", "smoothing.n=123", "--cfg", "job"])
    command = _run(["-m", "raysmooth.cli", "certify", "smoothing.n=123", "--cfg", "job"])
    assert script.returncode == command.returncode == 0, script.stderr + command.stderr
    assert "'n': 123" in script.stdout and script.stdout == command.stdout


def test_choosing_a_model_prints_its_config_with_cfg_job(capsys):
    # choosing a model clears `compare`; that override must not land after --cfg's argument
    assert certify_main(["model=linear", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "compare: []" in out and "base: linear" in out


def test_help_lists_only_the_options_a_group_really_has(capsys):
    """The schemas type the groups from the root config; none is an option (data=schema ran digits)."""
    assert certify_main(["--help"]) == 0
    groups = capsys.readouterr().out.split("Config groups (group=option):")[1].split("Examples:")[0]
    assert "data: cifar10, digits, imagenet, synthetic\n" in groups and "schema" not in groups


def test_a_run_keeps_hydras_records_beside_its_results(tmp_path):
    assert certify_main([*SMALL, f"out={tmp_path}"]) == 0
    records = list((tmp_path / ".hydra").glob("*/.hydra/config.yaml"))
    assert len(records) == 1 and "'n': 40" in records[0].read_text()
    assert (records[0].parent.parent / "certify.log").is_file()


def test_progress_seconds_sets_how_often_a_run_logs_its_progress(tmp_path, capfd):
    """A 40-hour job's log wants a line every few minutes, a short one every second; the default is 10 s."""
    args = [*SMALL, "data.options.num_images=400", "smoothing.n=2000", "progress_seconds=0.05", f"out={tmp_path}"]
    assert certify_main(args) == 0
    done = [int(m) for m in re.findall(r"progress: (\d+)/400 images", capfd.readouterr().err.replace(",", ""))]
    assert len([d for d in done if 0 < d < 400]) >= 2, done  # the 10 s default logs only the first and the last


def test_runs_started_in_the_same_second_keep_their_own_hydra_records(tmp_path, monkeypatch):
    """A script that starts one job per model (`… model=$m &`) starts them within a second: their records
    shared one .hydra/<time>/ folder, the last job's config.yaml standing for both."""
    import datetime as dt

    import hydra.core.utils

    ticks = iter(range(1, 1000))

    class SameSecond(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 27, 12, 0, 0, next(ticks))

    monkeypatch.setattr(hydra.core.utils, "datetime", SameSecond)
    for name in ("first", "second"):
        assert certify_main([*SMALL, f"out={tmp_path}", f"model.name={name}"]) == 0
    overrides = sorted(p.read_text() for p in (tmp_path / ".hydra").glob("*/.hydra/overrides.yaml"))
    assert len(overrides) == 2 and "model.name=first" in overrides[0] and "model.name=second" in overrides[1]


def test_a_multirun_grid_gives_each_job_its_own_run_directory(tmp_path):
    assert certify_main(["-m", *SMALL, "smoothing.n=40,60", f"out={tmp_path}"]) == 0
    runs = sorted(p.parent for p in tmp_path.glob("*/linear/manifest.json"))
    assert [r.parent.name for r in runs] == ["smoothing.n=40", "smoothing.n=60"]
    assert [RunStore.open(r).manifest["n"] for r in runs] == [40, 60]
    assert len(list((tmp_path / ".hydra").glob("multirun-*/*/.hydra/overrides.yaml"))) == 2


def test_flags_may_stand_among_the_overrides_as_the_readme_writes_them(tmp_path, capsys):
    """`raysmooth certify key=value … -m key=a,b`: argparse alone refused the overrides after the flag."""
    from raysmooth.cli import main as cli

    assert cli(["certify", *SMALL, f"out={tmp_path}", "-m", "smoothing.n=40,60"]) == 0
    assert sorted(p.parent.parent.name for p in tmp_path.glob("*/linear/manifest.json")) == [
        "smoothing.n=40",
        "smoothing.n=60",
    ]
    assert cli(["certify", "smoothing.n=7", "--cfg", "job", "smoothing.n0=3"]) == 0
    out = capsys.readouterr().out
    assert "n0: 3\n  'n': 7\n" in out


@pytest.mark.parametrize(
    "args, says",
    [
        (["--foo"], "unrecognized arguments: --foo"),
        (["--cfg", "jb"], "argument --cfg/-c: invalid choice: 'jb'"),
        (["model=linear", "--cfg"], "argument --cfg/-c: expected one argument"),
        (["-m", "--cfg", "job"], "only one of --run, --multirun (-m), --cfg and --info can be given"),
    ],
)
def test_a_flag_that_cannot_work_is_one_line(args, says, capsys):
    from raysmooth.cli import main as cli

    assert cli(["certify", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raysmooth certify: error: {says}") and "\n" not in err, err


@pytest.mark.parametrize("grid", ["smoothing.alpha=0.001,0.01", "smoothing.p0=[0.5],[0.7]"])
def test_a_grid_over_thresholds_alone_is_refused_for_a_sweep_of_the_stored_counts(tmp_path, capsys, grid):
    """In full mode α and p0 change no count: each job of the grid would sample the same counts again."""
    out = tmp_path / "never"
    assert certify_main(["-m", *SMALL, grid, f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raysmooth certify: error: a -m grid over {grid.split('=')[0]} alone would sample")
    assert "raysmooth sweep OUT/MODEL" in err and not out.exists()


def test_a_mistake_in_any_job_of_a_grid_stops_the_grid_before_its_first_job(tmp_path, capsys):
    out = tmp_path / "never"
    assert certify_main(["-m", *SMALL, "smoothing.n=40,-5,60", f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "raysmooth certify: error: smoothing.n must be at least 1, got -5 "
        "(in the -m job smoothing.n=-5; no job has run)"
    )
    assert not out.exists()


def test_a_mistake_is_one_line_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert certify_main([*SMALL, "smoothing.alpha=2", f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "smoothing.alpha" in err
    assert not out.exists()


def test_a_model_listed_twice_says_which_entries_share_its_folder(tmp_path, capsys):
    assert certify_main([*SMALL, "compare=[linear]", f"out={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "share the name linear (model, compare's linear); each one's results go to a folder" in err
    assert not (tmp_path / "linear").exists()


def test_composition_gives_a_typed_config_that_survives():
    cfg = compose("certify", ["smoothing.n=500", "engine.batch_size=auto"])
    assert isinstance(cfg, CertifyCfg)
    assert (
        cfg.smoothing.n == 500
        and cfg.engine.batch_size == "auto"
        and cfg.model.classifier["path"].endswith("classifier")
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("smoothing.sigmas=[0.5,nan]", "smoothing.sigmas"),
        ("smoothing.sigmas=[0.5,inf]", "smoothing.sigmas"),
        ("smoothing.alpha=nan", "smoothing.alpha"),
        ("smoothing.p0=[nan]", "smoothing.p0"),
        ("smoothing.p0=[0.4]", "smoothing.p0"),
        ("smoothing.n0=0", "smoothing.n0"),
        ("smoothing.mode=adaptive", "smoothing.mode"),
        ("engine.batch_size=0", "engine.batch_size"),
        ("engine.batch_size=big", "engine.batch_size"),
        ("engine.precision=fp8", "engine.precision"),
        ("engine.noise=uniform", "engine.noise"),
        ("ray.num_actors=0", "ray.num_actors"),
        ("data.skip=0", "data.skip"),
        ("data.indices=[]", "data.indices is empty"),
        ("model.input_shape=[1,8]", "model.input_shape"),
        ("model.denoiser.path=/no/such/folder", "model.denoiser.path"),
    ],
)
def test_every_value_is_checked_once_with_a_line_naming_its_key(override, key):
    with pytest.raises(ConfigError) as info:
        compose("certify", [override])
    assert key in str(info.value) and "\n" not in str(info.value)


def test_indices_and_max_images_together_are_refused_not_one_silently_ignored():
    with pytest.raises(ConfigError, match="data.max_images and data.indices both choose the images"):
        compose("certify", ["data.indices=[3,4,5]", "data.max_images=2"])


def test_images_of_another_shape_than_the_model_input_shape_are_refused_before_replicas_start(
    tmp_path, monkeypatch, capsys
):
    """Found by hand: the mismatch was found only after every replica had loaded its models."""
    import raysmooth.distributed

    def no_replicas(*args, **kwargs):
        raise AssertionError("replicas started")

    monkeypatch.setattr(raysmooth.distributed, "start_replicas", no_replicas)
    assert certify_main(["model=linear", "model.input_shape=[1,16,16]", f"out={tmp_path}", "plot=false"]) == 2
    err = capsys.readouterr().err
    assert "model.input_shape is [1, 16, 16] but data=digits gives images of (C, H, W) = (1, 8, 8)" in err


@pytest.mark.parametrize(
    "override,says",
    [
        ("model.base=resnet", "model.base: unknown base classifier 'resnet'; choose one of dds, diffsmooth"),
        ("model.denoiser.path=null", "model.denoiser needs either path .* or weights"),
        ("model.denoiser.path=''", "model.denoiser.path is empty: give a path, or null"),  # was read as '.'
        ("+model.options.width=3", r"model.base=dds takes no 'width'"),
    ],
)
def test_a_model_config_that_cannot_build_is_refused_before_replicas_start(
    tmp_path, monkeypatch, capsys, override, says
):
    """Found by hand: these were a worker's error once the actors had started (and left out/dds behind)."""
    import raysmooth.distributed

    def no_replicas(*args, **kwargs):
        raise AssertionError("replicas started")

    monkeypatch.setattr(raysmooth.distributed, "start_replicas", no_replicas)
    monkeypatch.setattr(raysmooth.distributed, "connect", no_replicas)
    assert certify_main(["compare=[]", override, f"out={tmp_path}", "plot=false"]) == 2
    err = capsys.readouterr().err
    assert re.search(f"^raysmooth certify: error: {says}", err, flags=re.M) and "Traceback" not in err, err
    assert not (tmp_path / "dds").exists()


def test_statistics_commands_never_import_torch(tmp_path):
    levels, _ = random_levels(np.random.default_rng(0), 10, [0.25, 0.5], 10)
    write_run(tmp_path / "run", levels, np.zeros(10, int))
    code = (
        "import sys; from raysmooth.cli import main; "
        f"assert main(['sweep', {str(tmp_path / 'run')!r}, '--p0', '0.5:0.7:0.1']) == 0; "
        f"assert main(['analyze', {str(tmp_path / 'run' / 'sweeps')!r}]) in (0, 2); "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'diffusers', 'timm'}); "
        "print('heavy:', heavy)"
    )
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stdout


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_the_front_ends_do_not_import_each_other():
    pkg = ROOT / "raysmooth"
    assert not (pkg / "jobs.py").exists()
    assert not any(m in (".cli", "raysmooth.cli") for m in _imports(pkg / "apps.py"))
    assert not any(m in (".runner", ".apps", ".cli") for m in _imports(pkg / "finetune.py"))
    assert not any("torch" in m for m in _imports(pkg / "config.py") | _imports(pkg / "certificates.py"))


def test_sweep_and_its_script_share_their_defaults():
    """`raysmooth sweep` passes only the flags given as overrides of the one sweep job, so configs/sweep.yaml
    (which must agree with its schema) holds the defaults of both."""
    import yaml

    from raysmooth.config import DEFAULT_RADII, SweepCfg

    yml = yaml.safe_load((ROOT / "configs" / "sweep.yaml").read_text())
    schema = SweepCfg()
    assert yml["radii"] == schema.radii == DEFAULT_RADII
    assert (yml["p0"], yml["policy"], yml["alpha"]) == (schema.p0, schema.policy, schema.alpha)
