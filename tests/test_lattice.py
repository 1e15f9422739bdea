"""Lattice noise (engine.noise=lattice): the sampler's law, exact integer arithmetic, and the margin
that certificates subtract, so that radii hold in floating point (docs/methods.md)."""

import mpmath
import numpy as np
import pytest
import torch
from scipy import stats as sps

from raysmooth import stats
from raysmooth.engine import EngineConfig, Replica
from raysmooth.errors import InputError
from raysmooth.models import BaseClassifier, LinearBase
from raysmooth.noise import LATTICE_BITS, lattice_margin, lattice_table
from raysmooth.units import WorkUnit


def _exact_pmf(sigma: float, levels: int, points: np.ndarray) -> np.ndarray:
    """P[round(ε·L) = k] for ε ~ N(0, σ²), in exact arithmetic."""
    with mpmath.workdps(30):
        s = mpmath.mpf(sigma) * levels
        return np.array([float(mpmath.ncdf((k + 0.5) / s) - mpmath.ncdf((k - 0.5) / s)) for k in points])


def test_the_thresholds_are_the_exact_cumulative_distribution_at_62_bits():
    table = lattice_table(0.25, 255)
    m = table.offset
    edges = np.array([float(mpmath.ncdf((j - m + 0.5) / (mpmath.mpf(0.25) * 255))) for j in (0, m, 2 * m - 1)])
    got = table.thresholds[[0, m, 2 * m - 1]] / 2.0**LATTICE_BITS
    assert np.allclose(got, edges, rtol=0, atol=2.0**-50)
    assert np.all(np.diff(table.thresholds) >= 0) and table.tv_per_coordinate < 1e-15


class Echo(BaseClassifier):
    """Reports, as its 'class', the noise it sees in the first pixel, in lattice steps (shifted to ≥ 0)."""

    num_classes, input_shape = 401, (1, 1, 1)

    def __init__(self, levels: int):
        super().__init__()
        self.levels = levels

    def logits(self, z, sigma, aux_noise=None):
        k = torch.round(z.flatten(1)[:, 0].double() * self.levels).long() - 100  # the image is 100/L
        return torch.nn.functional.one_hot((k + 200).clamp(0, 400), 401).float()


def test_the_sampled_noise_has_the_law_of_the_rounded_gaussian():
    levels, sigma, n = 255, 0.1, 200_000
    replica = Replica(Echo(levels), [sigma], 0, EngineConfig(batch_size=20_000, noise="lattice", levels=levels))
    image = np.full((1, 1, 1), 100 / levels, np.float32)
    counts = replica.run([WorkUnit(0, 0, "estimation", 0, n)], {0: image})[(0, 0, "estimation", 0)]
    k = np.arange(-200, 201)
    expected = n * _exact_pmf(sigma, levels, k)
    keep = expected > 5  # pool the tails for a chi-square test
    observed = np.append(counts[keep], counts[~keep].sum())
    expect = np.append(expected[keep], expected[~keep].sum())
    assert sps.chisquare(observed, expect * observed.sum() / expect.sum()).pvalue > 1e-4
    # and not the law of a Gaussian with another σ (the test can tell them apart)
    wrong = n * _exact_pmf(sigma * 1.02, levels, k)
    observed_w = np.append(counts[wrong > 5], counts[~(wrong > 5)].sum())
    expect_w = np.append(wrong[wrong > 5], wrong[~(wrong > 5)].sum())
    assert sps.chisquare(observed_w, expect_w * observed_w.sum() / expect_w.sum()).pvalue < 1e-4


def test_the_classifier_sees_exact_grid_points():
    seen = []

    class Probe(BaseClassifier):
        num_classes, input_shape = 2, (1, 4, 4)

        def logits(self, z, sigma, aux_noise=None):
            seen.append(z.double() * 255)
            return torch.zeros((len(z), 2))

    image = np.round(np.random.default_rng(0).random((1, 4, 4)) * 255).astype(np.float32) / 255
    Replica(Probe(), [0.5], 0, EngineConfig(batch_size=64, noise="lattice")).run(
        [WorkUnit(0, 0, "estimation", 0, 100)], {0: image}
    )
    z = torch.cat(seen)
    assert torch.allclose(z, z.round(), atol=1e-3)  # x + noise is a lattice point, computed in integers


def test_images_off_the_grid_are_refused_with_the_setting_to_change():
    replica = Replica(LinearBase(np.eye(2, 4), np.zeros(2), (1, 2, 2)), [0.5], 0, EngineConfig(noise="lattice"))
    with pytest.raises(InputError, match="engine.levels"):
        replica.run([WorkUnit(0, 0, "estimation", 0, 10)], {0: np.full((1, 2, 2), 0.3333, np.float32)})


def test_the_counts_do_not_depend_on_the_batch_size():
    base = LinearBase(np.random.default_rng(1).standard_normal((3, 16)), np.zeros(3), (1, 4, 4))
    image = {0: np.full((1, 4, 4), 8 / 16, np.float32)}
    units = [WorkUnit(0, 0, "estimation", c, 300) for c in range(3)]
    a = Replica(base, [0.5], 7, EngineConfig(batch_size=64, noise="lattice", levels=16)).run(units, image)
    b = Replica(base, [0.5], 7, EngineConfig(batch_size=500, noise="lattice", levels=16)).run(units, image)
    assert all(np.array_equal(a[u.key], b[u.key]) for u in units)


def test_certificates_subtract_the_lattice_margin():
    margin = lattice_margin(0.5, 255, 3 * 224 * 224)
    assert 0 < margin < 1e-9  # ImageNet-sized images: radii do not move, the guarantee is exact
    counts = stats.SparseCounts.from_dense(np.array([[9_990, 10]]))
    plain = stats.certify(counts, counts, 0.5, 0.001)
    sound = stats.certify(counts, counts, 0.5, 0.001, margin=1e-3)
    assert sound.p_lower[0] == pytest.approx(plain.p_lower[0] - 1e-3) and sound.radius[0] < plain.radius[0]
