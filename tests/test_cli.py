"""The analyze and sweep commands: numbers, formats, and one-line errors for user mistakes."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from raysmooth.cli import main
from raysmooth.stats import cascade_sweep, certify
from raysmooth.store import CountsRecord, RunStore

from helpers import random_levels, write_run

COHEN_TSV = (
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    "0\t1\t1\t0.5\t1\t0:00:01.1\n"
    "1\t2\t2\t1.2\t1\t0:00:01.0\n"
    "2\t3\t-1\t0.0\t0\t0:00:01.2\n"
    "3\t4\t5\t0.8\t0\t0:00:00.9\n"
)


@pytest.fixture
def tsv(tmp_path):
    path = tmp_path / "cohen_sigma_0.50.tsv"
    path.write_text(COHEN_TSV)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rng = np.random.default_rng(20)
    levels, _ = random_levels(rng, 120, [0.25, 0.5, 1.0], 10, concentration=0.15)
    labels = np.array([lv for lv in levels[0].selection.argmax()])  # mostly "correct" labels
    labels[::5] = (labels[::5] + 1) % 10
    root = tmp_path_factory.mktemp("runs") / "run"
    write_run(root, levels, labels, alpha=0.001)
    return root, levels, labels


def test_analyze_csv_prints_exactly_the_documented_columns(tsv, capsys):
    assert main(["analyze", str(tsv), "--radii", "0,0.5,1", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "source,radius,certified_accuracy",
        "cohen_sigma_0.50,0,0.500000",
        "cohen_sigma_0.50,0.5,0.500000",
        "cohen_sigma_0.50,1,0.250000",
    ]


def test_analyze_markdown_reports_acr_and_abstention(tsv, capsys):
    assert main(["analyze", str(tsv), "--radii", "0,1"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row == "| cohen_sigma_0.50 | 4 | 50.0 | 25.0 | 0.425 | 25.0% |"


def test_analyze_detects_a_running_total_in_correct(tmp_path, capsys):
    path = tmp_path / "dds.tsv"
    path.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\tx\n1\t2\t2\t0.4\t2\tx\n2\t3\t0\t0.1\t2\tx\n"
    )
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "running total" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "content,message",
    [
        ("label\tpredict\tradius\n1\t1\t0.5\n", "missing column"),
        ("idx\tlabel\tpredict\tradius\tcorrect\n", "no rows"),
        ("0\t1\t1\t0.5\t1\n", "first line is numbers, so the file has no header"),  # rRCM writes none
        (
            "idx label predict radius correct\n0 1 1 0.5 1\n",
            "separated by spaces: the columns must be separated by tabs",
        ),
    ],
)
def test_analyze_rejects_malformed_tables_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_analyze_missing_path_is_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope.tsv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_analyze_of_a_run_draws_a_plot(run_dir, tmp_path, capsys):
    from raysmooth.certificates import counts_view, derive_certificates
    from raysmooth.store import RunStore

    root, _, _ = run_dir
    store = RunStore.open(root)
    if store.read_certificates().num_rows == 0:
        store.append_certificates(derive_certificates(counts_view(store.read_counts()), alpha=0.001))
    png = tmp_path / "curves.png"
    assert main(["analyze", str(root), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "certify σ=0.25" in out and "cascade strict p0=0.5" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_of_a_runs_sweeps_folder_shows_every_sweep_by_name(tmp_path, capsys):
    levels, _ = random_levels(np.random.default_rng(3), 30, [0.25, 0.5], 10, concentration=0.15)
    root = tmp_path / "run"
    write_run(root, levels, np.zeros(30, np.int64), alpha=0.001)
    assert main(["sweep", str(root), "--p0", "0.5"]) == main(["sweep", str(root), "--p0", "0.7"]) == 0
    capsys.readouterr()
    assert main(["analyze", str(root / "sweeps")]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if "cascade strict" in ln]
    names = sorted(d.parent.name for d in (root / "sweeps").glob("*/sweep.json"))
    assert [r.split(":")[0].strip("| ") for r in rows] == names
    assert sorted(r.split("p0=")[1].split(" ")[0] for r in rows) == ["0.5", "0.7"]


def _copies_of_the_run(run_dir, *places: Path) -> None:
    """The module's run, with its certificates derived, copied to each place (its sweeps left out)."""
    import shutil

    from raysmooth.certificates import counts_view, derive_certificates
    from raysmooth.store import RunStore

    store = RunStore.open(run_dir[0])
    if store.read_certificates().num_rows == 0:
        store.append_certificates(derive_certificates(counts_view(store.read_counts()), alpha=0.001))
    for place in places:
        shutil.copytree(run_dir[0], place, ignore=shutil.ignore_patterns("sweeps", ".lock"))


