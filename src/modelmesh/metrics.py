"""The metric catalog, named as KServe ModelMesh names them so dashboards carry over.

Metrics live on a ``CollectorRegistry`` handed in by the composition root, never on the global
one, so each test builds its own. Counts of timed events come from the histograms' ``_count``
(as in ModelMesh, where e.g. ``modelmesh_loadmodel`` is exported as
``modelmesh_loadmodel_milliseconds``); per-model labels are left out on purpose (cardinality).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
