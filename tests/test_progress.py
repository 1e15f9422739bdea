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
