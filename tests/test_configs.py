"""Hydra configs and cluster.yaml: mistakes fail at start, in one line that names them."""

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from raysmooth.apps import certify_main
from raysmooth.config import CONFIG_DIR, compose
from raysmooth.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_default_config_composes_to_the_embedded_digits_run():
    cfg = compose("certify", [])
    assert cfg.data.name == "digits"
    assert cfg.smoothing.sigmas == [0.25, 0.5, 1.0]
    assert cfg.smoothing.mode == "full"


@pytest.mark.parametrize(
    "override,names",
    [
        ("smoothing.nn=3", "smoothing.nn"),
        ("smoothing.n=abc", "smoothing.n"),
        ("ray.num_actors=two", "ray.num_actors"),
        ("data=nope", "data/nope"),
    ],
)
def test_a_wrong_key_or_value_is_one_line_naming_it(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")) as info:
        compose("certify", [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override,says",
    [
        ("flush_seconds=nan", "flush_seconds must be a positive number of seconds"),  # never flushed by time
        ("flush_seconds=-1", "flush_seconds must be a positive number of seconds"),
        ("progress_seconds=0", "progress_seconds must be a positive number of seconds"),
        ("progress_seconds=inf", "progress_seconds must be a positive number of seconds"),
        ("ray.max_restarts=-2", r"ray.max_restarts must be -1 \(restart without limit\) or more"),
        ("ray.local_cpus=0", "ray.local_cpus must be at least 1, or null"),  # 0 took every CPU
        (
            "ray.cpus_per_actor=0",
            r"ray.cpus_per_actor and ray.gpus_per_actor are both 0, which leaves nothing to count",
        ),
        ("radii=[]", r"radii must be non-negative numbers, at least one"),  # a table without a radius
    ],
)
def test_a_run_setting_that_cannot_mean_what_it_says_is_refused(override, says):
    with pytest.raises(ConfigError, match=says):
        compose("certify", [override])


@pytest.mark.parametrize(
    "override,says",
    [
        ("smoothing.aplha=0.01", "did you mean smoothing.alpha"),
        ("seed=3", "did you mean smoothing.seed"),
        ("engine.batchsize=8", "did you mean engine.batch_size"),
    ],
)
def test_a_key_that_does_not_exist_names_the_key_probably_meant(override, says):
    with pytest.raises(ConfigError, match=says):
        compose("certify", [override])


@pytest.mark.parametrize(
    "override,says",
    [
        ("+seed=3", r"seed is no key .*did you mean smoothing\.seed"),
        ("+smoothing.sigma=0.5", r"smoothing\.sigma is no key .*did you mean smoothing\.sigmas"),
        ("+data.foo=1", r"data\.foo is no key of raysmooth certify; nothing would read it"),
    ],
)
def test_a_plus_override_adding_a_key_nothing_reads_is_refused_not_dropped(override, says):
    with pytest.raises(ConfigError, match=says):
        compose("certify", [override])


@pytest.mark.parametrize(
    "override,says",
    [
        ("smoothing.p0=[0.5,0.7,0.5]", r"smoothing\.p0 lists 0\.5 twice"),
        ("smoothing.policies=[strict,strict]", r"smoothing\.policies lists strict twice"),
        ("radii=[0,0.5,0.5]", r"radii lists 0\.5 twice"),
    ],
)
def test_a_report_value_listed_twice_is_refused_not_pooled_into_one_row(override, says):
    with pytest.raises(ConfigError, match=says):
        compose("certify", [override])


def test_a_report_method_that_does_not_exist_is_refused_not_an_empty_table():
    with pytest.raises(ConfigError, match=r"report_methods must be among \['certify', 'cascade', 'predict'"):
        compose("certify", ["report_methods=[certfy]"])


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data=image_folder", r"data= takes one of cifar10, digits, imagenet, synthetic, or data\.name=image_folder"),
        ("+data.options.num_images=3", r"set it without the \+: data\.options\.num_images=…"),
        ("smoothing.n=1e5", r"smoothing\.n takes a whole number, .*: smoothing\.n=100000 \(or 100_000\)$"),
        ("smoothing.n0=2.5", r"smoothing\.n0 takes a whole number, written without an exponent or a point$"),
    ],
)
def test_a_group_option_or_key_mistake_says_what_to_write_instead(override, says):
    overrides = ["data=synthetic", override] if override.startswith("+") else [override]
    with pytest.raises(ConfigError, match=says):
        compose("certify", overrides)


@pytest.mark.parametrize(
    "override, says",
    [
        (
            "model.denoiser.path=/runs/lr=0.001/denoiser",
            "quote the value as a whole: 'model.denoiser.path=\"/runs/lr=0.001/denoiser\"'",
        ),
        ("smoothing.sigmas=[0.25,0.5", "lists are written key=[a,b]"),
        ("out=~/runs", "('~' is not allowed bare); quote the value as a whole: 'out=\"~/runs\"'"),
    ],
)
def test_an_override_hydra_cannot_read_is_named_with_how_to_write_it(override, says):
    with pytest.raises(ConfigError) as raised:
        compose("certify", [override])
    assert str(raised.value).startswith(f"cannot read the override {override!r} (") and says in str(raised.value)


