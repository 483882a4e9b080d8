"""What TLS costs on a pod's port: the same request to the same model through a plaintext pod and
a TLS pod (MM_TLS_KEY_CERT_PATH / MM_TLS_PRIVATE_KEY_PATH, a throwaway CA from trustme), in one run,
alternating rounds so drift on the machine hits both alike.

    python -m loadtest.bench_tls [--duration 5] [--concurrency 1 16] [--rounds 2]

Both pods host the built-in runtime in-process (the default) and run on this machine's loopback;
the client sends a pre-serialized ModelInferRequest with raw gRPC over one long-lived connection
per pod, so the figures show per-request TLS cost (record encryption), not handshakes.
"""

from __future__ import annotations

import argparse
import asyncio
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        certs = make_certs(tmp)
        path = write_demo_models(tmp / "models", 1, FEATURES)[0]
        plain = start_pod(tmp, "--capacity", str(1 << 28))
        tls = start_pod(tmp, "--capacity", str(1 << 28),
                        env={"MM_TLS_KEY_CERT_PATH": str(certs["cert"]), "MM_TLS_PRIVATE_KEY_PATH": str(certs["key"])})
        creds = grpc.ssl_channel_credentials(certs["ca"].read_bytes())
        try:
            for pod, channel in ((plain, grpc.insecure_channel(plain.address)),
                                 (tls, grpc.secure_channel(tls.address, creds))):
                with channel:
                    mgrpc.ModelMeshStub(channel).registerModel(mpb.RegisterModelRequest(
                        modelId=path.stem, modelInfo=mpb.ModelInfo(type="onnx", path=str(path)), loadNow=True,
                        sync=True), timeout=60)
            print(f"loadavg {loadavg()} before the rounds")
            body = infer_request(demo_model_id(0), FEATURES)
            results = asyncio.run(measure({"plaintext": (plain, None), "tls": (tls, creds)}, body,
                                          args.concurrency, args.rounds, args.duration))
        finally:
            plain.stop()
            tls.stop()
    print(f"\nTLS on the pod's port — {args.duration:g} s x {args.rounds} rounds each")
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
