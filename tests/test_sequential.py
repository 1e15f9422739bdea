"""Sequential certification: valid under its own data-dependent stopping, deterministic, resumable,
and never fed the selection samples (docs/sequential.md)."""

import random

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from scipy.stats import norm

from raysmooth.stats import cp_lower, cp_upper
from raysmooth.stats import sequential as sq

# ---- the rule ---------------------------------------------------------------------------------------


def test_the_look_schedule_doubles_and_spends_half_of_alpha_on_the_last_look():
    looks = sq.look_schedule(125, 100_000)
    assert looks.tolist() == [125, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 100000]
    alphas = sq.spend_alpha(0.001, len(looks))
    assert alphas[-1] == pytest.approx(0.0005) and np.allclose(alphas[:-1], 0.001 / 20)
    assert alphas.sum() == pytest.approx(0.001)
    assert sq.spend_alpha(0.01, 4, "uniform").tolist() == [0.0025] * 4


@pytest.mark.parametrize(("unit", "n_max"), [(100, 3200), (125, 125 * 2**33)])  # up to 10^12 samples
def test_the_critical_counts_are_the_clopper_pearson_decisions(unit, n_max):
    d = sq.design(0.01, unit, n_max, [0, 0.25, 0.5, 1.0, 2.5], 0.5)
    for k, (n, a_k) in enumerate(zip(d.looks, d.alphas)):
        for j, p in enumerate(d.thresholds):
            c = d.lower_crit[k, j]  # the first count whose lower bound reaches p
            if c <= n:
                assert cp_lower(c, n, a_k) >= p and (c == 0 or cp_lower(c - 1, n, a_k) < p)
            else:
                assert cp_lower(n, n, a_k) < p
            u = d.upper_crit[k, j]  # the last count whose futility bound stays below p
            assert u == -1 or cp_upper(u, n, d.beta / d.num_looks) < p
            assert u == n or cp_upper(u + 1, n, d.beta / d.num_looks) >= p


SMALL = dict(unit=125, n_max=16_000)  # 8 looks: exact computations in a fraction of a second


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05])
@pytest.mark.parametrize("z", [0.0, 0.5, 1.0, 2.0, 3.0])
def test_the_exact_type_one_error_of_the_looks_is_at_most_alpha(alpha, z):
    """P(some look's bound exceeds the true p), by dynamic programming over the counts at the looks,
    bounds the error of any stopping rule on this schedule, ours included."""
    looks = sq.look_schedule(**SMALL)
    assert sq.crossing_probability(norm.cdf(z), looks, sq.spend_alpha(alpha, len(looks))) <= alpha


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05])
def test_the_naive_rule_that_spends_alpha_at_every_look_exceeds_alpha(alpha):
    looks = sq.look_schedule(**SMALL)
    assert sq.crossing_probability(0.5, looks, np.full(len(looks), alpha)) > 2 * alpha


def test_the_full_schedule_error_matches_the_design_note():
    """u = 125, N_max = 100,000, α = 0.001 at p = 1/2: 8.78e-4 (docs/sequential.md)."""
    looks = sq.look_schedule(125, 100_000)
    assert sq.crossing_probability(0.5, looks, sq.spend_alpha(0.001, len(looks))) == pytest.approx(8.78e-4, abs=5e-6)