@pytest.mark.parametrize(
    "word, says",
    [("smoothing", "an override is key=value"), ("--cfg", "a flag after `--` is read as an override")],
)
def test_a_word_that_is_no_override_says_what_an_override_is(word, says):
    with pytest.raises(ConfigError, match=f"^cannot read '{word}': .*{re.escape(says)}"):
        compose("certify", [word])


@pytest.mark.parametrize(
    "name", ["lr=0.001/denoiser", "my runs/den", "models\\den", 'we"ird', "it's", "end\\", "plain/a-1.0"]
)
def test_a_printed_override_reads_back_as_the_path_through_the_shell_and_hydra(tmp_path, name):
    """What finetune and convert-adm print to paste (a -m job's folder holds '=') must name the folder."""
    import shlex

    from raysmooth.config import override_text

    folder = tmp_path / name
    folder.mkdir(parents=True)
    words = shlex.split(override_text("model.denoiser.path", folder))
    assert len(words) == 1
    cfg = compose("certify", ["model=toy_dds", *words])
    assert cfg.model.denoiser["path"] == str(folder)


def test_keys_added_inside_the_open_sections_stay_the_users():
    cfg = compose("certify", ["data=synthetic", "+model.options.width=3", "+data.options.seed=5"])
    assert cfg.model.options == {"width": 3} and cfg.data.options["seed"] == 5


def test_one_value_for_a_list_key_says_the_key_takes_a_list():
    with pytest.raises(ConfigError, match=r"smoothing\.p0 is a list: smoothing\.p0=\[…\]"):
        compose("certify", ["smoothing.p0=0.7"])


def test_a_typo_inside_a_yaml_file_is_refused(tmp_path, monkeypatch):
    shutil = pytest.importorskip("shutil")
    conf = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, conf)
    (conf / "smoothing" / "typo.yaml").write_text("sigmas: [0.5]\nnnn_typo_in_yaml: 5\n")
    with pytest.raises(ConfigError, match="nnn_typo_in_yaml"):
        compose("certify", ["smoothing=typo"], config_dir=conf)