def test_analyze_tells_apart_runs_of_one_name_and_reads_a_path_given_twice_once(run_dir, tmp_path, capsys):
    labels = run_dir[2]
    _copies_of_the_run(run_dir, tmp_path / "a" / "run", tmp_path / "b" / "run")
    assert main(["analyze", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), str(tmp_path / "b" / "run")]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if "certify σ=0.25" in ln]
    assert [r.split(":")[0].strip("| ") for r in rows] == ["a/run", "b/run"]
    assert all(f"| {len(labels)} |" in r for r in rows)


def test_analyze_of_a_multirun_folder_shows_every_run_by_its_path_below_it(run_dir, tmp_path, capsys):
    """Found by hand: `certify -m` writes OUT/<override>/<model> per value, and analyze OUT found nothing."""
    _copies_of_the_run(run_dir, tmp_path / "smoothing.seed=1" / "dds", tmp_path / "smoothing.seed=2" / "dds")
    (tmp_path / ".hydra" / "multirun").mkdir(parents=True)
    assert main(["analyze", str(tmp_path)]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if "certify σ=0.25" in ln]
    assert [r.split(": ")[0].strip("| ") for r in rows] == ["smoothing.seed=1/dds", "smoothing.seed=2/dds"]


def test_analyze_of_a_table_inside_a_run_points_at_the_run_not_at_a_damaged_file(run_dir, capsys):
    root, _, _ = run_dir
    assert main(["analyze", str(root / "counts")]) == 2
    err = capsys.readouterr().err
    assert f"is the counts table of the run {root}; analyze the run itself" in err and "aside" not in err
    assert main(["analyze", str(root / "manifest.json")]) == 2  # was read as a TSV missing its columns
    assert f"is the manifest of the run {root}; analyze the run itself" in capsys.readouterr().err


def test_analyze_of_a_runs_sweeps_folder_before_any_sweep_says_how_to_make_one(run_dir, tmp_path, capsys):
    """It said the folder was 'the sweeps table of the run; analyze the run itself', which shows no sweep."""
    root = tmp_path / "run"
    _copies_of_the_run(run_dir, root)
    (root / "sweeps" / "crashed-before-its-sweep-json").mkdir(parents=True)
    assert main(["analyze", str(root / "sweeps")]) == 2
    assert f"holds no finished sweep of the run {root} yet; `raysmooth sweep {root}`" in capsys.readouterr().err