def _simulate(d: sq.Design, p: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative successes at every look for Bernoulli(p) samples: (trials, K)."""
    increments = np.diff(np.concatenate([[0], d.looks]))
    draws = rng.binomial(increments[None, :], p[:, None])
    return np.cumsum(draws, axis=1), np.ones(len(p), np.int64)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grid", "precision"])
def test_certified_radii_of_a_linear_classifier_exceed_the_truth_at_most_alpha_of_the_time(mode):
    """A linear classifier's smoothed probability is Φ(w·x / (σ‖w‖)) and its true radius w·x/‖w‖:
    with the rule stopping where it likes, the certified radius is above the truth at most α of the time."""
    rng = np.random.default_rng(0)
    alpha, sigma = 0.05, 0.5
    extra = {"precision": 0.2, "r_cap": 1.5} if mode == "precision" else {}
    d = sq.design(alpha, 64, 8192, [0, 0.25, 0.5, 0.75, 1.0], sigma, **extra)
    trials = 4000
    margins = rng.choice([0.05, 0.2, 0.26, 0.5, 0.76], size=trials)  # w·x/‖w‖: near the grid thresholds
    true_radius = margins
    p = norm.cdf(margins / sigma)
    cumulative, _ = _simulate(d, p, rng)
    cert, out = sq.sequential_certify(np.zeros(trials, np.int64), cumulative, d)
    false = (cert.prediction >= 0) & (cert.radius > true_radius)
    # an exact binomial upper bound: the observed rate cannot be explained by a true rate above α
    from scipy.stats import binomtest

    assert binomtest(int(false.sum()), trials, alpha, alternative="greater").pvalue > 1e-3
    assert false.mean() <= alpha + 0.01


def test_the_rule_stops_confident_images_early_and_hopeless_ones_earlier():
    d = sq.design(0.001, 125, 100_000, [0, 0.5, 1.0], 0.25)
    rng = np.random.default_rng(1)
    cumulative, _ = _simulate(d, np.array([0.9999, 0.3]), rng)
    out = sq.replay(d, cumulative)
    assert out.reason.tolist() == [1, 2]  # certified_all, futile
    assert d.looks[out.stop_look[0]] <= 8000 and d.looks[out.stop_look[1]] <= 500


def test_stored_decisions_are_never_re_taken():
    d = sq.design(0.001, 125, 4000, [0, 0.5], 0.5)
    cumulative = np.array([[125, 250, 500, 1000, 2000, 4000]])
    assert sq.replay(d, cumulative).stop_look[0] < 5
    forced = sq.replay(d, cumulative, stored_stop=np.array([5]))
    assert forced.stop_look[0] == 5


# ---- the planner -----------------------------------------------------------------------------------


def _planner(decide=None, audit=False, resume=None, images=(0, 1, 2)):
    from raysmooth.distributed import SequentialPlanner

    d = sq.design(0.01, 50, 800, [0, 0.5, 1.0], 0.5)
    rule = decide or (lambda s, hist: bool(sq.decide(d, np.asarray([hist]))[0]))
    return SequentialPlanner(
        list(images), 2, 30, 20, d.looks, 50, select=lambda c: int(np.argmax(c)), rule=rule, audit=audit, resume=resume
    )


def _fake_counts(unit, num_classes=4):
    """Counts a unit would have: a function of its key only, as the engine's are."""
    rng = np.random.default_rng(abs(hash(unit.key)) % 2**32)
    p = [0.9, 0.05, 0.03, 0.02] if unit.image_id % 2 == 0 else [0.4, 0.35, 0.15, 0.1]
    return rng.multinomial(unit.n_samples, p)


def _drain(planner, shuffle_seed=None, stop_after=None):
    rows, done = [], 0
    rnd = random.Random(shuffle_seed)
    while planner.has_work():
        units = planner.take(120)
        if shuffle_seed is not None:
            rnd.shuffle(units)
        for u in units:
            rows += planner.complete(u, _fake_counts(u))
            done += 1
            if stop_after is not None and done >= stop_after:
                return rows
    return rows


def _as_set(rows):
    return {(r.image_id, r.sigma_index, r.phase, r.round, r.seq_continue, tuple(r.counts)) for r in rows}


def test_completion_order_and_task_size_change_no_row():
    a = _as_set(_drain(_planner()))
    b = _as_set(_drain(_planner(), shuffle_seed=3))
    assert a == b and any(r[3] > 1 for r in a)


def test_a_round_holds_its_own_estimation_samples_only():
    for r in _drain(_planner()):
        if r.phase == "estimation":
            looks = [50, 100, 200, 400, 800]
            size = looks[r.round - 1] - (looks[r.round - 2] if r.round > 1 else 0)
            assert r.counts.sum() == size  # never the 30 selection samples folded in


def test_the_rule_sees_the_cumulative_counts_of_the_selected_class_only():
    seen = []

    def rule(s, history):
        seen.append(list(history))
        return len(history) < 3

    rows = _drain(_planner(decide=rule, images=(0,)))
    sel = {r.sigma_index: r.counts for r in rows if r.phase == "selection"}
    c_hat = {s: int(np.argmax(c)) for s, c in sel.items()}
    for s in (0, 1):
        own = [r.counts[c_hat[s]] for r in sorted(rows, key=lambda r: r.round) if r.sigma_index == s and r.round]
        assert list(np.cumsum(own)) in seen


def test_audit_mode_samples_every_look_and_records_the_rules_decisions():
    rows = _drain(_planner(audit=True))
    rounds = [r for r in rows if r.phase == "estimation"]
    assert len(rounds) == 3 * 2 * 5
    assert any(r.seq_continue is False and r.round < 5 for r in rounds)  # the rule would have stopped there


def test_a_resumed_planner_plans_the_next_round_only():
    full = _drain(_planner())
    cut = [r for r in full if r.round <= 1]  # as if the run stopped after the first round
    resume = {}
    for r in cut:
        if r.phase == "selection":
            resume[(r.image_id, r.sigma_index)] = (int(np.argmax(r.counts)), [], True, None)
    for r in cut:
        if r.phase == "estimation":
            c, hist, sel, _ = resume[(r.image_id, r.sigma_index)]
            resume[(r.image_id, r.sigma_index)] = (c, hist + [int(r.counts[c])], sel, r.seq_continue)
    rest = _drain(_planner(resume=resume))
    assert not [r for r in rest if r.phase == "selection" or r.round <= 1]
    assert _as_set(cut + rest) == _as_set(full)


# ---- end to end through Ray ---------------------------------------------------------------------------
ray = pytest.importorskip("ray")


pytestmark = pytest.mark.usefixtures("local_ray_per_module")


def _cfg(out, **over):
    from raysmooth.config import compose

    base = {
        "data": "synthetic",
        "model": "linear",
        "smoothing.mode": "sequential",
        "smoothing.n0": 32,
        "smoothing.sequential.unit": 50,
        "smoothing.sequential.n_max": 3200,
        "ray.num_actors": 2,
        "ray.samples_per_task": 400,
        "plot": "false",
        "flush_every": 3,
        "+model.options.scale": 12.0,
        "out": str(out),
    }
    base.update(over)
    return compose("certify", [f"{k}={v}" for k, v in base.items()])


def _tables(root):
    from raysmooth.store import RunStore

    def plain(t, keys):
        import pyarrow as pa

        cols = {
            f.name: (t[f.name].cast(pa.string()) if pa.types.is_dictionary(f.type) else t[f.name]) for f in t.schema
        }
        return (
            pa.table(cols)
            .drop_columns([c for c in ("run_id", "config_hash") if c in cols])
            .sort_by([(k, "ascending") for k in keys])
        )

    store = RunStore.open(root)
    return (
        plain(store.read_counts(), ["image_id", "sigma", "phase", "round"]),
        plain(store.read_certificates(), ["image_id", "method", "sigma"]),
    )


def _same(a, b) -> bool:
    """Tables equal cell by cell (NaN equal to NaN, as it is in the store)."""

    def rows(t):
        return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in t.to_pylist()]

    return a.schema == b.schema and rows(a) == rows(b)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    from raysmooth import runner

    out = tmp_path_factory.mktemp("seq") / "ref"
    runner.certify(_cfg(out))
    return out / "linear"


