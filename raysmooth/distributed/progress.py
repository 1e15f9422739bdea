"""Progress of a sampling run: a tqdm bar on a terminal, plain log lines (every 10 s) in
``ray job logs`` and CI. Runs whose total is unknown in advance (sequential) show samples done and
images still open instead of an ETA."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("raysmooth")

__all__ = ["Progress"]


class Progress:
    def __init__(self, total_images: int, every_s: float = 10.0):
        self.total = total_images
        self.every_s = every_s
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total_images, unit="img", dynamic_ncols=True, file=sys.stderr)

    def line(self, planner, elapsed: float) -> str:
        done = len(planner.finished_images)
        rate = planner.samples_done / max(elapsed, 1e-9)
        if getattr(planner, "total_known", True):
            remaining = planner.samples_planned - planner.samples_done
            eta = f"ETA {remaining / rate:,.0f} s" if rate > 0 else "ETA ?"
            return f"{done}/{self.total} images, {rate:,.0f} samples/s, {eta}"
        return (
            f"{done}/{self.total} images done, {planner.open_images} open, {planner.samples_done:,} samples, "
            f"{rate:,.0f} samples/s"
        )

    def __call__(self, planner, elapsed: float) -> None:
        done = len(planner.finished_images)
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(self.line(planner, elapsed).split(", ", 1)[1], refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last > self.every_s or done == self.total:
            self.last = time.monotonic()
            log.info("progress: %s", self.line(planner, elapsed))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
