"""Composition root: builds a mesh pod from its settings and owns its lifecycle.

Start order: store -> runtime (child process, or the given endpoint) until READY -> registry view
-> mesh core -> gRPC server -> metrics endpoint; health turns SERVING last. Stop runs backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry, start_http_server

from modelmesh.api import bulk, dataplane, management
from modelmesh.api.server import build_server
from modelmesh.clock import Clock, SystemClock
from modelmesh.cluster import Cluster
from modelmesh.dynamic import DynamicConfig
from modelmesh.errors import MeshError, RuntimeUnavailable
from modelmesh.kv.base import KVStore
from modelmesh.kv.memory import MemoryStore
from modelmesh.mesh import Mesh
from modelmesh.metrics import MeshMetrics, TopModels
from modelmesh.placement.load import parse_type_constraints
from modelmesh.registry import Registry
from modelmesh.runtime.grpc_client import GrpcRuntimeClient, PeerClient
from modelmesh.runtime.inprocess import InProcessRuntime
from modelmesh.scaling import CopyKeeper
from modelmesh.settings import MeshSettings, RuntimeSettings
from modelmesh.tls import load_tls, peer_credentials, server_credentials
from modelmesh.types import ModelInfo
from modelmesh.vmodels import VModels

log = logging.getLogger(__name__)

LISTENING_PREFIX = "modelmesh runtime listening on "
# a new pod waits to be ready while another pod shuts down: at most its re-homing budget
# (MM_SHUTDOWN_REHOME_S) plus this, checking this often
READY_WAIT_MARGIN_S = 30.0
READY_POLL_S = 0.2


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def open_store(settings: MeshSettings, clock: Clock) -> KVStore:
    if settings.kv_store == "memory":
        return MemoryStore(clock)
    if settings.kv_store.startswith("etcd:"):
        from modelmesh.kv.etcd import EtcdStore

        return EtcdStore(settings.kv_store.removeprefix("etcd:"))
    raise ValueError(f"KV_STORE={settings.kv_store!r}: expected 'memory' or 'etcd:http://host:port'")


def advertised_endpoint(settings: MeshSettings, port: int) -> str:
    host = settings.advertise_host
    if not host:
        host = settings.host if settings.host not in ("0.0.0.0", "::", "[::]", "") else socket.gethostname()
    return f"{host}:{port}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the runtime child gets SIGTERM if the pod process dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class RuntimeProcess:
    """The built-in runtime as a child process on a free loopback port."""

    def __init__(self, settings: MeshSettings) -> None:
        self._settings = settings
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self.address = ""

    async def start(self) -> str:
        cmd = [sys.executable, "-m", "modelmesh.cli", "runtime", "--host", "127.0.0.1", "--grpc-port", "0",
               "--log-level", self._settings.log_level]
        if self._settings.runtime_capacity_bytes:
            cmd += ["--capacity", str(self._settings.runtime_capacity_bytes)]
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=subprocess.PIPE, stderr=None, preexec_fn=_die_with_parent,
        )
        assert self._proc.stdout is not None
        try:
            async with asyncio.timeout(self._settings.runtime_startup_timeout_s):
                while True:
                    line = await self._proc.stdout.readline()
                    if not line:
                        raise RuntimeUnavailable(
                            f"the built-in runtime exited during start-up (code {await self._proc.wait()})"
                        )
                    text = line.decode(errors="replace").strip()
                    if text.startswith(LISTENING_PREFIX):
                        self.address = text[len(LISTENING_PREFIX):]
                        break
        except TimeoutError:
            await self.stop()
            raise RuntimeUnavailable("the built-in runtime did not start in time") from None
        # keep draining stdout so the child never blocks on a full pipe
        self._stderr_task = asyncio.create_task(self._drain(), name="runtime-stdout")
        log.info("built-in runtime (pid %d) listening on %s", self._proc.pid, self.address)
        return self.address

    async def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while await self._proc.stdout.readline():
            pass

    async def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._stderr_task is not None:
            self._stderr_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_task
        self._proc = None


@dataclass
class MeshPod:
    """A running pod; ``stop()`` shuts everything down."""

    settings: MeshSettings
    port: int
    mesh: Mesh
    metrics_registry: CollectorRegistry
    metrics_port: int = 0
    _closers: list[Any] = field(default_factory=list)

    async def stop(self, grace_s: float = 5.0) -> None:
        for closer in reversed(self._closers):
            try:
                result = closer(grace_s)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("error while stopping")
        self._closers.clear()


async def start_pod(settings: MeshSettings, *, clock: Clock | None = None) -> MeshPod:
    """Start every part of a pod and return once it serves."""
    clock = clock or SystemClock()
    closers: list[Any] = []
    tls = load_tls(settings)  # read first: a bad path fails the start before anything runs
    peer_creds = peer_credentials(tls) if tls is not None else None

    async def unwind() -> None:
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                result = closer(0)
                if asyncio.iscoroutine(result):
                    await result

    try:
        store = open_store(settings, clock)
        closers.append(lambda _g: store.close())

        runtime: GrpcRuntimeClient | InProcessRuntime
        if settings.runtime_endpoint is None and settings.runtime_mode == "inprocess":
            runtime = InProcessRuntime(RuntimeSettings(
                capacity_bytes=settings.runtime_capacity_bytes, max_msg_size=settings.max_msg_size))
            await runtime.start()
            closers.append(lambda _g: runtime.close())
            status = await runtime.status()
        else:
            endpoint = settings.runtime_endpoint
            if endpoint is None:
                child = RuntimeProcess(settings)
                closers.append(lambda _g: child.stop())
                endpoint = await child.start()
            runtime = GrpcRuntimeClient(endpoint, settings.max_msg_size)
            closers.append(lambda _g: runtime.close())
            status = await runtime.wait_ready(settings.runtime_startup_timeout_s)

        registry = Registry(store, settings.key_root)
        await registry.start()
        closers.append(lambda _g: registry.close())

        metrics_registry = CollectorRegistry()
        metrics = MeshMetrics(metrics_registry)
        mesh = Mesh(
            instance_id=settings.instance_id, registry=registry, runtime=runtime, metrics=metrics,
            clock=clock, load_failure_expiry_ms=settings.load_failure_expiry_ms,
            peer_factory=lambda endpoint: PeerClient(endpoint, settings.max_msg_size, peer_creds),
            constraints=parse_type_constraints(settings.type_constraints),
            churn_guard_ms=settings.churn_guard_ms,
        )
        mesh.start(status)
        if settings.per_model_metrics:
            metrics_registry.register(TopModels(mesh.model_figures, settings.per_model_metrics))
        closers.append(lambda _g: mesh.close())
        vmodels = VModels(store, settings.key_root, mesh, clock)
        await vmodels.start()
        mesh.aliases = vmodels
        closers.append(lambda _g: vmodels.close())

        health_servicer = health.aio.HealthServicer()
        serving = {"ready": False}
        server = build_server(
            management_servicer=management.ManagementServicer(mesh, vmodels),
            bulk_servicer=bulk.BulkRegistrationServicer(mesh),
            data_plane=dataplane.DataPlane(mesh, metrics, clock, ready=lambda: serving["ready"]),
            health_servicer=health_servicer,
            max_msg_size=settings.max_msg_size,
        )
        address = f"{settings.host}:{settings.grpc_port}"
        port = server.add_secure_port(address, server_credentials(tls)) if tls is not None \
            else server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {settings.host}:{settings.grpc_port}")
        await server.start()
        closers.append(lambda g: server.stop(g))

        endpoint = advertised_endpoint(settings, port)
        start_ms = clock.now_ms()
        cluster = Cluster(
            store, settings.key_root, settings.instance_id, clock=clock,
            lease_ttl_s=settings.instance_lease_ttl_s,
            figures=lambda: mesh.instance_figures(endpoint, settings.labels, settings.zone, start_ms),
        )
        await mesh.forget_own_copies()
        await cluster.start()
        mesh.attach(cluster)
        closers.append(lambda _g: cluster.close())
        if cluster.is_leader():
            await mesh.sweep_dead_copies()
        # run-time parameters: a value under <root>/config/ overrides the environment's
        dynamic = DynamicConfig(store, settings.key_root, scaleup_rpm_threshold=settings.scaleup_rpm_threshold)
        await dynamic.start()
        closers.append(lambda _g: dynamic.close())
        keeper = CopyKeeper(mesh, clock, threshold_rpm=dynamic.scaleup_rpm_threshold,
                            leader_chores=(vmodels.advance_all,))
        keeper.start()
        closers.append(lambda _g: keeper.close())

        metrics_port = 0
        if settings.metrics_port >= 0:
            httpd, thread = start_http_server(settings.metrics_port, settings.host, registry=metrics_registry)
            metrics_port = httpd.server_port

            def stop_metrics(_g: float) -> None:
                httpd.shutdown()
                httpd.server_close()
                thread.join(timeout=5)

            closers.append(stop_metrics)

        if settings.demo_models:
            await register_demo_models(mesh, settings)

        async def become_ready() -> None:
            serving["ready"] = True
            for name in ("", management.SERVICE, bulk.SERVICE, dataplane.SERVICE):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

        stopping = cluster.others_stopping()
        if not stopping:
            await become_ready()
        else:
            # ModelMesh's rolling-update rule: a new pod is not ready while another pod is shutting
            # down, so a rolling update stops the next old pod only once this one has re-homed its
            # models; the pod serves requests meanwhile
            log.info("not ready while %s %s shutting down", ", ".join(stopping),
                     "is" if len(stopping) == 1 else "are")
            limit_s = settings.shutdown_rehome_s + READY_WAIT_MARGIN_S

            async def ready_when_none_stopping() -> None:
                deadline = asyncio.get_running_loop().time() + limit_s
                while cluster.others_stopping() and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(READY_POLL_S)
                left = cluster.others_stopping()
                if left:
                    log.warning("ready after %.0f s though %s still shut(s) down", limit_s, ", ".join(left))
                await become_ready()

            waiting = asyncio.create_task(ready_when_none_stopping(), name="ready-after-stopping-pods")

            async def stop_waiting(_g: float) -> None:
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)

            closers.append(stop_waiting)

        async def not_serving(_g: float) -> None:
            serving["ready"] = False
            await cluster.mark_shutting_down()
            await health_servicer.enter_graceful_shutdown()
            # still serving: the models in use move before the pod goes (placement now passes it over)
            try:
                await mesh.rehome(settings.shutdown_rehome_s)
            except MeshError as err:
                log.warning("shutting down: re-homing models failed: %s", err)

        closers.append(not_serving)
    except BaseException:
        await unwind()
        raise
    log.info("modelmesh pod %s serving on %s:%d%s", settings.instance_id, settings.host, port,
             "" if tls is None else f" with TLS (client certificates: {settings.tls_client_auth})")
    return MeshPod(settings, port, mesh, metrics_registry, metrics_port, closers)


async def register_demo_models(mesh: Mesh, settings: MeshSettings) -> None:
    from modelmesh.demo import write_demo_models

    paths = await asyncio.to_thread(write_demo_models, Path(settings.demo_dir), settings.demo_models)
    for path in paths:
        await mesh.register(path.stem, ModelInfo("onnx", str(path.resolve())), load_now=False, sync=False)
    log.info("registered %d demo models from %s", len(paths), settings.demo_dir)


def event_loop_factory(choice: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The event loop ``MM_EVENT_LOOP`` names: (its name, a factory for ``asyncio.Runner``, None
    for the standard library's loop). "auto" is uvloop when it is installed."""
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("MM_EVENT_LOOP=uvloop, but uvloop is not installed "
                             "(pip install 'modelmesh[uvloop]')") from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def run_mesh(settings: MeshSettings) -> int:
    """Run a pod until SIGINT or SIGTERM."""
    configure_logging(settings.log_level)
    try:
        loop_name, loop_factory = event_loop_factory(settings.event_loop)
    except ValueError as err:
        log.error("cannot start: %s", err)
        return 1

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            pod = await start_pod(settings)
        except (MeshError, OSError, ValueError) as err:
            log.error("cannot start: %s", err)
            return 1
        print(f"modelmesh serving on {settings.host}:{pod.port} (metrics on :{pod.metrics_port})", flush=True)
        if settings.demo_models:
            print(f"try it: python examples/infer.py demo-0007 --url localhost:{pod.port}", flush=True)
        await stop.wait()
        log.info("shutting down")
        await pod.stop()
        return 0

    log.info("event loop: %s", loop_name)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_mesh(MeshSettings.from_env(os.environ)))
