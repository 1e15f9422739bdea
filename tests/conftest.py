import os
import sys
from pathlib import Path

import pytest

# Nothing in the tests may reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def local_ray_per_module():
    """Runs in a module start their own local Ray (as the CLI does); shut it down when the module ends."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
