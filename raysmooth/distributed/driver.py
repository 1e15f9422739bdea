"""Ray actors that each hold one engine Replica, and the driver loop that feeds them.

Ray does what it does well: actors that are restarted when they die (``max_restarts``), ``ray.wait``
for backpressure. The driver does the rest: a task whose actor died is handed to any healthy actor
(``max_task_retries=0`` plus re-queueing, docs/distributed.md), results are keyed by unit so a unit that
runs twice never counts twice, and finished rows go to a callback (the store) as they complete.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from ..config import GIVE_UP_AFTER_S, RayCfg
from ..errors import ModelLoadError, RaySmoothError, one_line
from ..units import WorkUnit
from .planner import FinishedRow, Planner

__all__ = ["ReplicaActor", "ActorSpec", "start_actors", "stop_actors", "Driver", "DistributedError", "user_error_of"]

log = logging.getLogger("raysmooth")


class DistributedError(RaySmoothError):
    """The run cannot go on: no healthy actor left, or an actor reported a user error."""


class ReplicaActor:
    """Holds one base classifier on one device (wrapped with ``ray.remote`` by ``start_actors``).

    A model that cannot be built does not kill the actor: the error is kept and raised from
    ``describe`` and ``run``, so the driver receives it as the cause of a ``RayTaskError`` and shows
    its one line (Ray would otherwise report an ``ActorDiedError`` with the traceback inside).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        sigmas: Sequence[float],
        run_seed: int,
        engine: Mapping[str, Any],
        threads: int | None = None,
    ):
        self.error: Exception | None = None
        self.replica = None
        try:
            self._build(model, sigmas, run_seed, engine, threads)
        except Exception as exc:  # noqa: BLE001 - reported through describe()
            where = f"on Ray worker {socket.gethostname()}"
            self.error = (
                type(exc)(f"{exc} ({where})")
                if isinstance(exc, RaySmoothError)
                else ModelLoadError(f"building the model failed {where}: {type(exc).__name__}: {one_line(exc, 200)}")
            )

    def _build(self, model, sigmas, run_seed, engine, threads) -> None:
        import torch

        from ..engine import EngineConfig, Replica, resolve_device
        from ..models import create_base_classifier, model_sections

        engine = dict(engine)
        device = resolve_device(engine.pop("device", "auto"))
        if threads:
            torch.set_num_threads(int(threads))
        name, kwargs = model_sections(model)
        base = create_base_classifier(name, **kwargs)
        self.replica = Replica(base, sigmas, run_seed, EngineConfig(**engine), device=device)
        self.device = device

    def describe(self) -> dict:
        if self.error is not None:
            raise self.error
        base = self.replica.base
        return {
            "num_classes": base.num_classes,
            "input_shape": list(base.input_shape),
            "model_id": base.model_id,
            "device": str(self.device),
            "pid": os.getpid(),
            "batch_size": self.replica.batch_size,
            "applied_sigmas": self.replica.applied_sigmas,
        }

    def run(self, units: list[WorkUnit], images: dict[int, np.ndarray]) -> tuple[list[tuple], list[np.ndarray], float]:
        if self.error is not None:
            raise self.error
        start = time.perf_counter()
        counts = self.replica.run(units, images)
        return [u.key for u in units], [counts[u.key] for u in units], time.perf_counter() - start


@dataclass(frozen=True)
class ActorSpec:
    num_actors: int
    num_cpus: float
    num_gpus: float
    max_restarts: int


def start_actors(spec: ActorSpec, *args: Any, **kwargs: Any) -> list:
    """Create the replica actors; Ray restarts a dead one, the driver never waits for it."""
    import ray

    remote = ray.remote(ReplicaActor).options(
        num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_restarts=spec.max_restarts, max_task_retries=0
    )
    return [remote.remote(*args, **kwargs) for _ in range(spec.num_actors)]


def stop_actors(actors: Sequence) -> None:
    """End the replicas for good (no restart): their devices are free for the next model or run."""
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)


def user_error_of(exc: BaseException) -> RaySmoothError | None:
    """The user's mistake behind a Ray error, if it is one (a task or actor that raised ours)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # Ray's RayTaskError also *is* an instance of its cause's class
        if isinstance(cause, BaseException):
            exc = cause
            continue
        if isinstance(exc, RaySmoothError):
            return exc
        exc = exc.__cause__
    return None


def _raise_task_error(exc: BaseException) -> NoReturn:
    """A task that raised: the user's mistake as one line, anything else as it is."""
    cause = user_error_of(exc)
    if cause is not None:
        raise DistributedError(str(cause)) from None
    raise exc