def test_analyze_of_one_parquet_part_names_the_run_it_belongs_to(run_dir, tmp_path, capsys):
    """A run's rows span many part files: one part alone is a fraction of its images, never analysed."""
    root, _, _ = run_dir
    part = sorted((root / "counts").glob("part-*.parquet"))[0]
    assert main(["analyze", str(part)]) == 2
    assert f"is a part of the counts table of the run {root};" in capsys.readouterr().err
    lone = tmp_path / "lone.parquet"
    lone.write_bytes(part.read_bytes())
    assert main(["analyze", str(lone)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a Parquet file; analyze takes a run directory" in err and len(err.splitlines()) == 1


def test_sweep_recomputes_certificates_from_stored_counts(run_dir, capsys):
    root, levels, labels = run_dir
    assert main(["sweep", str(root), "--p0", "0.5:0.9:0.1", "--policy", "strict"]) == 0
    out = capsys.readouterr()
    assert "cascade strict p0=0.9" in out.out
    sweep_dirs = sorted((root / "sweeps").iterdir())
    table = pq.read_table(next(sweep_dirs[-1].glob("part-*.parquet")))
    table = table.filter(pc.equal(table["method"].cast("string"), "cascade"))
    expect = cascade_sweep(levels, [0.5, 0.6, 0.7, 0.8, 0.9], 0.001, "strict")
    assert table.num_rows == 5 * len(labels)
    for i, p0 in enumerate(expect.p0):
        rows = table.filter(pc.equal(table["p0"], p0))
        assert np.array_equal(rows.column("prediction").to_numpy(), expect.prediction[i])
        np.testing.assert_allclose(rows.column("radius").to_numpy(), expect.radius[i])
        assert np.array_equal(
            rows.column("correct").to_numpy(zero_copy_only=False),
            (expect.prediction[i] == labels) & (expect.prediction[i] >= 0),
        )


def test_a_sweep_over_alpha_gives_each_sigmas_certify_at_that_alpha_from_the_stored_counts(run_dir, capsys):
    """A run certified at α = 0.001 answers α = 0.01 from its counts: each σ's Clopper-Pearson certificate
    at the new α, not only the cascade's (its own certificates table is fixed at the run's α)."""
    root, levels, labels = run_dir
    assert main(["sweep", str(root), "--p0", "0.5", "--alpha", "0.001,0.01"]) == 0
    out, err = capsys.readouterr()
    assert "certify σ=0.5 α=0.01" in out
    folder = Path(err.split("sweep certificates: ")[1].strip())
    table = pq.read_table(next(folder.glob("part-*.parquet")))
    for level in levels:
        for alpha in (0.001, 0.01):
            mine = (pc.field("method").cast("string") == "certify") & (pc.field("sigma") == level.sigma)
            rows = table.filter(mine & (pc.field("alpha") == alpha)).sort_by("image_id")
            expect = certify(level.selection, level.estimation, level.sigma, alpha)
            assert np.array_equal(rows.column("prediction").to_numpy(), expect.prediction)
            np.testing.assert_allclose(rows.column("radius").to_numpy(), expect.radius)


def test_a_sweeps_rows_name_their_alpha_when_printed_and_when_analyzed(run_dir, capsys):
    """A sweep is run for its α: one at α = 0.01 printed rows that read like the run's own at 0.001."""
    root, _, _ = run_dir
    assert main(["sweep", str(root), "--p0", "0.5", "--alpha", "0.01"]) == 0
    out, err = capsys.readouterr()
    rows = [ln for ln in out.splitlines() if ln.startswith("| c")]
    assert rows and all(" α=0.01 |" in ln for ln in rows)
    assert main(["analyze", err.split("sweep certificates: ")[1].strip()]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| c")] == rows


def test_a_run_of_one_sigma_is_swept_over_alpha_alone(tmp_path, capsys):
    """Cohen's setting, one σ per run: its α sweep was refused ('a p0 sweep needs counts at two or more σ')."""
    import json

    levels, _ = random_levels(np.random.default_rng(5), 40, [0.5], 10, concentration=0.15)
    write_run(tmp_path / "run", levels, np.zeros(40, np.int64), alpha=0.001)
    assert main(["sweep", str(tmp_path / "run"), "--alpha", "0.001,0.01"]) == 0
    out, err = capsys.readouterr()
    assert "2 settings (α = 0.001, 0.01, one σ, no cascade)" in err and "cascade" not in out
    folder = Path(err.split("sweep certificates: ")[1].strip())
    assert json.loads((folder / "sweep.json").read_text())["p0"] == []
    table = pq.read_table(next(folder.glob("part-*.parquet")))
    for alpha in (0.001, 0.01):
        rows = table.filter(pc.field("alpha") == alpha).sort_by("image_id")
        expect = certify(levels[0].selection, levels[0].estimation, 0.5, alpha)
        assert np.array_equal(rows.column("prediction").to_numpy(), expect.prediction)


def _unfinished_run(root, levels, labels, *, finished, started=(), sigmas=None):
    """A run stopped part-way: every count of the ``finished`` images, and for the ``started`` ones only
    the selection counts at the first σ; its manifest names the run's σ and image count."""
    sigmas = sigmas or [lv.sigma for lv in levels]
    store = RunStore.create(root, {"test": True, "sigmas": sigmas}, sigmas=sigmas, images=len(labels))
    records = [
        CountsRecord(i, int(labels[i]), lv.sigma, phase, counts.to_dense()[i])
        for lv in levels
        for phase, counts in (("selection", lv.selection), ("estimation", lv.estimation))
        for i in finished
    ]
    records += [
        CountsRecord(i, int(labels[i]), levels[0].sigma, "selection", levels[0].selection.to_dense()[i])
        for i in started
    ]
    store.append_counts(records, model_id="synthetic", seed=0, alpha=0.001)


def test_a_sweep_of_an_unfinished_run_certifies_its_finished_images_and_says_so(run_dir, tmp_path, capsys):
    _, levels, labels = run_dir
    _unfinished_run(tmp_path / "run", levels, labels, finished=range(100), started=range(100, 104))
    assert main(["sweep", str(tmp_path / "run"), "--p0", "0.5,0.7"]) == 0
    out, err = capsys.readouterr()
    assert "all its counts for 100 of its 120 images" in err and "not the 4 with only some of their counts" in err
    table = pq.read_table(next((tmp_path / "run" / "sweeps").glob("*/part-*.parquet")))
    expect = cascade_sweep(levels, [0.5, 0.7], 0.001, "strict")  # the finished images' certificates are theirs
    got = table.filter(pc.equal(table["p0"], 0.7)).sort_by("image_id")
    assert got.column("image_id").to_pylist() == list(range(100))
    assert np.array_equal(got.column("prediction").to_numpy(), expect.prediction[1][:100])


def test_a_sigma_no_image_has_reached_is_not_dropped_from_the_cascade(run_dir, tmp_path, capsys):
    _, levels, labels = run_dir
    sigmas = [lv.sigma for lv in levels]
    _unfinished_run(tmp_path / "run", levels[:2], labels, finished=range(120), sigmas=sigmas)  # nothing at σ=1 yet
    assert main(["sweep", str(tmp_path / "run"), "--p0", "0.5"]) == 2
    assert "no image has all its counts yet (both phases at σ = 0.25, 0.5, 1)" in capsys.readouterr().err


def test_sweep_takes_p0_as_a_comma_separated_list_as_it_takes_alpha(run_dir, capsys):
    root, _, _ = run_dir
    assert main(["sweep", str(root), "--p0", "0.5:0.7:0.2"]) == 0
    grid = capsys.readouterr().out
    assert main(["sweep", str(root), "--p0", "0.5,0.7"]) == 0
    listed = capsys.readouterr().out
    assert main(["sweep", str(root), "--p0", "0.5:0.5:0.1,0.7"]) == 0
    assert listed == grid == capsys.readouterr().out and "cascade strict p0=0.7" in listed


def test_a_value_given_twice_to_sweep_is_one_setting_not_its_rows_pooled_twice(run_dir, capsys):
    root, _, labels = run_dir
    assert main(["sweep", str(root), "--p0", "0.5", "--alpha", "0.01", "--radii", "0.5,0,0.5"]) == 0
    once = capsys.readouterr().out
    assert main(["sweep", str(root), "--p0", "0.5", "--alpha", "0.01,0.01", "--radii", "0,0.5"]) == 0
    twice = capsys.readouterr().out
    assert twice == once and f"| {len(labels)} | " in once and "| r=0 | r=0.5 |" in once


@pytest.mark.parametrize(
    "args,message",
    [
        (["--p0", "0.3:0.9:0.1"], "[0.5, 1)"),
        (["--p0", "0.5:1.0:0.1"], "[0.5, 1)"),
        (["--p0", "0.5", "--alpha", "1.5"], "(0, 0.5)"),
        (["--p0", "a:b:c"], "START:STOP:STEP"),
    ],
)
def test_sweep_rejects_bad_parameters_in_one_line(run_dir, capsys, args, message):
    root, _, _ = run_dir
    assert main(["sweep", str(root), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("style", [["run_dir={root}"], ["{root}", "p0=0.6"]])
def test_sweep_given_the_jobs_key_value_form_says_which_form_it_takes(run_dir, capsys, style):
    root, _, _ = run_dir
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", *(a.format(root=root) for a in style)])
    assert exit_.value.code == 2
    assert "raysmooth sweep RUN_DIR --p0 0.6" in capsys.readouterr().err


def test_sweep_of_a_directory_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["sweep", str(tmp_path), "--p0", "0.5"]) == 2
    assert "not a raysmooth run directory" in capsys.readouterr().err


def test_sweep_of_a_folder_of_runs_or_of_a_folder_inside_a_run_names_the_run_to_give(tmp_path, capsys):
    levels, _ = random_levels(np.random.default_rng(4), 10, [0.25, 0.5], 10, concentration=0.15)
    for name in ("dds", "onestep"):
        write_run(tmp_path / name, levels, np.zeros(10, np.int64), alpha=0.001)
    assert main(["sweep", str(tmp_path), "--p0", "0.5"]) == 2
    assert f"it holds the runs dds, onestep: name one ({tmp_path / 'dds'})" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "dds" / "counts"), "--p0", "0.5"]) == 2
    assert f"it is inside the run {tmp_path / 'dds'}" in capsys.readouterr().err
    # found by hand: model=toy_dds writes its run to OUT/dds (model.name), and OUT/toy_dds is what users try
    assert main(["sweep", str(tmp_path / "toy_dds"), "--p0", "0.5"]) == 2
    assert f"no such run directory; {tmp_path} holds the runs dds, onestep" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "toy_dds")]) == 2
    assert f"no such file or directory; {tmp_path} holds the runs dds, onestep" in capsys.readouterr().err


