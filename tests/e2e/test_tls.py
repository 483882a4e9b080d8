"""TLS (ModelMesh's MM_TLS_* settings) on real pods: tritonclient over TLS, client certificates,
the pod-to-pod hop over TLS, the CLI, and clear errors for unusable settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import trustme
from tritonclient.utils import InferenceServerException

from modelmesh.demo import demo_model_id, demo_weights, write_demo_models
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.proto import model_mesh_pb2_grpc as mgrpc
from tests.etcd_server import EtcdServer
from tests.procs import start_pod

pytestmark = pytest.mark.slow
F = 8


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, the pods' certificate (for 127.0.0.1 and localhost) and a client's, as PEM files."""
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    pod_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client@example.com")
    files = {"ca": d / "ca.pem", "pod_cert": d / "pod.pem", "pod_key": d / "pod.key",
             "client_cert": d / "client.pem", "client_key": d / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    pod_cert.private_key_pem.write_to_path(str(files["pod_key"]))
    client_cert.private_key_pem.write_to_path(str(files["client_key"]))
    with open(files["pod_cert"], "wb") as out:
        for blob in pod_cert.cert_chain_pems:
            out.write(blob.bytes())
    with open(files["client_cert"], "wb") as out:
        for blob in client_cert.cert_chain_pems:
            out.write(blob.bytes())
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_demo_models(tmp_path_factory.mktemp("models"), 2, F)


def tls_env(pki, client_auth: str = "NONE") -> dict[str, str]:
    env = {"MM_TLS_KEY_CERT_PATH": pki["pod_cert"], "MM_TLS_PRIVATE_KEY_PATH": pki["pod_key"]}
    if client_auth != "NONE":
        env |= {"MM_TLS_CLIENT_AUTH": client_auth, "MM_TLS_TRUST_CERT_PATH": pki["ca"]}
    return env


def check_infer(client: tc.InferenceServerClient, index: int) -> None:
    x = np.random.default_rng(index).standard_normal((2, F)).astype(np.float32)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    w, b = demo_weights(index, F)
    np.testing.assert_allclose(client.infer(demo_model_id(index), [inp], client_timeout=30).as_numpy("y"),
                               x @ w + b, rtol=1e-4, atol=1e-4)


def register(address: str, pki, path, *, client: bool = False) -> None:
    def read(key: str) -> bytes:
        return Path(pki[key]).read_bytes()

    creds = grpc.ssl_channel_credentials(
        read("ca"), read("client_key") if client else None, read("client_cert") if client else None)
    with grpc.secure_channel(address, creds) as ch:
        mgrpc.ModelMeshStub(ch).registerModel(mpb.RegisterModelRequest(
            modelId=path.stem, modelInfo=mpb.ModelInfo(type="onnx", path=str(path))), timeout=20)


def copies(address: str, pki, model_id: str) -> set[str]:
    creds = grpc.ssl_channel_credentials(Path(pki["ca"]).read_bytes(), Path(pki["client_key"]).read_bytes(),
                                         Path(pki["client_cert"]).read_bytes())
    with grpc.secure_channel(address, creds) as ch:
        status = mgrpc.ModelMeshStub(ch).getModelStatus(mpb.GetStatusRequest(modelId=model_id), timeout=10)
    return {c.location for c in status.modelCopyInfos}


def test_a_tls_pod_serves_tls_clients_and_refuses_plaintext(tmp_path, pki, models):
    pod = start_pod(tmp_path, "--capacity", str(1 << 28), env=tls_env(pki))
    try:
        register(pod.address, pki, models[0])
        with tc.InferenceServerClient(pod.address, ssl=True, root_certificates=pki["ca"]) as client:
            check_infer(client, 0)
        with tc.InferenceServerClient(pod.address) as plain, pytest.raises(InferenceServerException) as err:
            plain.is_server_live(client_timeout=5)
        assert "UNAVAILABLE" in str(err.value)
        # the operator CLI, with --ca-cert
        cli = [sys.executable, "-m", "modelmesh.cli", "models", "status", demo_model_id(0),
               "--endpoint", pod.address]
        done = subprocess.run([*cli, "--ca-cert", pki["ca"]], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "LOADED" in done.stdout, done.stderr
        plain_cli = subprocess.run(cli + ["--timeout", "3"], capture_output=True, text=True, timeout=60)
        assert plain_cli.returncode == 1
        assert "with TLS (client certificates: NONE)" in pod.log()
    finally:
        assert pod.stop() == 0, pod.log()


def test_required_client_certificates_are_checked(tmp_path, pki, models):
    pod = start_pod(tmp_path, "--capacity", str(1 << 28), env=tls_env(pki, "REQUIRE"))
    try:
        register(pod.address, pki, models[1], client=True)
        with tc.InferenceServerClient(pod.address, ssl=True, root_certificates=pki["ca"],
                                      private_key=pki["client_key"], certificate_chain=pki["client_cert"]) as c:
            check_infer(c, 1)
        with tc.InferenceServerClient(pod.address, ssl=True, root_certificates=pki["ca"]) as anonymous, \
                pytest.raises(InferenceServerException):
            anonymous.is_server_live(client_timeout=5)
    finally:
        assert pod.stop() == 0, pod.log()


def test_pods_forward_to_each_other_over_tls_with_client_certificates_required(tmp_path, pki, models):
    with EtcdServer() as etcd:
        env = tls_env(pki, "REQUIRE")
        pods = [start_pod(tmp_path, "--etcd", etcd.endpoint, "--capacity", str(1 << 28), "--instance-id",
                          f"pod-{i}", env=env) for i in range(2)]
        try:
            client_files = {"root_certificates": pki["ca"], "private_key": pki["client_key"],
                            "certificate_chain": pki["client_cert"]}
            register(pods[0].address, pki, models[0], client=True)
            with tc.InferenceServerClient(pods[1].address, ssl=True, **client_files) as c:
                check_infer(c, 0)
            holders = copies(pods[0].address, pki, demo_model_id(0))
            assert len(holders) == 1, holders
            holder = int(holders.pop().removeprefix("pod-"))
            entry = pods[1 - holder]
            loads = pods[holder].metrics()["modelmesh_loadmodel_milliseconds_count"]
            with tc.InferenceServerClient(entry.address, ssl=True, **client_files) as c:
                for _ in range(5):
                    check_infer(c, 0)
            # the entry pod has no copy: it forwarded to the holder over TLS, presenting its own
            # certificate, and loaded nothing itself
            assert entry.metrics().get("modelmesh_loadmodel_milliseconds_count", 0) == 0
            assert pods[holder].metrics()["modelmesh_loadmodel_milliseconds_count"] == loads
        finally:
            for p in pods:
                assert p.stop() == 0, p.log()


@pytest.mark.parametrize(("env", "message"), [
    ({"MM_TLS_KEY_CERT_PATH": "/nowhere/pod.pem"}, "needs both MM_TLS_KEY_CERT_PATH and MM_TLS_PRIVATE_KEY_PATH"),
    ({"MM_TLS_KEY_CERT_PATH": "/nowhere/pod.pem", "MM_TLS_PRIVATE_KEY_PATH": "/nowhere/pod.key"},
     "MM_TLS_KEY_CERT_PATH: cannot read /nowhere/pod.pem"),
    ({"MM_TLS_CLIENT_AUTH": "SOMETIMES"}, "MM_TLS_CLIENT_AUTH='SOMETIMES'"),
    ({"MM_TLS_CLIENT_AUTH": "REQUIRE"}, "needs TLS"),
])
def test_unusable_tls_settings_stop_the_pod_with_a_clear_message(tmp_path, env, message):
    done = subprocess.run([sys.executable, "-m", "modelmesh.cli", "serve", "--grpc-port", "0", "--metrics-port", "-1"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
