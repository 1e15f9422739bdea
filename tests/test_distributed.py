"""Ray actors and the driver: same counts as the engine in-process, through actor deaths and resumes."""

import os

import numpy as np
import pyarrow.compute as pc
import pytest

ray = pytest.importorskip("ray")

from raysmooth.distributed import ActorSpec, Driver, Planner, start_actors, stop_actors  # noqa: E402
from raysmooth.engine import EngineConfig, Replica  # noqa: E402
from raysmooth.errors import ConfigError  # noqa: E402
from raysmooth.models import create_base_classifier, model_sections  # noqa: E402
from raysmooth.store import RunStore  # noqa: E402

MODEL = {"base": "linear", "input_shape": [1, 8, 8], "options": {"num_classes": 10, "seed": 3}}
SIGMAS = [0.25, 0.5, 1.0]
ENGINE = {"batch_size": 256, "noise_block": 64, "device": "cpu"}


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return {i: rng.random((1, 8, 8), dtype=np.float32) for i in range(12)}


def _engine_counts(units, images):
    name, kw = model_sections(MODEL)
    base = create_base_classifier(name, **kw)
    cfg = {k: v for k, v in ENGINE.items() if k != "device"}
    return Replica(base, SIGMAS, run_seed=5, config=EngineConfig(**cfg)).run(units, images)


def _drive(actors, images, planner, **kw):
    rows = {}
    Driver(
        actors,
        images,
        planner,
        on_rows=lambda rs: rows.update({(r.image_id, r.sigma_index, r.phase): r.counts for r in rs}),
        samples_per_task=300,
        **kw,
    ).run()
    return rows


def _planner(images):
    return Planner(sorted(images), len(SIGMAS), n0=50, n=400, chunk=150)


def _expected(images):
    units = _planner(images).take(10**9)
    counts = _engine_counts(units, images)
    rows = {}
    for u in units:
        key = (u.image_id, u.sigma_index, u.phase)
        rows[key] = rows.get(key, 0) + counts[u.key]
    return rows


def _assert_engine_counts(rows, images, actors):
    expected = _expected(images)
    assert rows.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(rows[key], expected[key]), key
    for a in actors:
        ray.kill(a, no_restart=True)


def test_two_actors_produce_exactly_the_engines_counts(local_ray, images):
    actors = start_actors(ActorSpec(2, 1, 0, -1), MODEL, SIGMAS, 5, ENGINE, 1)
    _assert_engine_counts(_drive(actors, images, _planner(images)), images, actors)


def test_an_actor_killed_mid_run_changes_no_count(local_ray, images):
    actors = start_actors(ActorSpec(2, 1, 0, -1), MODEL, SIGMAS, 5, ENGINE, 1)
    ray.get([a.describe.remote() for a in actors])
    killed = []

    def kill_once(planner, elapsed):
        if not killed and planner.samples_done > 0:
            ray.kill(actors[0], no_restart=False)  # a crash: Ray restarts the actor
            killed.append(True)

    driver_rows = {}
    driver = Driver(
        actors,
        images,
        _planner(images),
        samples_per_task=300,
        progress=kill_once,
        on_rows=lambda rs: driver_rows.update({(r.image_id, r.sigma_index, r.phase): r.counts for r in rs}),
    )
    driver.run()
    assert killed and driver.retried_units > 0
    _assert_engine_counts(driver_rows, images, actors)


def _cfg(tmp_path, **over):
    from raysmooth.config import compose

    overrides = [
        "data=synthetic",
        "model=linear",
        f"out={tmp_path}",
        "smoothing.n=300",
        "smoothing.n0=30",
        "smoothing.chunk=100",
        "ray.samples_per_task=200",
        "ray.num_actors=2",
        "plot=false",
        "flush_every=5",
        "smoothing.p0=[0.5]",
    ]
    return compose("certify", overrides + [f"{k}={v}" for k, v in over.items()])


def _sorted(table, keys):
    import pyarrow as pa

    plain = pa.table(
        {
            f.name: (table[f.name].cast(pa.string()) if pa.types.is_dictionary(f.type) else table[f.name])
            for f in table.schema
        }
    )
    return plain.sort_by([(k, "ascending") for k in keys])


