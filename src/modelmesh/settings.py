"""Settings, parsed once from the environment and command-line flags into frozen objects.

Nothing else in modelmesh reads ``os.environ``: ``app`` and ``cli`` call ``from_env`` with the
process environment and pass the result down. Env names follow KServe ModelMesh where one exists.
A flag given on the command line wins over its env var.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

MIB = 1024 * 1024
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
TLS_CLIENT_AUTH = ("NONE", "OPTIONAL", "REQUIRE")


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _paths(raw: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in raw.split(",") if x.strip())


def _labels(raw: str) -> tuple[str, ...]:
    return tuple(sorted(_paths(raw)))


@dataclass(frozen=True)
class MeshSettings:
    """Settings of a mesh pod (``modelmesh serve``)."""

    # address the external gRPC port binds; tests use 127.0.0.1
    host: str = "0.0.0.0"
    # external gRPC port: inference data plane + management API (MM_SVC_GRPC_PORT)
    grpc_port: int = 8033
    # largest gRPC message accepted and forwarded, both directions (MM_SVC_GRPC_MAX_MSG_SIZE)
    max_msg_size: int = 16 * MIB
    # Prometheus metrics port; 0 picks a free one, negative disables (MM_METRICS_PORT)
    metrics_port: int = 2112
    # runtime to use: "host:port" or "unix:/path"; None starts the built-in runtime as a child
    # (INTERNAL_GRPC_PORT gives a loopback port, INTERNAL_GRPC_SOCKET_PATH a Unix socket)
    runtime_endpoint: str | None = None
    # where the built-in runtime runs when no endpoint is given: "process" (a child process, the
    # SPI over loopback) or "inprocess" (inside this process, no hop) (MM_RUNTIME_MODE)
    runtime_mode: str = "inprocess"
    # capacity handed to the built-in runtime; None lets it size itself (MM_RUNTIME_CAPACITY_BYTES)
    runtime_capacity_bytes: int | None = None
    # registry store: "memory" for single node, or "etcd:http://host:port[,...]" (KV_STORE)
    kv_store: str = "memory"
    # key prefix and service name: keys live under <prefix>/<service>/ (MM_KVSTORE_PREFIX, MM_SERVICE_NAME)
    kv_prefix: str = "mm"
    service_name: str = "modelmesh"
    # this pod's id in the cluster (MM_INSTANCE_ID; default hostname-pid)
    instance_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # placement labels of this pod and its zone (MM_LABELS comma separated, MM_ZONE)
    labels: tuple[str, ...] = ()
    zone: str = ""
    # {"<model type>": {"required": [...], "preferred": [...]}} (MM_TYPE_CONSTRAINTS)
    type_constraints: dict[str, Any] = field(default_factory=dict)
    # requests per minute per copy above which copies are added (MM_SCALEUP_RPM_THRESHOLD)
    scaleup_rpm_threshold: int = 2000
    # churn guard: a load that would evict a model used less than this long ago is refused with
    # RESOURCE_EXHAUSTED instead, so a working set far beyond capacity cannot thrash; 0 turns it
    # off (MM_CHURN_GUARD_MS). ModelMesh's value is 10 x max(3 s, load timeout / 3).
    churn_guard_ms: int = 0
    # how long a failed load is remembered before the model is tried again (MM_LOAD_FAILURE_EXPIRY_MS)
    load_failure_expiry_ms: int = 15 * 60 * 1000
    # seconds to wait for the runtime to report READY at start (MM_RUNTIME_STARTUP_TIMEOUT_S)
    runtime_startup_timeout_s: float = 60.0
    # log level name (MM_LOG_LEVEL)
    log_level: str = "INFO"
    # the pod's asyncio event loop (MM_EVENT_LOOP): "uvloop", "asyncio" (the standard library's),
    # or "auto": uvloop when it is installed (the `uvloop` extra), else asyncio. uvloop cuts the
    # pod's CPU per request (benchmarks.md, B1 "The event loop")
    event_loop: str = "auto"
    # address other pods use to reach this one (MM_ADVERTISE_ADDRESS); default: --host, or this
    # machine's hostname when --host is 0.0.0.0. The bound gRPC port is appended.
    advertise_host: str | None = None
    # TTL of this pod's instance-record lease: how long a dead pod stays in the views (MM_INSTANCE_LEASE_TTL_S)
    instance_lease_ttl_s: float = 20.0
    # at shutdown, how long to wait for the models used here in the last hour, held nowhere else, to
    # load on other pods before exiting; 0 skips it (MM_SHUTDOWN_REHOME_S). Keep the pod's
    # termination grace period above it.
    shutdown_rehome_s: float = 20.0
    # TLS on the external port, as ModelMesh reads it: the pod's certificate (chain) and private key
    # (MM_TLS_KEY_CERT_PATH, MM_TLS_PRIVATE_KEY_PATH; both or neither); client certificates
    # NONE, OPTIONAL or REQUIRE (MM_TLS_CLIENT_AUTH), checked against MM_TLS_TRUST_CERT_PATH
    # (files or folders of .pem/.crt, comma separated). Pod-to-pod hops use TLS too, trusting the
    # pod's own certificate plus MM_INTERNAL_TRUST_CERTS.
    tls_key_cert_path: str | None = None
    tls_private_key_path: str | None = None
    tls_client_auth: str = "NONE"
    tls_trust_cert_paths: tuple[str, ...] = ()
    internal_trust_cert_paths: tuple[str, ...] = ()
    # per-model gauges for this pod's N busiest models (requests in the last minute, size, copies);
    # 0 turns them off (MM_PER_MODEL_METRICS)
    per_model_metrics: int = 0
    # try-it mode: write this many demo ONNX models to demo_dir and register them at start
    demo_models: int = 0
    demo_dir: str = "modelmesh-demo-models"

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> MeshSettings:
        """Build settings from ``env`` (usually os.environ), then apply non-None ``overrides``."""
        endpoint = None
        if env.get("INTERNAL_GRPC_SOCKET_PATH"):
            endpoint = "unix:" + env["INTERNAL_GRPC_SOCKET_PATH"]
        elif env.get("INTERNAL_GRPC_PORT"):
            endpoint = f"127.0.0.1:{_int(env, 'INTERNAL_GRPC_PORT', 0)}"
        capacity = env.get("MM_RUNTIME_CAPACITY_BYTES")
        constraints_raw = env.get("MM_TYPE_CONSTRAINTS", "")
        try:
            constraints = json.loads(constraints_raw) if constraints_raw else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"MM_TYPE_CONSTRAINTS is not valid JSON: {err}") from None
        base = cls(
            grpc_port=_int(env, "MM_SVC_GRPC_PORT", 8033),
            max_msg_size=_int(env, "MM_SVC_GRPC_MAX_MSG_SIZE", 16 * MIB),
            metrics_port=_int(env, "MM_METRICS_PORT", 2112),
            runtime_endpoint=endpoint,
            runtime_mode=env.get("MM_RUNTIME_MODE", "inprocess") or "inprocess",
            runtime_capacity_bytes=int(capacity) if capacity else None,
            kv_store=env.get("KV_STORE", "memory") or "memory",
            kv_prefix=env.get("MM_KVSTORE_PREFIX", "mm") or "mm",
            service_name=env.get("MM_SERVICE_NAME", "modelmesh") or "modelmesh",
            labels=_labels(env.get("MM_LABELS", "")),
            zone=env.get("MM_ZONE", ""),
            type_constraints=constraints,
            scaleup_rpm_threshold=_int(env, "MM_SCALEUP_RPM_THRESHOLD", 2000),
            load_failure_expiry_ms=_int(env, "MM_LOAD_FAILURE_EXPIRY_MS", 15 * 60 * 1000),
            churn_guard_ms=_int(env, "MM_CHURN_GUARD_MS", 0),
            runtime_startup_timeout_s=float(env.get("MM_RUNTIME_STARTUP_TIMEOUT_S", "60") or 60),
            log_level=env.get("MM_LOG_LEVEL", "INFO") or "INFO",
            event_loop=env.get("MM_EVENT_LOOP", "auto") or "auto",
            advertise_host=env.get("MM_ADVERTISE_ADDRESS") or None,
            instance_lease_ttl_s=float(env.get("MM_INSTANCE_LEASE_TTL_S", "20") or 20),
            shutdown_rehome_s=max(0.0, float(env.get("MM_SHUTDOWN_REHOME_S", "20") or 20)),
            per_model_metrics=_int(env, "MM_PER_MODEL_METRICS", 0),
            tls_key_cert_path=env.get("MM_TLS_KEY_CERT_PATH") or None,
            tls_private_key_path=env.get("MM_TLS_PRIVATE_KEY_PATH") or None,
            tls_client_auth=(env.get("MM_TLS_CLIENT_AUTH") or "NONE").upper(),
            tls_trust_cert_paths=_paths(env.get("MM_TLS_TRUST_CERT_PATH", "")),
            internal_trust_cert_paths=_paths(env.get("MM_INTERNAL_TRUST_CERTS", "")),
        )
        if env.get("MM_TLS_PRIVATE_KEY_PASSPHRASE"):
            raise ValueError("MM_TLS_PRIVATE_KEY_PASSPHRASE: encrypted private keys are not supported; "
                             "give MM_TLS_PRIVATE_KEY_PATH an unencrypted PEM key")
        if env.get("MM_INSTANCE_ID"):
            base = replace(base, instance_id=env["MM_INSTANCE_ID"])
        settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        if settings.runtime_mode not in ("process", "inprocess"):
            raise ValueError(f"MM_RUNTIME_MODE={settings.runtime_mode!r}: expected 'process' or 'inprocess'")
        if (settings.tls_key_cert_path is None) != (settings.tls_private_key_path is None):
            raise ValueError("TLS needs both MM_TLS_KEY_CERT_PATH and MM_TLS_PRIVATE_KEY_PATH")
        if settings.tls_client_auth not in TLS_CLIENT_AUTH:
            raise ValueError(f"MM_TLS_CLIENT_AUTH={settings.tls_client_auth!r}: expected one of "
                             f"{', '.join(TLS_CLIENT_AUTH)}")
        if settings.tls_client_auth != "NONE" and not (settings.tls_key_cert_path and settings.tls_trust_cert_paths):
            raise ValueError(f"MM_TLS_CLIENT_AUTH={settings.tls_client_auth} needs TLS (MM_TLS_KEY_CERT_PATH) "
                             "and the certificates to check clients against (MM_TLS_TRUST_CERT_PATH)")
        if settings.per_model_metrics < 0:
            raise ValueError(f"MM_PER_MODEL_METRICS={settings.per_model_metrics}: expected 0 (off) or a count")
        if settings.event_loop not in EVENT_LOOPS:
            raise ValueError(f"MM_EVENT_LOOP={settings.event_loop!r}: expected one of {', '.join(EVENT_LOOPS)}")
        return settings

    @property
    def key_root(self) -> str:
        return f"{self.kv_prefix}/{self.service_name}"


@dataclass(frozen=True)
class RuntimeSettings:
    """Settings of the built-in ONNX runtime (``modelmesh runtime``)."""

    host: str = "127.0.0.1"
    # SPI + inference port (INTERNAL_GRPC_PORT); 0 picks a free one and prints it
    grpc_port: int = 8085
    # Unix socket to listen on instead of the port (INTERNAL_GRPC_SOCKET_PATH)
    socket_path: str | None = None
    # bytes for loaded models; None: a share of available memory (MM_RUNTIME_CAPACITY_BYTES)
    capacity_bytes: int | None = None
    # share of available memory used when capacity_bytes is None
    memory_share: float = 0.5
    max_loading_concurrency: int = 2
    loading_timeout_ms: int = 240_000
    default_model_size_bytes: int = 1 * MIB
    max_msg_size: int = 16 * MIB
    # threads running inference (onnxruntime releases the GIL)
    inference_threads: int = 4
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> RuntimeSettings:
        capacity = env.get("MM_RUNTIME_CAPACITY_BYTES")
        base = cls(
            grpc_port=_int(env, "INTERNAL_GRPC_PORT", 8085),
            socket_path=env.get("INTERNAL_GRPC_SOCKET_PATH") or None,
            capacity_bytes=int(capacity) if capacity else None,
            max_msg_size=_int(env, "MM_SVC_GRPC_MAX_MSG_SIZE", 16 * MIB),
            log_level=env.get("MM_LOG_LEVEL", "INFO") or "INFO",
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})
