"""What TLS costs on a pod's port: the same request to the same model through a plaintext pod and
a TLS pod (MM_TLS_KEY_CERT_PATH / MM_TLS_PRIVATE_KEY_PATH, a throwaway CA from trustme), in one run,
alternating rounds so drift on the machine hits both alike.

    python -m loadtest.bench_tls [--duration 5] [--concurrency 1 16] [--rounds 2] [--hop]

Both pods host the built-in runtime in-process (the default) and run on this machine's loopback;
the client sends a pre-serialized ModelInferRequest with raw gRPC over one long-lived connection
per pod, so the figures show per-request TLS cost (record encryption), not handshakes.

``--hop``: two clusters on one etcd instead (service names "plain" and "tls"), each of two pods;
the model is pinned to the second pod (label ``holder``), and requests enter the first, so each
request crosses the client's connection and the pod-to-pod hop, both TLS in the "tls" cluster.
Afterwards the entry pods must have loaded nothing, else the run is reported invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.bench_hop import infer_request, loadavg  # noqa: E402
from modelmesh.demo import demo_model_id, write_demo_models  # noqa: E402
from modelmesh.proto import model_mesh_pb2 as mpb  # noqa: E402
from modelmesh.proto import model_mesh_pb2_grpc as mgrpc  # noqa: E402
from tests.etcd_server import EtcdServer  # noqa: E402
from tests.procs import PodProcess, start_pod  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
FEATURES = 64


def make_certs(d: Path) -> dict[str, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": d / "ca.pem", "cert": d / "pod.pem", "key": d / "pod.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    return files


async def one_round(channel: grpc.aio.Channel, body: bytes, concurrency: int, duration: float) -> dict[str, float]:
    call = channel.unary_unary(INFER)
    for _ in range(50):
        await call(body, timeout=60)
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await call(body, timeout=30)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"rps": len(latencies) / elapsed, "p50": q[49] * 1000, "p99": q[98] * 1000}


Rows = dict[tuple[str, int], list[dict[str, float]]]


async def measure(pods: dict[str, tuple[PodProcess, grpc.ChannelCredentials | None]], body: bytes,
                  concurrencies: list[int], rounds: int, duration: float) -> Rows:
    results: Rows = {}
    channels = {
        name: grpc.aio.secure_channel(pod.address, creds) if creds is not None
        else grpc.aio.insecure_channel(pod.address)
        for name, (pod, creds) in pods.items()
    }
    try:
        for conc in concurrencies:
            for _ in range(rounds):
                for name, channel in channels.items():
                    row = await one_round(channel, body, conc, duration)
                    results.setdefault((name, conc), []).append(row)
                    print(f"  {name:<9} c={conc:<3} {row['rps']:7.0f} req/s  p50 {row['p50']:.3f} ms  "
                          f"p99 {row['p99']:.3f} ms  ({loadavg()})", flush=True)
    finally:
        for channel in channels.values():
            await channel.close()
    return results


def register(pod: PodProcess, creds: grpc.ChannelCredentials | None, path: Path, pinned: bool) -> None:
    channel = grpc.secure_channel(pod.address, creds) if creds is not None else grpc.insecure_channel(pod.address)
    with channel:
        request = mpb.RegisterModelRequest(modelId=path.stem, modelInfo=mpb.ModelInfo(type="onnx", path=str(path)),
                                           loadNow=True, sync=True)
        if pinned:
            request.placement.requiredLabels.append("holder")
        mgrpc.ModelMeshStub(channel).registerModel(request, timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hop", action="store_true", help="through a pod-to-pod hop (two clusters on one etcd)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        certs = make_certs(tmp)
        tls_env = {"MM_TLS_KEY_CERT_PATH": str(certs["cert"]), "MM_TLS_PRIVATE_KEY_PATH": str(certs["key"])}
        path = write_demo_models(tmp / "models", 1, FEATURES)[0]
        creds = grpc.ssl_channel_credentials(certs["ca"].read_bytes())
        entries: dict[str, tuple[PodProcess, grpc.ChannelCredentials | None]] = {}
        started: list[PodProcess] = []
        try:
            if args.hop:
                etcd = stack.enter_context(EtcdServer())
                for name, env, pod_creds in (("plaintext", {}, None), ("tls", tls_env, creds)):
                    common = ("--etcd", etcd.endpoint, "--capacity", str(1 << 28))
                    entry = start_pod(tmp, *common, "--instance-id", f"{name}-a",
                                      env={**env, "MM_SERVICE_NAME": name})
                    holder = start_pod(tmp, *common, "--instance-id", f"{name}-b",
                                       env={**env, "MM_SERVICE_NAME": name, "MM_LABELS": "holder"})
                    started += [entry, holder]
                    register(entry, pod_creds, path, pinned=True)
                    entries[name] = (entry, pod_creds)
            else:
                plain = start_pod(tmp, "--capacity", str(1 << 28))
                started.append(plain)
                tls = start_pod(tmp, "--capacity", str(1 << 28), env=tls_env)
                started.append(tls)
                register(plain, None, path, pinned=False)
                register(tls, creds, path, pinned=False)
                entries = {"plaintext": (plain, None), "tls": (tls, creds)}
            print(f"loadavg {loadavg()} before the rounds")
            body = infer_request(demo_model_id(0), FEATURES)
            results = asyncio.run(measure(entries, body, args.concurrency, args.rounds, args.duration))
            if args.hop:
                for name, (entry, _) in entries.items():
                    loads = entry.metrics().get("modelmesh_loadmodel_milliseconds_count", 0)
                    if loads:
                        print(f"INVALID: the entry pod of '{name}' loaded the model ({loads:g} loads): no hop")
                        return 1
        finally:
            for pod in started:
                pod.stop()
    where = "through a pod-to-pod hop" if args.hop else "on the pod's port"
    print(f"\nTLS {where} — {args.duration:g} s x {args.rounds} rounds each")
    print(f"{'conc':>5} {'plain req/s':>12} {'tls req/s':>10} {'ratio':>6} {'plain p50':>10} {'added p50':>10} "
          f"{'added p99':>10}")
    for conc in args.concurrency:
        p, t = results[("plaintext", conc)], results[("tls", conc)]

        def mean(rows: list[dict[str, float]], key: str) -> float:
            return statistics.fmean(r[key] for r in rows)

        print(f"{conc:>5} {mean(p, 'rps'):>12.0f} {mean(t, 'rps'):>10.0f} {mean(t, 'rps') / mean(p, 'rps'):>6.2f} "
              f"{mean(p, 'p50'):>8.3f}ms {mean(t, 'p50') - mean(p, 'p50'):>8.3f}ms "
              f"{mean(t, 'p99') - mean(p, 'p99'):>8.3f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