def test_a_run_stopped_part_way_resumes_to_the_uninterrupted_tables(local_ray, tmp_path, monkeypatch):
    from raysmooth import runner
    from raysmooth.distributed import Progress

    whole = runner.certify(_cfg(tmp_path / "a"))
    assert whole.rows_written == 16 * 3 * 2

    calls = {"n": 0}
    original = Progress.__call__

    def interrupt(self, planner, elapsed):
        original(self, planner, elapsed)
        calls["n"] += 1
        if len(planner.done_rows) >= 20:
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        runner.certify(_cfg(tmp_path / "b"))
    monkeypatch.setattr(Progress, "__call__", original)
    partial = RunStore.open(tmp_path / "b" / "linear").read_counts().num_rows
    assert 0 < partial < 96
    resumed = runner.certify(_cfg(tmp_path / "b"))
    assert resumed.rows_written == 96 - partial

    a, b = RunStore.open(tmp_path / "a" / "linear"), RunStore.open(tmp_path / "b" / "linear")
    keys = ["image_id", "sigma", "phase"]
    ca, cb = _sorted(a.read_counts(), keys), _sorted(b.read_counts(), keys)
    assert cb.num_rows == 96  # no duplicates
    for col in ("image_id", "sigma", "phase", "classes", "counts"):
        assert ca.column(col).to_pylist() == cb.column(col).to_pylist()
    ckeys = ["image_id", "method", "sigma", "policy", "p0"]
    ta, tb = a.read_certificates(), b.read_certificates()
    assert ta.num_rows == tb.num_rows
    ta, tb = _sorted(ta, ckeys), _sorted(tb, ckeys)
    for col in ("prediction", "radius", "correct"):
        assert ta.column(col).to_pylist() == tb.column(col).to_pylist()


def test_running_again_adds_no_rows(local_ray, tmp_path):
    from raysmooth import runner

    runner.certify(_cfg(tmp_path))
    again = runner.certify(_cfg(tmp_path))
    store = RunStore.open(tmp_path / "linear")
    assert again.rows_written == 0
    assert store.read_certificates().num_rows == 16 * (3 + 3 + 2)  # certify, predict per σ; two cascade policies


def test_a_different_config_into_the_same_directory_is_refused(local_ray, tmp_path):
    from raysmooth import runner
    from raysmooth.store import StoreError

    runner.certify(_cfg(tmp_path))
    with pytest.raises(StoreError, match="another config"):
        runner.certify(_cfg(tmp_path, **{"smoothing.n": 400}))


def test_cascade_mode_samples_lower_sigma_only_where_needed(local_ray, tmp_path):
    from raysmooth import runner

    # Two classes: margins of random images are large enough for the largest σ to settle some of them.
    common = {
        "smoothing.p0": "[0.6]",
        "smoothing.policies": "[strict]",
        "model.options.num_classes": 2,
        "data.options.num_classes": 2,
        "data.options.num_images": 24,
    }
    full = runner.certify(_cfg(tmp_path / "full", **common))
    lazy = runner.certify(_cfg(tmp_path / "lazy", **{"smoothing.mode": "cascade", **common}))
    assert lazy.rows_written < full.rows_written
    pick = lambda t: _sorted(t.filter(pc.equal(t["method"], "cascade")), ["image_id"])  # noqa: E731
    tf = pick(RunStore.open(tmp_path / "full" / "linear").read_certificates())
    tl = pick(RunStore.open(tmp_path / "lazy" / "linear").read_certificates())
    assert tf.column("prediction").to_pylist() == tl.column("prediction").to_pylist()
    assert tf.column("radius").to_pylist() == tl.column("radius").to_pylist()
    from raysmooth.certificates import run_sweep
    from raysmooth.store import StoreError

    with pytest.raises(StoreError, match=r"lazy cascade run .* certify no other threshold"):  # not its hard images
        run_sweep(tmp_path / "lazy" / "linear", np.array([0.6, 0.7]), None, "strict")


def test_a_run_whose_actors_are_all_gone_stops_with_one_clear_error(local_ray, images):
    from raysmooth.distributed import DistributedError

    actors = start_actors(ActorSpec(1, 1, 0, 0), MODEL, SIGMAS, 5, ENGINE, 1)  # no restarts
    ray.get(actors[0].describe.remote())
    ray.kill(actors[0], no_restart=True)
    with pytest.raises(DistributedError, match="no actor has finished a task"):
        _drive(actors, images, _planner(images), give_up_after_s=2.0)


def test_data_that_does_not_fit_the_model_is_refused_before_sampling(local_ray, tmp_path):
    from raysmooth import runner
    from raysmooth.errors import InputError

    with pytest.raises(InputError, match="5 classes but the classifier predicts 10"):
        runner.certify(_cfg(tmp_path, **{"data.options.num_classes": 5}))
    # Nothing was sampled and no manifest was written: the corrected command starts afresh.
    assert not (tmp_path / "linear" / "manifest.json").exists() and not (tmp_path / "linear" / "counts").exists()
    assert runner.certify(_cfg(tmp_path)).rows_written == 16 * 3 * 2


def test_an_interrupted_lazy_cascade_resumes_to_the_uninterrupted_tables(local_ray, tmp_path, monkeypatch):
    from raysmooth import runner
    from raysmooth.distributed import Progress

    common = {
        "smoothing.mode": "cascade",
        "smoothing.p0": "[0.6]",
        "smoothing.policies": "[strict]",
        "model.options.num_classes": 2,
        "data.options.num_classes": 2,
        "data.options.num_images": 24,
    }
    whole = runner.certify(_cfg(tmp_path / "a", **common))
    original = Progress.__call__

    def interrupt(self, planner, elapsed):
        original(self, planner, elapsed)
        if len(planner.done_rows) >= whole.rows_written // 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        runner.certify(_cfg(tmp_path / "b", **common))
    monkeypatch.setattr(Progress, "__call__", original)
    runner.certify(_cfg(tmp_path / "b", **common))
    keys = ["image_id", "sigma", "phase"]
    ca = _sorted(RunStore.open(tmp_path / "a" / "linear").read_counts(), keys)
    cb = _sorted(RunStore.open(tmp_path / "b" / "linear").read_counts(), keys)
    assert cb.num_rows == ca.num_rows == whole.rows_written
    for col in ("image_id", "sigma", "phase", "counts"):
        assert ca.column(col).to_pylist() == cb.column(col).to_pylist()