def test_a_sequential_run_certifies_from_fewer_samples(reference_run):
    counts, certs = _tables(reference_run)
    assert set(certs.column("method").to_pylist()) == {"sequential"}
    n_used = np.asarray(certs.column("n_used").to_pylist())
    assert n_used.mean() < 32 + 3200 and n_used.min() >= 32 + 50
    assert set(certs.column("stop_reason").to_pylist()) <= {"certified_all", "futile", "n_max"}
    assert not np.isnan(np.asarray(certs.column("p_lower").to_pylist(), float)).all()
    raw = pq.read_table(reference_run / "counts")
    assert raw.num_rows == counts.num_rows  # every row stored once


def test_more_actors_and_other_task_sizes_change_no_row(reference_run, tmp_path):
    from raysmooth import runner

    runner.certify(_cfg(tmp_path, **{"ray.num_actors": 1, "ray.samples_per_task": 150}))
    a, b = _tables(reference_run), _tables(tmp_path / "linear")
    assert _same(a[0], b[0]) and _same(a[1], b[1])


@pytest.mark.parametrize("stop_after", [7, 19, 40])
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_tables(reference_run, tmp_path, monkeypatch, stop_after):
    from raysmooth import runner
    from raysmooth.distributed import Progress

    calls = {"n": 0}
    original = Progress.__call__

    def interrupt(self, planner, elapsed):
        calls["n"] += 1
        if calls["n"] == stop_after:  # inside a round, between rounds: wherever the driver happens to be
            raise KeyboardInterrupt
        return original(self, planner, elapsed)

    monkeypatch.setattr(Progress, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        runner.certify(_cfg(tmp_path))
    monkeypatch.setattr(Progress, "__call__", original)
    runner.certify(_cfg(tmp_path))
    a, b = _tables(reference_run), _tables(tmp_path / "linear")
    assert _same(a[0], b[0]) and _same(a[1], b[1])
    assert pq.read_table(tmp_path / "linear" / "counts").num_rows == a[0].num_rows  # nothing counted twice


def test_a_run_killed_while_writing_its_certificates_finishes_them(reference_run, tmp_path, monkeypatch):
    from raysmooth import certificates, runner

    real = certificates.append_new_certificates

    def crash(store, certs):
        real(store, certs.slice(0, certs.num_rows // 2))
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "append_new_certificates", crash)
    with pytest.raises(KeyboardInterrupt):
        runner.certify(_cfg(tmp_path))
    monkeypatch.setattr(runner, "append_new_certificates", real)
    assert runner.certify(_cfg(tmp_path)).rows_written == 0  # nothing sampled again
    a, b = _tables(reference_run), _tables(tmp_path / "linear")
    assert _same(a[1], b[1])


def test_resuming_with_another_schedule_is_refused(reference_run, tmp_path, capsys):
    from raysmooth.apps import certify_main

    args = [
        "data=synthetic",
        "model=linear",
        "smoothing.mode=sequential",
        "smoothing.sequential.unit=50",
        "ray.num_actors=1",
        "plot=false",
        f"out={tmp_path}",
    ]
    assert certify_main([*args, "smoothing.sequential.n_max=1600"]) == 0
    capsys.readouterr()
    assert certify_main([*args, "smoothing.sequential.n_max=3200"]) == 2
    assert "another config" in capsys.readouterr().err


def test_a_resume_whose_recorded_designs_are_damaged_is_one_line(reference_run, tmp_path):
    import json
    import shutil

    from raysmooth import runner
    from raysmooth.store import StoreError

    shutil.copytree(reference_run, tmp_path / "linear")
    manifest = json.loads((tmp_path / "linear" / "manifest.json").read_text())
    for design in manifest["sequential"]["designs"].values():
        del design["lower_crit"]  # a hand edit: the critical counts the run decides with are gone
    (tmp_path / "linear" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"manifest.json: damaged: its sequential designs do not read \(KeyError"):
        runner.certify(_cfg(tmp_path))


def test_an_audit_run_draws_the_same_noise_and_reports_both_certificates(reference_run, tmp_path, capsys):
    from raysmooth import runner
    from raysmooth.cli import main

    runner.certify(_cfg(tmp_path, **{"smoothing.sequential.stop": "never"}))
    counts, certs = _tables(tmp_path / "linear")
    looks = sq.look_schedule(50, 3200)
    estimation = counts.filter(pc.equal(counts["phase"], "estimation"))
    assert set(estimation.column("round").to_pylist()) == set(range(1, len(looks) + 1))
    ref_certs = _tables(reference_run)[1]
    seq = certs.filter(pc.equal(certs["method"], "sequential"))
    assert seq.select(["image_id", "sigma", "prediction", "radius", "n_used", "rounds"]).equals(
        ref_certs.select(["image_id", "sigma", "prediction", "radius", "n_used", "rounds"])
    )
    fixed = certs.filter(pc.equal(certs["method"], "certify"))
    assert set(fixed.column("n_used").to_pylist()) == {32 + 3200}
    assert main(["analyze", str(tmp_path / "linear")]) == 0
    out = capsys.readouterr().out
    assert "| certify σ=0.25 |" in out and "| sequential σ=0.25 |" in out and "mean n" in out
    assert "comparable with fixed n at the grid radii" in out


def test_a_threshold_sweep_of_a_sequential_run_is_refused_in_one_line(reference_run, capsys):
    from raysmooth.cli import main

    assert main(["sweep", str(reference_run), "--p0", "0.5"]) == 2
    assert "sequential run" in capsys.readouterr().err
    assert main(["sweep", str(reference_run), "--alpha", "0.01"]) == 2  # its stopping spent the run's own α
    err = capsys.readouterr().err
    assert "counts answer no other α" in err and err.count("\n") == 1


def test_the_sequential_imagenet_preset_is_the_papers_budget_on_a_doubling_schedule(tmp_path):
    from raysmooth.config import compose
    from raysmooth.runner import run_noise, sequential_designs_for

    from helpers import imagenet_stand_in_overrides

    cfg = compose("certify", ["+experiment=sequential_imagenet", *imagenet_stand_in_overrides(tmp_path)])
    assert cfg.smoothing.mode == "sequential" and cfg.smoothing.sigmas == [0.25, 0.5, 1.0]
    designs = sequential_designs_for(cfg, cfg.smoothing.sigmas, run_noise(cfg, cfg.smoothing.sigmas))
    d = designs[0.25]
    assert d.looks.tolist()[-1] == 100_000 and len(d.looks) == 11
    assert d.radii.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert d.radii[d.feasible] == 0.5  # at σ = 0.25, radii above 0.5 cannot be certified from 100,000 samples


def test_the_python_api_gives_the_jobs_sequential_certificates(reference_run):
    """Smoothed.certify_sequential draws the job's noise round by round and stops where the job did."""
    from raysmooth import Smoothed
    from raysmooth.data import load_dataset

    cfg = _cfg(reference_run.parent)
    sq_cfg = cfg.smoothing.sequential
    data = load_dataset("synthetic", **cfg.data.options)
    smoothed = Smoothed(
        "linear",
        cfg.smoothing.sigmas,
        input_shape=(1, 8, 8),
        model_kwargs={"num_classes": 10, "seed": 0, "scale": 12.0},
    )
    _, certs = _tables(reference_run)
    stored = {(r["image_id"], r["sigma"]): r for r in certs.to_pylist()}
    for sigma in cfg.smoothing.sigmas:
        got = smoothed.certify_sequential(
            data.images,
            n0=cfg.smoothing.n0,
            n_max=sq_cfg.n_max,
            alpha=cfg.smoothing.alpha,
            radii=cfg.radii,
            unit=sq_cfg.unit,
            sigma=sigma,
            ids=data.ids,
        )
        for image_id, cert in zip(data.ids.tolist(), got):
            row = stored[(image_id, sigma)]
            assert (cert.prediction, cert.n_used, cert.rounds, cert.stop_reason) == (
                row["prediction"],
                row["n_used"],
                row["rounds"],
                row["stop_reason"],
            ), (sigma, image_id)
            assert cert.radius == pytest.approx(row["radius"], abs=1e-12)


def test_a_unit_of_a_finished_round_that_arrives_again_is_dropped():
    p = _planner(images=(0,), decide=lambda s, hist: len(hist) < 2)
    seen, rows = [], []
    while p.has_work():
        for u in p.take(120):
            seen.append(u)
            rows += p.complete(u, _fake_counts(u))
    done = p.samples_done
    assert all(p.complete(u, _fake_counts(u)) == [] for u in seen) and p.samples_done == done
    assert sum(r.phase == "estimation" for r in rows) == 2 * 2  # two rounds at each of 2 σ, each once
