"""Shared fixtures: one real local Ray cluster per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train starts a PreemptionWatcher actor per fit to drain workers before a spot node is
# reclaimed. The test clusters are one local node with nothing to reclaim, and the actor costs
# each of the suite's ~30 fits a process that imports Ray Train (~3.5 CPU-seconds measured).
# Set here, it reaches every Ray the suite starts: in-process, `ray start` heads, job drivers.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray instance (no mocks). 4 logical CPUs on a 2-core box, so that two
    train workers, Ray Data read tasks and a driver can all be scheduled at once."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
