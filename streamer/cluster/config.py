"""ClusterConfig: how many workers, where the Ray cluster is, what each worker reserves (run_server.py fills it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClusterConfig:
    workers: int = 2                      # Ray actors, each owning one device, its generator and its sessions
    ray_address: str | None = None        # an existing Ray cluster ("auto", "ray://head:10001", "10.0.0.5:6379");
                                          #   None starts a local one in this process
    gpus_per_worker: float | None = None  # None: 1 when the Ray cluster has GPUs, else 0 (CPU workers)
    cpus_per_worker: float = 1.0          # Ray CPUs a worker reserves (its torch thread count on CPU workers)
    max_restarts: int = -1                # Ray restarts a dead worker this many times (-1: always)
    namespace: str = "packforcing"        # Ray namespace of the named worker actors ("<namespace>-w0", ...)
    status_interval: float = 0.5          # seconds between the front door's polls of every worker's status
    call_timeout: float = 5.0             # a worker that does not answer a status/metrics call within this is down
    move_timeout: float = 60.0            # seconds a drain may take to snapshot and move one session

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ValueError("gpus_per_worker must be >= 0")
        if self.cpus_per_worker < 0:
            raise ValueError("cpus_per_worker must be >= 0")
        if not 0 < self.status_interval <= 10:
            raise ValueError("status_interval must be in (0, 10] seconds")
