"""Request traces: who asks for which model when, seeded and built with numpy.

Every trace is a Poisson stream at ``SimConfig.rate`` whose models follow Zipf popularity by rank
(``loadtest.workload.zipf_probabilities``) over a seeded permutation of the models. Kinds:

- ``zipf``: the ranking never changes; the watched hot model is the top one, from the start;
- ``shift``: every ``shift_every_s`` the ranking moves by ``shift_models`` (rank r is served by
  the model that held rank r + shift_models before), so a new hot set takes over; the watched
  model is the one that becomes the top at the first shift;
- ``burst``: the zipf trace plus, from ``burst_at_s``, a cold model (median rank) at
  ``burst_x`` times the scale-up threshold; the watched model is that one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loadtest.sim.config import EPOCH_MS, SimConfig
from loadtest.workload import zipf_probabilities

__all__ = ["Trace", "make_trace", "next_uses"]

TRACE_KINDS = ("zipf", "shift", "burst")


@dataclass(frozen=True, slots=True)
class Trace:
    """Requests in time order: ``times_ms[i]`` (ms since the epoch) asks for ``models[i]``."""

    times_ms: np.ndarray
    models: np.ndarray
    # the hot model whose copies are timed: from when, and at what steady rate
    watched_model: int
    watched_from_ms: int
    watched_rpm: float

    def __len__(self) -> int:
        return len(self.times_ms)


def make_trace(cfg: SimConfig) -> Trace:
    if cfg.trace not in TRACE_KINDS:
        raise ValueError(f"unknown trace {cfg.trace!r}; choose one of {', '.join(TRACE_KINDS)}")
    rng = np.random.default_rng(cfg.seed)
    n = int(rng.poisson(cfg.rate * cfg.duration_s))
    seconds = np.sort(rng.uniform(0.0, cfg.duration_s, n))
    probabilities = np.asarray(zipf_probabilities(cfg.models, cfg.zipf_s))
    cumulative = np.cumsum(probabilities)
    cumulative[-1] = 1.0
    ranks = np.searchsorted(cumulative, rng.uniform(0.0, 1.0, n), side="right")
    model_of_rank = rng.permutation(cfg.models)
    top_rpm = float(probabilities[0]) * cfg.rate * 60

    if cfg.trace == "shift":
        epochs = (seconds // cfg.shift_every_s).astype(np.int64)
        models = model_of_rank[(ranks + epochs * cfg.shift_models) % cfg.models]
        watched = int(model_of_rank[cfg.shift_models % cfg.models])
        return _trace(seconds, models, watched, cfg.shift_every_s, top_rpm)
    models = model_of_rank[ranks]
    if cfg.trace == "zipf":
        return _trace(seconds, models, int(model_of_rank[0]), 0.0, top_rpm)

    cold = int(model_of_rank[cfg.models // 2])
    burst_rpm = cfg.burst_x * cfg.threshold_rpm
    span = max(cfg.duration_s - cfg.burst_at_s, 0.0)
    extra = np.sort(rng.uniform(cfg.burst_at_s, cfg.burst_at_s + span, int(rng.poisson(burst_rpm / 60 * span))))
    seconds = np.concatenate([seconds, extra])
    models = np.concatenate([models, np.full(len(extra), cold, dtype=models.dtype)])
    order = np.argsort(seconds, kind="stable")
    return _trace(seconds[order], models[order], cold, cfg.burst_at_s, burst_rpm)


def _trace(seconds: np.ndarray, models: np.ndarray, watched: int, from_s: float, rpm: float) -> Trace:
    times = EPOCH_MS + (seconds * 1000).astype(np.int64)
    return Trace(times, models.astype(np.int64), watched, EPOCH_MS + int(from_s * 1000), rpm)


def next_uses(models: np.ndarray) -> np.ndarray:
    """For each request, the index of the next request for the same model (``len(models)`` if
    none): the backward scan Belady needs, done as one stable sort by model so that each request's
    successor in that order is its next use."""
    n = len(models)
    following = np.full(n, n, dtype=np.int64)
    if n < 2:
        return following
    order = np.argsort(models, kind="stable")
    same = models[order[1:]] == models[order[:-1]]
    following[order[:-1][same]] = order[1:][same]
    return following