def test_sigmas_in_any_order_give_the_same_run(local_ray, tmp_path):
    from raysmooth import runner

    a = runner.certify(_cfg(tmp_path / "a", **{"smoothing.sigmas": "[0.25,0.5,1.0]"}))
    b = runner.certify(_cfg(tmp_path / "b", **{"smoothing.sigmas": "[1.0,0.25,0.5]"}))
    keys = ["image_id", "sigma", "phase"]
    ca = _sorted(RunStore.open(a.out_dir).read_counts(), keys)
    cb = _sorted(RunStore.open(b.out_dir).read_counts(), keys)
    assert ca.column("counts").to_pylist() == cb.column("counts").to_pylist()


def test_an_actor_the_cluster_cannot_place_yet_does_not_hold_the_run_and_joins_when_placed(local_ray, images, caplog):
    from raysmooth.distributed import start_replicas

    # the cluster has 2 CPUs: the third actor of 1 CPU waits until another actor is stopped
    spec = ActorSpec(num_actors=3, num_cpus=1, num_gpus=0, max_restarts=0)
    with caplog.at_level("INFO", logger="raysmooth"):
        replicas = start_replicas(spec, MODEL, SIGMAS, 5, ENGINE, 1, patience_s=2.0)
        assert len(replicas.actors) == len(replicas.infos) == 2 and len(replicas.joining) == 1
        assert "2 of 3 replica actor(s) up; going on with them, the other 1 join" in caplog.text
        stop_actors(replicas.actors[:1])  # frees a CPU: the waiting actor is placed
        ray.wait(list(replicas.joining), timeout=60)
        seen = []
        rows = _drive(replicas.actors[1:], images, _planner(images), joining=replicas.joining, check_joined=seen.append)
    assert "a replica actor joined the run (2 up, 0 waiting)" in caplog.text and seen[0]["num_classes"] == 10
    _assert_engine_counts(rows, images, replicas.all())


def test_when_no_actor_can_be_placed_the_error_says_what_each_needs(local_ray):
    from raysmooth.distributed import DistributedError, start_replicas

    spec = ActorSpec(num_actors=1, num_cpus=0, num_gpus=1, max_restarts=0)  # a GPU this cluster lacks
    with pytest.raises(DistributedError, match=r"no replica actor started within 3 s \(0 CPU, 1 GPU each"):
        start_replicas(spec, MODEL, SIGMAS, 5, ENGINE, 1, give_up_s=3.0)


def test_a_late_replica_reporting_another_model_is_refused():
    from raysmooth.errors import ModelLoadError
    from raysmooth.runner import _same_replica

    first = {"num_classes": 10, "input_shape": [1, 8, 8], "model_id": "m", "applied_sigmas": [0.25]}
    _same_replica(first, dict(first, pid=7, device="cuda:0"))  # where it runs may differ
    with pytest.raises(ModelLoadError, match="joined late reports another model .model_id: other there, m on"):
        _same_replica(first, dict(first, model_id="other"))


def test_a_run_with_no_actor_up_yet_starts_when_a_late_one_joins(local_ray, images):
    (late,) = start_actors(ActorSpec(1, 1, 0, 0), MODEL, SIGMAS, 5, ENGINE, 1)
    rows = _drive([], images, _planner(images), joining={late.describe.remote(): late}, give_up_after_s=30)
    _assert_engine_counts(rows, images, [late])


def test_replicas_kept_off_the_gpus_a_cluster_has_say_so(monkeypatch, caplog):
    """engine=gpu with ray=local on a GPU machine: every replica ran on the CPU, 100× slower, silently."""
    import ray

    from raysmooth.distributed.session import actor_spec

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    with caplog.at_level("WARNING", logger="raysmooth"):
        assert actor_spec(None, 4.0, 0.0, -1).num_actors == 4
    assert "the replicas run on the CPU (ray.gpus_per_actor=0) although the cluster has 2 GPU(s)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="raysmooth"):
        assert actor_spec(None, 4.0, 1.0, -1).num_actors == 2
    assert caplog.text == ""


def test_actors_of_no_cpu_and_no_gpu_are_never_counted_by_the_cluster(monkeypatch):
    """cpus_per_actor=0, gpus_per_actor=0 and no num_actors: 2 CPUs // 1e-9 started two billion actors."""
    import ray

    from raysmooth.distributed.session import actor_spec

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match="set ray.num_actors"):
        actor_spec(None, 0.0, 0.0, -1)
    assert actor_spec(3, 0.0, 0.0, -1).num_actors == 3  # a count given is a count
