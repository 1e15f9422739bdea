"""The engine: counts that depend only on the unit, frequencies that match the closed form, and input
checks that stop a run before any sampling."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from raysmooth.engine import EngineConfig, Replica, validate_images, validate_sampling
from raysmooth.errors import InputError
from raysmooth.models import create_base_classifier
from raysmooth.models.denoiser import DenoiserConfig
from raysmooth.stats import SparseCounts, certify
from raysmooth.units import WorkUnit, budget_units, split_budget, unit_seed

from tiny_models import save_denoiser_folder, tiny_classifier_config

SHAPE = (1, 8, 8)


def linear_base(bias: float = -3.8):
    """Two classes; class 1 iff mean-free w·z + b > 0 with ‖w‖ = 1."""
    w = np.zeros((2, 64))
    w[1] = 1 / 8.0
    return create_base_classifier("linear", weight=w, bias=np.array([0.0, bias]), input_shape=SHAPE)


@pytest.fixture(scope="module")
def dds_base(tmp_path_factory):
    folder = save_denoiser_folder(tmp_path_factory.mktemp("den"))
    return create_base_classifier(
        "dds", denoiser=DenoiserConfig(path=str(folder)), classifier=tiny_classifier_config(), input_shape=SHAPE
    )


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return {i: torch.from_numpy(rng.random(SHAPE, dtype=np.float32)) for i in range(4)}


def _units():
    return [
        WorkUnit(i, s, phase, c, n)
        for i in range(4)
        for s in range(2)
        for phase, c, n in (("selection", 0, 37), ("estimation", 0, 300), ("estimation", 1, 123))
    ]


def test_a_units_counts_do_not_depend_on_packing_order_or_batch_size(dds_base, images):
    units = _units()
    packed = Replica(dds_base, [0.25, 0.5], run_seed=7, config=EngineConfig(batch_size=256, noise_block=64)).run(
        units, images
    )
    other = Replica(dds_base, [0.25, 0.5], run_seed=7, config=EngineConfig(batch_size=33, noise_block=64))
    reordered = other.run(units[::-1], images)
    for unit in units[::5]:
        alone = other.run([unit], images)
        assert np.array_equal(alone[unit.key], packed[unit.key])
    for key in packed:
        assert np.array_equal(reordered[key], packed[key])
        assert packed[key].sum() == next(u.n_samples for u in units if u.key == key)


def test_counts_change_with_the_run_seed(dds_base, images):
    unit = [WorkUnit(0, 1, "estimation", 0, 200)]
    a = Replica(dds_base, [0.25, 0.5], run_seed=1).run(unit, images)[unit[0].key]
    b = Replica(dds_base, [0.25, 0.5], run_seed=2).run(unit, images)[unit[0].key]
    assert not np.array_equal(a, b)


def test_unit_seeds_are_distinct_for_every_coordinate():
    base = unit_seed(0, 5, 1, "estimation", 2)
    others = [
        unit_seed(1, 5, 1, "estimation", 2),
        unit_seed(0, 6, 1, "estimation", 2),
        unit_seed(0, 5, 2, "estimation", 2),
        unit_seed(0, 5, 1, "selection", 2),
        unit_seed(0, 5, 1, "estimation", 3),
    ]
    assert len({base, *others}) == 6
    assert split_budget(100_000, 30_000) == [30_000, 30_000, 30_000, 10_000]


@pytest.mark.parametrize(("n", "chunk"), [(1, 1), (100_000, 30_000), (90_000, 30_000), (7, 10_000)])
def test_budget_units_counts_the_units_split_budget_makes(n, chunk):
    assert budget_units(n, chunk) == len(split_budget(n, chunk))


def test_linear_frequencies_match_the_closed_form_within_binomial_error():
    base = linear_base(bias=-3.8)  # on the constant image 0.5, w·x + b = 4 - 3.8 = 0.2
    img = {0: torch.full(SHAPE, 0.5)}
    sigmas = [0.25, 0.5, 1.0]
    n = 20_000
    units = [WorkUnit(0, s, "estimation", 0, n) for s in range(3)]
    out = Replica(base, sigmas, run_seed=3, config=EngineConfig(batch_size=4096)).run(units, img)
    for s, sigma in enumerate(sigmas):
        p = norm.cdf(0.2 / sigma)
        freq = out[(0, s, "estimation", 0)][1] / n
        assert abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_certify_through_the_engine_approaches_the_true_distance_from_below():
    base = linear_base(bias=-3.6)  # distance 0.4 to the hyperplane
    img = {0: torch.full(SHAPE, 0.5)}
    rep = Replica(base, [0.5], run_seed=4, config=EngineConfig(batch_size=8192, noise_block=4096))
    radii = []
    for n in (100, 3_000, 100_000):
        counts = rep.run([WorkUnit(0, 0, "selection", 0, 100), WorkUnit(0, 0, "estimation", 0, n)], img)
        sel = SparseCounts.from_dense(counts[(0, 0, "selection", 0)][None])
        est = SparseCounts.from_dense(counts[(0, 0, "estimation", 0)][None])
        radii.append(float(certify(sel, est, 0.5, 0.001).radius[0]))
    assert radii[0] < radii[1] < radii[2] < 0.4
    assert radii[2] > 0.35


# ---- input checks --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "images,message",
    [
        (np.zeros((3, 1, 7, 8), np.float32), "shape"),
        (np.zeros((3, 1, 8, 8), np.uint8), "floating point"),
        (np.full((3, 1, 8, 8), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((3, 1, 8, 8), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_images_are_refused_before_sampling(images, message):
    with pytest.raises(InputError, match=message):
        base = linear_base()
        validate_images(images, None, base.input_shape, base.num_classes)


def test_a_class_count_mismatch_is_refused():
    base = linear_base()
    with pytest.raises(InputError, match="10 classes"):
        validate_images(np.zeros((3, 1, 8, 8), np.float32), None, base.input_shape, base.num_classes, num_classes=10)
    with pytest.raises(InputError, match="labels"):
        validate_images(np.zeros((3, 1, 8, 8), np.float32), np.array([0, 1, 5]), base.input_shape, base.num_classes)


@pytest.mark.parametrize("sigmas,n0,n", [([0.25, 0.0], 100, 1000), ([0.25], 0, 1000), ([0.25], 100, 0), ([-1.0], 1, 1)])
def test_bad_sampling_parameters_are_refused(sigmas, n0, n):
    with pytest.raises(InputError):
        validate_sampling(sigmas, n0, n)


def test_a_unit_for_an_unknown_sigma_or_image_is_refused():
    rep = Replica(linear_base(), [0.25], run_seed=0)
    with pytest.raises(InputError, match="σ index"):
        rep.run([WorkUnit(0, 1, "estimation", 0, 10)], {0: torch.zeros(SHAPE)})
    with pytest.raises(InputError, match="not provided"):
        rep.run([WorkUnit(3, 0, "estimation", 0, 10)], {0: torch.zeros(SHAPE)})
