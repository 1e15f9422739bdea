"""The sampling loop of a run: the driver feeds the actors, finished rows are committed to the store
every ``flush_every`` rows or ``flush_seconds``, and whatever stops the loop, what finished is kept."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..store import CountsRecord, RunStore
from .driver import Driver, stop_actors
from .planner import FinishedRow, Planner
from .progress import Progress

__all__ = ["SampleResult", "sample_counts"]

log = logging.getLogger("raysmooth")


@dataclass
class SampleResult:
    rows_written: int
    retried_units: int


def sample_counts(
    actors: list,
    images: Mapping[int, Any],
    labels: Mapping[int, int],
    sigmas: Sequence[float],
    planner: Planner,
    store: RunStore,
    *,
    model_id: str,
    seed: int,
    alpha: float,
    ray_cfg: Any,
    flush_every: int = 200,
    flush_seconds: float = 30.0,
    progress_seconds: float = 10.0,
    progress: Callable[[Planner, float], None] | None = None,
    joining: Mapping[Any, Any] | None = None,
    check_joined: Callable[[dict], None] | None = None,
) -> SampleResult:
    """Run the planner's work on ``actors`` (and on those of ``joining`` as they come up) until none is
    left; returns how many rows were committed."""

    buffer: list[CountsRecord] = []
    state = {"written": 0, "last_flush": time.monotonic()}

    def flush() -> None:
        if buffer:
            store.append_counts(buffer, model_id=model_id, seed=seed, alpha=alpha)
            state["written"] += len(buffer)
            buffer.clear()
        state["last_flush"] = time.monotonic()

    def on_rows(rows: list[FinishedRow]) -> None:
        for r in rows:
            buffer.append(
                CountsRecord(
                    r.image_id, labels[r.image_id], sigmas[r.sigma_index], r.phase, r.counts, r.round, r.seq_continue
                )
            )
        if len(buffer) >= flush_every or time.monotonic() - state["last_flush"] > flush_seconds:
            flush()

    bar = progress or Progress(len(images), every_s=progress_seconds)
    driver = Driver(
        actors,
        images,
        planner,
        on_rows=on_rows,
        max_in_flight_per_actor=ray_cfg.max_in_flight_per_actor,
        samples_per_task=ray_cfg.samples_per_task,
        task_timeout_s=ray_cfg.task_timeout_s,
        progress=bar,
        give_up_after_s=ray_cfg.give_up_after_s,
        joining=joining,
        check_joined=check_joined,
    )
    try:
        driver.run()
    finally:
        flush()  # nothing finished is lost, whatever stopped the loop
        if isinstance(bar, Progress):
            bar.close()
        stop_actors([*driver.actors, *driver.joining.values()])
    if driver.retried_units:
        log.info("%d units were re-run after actor failures", driver.retried_units)
    return SampleResult(state["written"], driver.retried_units)
