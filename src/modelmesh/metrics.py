"""The metric catalog, named as KServe ModelMesh names them so dashboards carry over.

Metrics live on a ``CollectorRegistry`` handed in by the composition root, never on the global
one, so each test builds its own. Counts of timed events come from the histograms' ``_count``
(as in ModelMesh, where e.g. ``modelmesh_loadmodel`` is exported as
``modelmesh_loadmodel_milliseconds``); per-model labels are left out of these on purpose
(cardinality). Per-model figures come from ``TopModels``, off unless asked for: gauges of the
busiest N models of the pod, computed when scraped from what the pod tracks anyway, so they cost
nothing per request and at most 3N series.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# milliseconds: from sub-millisecond hops to multi-minute loads
_MS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
               30000, 60000, 120000, 300000)
_AGE_BUCKETS = (1000, 10_000, 60_000, 300_000, 900_000, 3_600_000, 4 * 3_600_000,
                24 * 3_600_000, 7 * 24 * 3_600_000)
_SIZE_BUCKETS = tuple(float(1 << k) for k in range(12, 36, 2))  # 4 KiB .. 32 GiB


class MeshMetrics:
    """Every metric a mesh pod exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.api_request = Histogram(
            "modelmesh_api_request_milliseconds", "External inference request time",
            ["method", "code"], buckets=_MS_BUCKETS, registry=r)
        self.invoke_model = Histogram(
            "modelmesh_invoke_model_milliseconds", "Internal model server inference request time",
            ["method", "code"], buckets=_MS_BUCKETS, registry=r)
        self.cache_miss = Histogram(
            "modelmesh_cache_miss_milliseconds", "Cache miss delay",
            buckets=_MS_BUCKETS, registry=r)
        self.load_model = Histogram(
            "modelmesh_loadmodel_milliseconds", "Time taken to load model",
            buckets=_MS_BUCKETS, registry=r)
        self.unload_model = Histogram(
            "modelmesh_unloadmodel_milliseconds", "Time taken to unload model",
            buckets=_MS_BUCKETS, registry=r)
        self.loading_queue_delay = Histogram(
            "modelmesh_loading_queue_delay_milliseconds", "Time spent in model loading queue",
            buckets=_MS_BUCKETS, registry=r)
        self.load_model_failure = Counter(
            "modelmesh_loadmodel_failure", "Model load failures", registry=r)
        self.unload_model_failure = Counter(
            "modelmesh_unloadmodel_failure", "Unload model failures", registry=r)
        self.model_evicted = Counter(
            "modelmesh_model_evicted", "Count of model copy evictions", registry=r)
        self.age_at_eviction = Histogram(
            "modelmesh_age_at_eviction_milliseconds", "Time since model was last used when evicted",
            buckets=_AGE_BUCKETS, registry=r)
        self.loaded_model_size = Histogram(
            "modelmesh_loaded_model_size_bytes", "Reported size of loaded model",
            buckets=_SIZE_BUCKETS, registry=r)
        self.models_loaded = Gauge(
            "modelmesh_models_loaded_total", "Total number of models with at least one loaded copy",
            registry=r)
        self.models_with_failure = Gauge(
            "modelmesh_models_with_failure_total",
            "Total number of models with one or more recent load failures", registry=r)
        self.models_managed = Gauge(
            "modelmesh_models_managed_total", "Total number of models managed", registry=r)
        self.instance_capacity = Gauge(
            "modelmesh_instance_capacity_bytes", "Effective model capacity of pod", registry=r)
        self.instance_used = Gauge(
            "modelmesh_instance_used_bytes", "Amount of capacity currently in use by loaded models",
            registry=r)
        self.instance_used_bps = Gauge(
            "modelmesh_instance_used_bps", "Amount of capacity used in basis points", registry=r)
        self.instance_models = Gauge(
            "modelmesh_instance_models_total", "Number of model copies loaded in pod", registry=r)
        self.instance_lru = Gauge(
            "modelmesh_instance_lru_seconds",
            "Last used time of least recently used model in pod (secs since epoch)", registry=r)
        self.instance_lru_age = Gauge(
            "modelmesh_instance_lru_age_seconds",
            "Last used age of least recently used model in pod (secs ago)", registry=r)
        # ours, not ModelMesh's: which rule eviction ranks by (placement.eviction.PopularityFit)
        self.popularity_fit = Gauge(
            "modelmesh_popularity_fit",
            "Mean chi-square per copy of the pod's request counts against their long-term rates", registry=r)
        self.popularity_steady = Gauge(
            "modelmesh_popularity_steady",
            "1 while the pod's popularity holds steady (eviction ranks by long-term use), else 0", registry=r)


@dataclass(frozen=True, slots=True)
class ModelFigures:
    """One model copy of this pod, as the per-model gauges show it."""

    model_id: str
    requests_per_minute: float
    size_bytes: int
    copies: int  # copies in the cluster, as this pod's view of the model's record has them


class TopModels(Collector):
    """Per-model gauges (``modelId`` label) of the ``top`` models with the most requests in the last
    minute on this pod (MM_PER_MODEL_METRICS). ``figures`` gives every copy the pod holds; it is
    called at scrape time only."""

    def __init__(self, figures: Callable[[], Iterable[ModelFigures]], top: int) -> None:
        self._figures = figures
        self._top = top

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rate = GaugeMetricFamily(
            "modelmesh_model_requests_per_minute",
            "Requests in the last minute to the model's copy in this pod (the pod's busiest models)",
            labels=["modelId"])
        size = GaugeMetricFamily(
            "modelmesh_model_size_bytes", "Measured size of the model's copy in this pod", labels=["modelId"])
        copies = GaugeMetricFamily(
            "modelmesh_model_copies", "Copies of the model in the cluster", labels=["modelId"])
        for f in heapq.nlargest(self._top, self._figures(), key=lambda f: (f.requests_per_minute, f.model_id)):
            rate.add_metric([f.model_id], f.requests_per_minute)
            size.add_metric([f.model_id], f.size_bytes)
            copies.add_metric([f.model_id], f.copies)
        yield rate
        yield size
        yield copies

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