def test_the_job_prints_one_line_and_exits_2_on_a_config_mistake(capsys):
    assert certify_main(["smoothing.alpha=1.5", "data=synthetic", "model=linear", "out=/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "alpha" in err


@pytest.mark.parametrize(
    "override,says",
    [
        ("data.name=imagenett", "data.name: unknown dataset 'imagenett'; choose one of cifar10, digits"),
        ("data.split=validation", "data.split must be train or test for digits, got 'validation'"),
        ("+data.options.num_imags=3", r"data.options: digits takes no 'num_imags' \(it takes no options\)"),
        ("data.indices=[3,-1]", r"data.indices must be image indices \(0 or more\)"),
        ("data.indices=[0,5,0]", "data.indices lists 0 more than once"),
    ],
)
def test_a_data_mistake_is_refused_before_hydra_makes_a_folder_or_a_model_starts(override, says, tmp_path, capsys):
    """Found by hand: these stopped only when the first model's run loaded the data, after hydra had
    made its records folder and the job had logged 'certifying dds (1 of 3)'."""
    with pytest.raises(ConfigError, match=says):
        compose("certify", [override])
    assert certify_main([override, f"out={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_cluster_yaml_validates_against_the_schema_in_the_ray_package():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_a_cluster_yaml_typo_is_caught_by_that_schema():
    import jsonschema
    import ray

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["available_node_types"]["gpu_worker"]["min_worker"] = 1
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(cfg, schema)


def test_an_output_path_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert certify_main(["data=synthetic", "model=linear", f"out={blocker / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"out={blocker / 'x'} cannot be made: {blocker} is a file, not a folder" in err


def test_the_readme_module_map_names_every_module_and_only_real_ones():
    block = (ROOT / "README.md").read_text().split("## Development", 1)[1].split("```")[1]
    named = set()
    for line in block.splitlines():
        words = line.split()
        if not words or not words[0].startswith("raysmooth/"):
            continue
        paths = [words[0].rstrip(",")]
        while words[len(paths) - 1].endswith(","):  # "raysmooth/finetune.py, toy.py"
            paths.append(str(Path(paths[0]).parent / words[len(paths)]))
        named |= {p.rstrip("/") for p in paths}
    package = ROOT / "raysmooth"
    modules = {f"raysmooth/{p.name}" for p in package.glob("*.py") if p.name != "__init__.py"}
    modules |= {f"raysmooth/{p.name}" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert modules - named == set(), "modules the README does not map"
    assert {n for n in named if not (ROOT / n).exists()} == set(), "README names modules that do not exist"


def test_a_key_a_model_section_does_not_hold_yet_says_to_add_it_with_a_plus():
    with pytest.raises(ConfigError, match=r"added with a \+: \+model\.classifier\.name=…"):
        compose("certify", ["model=toy_dds", "model.classifier.name=resnet18"])


def test_an_empty_out_is_refused_not_the_working_directory(tmp_path):
    # hydra's records would go to /.hydra and the runs into the working directory
    with pytest.raises(ConfigError, match="out must name a directory, got an empty path"):
        compose("certify", ["out="])
    with pytest.raises(ConfigError, match="out must name a directory, got an empty path"):
        compose("finetune", ["out= "])


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="out must be a directory; .* is a file"):
        compose("certify", [f"out={tmp_path / 'file'}"])


@pytest.mark.parametrize("app", ["certify", "finetune"])
def test_an_out_under_a_file_is_refused_naming_the_file(tmp_path, app):
    """It was hydra's 'Not a directory' on a path of its own records, after the config was read."""
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"out={tmp_path}/file/a/b cannot be made: {tmp_path}/file is a file"):
        compose(app, [f"out={tmp_path / 'file' / 'a' / 'b'}"])


def test_a_relative_out_inside_a_ray_job_with_a_working_dir_is_refused(monkeypatch, tmp_path):
    # the entrypoint of `ray job submit --working-dir .` runs in Ray's temporary copy of that folder
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.delenv("RAYSMOOTH_OUT", raising=False)
    with pytest.raises(ConfigError, match="out=runs/digits is relative, and this Ray job runs in a temporary copy"):
        compose("certify", [])
    assert compose("certify", [f"out={tmp_path}"]).out == str(tmp_path)
    monkeypatch.setenv("RAYSMOOTH_OUT", str(tmp_path))
    assert compose("certify", []).out == f"{tmp_path}/digits"


def test_a_key_in_a_section_the_model_config_lacks_names_the_section():
    with pytest.raises(ConfigError, match=r"this model config has no model\.denoiser section"):
        compose("certify", ["model=toy_onestep", "+model.denoiser.path=x"])


def test_a_lazy_cascade_says_which_listed_thresholds_it_cannot_report():
    from raysmooth.config import lazy_cascade_note

    cfg = compose("certify", ["smoothing.mode=cascade", "smoothing.p0=[0.5,0.7]", "smoothing.policies=[strict]"])
    note = lazy_cascade_note(cfg.smoothing)
    assert "p0=0.5 with the strict policy (the first of each); p0=0.7 are not reported" in note
    assert lazy_cascade_note(compose("certify", ["smoothing.p0=[0.5,0.7]"]).smoothing) is None  # full mode: all
    one_rule = ["smoothing.mode=cascade", "smoothing.p0=[0.6]", "smoothing.policies=[reference]"]
    assert lazy_cascade_note(compose("certify", one_rule).smoothing) is None


def test_a_seed_the_counts_table_cannot_store_is_refused_before_the_run():
    with pytest.raises(ConfigError, match="smoothing.seed must fit in 64 bits"):
        compose("certify", [f"smoothing.seed={2**70}"])
    assert compose("certify", [f"smoothing.seed={-(2**63)}"]).smoothing.seed == -(2**63)


def test_the_custom_model_without_a_builder_says_to_give_one_instead_of_running_dds():
    # the schema's default base used to survive custom.yaml's `base: ???`: the run became a dds
    # without a denoiser and failed on a worker, naming the wrong model
    with pytest.raises(ConfigError, match=r"missing mandatory value: base .*model\.base=pkg\.module:builder"):
        compose("certify", ["model=custom"])


def test_the_sweep_job_without_a_run_dir_says_how_to_give_one():
    with pytest.raises(
        ConfigError, match=r"missing mandatory value: run_dir; give it on the command line: run_dir=RUN_DIR$"
    ):
        compose("sweep", [])


def test_a_model_or_data_path_under_an_unexpanded_tilde_is_found_at_home(tmp_path, monkeypatch):
    """`'data.root="~/imagenet"'` (what a quoted override gives): the home folder, not a path named '~'."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(ROOT / "raysmooth" / "embedded" / "digits" / "denoiser", tmp_path / "den")
    from raysmooth.config import resolve_model_paths

    cfg = compose("certify", ["model=toy_dds", 'model.denoiser.path="~/den"'])  # checked here: it exists
    assert resolve_model_paths(cfg.model).denoiser["path"] == str(tmp_path / "den")


def test_a_cascade_of_one_sigma_is_refused_in_the_job_words():
    with pytest.raises(ConfigError, match=r"^smoothing.mode=cascade needs two or more σ$"):
        compose("certify", ["smoothing.mode=cascade", "smoothing.sigmas=[0.25]"])
