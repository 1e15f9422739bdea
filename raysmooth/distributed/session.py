"""The Ray session of a run: connecting (or starting a local cluster), sizing the actors, shipping a
user's model code to the workers, and starting the replicas so that a model that cannot be built is
one line, not a Ray traceback."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import GIVE_UP_AFTER_S
from ..errors import ConfigError, one_line
from ..signals import raise_on_sigterm
from .driver import ActorSpec, DistributedError, start_actors, stop_actors, user_error_of

__all__ = ["connect", "actor_spec", "runtime_env_for", "start_replicas", "Replicas", "unreachable"]

log = logging.getLogger("raysmooth")

# The GCS address of the local cluster this process started: its resources are all there will ever be
# (no autoscaler), so actors it cannot hold are refused at once rather than waited for.
_LOCAL_CLUSTER: dict[str, str | None] = {"gcs": None}
PLACEMENT_PATIENCE_S = 60.0  # once one replica is up, how long to wait for the next before going on without it


def connect(address: str | None, local_cpus: int | None = None, runtime_env: dict | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, as inside ``ray job submit``), else start a
    local one; ``runtime_env`` (a user's model package) is merged into the job's. A failure is one
    line that says what to try."""
    import ray

    if ray.is_initialized():
        if runtime_env:
            log.warning(
                "Ray was already initialised in this process: %s is not shipped to the workers, which must "
                "import it themselves",
                runtime_env.get("py_modules"),
            )
        return
    address = address or os.environ.get("RAY_ADDRESS")
    problem = unreachable(address) if address else None
    if problem:  # ray.init would retry for minutes before saying so
        raise DistributedError(
            f"could not reach the Ray cluster at {address}: {problem}; check that the cluster is up "
            "(`ray status --address ...`) and the address is right"
        )
    try:
        if address:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        else:
            _say_if_a_cluster_runs_here()
            ray.init(
                address="local",  # a cluster `ray start` left on this machine is joined only when asked
                num_cpus=local_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=True,
                logging_level=logging.WARNING,
                runtime_env=runtime_env,
            )
            _LOCAL_CLUSTER["gcs"] = _gcs_address()
        raise_on_sigterm()  # ray.init replaced it: a stopped job commits its finished rows and says so
    except Exception as exc:  # noqa: BLE001 - ray.init raises many kinds (ConnectionError, TimeoutError, RuntimeError…)
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        hint = (
            "check that the cluster is up (`ray status --address ...`) and the address is right"
            if address
            else "a machine under heavy load starts Ray slowly: run again, end stale Ray processes "
            "with `ray stop`, or start one yourself (`ray start --head`) and pass ray.address=auto"
        )
        raise DistributedError(
            f"could not start or reach {where} ({type(exc).__name__}: {one_line(exc, 160)}); {hint}"
        ) from None


def _say_if_a_cluster_runs_here() -> None:
    """Ray's own ``ray.init()`` joins the last cluster ``ray start`` began on this machine (and then refuses
    the local CPU count); a run without ``ray.address`` starts its own, and says how to join that one."""
    try:
        from ray._private.services import find_bootstrap_address

        running = find_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - a private helper: if it moved, the run just starts its own cluster
        return
    if running:
        log.info(
            "a Ray cluster started with `ray start` runs on this machine (%s); this run starts its own "
            "(ray.address=auto joins that one)",
            running,
        )


