"""What a run says while it samples: images done, rate, and an ETA a person reads at a glance."""

from types import SimpleNamespace

import pytest

from raysmooth.distributed.progress import Progress, duration


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0 s"),
        (42.4, "42 s"),
        (59.6, "1 min 00 s"),
        (425, "7 min 05 s"),
        (12_000, "3 h 20 min"),
        (144_000, "1 d 16 h"),
        (-3, "0 s"),
    ],
)
def test_a_duration_reads_in_the_largest_two_units(seconds, text):
    assert duration(seconds) == text


def _planner(done_images: int, done: int, planned: int, **extra) -> SimpleNamespace:
    return SimpleNamespace(finished_images=set(range(done_images)), samples_done=done, samples_planned=planned, **extra)


def test_a_long_runs_eta_is_in_hours_not_a_six_figure_count_of_seconds():
    # an hour into an ImageNet run at 1,000 samples/s with 144 million samples to go
    planner = _planner(10, 3_600_000, 3_600_000 + 144_000_000)
    line = Progress(50_000).line(planner, 3600.0)
    assert line == "10/50,000 images, 1,000 samples/s, ETA 1 d 16 h"


def test_a_run_whose_total_is_not_known_shows_what_is_open_instead_of_an_eta():
    planner = _planner(3, 12_000, 0, total_known=False, open_images=5)
    line = Progress(8).line(planner, 10.0)
    assert line == "3/8 images done, 5 open, 12,000 samples, 1,200 samples/s" and "ETA" not in line


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _rates(progress: Progress, clock: _Clock, steps: list[tuple[float, int]]) -> list[float]:
    """(seconds since start, samples done) in order; the rate the line would show after each."""
    out = []
    for t, done in steps:
        clock.now = t
        out.append(progress.rate(done, elapsed=t))
    return out


def test_the_rate_leaves_out_the_start_up_before_the_first_samples():
    """Ten minutes of compiling, then 1,000 samples/s: the rate says 1,000, where the run's average
    (what the ETA used) still says 500 after twenty minutes."""
    clock = _Clock()
    steps = [(600 + 10 * k, 1_000 * 10 * (k + 1)) for k in range(60)]
    rates = _rates(Progress(100, clock=clock), clock, steps)
    assert rates[-1] == pytest.approx(1_000) and steps[-1][1] / steps[-1][0] < 560


def test_the_rate_follows_a_change_of_throughput_within_the_window():
    """Four actors, then two (one lost, say): after the window the rate is the new one."""
    clock = _Clock()
    steps, done = [], 0
    for t in range(10, 3610, 10):
        done += 4_000 * 10 if t <= 1800 else 2_000 * 10
        steps.append((float(t), done))
    rates = _rates(Progress(100, clock=clock), clock, steps)
    assert rates[170] == pytest.approx(4_000) and rates[-1] == pytest.approx(2_000)


def test_a_run_stalled_for_the_whole_window_has_no_eta():
    clock = _Clock()
    progress = Progress(100, clock=clock)
    _rates(progress, clock, [(10.0, 1_000), (20.0, 2_000)] + [(float(t), 3_000) for t in range(30, 700, 10)])
    clock.now = 700.0
    line = progress.line(_planner(1, 3_000, 10_000), 700.0)
    assert line.endswith("0 samples/s, ETA ?")


def test_one_batch_in_gives_the_average_not_nothing():
    clock = _Clock()
    progress = Progress(100, clock=clock)
    assert _rates(progress, clock, [(90.0, 9_000), (95.0, 9_000)]) == [100.0, pytest.approx(9_000 / 95)]


def test_a_lazy_cascades_eta_is_marked_as_a_floor():
    """Its lower σ are planned only as images are sent down, so the samples planned are a floor."""
    from raysmooth.distributed import Planner

    planner = Planner([0, 1], 3, 10, 100, 100, mode="cascade", stop_rule=lambda *a: True)
    assert planner.total_is_floor and not Planner([0, 1], 3, 10, 100, 100).total_is_floor
    planner.samples_done = 110
    line = Progress(2).line(planner, 10.0)
    assert line.endswith("11 samples/s, ETA at least 10 s")


def test_before_the_first_samples_the_line_says_it_waits_not_zero_samples_per_second():
    line = Progress(50_000).line(_planner(0, 0, 10**9), 75.0)
    assert line == "0/50,000 images, waiting for the first samples (1 min 15 s)"
