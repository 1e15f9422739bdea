"""The distributed layer: Ray actors holding engine replicas, the driver loop, and the planner.

It knows how to move work units and counts around; it knows nothing of bounds or radii.
"""

from .driver import ActorSpec, Driver, DistributedError, ReplicaActor, start_actors
from .planner import FinishedRow, Planner

__all__ = ["ActorSpec", "Driver", "DistributedError", "FinishedRow", "Planner", "ReplicaActor", "start_actors"]