def test_sweep_of_a_multirun_folder_names_its_runs_and_a_long_list_is_cut(tmp_path, capsys):
    levels, _ = random_levels(np.random.default_rng(4), 10, [0.25, 0.5], 10, concentration=0.15)
    for seed in range(8):  # certify -m 'smoothing.seed=range(8)' writes OUT/smoothing.seed=K/dds
        write_run(tmp_path / f"smoothing.seed={seed}" / "dds", levels, np.zeros(10, np.int64), alpha=0.001)
    assert main(["sweep", str(tmp_path), "--p0", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "it holds the runs smoothing.seed=0/dds, smoothing.seed=1/dds," in err
    assert f"… (8 in all): name one ({tmp_path / 'smoothing.seed=0' / 'dds'})" in err and err.count("\n") == 1


def test_the_console_script_prints_no_traceback_for_a_user_mistake(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raysmooth.cli", "analyze", str(tmp_path / "x.tsv")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["analyze", "sweep"])
def test_a_reader_that_stops_early_ends_the_command_quietly(run_dir, tsv, tmp_path, command):
    """`raysmooth analyze RUN | head`: the closed pipe printed "error: [Errno 32] Broken pipe" (exit 2)."""
    import shutil

    run = shutil.copytree(run_dir[0], tmp_path / "run")  # a sweep writes into the run
    args = ["analyze", str(tsv)] if command == "analyze" else ["sweep", str(run)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysmooth.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # the reader is gone before the table is printed
    assert proc.wait(timeout=120) == 141
    err = proc.stderr.read().decode()
    assert "Broken pipe" not in err and "Traceback" not in err and "error" not in err


def test_the_hydra_sweep_job_matches_the_cli_sweep(run_dir, capsys):
    from raysmooth.apps import sweep_main

    root, levels, labels = run_dir
    assert sweep_main([f"run_dir={root}", "p0=0.5:0.7:0.1", "policy=reference"]) == 0
    job = capsys.readouterr()
    assert "cascade reference p0=0.7" in job.out and "sweep certificates:" in job.err
    # The command line is the same job: same table on the same stream, same defaults.
    assert main(["sweep", str(root), "--p0", "0.5:0.7:0.1", "--policy", "reference"]) == 0
    cli = capsys.readouterr()
    assert cli.out == job.out and "sweep certificates:" in cli.err
    assert sweep_main([f"run_dir={root}", "p0=0.4"]) == 2
    assert "[0.5, 1)" in capsys.readouterr().err
    assert sweep_main(["p0=0.5"]) == 2  # run_dir is required
    err = capsys.readouterr().err.strip()
    assert "run_dir" in err and err.count("\n") == 0


def test_every_plain_command_says_what_it_does_and_what_each_argument_is():
    """`raysmooth COMMAND --help` opens with a sentence and explains every argument (the hydra apps,
    certify and finetune, print hydra's own help with the config groups)."""
    import argparse

    from raysmooth.cli import build_parser

    parser = build_parser()
    assert parser.description and "``" not in parser.description  # no docstring markup in a terminal
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    plain = {name: p for name, p in commands.choices.items() if name not in ("certify", "finetune")}
    assert set(plain) == {"train-toy", "convert-adm", "analyze", "sweep"}
    for name, sub in plain.items():
        assert sub.description and sub.description[0].isupper() and sub.description.endswith("."), name
        unexplained = [a.dest for a in sub._actions if not a.help and a.dest != "help"]
        assert unexplained == [], f"{name}: {unexplained}"


@pytest.mark.parametrize(
    "radius,correct,radii,says",
    [
        ([0.1, 0.3], [True], [0], r"one value per image, got shapes \(2,\) and \(1,\)"),  # was 100%: broadcast
        ([0.1, 0.2], [3, 1], [0], "correct must be True or False per image"),  # predictions, read as True
        ([0.1, float("nan")], [True, True], [0], "radius holds NaN for 1 image"),
        ([0.1], [True], "0.25", "radii must be numbers"),
        ([0.1], [True], [-1, 0], "radii must be finite non-negative numbers"),  # as analyze --radii
    ],
)
def test_certified_accuracy_refuses_inputs_it_would_count_wrongly(radius, correct, radii, says):
    from raysmooth.analysis import certified_accuracy
    from raysmooth.errors import InputError

    with pytest.raises(InputError, match=says):
        certified_accuracy(radius, correct, radii)


def test_certified_accuracy_at_one_radius_and_with_zero_one_correct():
    from raysmooth.analysis import certified_accuracy

    assert certified_accuracy([0.1, 0.3, 0.0], [1, 1, 0], 0.2).tolist() == [1 / 3]
    assert certified_accuracy([0.1, 0.3, 0.0], [True, True, False], [0, 0.2]).tolist() == [2 / 3, 1 / 3]


@pytest.mark.parametrize("count", [3, 60])
def test_a_plot_names_its_curves_in_a_legend_only_while_it_can_hold_them(tmp_path, caplog, monkeypatch, count):
    """A sweep's thousands of settings made a legend taller than the figure: minutes of drawing, and
    matplotlib's 'Tight layout not applied' warning printed with its source line."""
    import warnings

    import matplotlib.pyplot as plt

    from raysmooth.analysis import LEGEND_MAX, Curve, plot_curves

    rng = np.random.default_rng(0)
    curves = [
        Curve(f"cascade strict p0={0.5 + i / 1000:g}", rng.random(8), rng.random(8) < 0.5, np.zeros(8, bool))
        for i in range(count)
    ]
    legends, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (legends.append(fig.axes[0].get_legend()), real_close(fig)))
    with warnings.catch_warnings(record=True) as said, caplog.at_level("WARNING", logger="raysmooth"):
        warnings.simplefilter("always")
        plot_curves(curves, tmp_path / "p.png")
    assert [str(w.message) for w in said] == []
    assert (legends[0] is not None) is (count <= LEGEND_MAX)
    assert ("60 curves: no legend past 20" in caplog.text) is (count > LEGEND_MAX)
