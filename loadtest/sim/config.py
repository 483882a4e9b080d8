"""The simulation's settings and the cluster they imply."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# trace times are ms since the epoch from here, so "0 = never used" keeps its meaning
EPOCH_MS = 1_700_000_000_000
MB = 1_000_000


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulation: cluster, models, traffic and the mesh's knobs. Times in seconds unless named."""

    pods: int = 100
    models: int = 100_000
    # memory for this share of all models' bytes, split evenly over the pods
    memory_share: float = 0.10
    # model sizes: lognormal around this median (bytes), with this sigma of the log
    size_median: int = MB
    size_sigma: float = 0.5
    # requests per second over the whole cluster, and the trace
    rate: float = 10_000.0
    duration_s: float = 100.0
    warmup_s: float = 40.0
    trace: str = "zipf"  # zipf | shift | burst
    zipf_s: float = 1.0
    # shift: every shift_every_s the ranking moves by shift_models models (a new hot set)
    shift_every_s: float = 30.0
    shift_models: int = 1_000
    # burst: from burst_at_s, a cold model gets burst_x times the scale-up threshold
    burst_at_s: float = 60.0
    burst_x: float = 4.0
    # a request occupies its pod this long (in-flight counts for routing)
    service_ms: int = 10
    # the mesh: MM_SCALEUP_RPM_THRESHOLD, how often pods republish their records
    threshold_rpm: float = 2000.0
    publish_ms: int = 1_000
    # routing among copies by requests in flight as the entry pod knows them ("local", as
    # mesh.py does: only the requests it forwarded) or as the whole cluster knows them ("global")
    copy_load: str = "local"
    # churn guard with this load timeout; 0 turns it off
    churn_guard_timeout_ms: int = 0
    # Ray Serve-style baseline: a replica with this many requests in flight counts as busy
    ray_max_ongoing: int = 5
    seed: int = 1

    def model_sizes(self) -> np.ndarray:
        """Every model's size in bytes (seeded; at least 1 KB)."""
        rng = np.random.default_rng(self.seed + 17)
        sizes = rng.lognormal(math.log(self.size_median), self.size_sigma, self.models)
        return np.maximum(sizes, 1_000).astype(np.int64)

    def pod_capacity(self, sizes: np.ndarray) -> int:
        """Bytes per pod: ``memory_share`` of all models, split evenly, and room for the largest."""
        return max(int(self.memory_share * int(sizes.sum()) / self.pods), int(sizes.max()))

    @property
    def measure_from_ms(self) -> int:
        return EPOCH_MS + int(self.warmup_s * 1000)
