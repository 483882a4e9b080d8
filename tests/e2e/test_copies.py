"""Copies that follow traffic, on three real pods and one etcd."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import tritonclient.grpc as tc

from modelmesh.demo import demo_model_id, write_demo_models
from modelmesh.dynamic import SCALEUP_RPM_THRESHOLD
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.proto import model_mesh_pb2_grpc as mgrpc
from tests.e2e.test_cluster import F, check_infer, copies_of
from tests.etcd_server import EtcdServer
from tests.procs import start_pod

pytestmark = pytest.mark.slow
THRESHOLD_RPM = 120  # 2 requests/s per copy


def set_config(endpoint: str, name: str, value: str) -> None:
    """What an operator does: ``modelmesh config set <name> <value> --etcd <url>``."""
    done = subprocess.run([sys.executable, "-m", "modelmesh.cli", "config", "set", name, value, "--etcd", endpoint],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def invocations(pod) -> float:
    return sum(v for k, v in pod.metrics().items()
               if k.startswith("modelmesh_invoke_model_milliseconds_count"))


@pytest.mark.timeout(300)
def test_a_hot_model_gets_a_second_copy_that_serves(tmp_path):
    paths = write_demo_models(tmp_path / "models", 2, F)
    with EtcdServer() as etcd:
        # the environment's threshold is out of reach; the operator lowers it at run time in etcd
        pods = [start_pod(tmp_path, "--etcd", etcd.endpoint, "--capacity", str(100_000_000),
                          "--instance-id", f"pod-{i}", env={"MM_SCALEUP_RPM_THRESHOLD": "1000000"})
                for i in range(3)]
        try:
            set_config(etcd.endpoint, SCALEUP_RPM_THRESHOLD, str(THRESHOLD_RPM))
            with grpc.insecure_channel(pods[0].address) as ch:
                stub = mgrpc.ModelMeshStub(ch)
                for p in paths:
                    stub.registerModel(mpb.RegisterModelRequest(
                        modelId=p.stem, loadNow=True, sync=True, modelInfo=mpb.ModelInfo(type="onnx", path=str(p))))
                status = stub.getModelStatus(mpb.GetStatusRequest(modelId=demo_model_id(0)), timeout=10)
                assert len(status.modelCopyInfos) == 1
            # hot: ~20 requests/s entering through every pod, ten times the threshold per copy
            clients = [tc.InferenceServerClient(p.address) for p in pods]
            deadline = time.monotonic() + 40
            try:
                with ThreadPoolExecutor(3) as pool:
                    while time.monotonic() < deadline and len(copies_of(pods[1].address, demo_model_id(0))) < 2:
                        list(pool.map(lambda c: check_infer(c, 0), clients))
                        time.sleep(0.1)
                holders = copies_of(pods[1].address, demo_model_id(0))
                assert len(holders) >= 2, holders
                assert any(f"copies of '{demo_model_id(0)}'" in p.log() for p in pods)  # the rate tracker did it
                assert all(f"config: scaleup_rpm_threshold = {THRESHOLD_RPM}" in p.log() for p in pods)
                # both copies now take requests: traffic entering at the pods spreads over them
                before = {p.address: invocations(p) for p in pods}
                with ThreadPoolExecutor(3) as pool:
                    for _ in range(30):
                        list(pool.map(lambda c: check_infer(c, 0), clients))
                grew = [p for p in pods if invocations(p) > before[p.address]]
                assert len(grew) >= 2
            finally:
                for c in clients:
                    c.close()
            # the cold model kept its single copy
            assert len(copies_of(pods[0].address, demo_model_id(1))) == 1
        finally:
            for p in pods:
                assert p.stop() == 0, p.log()