class Driver:
    """Feeds actors from a Planner with bounded in-flight work; survives actor loss."""

    def __init__(
        self,
        actors: list,
        images: Mapping[int, np.ndarray],
        planner: Planner,
        *,
        on_rows: Callable[[list[FinishedRow]], None],
        max_in_flight_per_actor: int = RayCfg.max_in_flight_per_actor,
        samples_per_task: int = RayCfg.samples_per_task,
        task_timeout_s: float | None = None,
        progress: Callable[[Planner, float], None] | None = None,
        give_up_after_s: float = GIVE_UP_AFTER_S,
        joining: Mapping[Any, Any] | None = None,
        check_joined: Callable[[dict], None] | None = None,
    ):
        self.actors = list(actors)
        # actors not placed yet, keyed by their pending describe() call: each joins when it resolves,
        # after ``check_joined`` has seen its report (the same model as the others)
        self.joining = dict(joining or {})
        self.check_joined = check_joined
        self.images = images
        self.planner = planner
        self.on_rows = on_rows
        self.max_in_flight = max(1, max_in_flight_per_actor)
        self.samples_per_task = max(1, samples_per_task)
        self.task_timeout_s = task_timeout_s
        self.progress = progress
        self.give_up_after_s = give_up_after_s
        self.retried_units = 0
        self._strikes: dict = {}  # actor -> consecutive failures
        self._cooldown: dict = {}  # actor -> monotonic time before which it gets no work
        self._last_success = time.monotonic()

    def _submit(self, actor, in_flight: dict, load: dict) -> bool:
        units = self.planner.take(self.samples_per_task)
        if not units:
            return False
        imgs = {u.image_id: self.images[u.image_id] for u in units}
        ref = actor.run.remote(units, imgs)
        in_flight[ref] = (actor, units, time.monotonic())
        load[actor] = load.get(actor, 0) + 1
        return True

    def _fill(self, in_flight: dict, load: dict) -> None:
        # Round-robin: give every actor one task before any gets a second; skip actors that just
        # failed (Ray is restarting them) until their back-off has passed.
        now = time.monotonic()
        for depth in range(self.max_in_flight):
            for actor in self.actors:
                if self._cooldown.get(actor, 0.0) > now:
                    continue
                if load.get(actor, 0) <= depth and self.planner.has_work():
                    self._submit(actor, in_flight, load)

    def run(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        in_flight: dict = {}
        load: dict = {}
        started = time.monotonic()
        self._last_success = started
        while True:
            self._fill(in_flight, load)
            if not in_flight:
                if not self.planner.has_work():
                    break
                # Every actor is backing off after failures: wait for Ray to bring them back (or for a late one).
                if time.monotonic() - self._last_success > self.give_up_after_s:
                    raise DistributedError(
                        f"no actor has finished a task for {self.give_up_after_s:.0f} s; the cluster has no healthy "
                        "replica (see `ray status`); run the same command again to resume"
                    )
                joined, _ = ray.wait(list(self.joining), num_returns=1, timeout=0.5) if self.joining else ([], [])
                for ref in joined:
                    self._join(ref)
                if not self.joining:
                    time.sleep(0.5)
                continue
            ready, _ = ray.wait([*self.joining, *in_flight], num_returns=1, timeout=1.0)  # joiners first
            now = time.monotonic()
            for ref in [r for r in ready if r in self.joining]:
                self._join(ref)
            ready = [r for r in ready if r in in_flight]
            if not ready and self.task_timeout_s:
                for ref, (_actor, units, t0) in list(in_flight.items()):
                    if now - t0 > self.task_timeout_s:
                        log.warning(
                            "task of %d units ran over %.0f s; handing it to another actor",
                            len(units),
                            self.task_timeout_s,
                        )
                        try:
                            ray.cancel(ref, force=False)  # best effort: a busy sync actor finishes it anyway
                        except Exception:  # noqa: BLE001 - cancelling is advisory; re-queueing is what counts
                            pass
                        self._lost(ref, in_flight, load)
            for ref in ready:
                actor, units, _t0 = in_flight[ref]
                try:
                    keys, counts, _seconds = ray.get(ref)
                except RayActorError as exc:
                    log.warning("actor lost (%s); re-queueing %d units", type(exc).__name__, len(units))
                    self._lost(ref, in_flight, load)
                    continue
                except RayTaskError as exc:
                    _raise_task_error(exc)
                except GetTimeoutError:  # pragma: no cover - ray.wait said ready
                    continue
                del in_flight[ref]
                load[actor] -= 1
                finished = []
                for unit, c in zip(units, counts):
                    finished += self.planner.complete(unit, c)
                if finished:
                    self.on_rows(finished)
                self._strikes[actor] = 0
                self._last_success = time.monotonic()
            if self.progress:
                self.progress(self.planner, time.monotonic() - started)

    def _join(self, ref) -> None:
        """A late actor came up: check its report, then it takes work like the others."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        actor = self.joining.pop(ref)
        try:
            info = ray.get(ref)
        except RayActorError as exc:
            log.warning("a replica actor that was waiting to be placed is gone (%s)", type(exc).__name__)
            return
        except RayTaskError as exc:
            _raise_task_error(exc)
        if self.check_joined is not None:
            self.check_joined(info)
        self.actors.append(actor)
        log.info("a replica actor joined the run (%d up, %d waiting)", len(self.actors), len(self.joining))

    def _lost(self, ref, in_flight: dict, load: dict) -> None:
        """Re-queue a lost task's units for any actor; back off from the one that lost them."""
        actor, units, _ = in_flight.pop(ref)
        load[actor] -= 1
        self.planner.requeue(units)
        self.retried_units += len(units)
        strikes = self._strikes.get(actor, 0) + 1
        self._strikes[actor] = strikes
        self._cooldown[actor] = time.monotonic() + min(60.0, 0.5 * 2 ** (strikes - 1))
        if time.monotonic() - self._last_success > self.give_up_after_s:
            raise DistributedError(
                f"no actor has finished a task for {self.give_up_after_s:.0f} s; the cluster has no healthy replica "
                "(see `ray status`); run the same command again to resume"
            )