def unreachable(address: str, timeout_s: float = 5.0) -> str | None:
    """Why nothing accepts a connection at a ``host:port`` (or ``ray://host:port``) address, else None;
    ``auto``, ``http://…`` and other forms are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in host:
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"nothing answers at {host}:{port} ({exc.strerror or type(exc).__name__})"


def _gcs_address() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - only used to recognise the local cluster
        return None


def _is_our_local_cluster() -> bool:
    return _LOCAL_CLUSTER["gcs"] is not None and _LOCAL_CLUSTER["gcs"] == _gcs_address()


def actor_spec(num_actors: int | None, cpus_per_actor: float, gpus_per_actor: float, max_restarts: int) -> ActorSpec:
    """One actor per GPU (or per ``cpus_per_actor`` CPUs) of the cluster unless ``num_actors`` is set.
    On a local cluster this process started, more actors than it can hold are refused: the ones it
    could not place would wait for resources that never come."""
    import ray

    resources = ray.cluster_resources()
    if gpus_per_actor == 0 and resources.get("GPU", 0) > 0:  # engine=gpu with ray=local ran on the CPU, silently
        log.warning(
            "the replicas run on the CPU (ray.gpus_per_actor=0) although the cluster has %g GPU(s); ray=gpu_cluster "
            "or ray.gpus_per_actor=1 puts each replica on a GPU",
            resources["GPU"],
        )
    if num_actors is not None and _is_our_local_cluster():
        for kind, each in (("CPU", cpus_per_actor), ("GPU", gpus_per_actor)):
            have = resources.get(kind, 0.0)
            if num_actors * each > have + 1e-9:
                raise ConfigError(
                    f"ray.num_actors={num_actors} with {each:g} {kind} each needs {num_actors * each:g} {kind}(s); "
                    f"this local Ray cluster has {have:g}. Leave ray.num_actors unset (one actor per "
                    f"{'GPU' if kind == 'GPU' else 'CPU slot'}) or lower it"
                    + ("; ray.local_cpus sets the local cluster's CPU count" if kind == "CPU" else "")
                )
    if num_actors is None:
        if gpus_per_actor > 0:
            num_actors = int(resources.get("GPU", 0) // gpus_per_actor)
            if num_actors < 1:
                raise ConfigError(
                    f"ray.gpus_per_actor={gpus_per_actor:g} but the cluster has {resources.get('GPU', 0):g} "
                    "GPU(s); use engine=cpu ray=local on a machine without a GPU"
                )
        elif cpus_per_actor > 0:
            num_actors = int(resources.get("CPU", 1) // cpus_per_actor)
        else:
            raise ConfigError("an actor of 0 CPUs and 0 GPUs gives no count of actors: set ray.num_actors")
        num_actors = max(1, num_actors)
    return ActorSpec(int(num_actors), cpus_per_actor, gpus_per_actor, max_restarts)


def runtime_env_for(base: str) -> dict | None:
    """For ``model.base=pkg.module:builder``: ship ``pkg`` to the workers with Ray's runtime environment
    (``py_modules``, given to ``ray.init``: Ray uploads local folders for the whole job), unless it is
    installed in site-packages, where every node has it anyway."""
    if ":" not in base:
        return None
    top = base.partition(":")[0].split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise ConfigError(f"model.base={base}: cannot find the module {top} (is it installed or on PYTHONPATH?)")
    module = sys.modules.get(top) or importlib.import_module(top)
    location = Path(next(iter(getattr(module, "__path__", [])), None) or module.__file__ or "")
    if not str(location) or any(part in ("site-packages", "dist-packages") for part in location.parts):
        return None
    return {"py_modules": [str(location)]}  # a package's folder, or a single module's file


@dataclass
class Replicas:
    """The replica actors of a run: those up (with what each reported), and those still waiting to be
    placed, keyed by their pending ``describe`` call, which join the run when the cluster places them."""

    actors: list
    infos: list[dict]
    joining: dict = field(default_factory=dict)

    def all(self) -> list:
        return [*self.actors, *self.joining.values()]


def start_replicas(
    spec: ActorSpec,
    model: Mapping[str, Any],
    sigmas: Sequence[float],
    seed: int,
    engine: Mapping[str, Any],
    threads: int | None,
    *,
    give_up_s: float = GIVE_UP_AFTER_S,
    patience_s: float = PLACEMENT_PATIENCE_S,
) -> Replicas:
    """Start the actors and wait until each has built its model (classes, input shape, model id,
    batch size, the σ its noise really has). Actors the cluster cannot place yet do not hold the run
    up: see ``_await_replicas``."""
    from ray.exceptions import RayActorError, RayError

    log.info("starting %d replica actor(s) (%g CPU, %g GPU each)", spec.num_actors, spec.num_cpus, spec.num_gpus)
    actors = start_actors(spec, dict(model), list(sigmas), seed, dict(engine), threads)
    try:
        return _await_replicas(actors, spec, give_up_s, patience_s)
    except RayError as exc:
        stop_actors(actors)
        cause = user_error_of(exc)
        if cause is not None:  # a model the actor could not build: the user's to fix
            raise type(cause)(str(cause)) from None
        if isinstance(exc, RayActorError) or "RuntimeEnvSetupError" in type(exc).__name__:
            raise DistributedError(
                f"a replica actor could not start ({type(exc).__name__}: {one_line(exc, 200)}); "
                "see the worker logs (`ray logs`) for the reason"
            ) from None
        raise


def _await_replicas(actors: list, spec: ActorSpec, give_up_s: float, patience_s: float) -> Replicas:
    """Wait for every actor to come up; but once some are, an actor still not up after ``patience_s``
    (or twice the time the first one took) no longer holds the run: it goes on with those up, and the
    rest join when placed (a full cluster may place them late or never). None up after ``give_up_s`` is
    an error naming what each actor needs and what the cluster has."""
    import ray

    refs = {a.describe.remote(): a for a in actors}
    up: list[tuple[Any, dict]] = []
    started = last = said = time.monotonic()
    first_took = 0.0
    while refs:
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=min(5.0, patience_s))
        now = time.monotonic()
        for ref in done:
            up.append((refs.pop(ref), ray.get(ref)))  # raises the actor's own error (a model it cannot build)
            first_took, last = first_took or now - started, now
        if not refs:
            break
        if up and now - last > max(patience_s, 2 * first_took):
            log.warning(
                "%d of %d replica actor(s) up; going on with them, the other %d join when the cluster places them (%s)",
                len(up),
                len(actors),
                len(refs),
                _needs(spec),
            )
            break
        if not up and now - started > give_up_s:
            stop_actors(actors)
            raise DistributedError(
                f"no replica actor started within {give_up_s:.0f} s ({_needs(spec)}); lower ray.num_actors, "
                "ray.cpus_per_actor or ray.gpus_per_actor, or add nodes"
            )
        if now - said >= 30.0:
            log.info("%d of %d replica actor(s) up; waiting for the others (%s)", len(up), len(actors), _needs(spec))
            said = now
    return Replicas([a for a, _ in up], [info for _, info in up], refs)


def _needs(spec: ActorSpec) -> str:
    """What each actor asks for and what the cluster has free: asked of Ray only when a line says it."""
    import ray

    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        has = ", ".join(f"{free.get(k, 0):g} of {total.get(k, 0):g} {k} free" for k in ("CPU", "GPU") if k in total)
    except Exception:  # noqa: BLE001 - only for the message
        has = "unknown resources"
    return f"{spec.num_cpus:g} CPU, {spec.num_gpus:g} GPU each; the cluster has {has or 'none'}"
