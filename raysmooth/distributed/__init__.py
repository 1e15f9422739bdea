"""The distributed layer: Ray actors holding engine replicas, the driver loop, and the planner.

It knows how to move work units and counts around; it knows nothing of bounds or radii.
"""

from .driver import ActorSpec, DistributedError, Driver, ReplicaActor, start_actors, stop_actors, user_error_of
from .planner import FinishedRow, Planner, SequentialPlanner
from .progress import Progress
from .sampling import SampleResult, sample_counts
from .session import Replicas, actor_spec, connect, runtime_env_for, start_replicas

__all__ = [
    "ActorSpec",
    "Driver",
    "DistributedError",
    "FinishedRow",
    "Planner",
    "Progress",
    "ReplicaActor",
    "SampleResult",
    "SequentialPlanner",
    "actor_spec",
    "connect",
    "runtime_env_for",
    "sample_counts",
    "start_actors",
    "start_replicas",
    "Replicas",
    "stop_actors",
    "user_error_of",
]
