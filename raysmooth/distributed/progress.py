"""Progress of a sampling run: a tqdm bar on a terminal, plain log lines (every 10 s) in
``ray job logs`` and CI. Runs whose total is unknown in advance (sequential) show samples done and
images still open instead of an ETA. The rate is that of the last few minutes, so the minutes a
replica spends compiling before its first batch, or an actor lost or joined, do not skew a day-long
run's ETA for hours."""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("raysmooth")

__all__ = ["Progress", "duration"]


def duration(seconds: float) -> str:
    """A time a person reads at a glance: 42 s, 7 min 05 s, 3 h 20 min, 2 d 04 h (a 40-hour ImageNet
    run's ETA in seconds, 144,000, says little)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


class Progress:
    WINDOW_S = 300.0  # the rate is measured over about this long

    def __init__(self, total_images: int, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.total = total_images
        self.every_s = every_s
        self.clock = clock
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.bar = None
        self._marks: deque[tuple[float, int]] = deque()  # (time, samples done), from the first samples in
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_images, unit="img", dynamic_ncols=True, file=sys.stderr)

    def rate(self, samples_done: int, elapsed: float) -> float:
        """Samples per second over the last ``WINDOW_S``, counted from the first samples to arrive (the
        wait for them is start-up, not throughput); the whole run's average until more have come in.
        A run that has stalled for the whole window has rate 0 (ETA ?)."""
        now = self.clock()
        marks = self._marks
        if samples_done > 0 and (not marks or now - marks[-1][0] >= 1.0):
            marks.append((now, samples_done))
        while len(marks) > 2 and marks[1][0] <= now - self.WINDOW_S:
            marks.popleft()
        # A first mark still inside the window was never trimmed: nothing in since it is one batch, not a stall.
        if not marks or (samples_done == marks[0][1] and marks[0][0] > now - self.WINDOW_S):
            return samples_done / max(elapsed, 1e-9)
        t0, s0 = marks[0]
        return (samples_done - s0) / max(now - t0, 1e-9)

    def line(self, planner, elapsed: float) -> str:
        done = len(planner.finished_images)
        if planner.samples_done == 0:  # the replicas' first batch: a compile can take minutes
            return f"{done:,}/{self.total:,} images, waiting for the first samples ({duration(elapsed)})"
        rate = self.rate(planner.samples_done, elapsed)
        if getattr(planner, "total_known", True):
            remaining = planner.samples_planned - planner.samples_done
            floor = "at least " if getattr(planner, "total_is_floor", False) and remaining > 0 else ""
            eta = f"ETA {floor}{duration(remaining / rate)}" if rate > 0 else "ETA ?"
            return f"{done:,}/{self.total:,} images, {rate:,.0f} samples/s, {eta}"
        return (
            f"{done:,}/{self.total:,} images done, {planner.open_images:,} open, {planner.samples_done:,} samples, "
            f"{rate:,.0f} samples/s"
        )

    def __call__(self, planner, elapsed: float) -> None:
        done = len(planner.finished_images)
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(self.line(planner, elapsed).split(", ", 1)[1], refresh=False)
            self.bar.refresh()
        elif self.clock() - self.last > self.every_s or done == self.total:
            self.last = self.clock()
            log.info("progress: %s", self.line(planner, elapsed))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
