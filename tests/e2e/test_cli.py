"""The operator commands against a real pod, as an operator types them."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.procs import start_pod

pytestmark = pytest.mark.slow


def modelmesh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "modelmesh.cli", *args], capture_output=True, text=True,
                            timeout=120)
    if check:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


def test_demo_models_bulk_register_list_status_unregister(tmp_path):
    models = tmp_path / "models"
    out = modelmesh("demo-models", "--count", "300", str(models)).stdout
    assert "wrote 300 demo models" in out
    (models / "broken.onnx").write_bytes(b"not a model")
    pod = start_pod(tmp_path, "--capacity", str(50_000_000))
    try:
        ep = ["--endpoint", pod.address]
        bulk = modelmesh("models", "register-bulk", str(models), *ep)
        assert "301 registered" in bulk.stdout + bulk.stderr

        listed = modelmesh("models", "list", "--json", *ep).stdout.splitlines()
        states = {json.loads(line)["id"]: json.loads(line)["state"] for line in listed}
        assert len(states) == 301 and set(states.values()) == {"NOT_LOADED"}

        loaded = modelmesh("models", "load", "demo-0042", "--sync", *ep)
        assert "LOADED" in loaded.stdout
        status = modelmesh("models", "status", "demo-0042", *ep).stdout
        assert "LOADED" in status

        failed = modelmesh("models", "load", "broken", "--sync", *ep, check=False)
        assert failed.returncode == 1
        assert "LOADING_FAILED" in failed.stdout + failed.stderr
        assert "broken" in modelmesh("models", "status", "broken", *ep, check=False).stdout

        modelmesh("models", "unregister", "demo-0042", *ep)
        gone = modelmesh("models", "status", "demo-0042", *ep, check=False)
        assert gone.returncode == 1 and "NOT_FOUND" in gone.stdout + gone.stderr

        again = modelmesh("models", "register", "demo-0001", "--type", "onnx", "--path",
                          str(models / "demo-0002.onnx"), *ep, check=False)
        assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr
    finally:
        assert pod.stop() == 0, pod.log()


def test_vmodel_commands_create_move_show_and_delete(tmp_path):
    models = tmp_path / "models"
    modelmesh("demo-models", "--count", "2", str(models))
    pod = start_pod(tmp_path, "--capacity", str(50_000_000))
    try:
        ep = ["--endpoint", pod.address]
        created = modelmesh("models", "vmodel-set", "isvc", "demo-0000", "--path", str(models / "demo-0000.onnx"),
                            "--auto-delete", "--owner", "team", "--load-now", "--sync", *ep).stdout
        assert created.strip() == "isvc: DEFINED -> demo-0000 (LOADED) [owner team]"
        moved = modelmesh("models", "vmodel-set", "isvc", "demo-0001", "--path", str(models / "demo-0001.onnx"),
                          "--auto-delete", "--expect", "demo-0000", "--sync", *ep).stdout
        assert moved.strip() == "isvc: DEFINED -> demo-0001 (LOADED) [owner team]"
        # the first model goes with the move (auto-delete), after a short grace
        deadline = time.monotonic() + 15
        while modelmesh("models", "status", "demo-0000", *ep, check=False).returncode != 1:
            assert time.monotonic() < deadline, "demo-0000 was not collected"
            time.sleep(0.2)
        stale = modelmesh("models", "vmodel-set", "isvc", "demo-0001", "--expect", "demo-0000",
                          "--owner", "other", *ep, check=False)
        assert stale.returncode == 1 and "ALREADY_EXISTS" in stale.stderr
        assert "DEFINED -> demo-0001" in modelmesh("models", "vmodel-status", "isvc", *ep).stdout
        modelmesh("models", "vmodel-delete", "isvc", "--owner", "team", *ep)
        gone = modelmesh("models", "vmodel-status", "isvc", *ep, check=False)
        assert gone.returncode == 1 and gone.stdout.strip() == "isvc: NOT_FOUND"
        assert modelmesh("models", "status", "demo-0001", *ep, check=False).returncode == 1
    finally:
        assert pod.stop() == 0, pod.log()


def test_unreachable_pod_is_a_clear_error():
    result = modelmesh("models", "list", "--endpoint", "unix:/nonexistent/modelmesh.sock", "--timeout", "2",
                       check=False)
    assert result.returncode == 1
    assert "unix:/nonexistent/modelmesh.sock" in result.stderr


def test_bulk_registration_lands_in_etcd_over_the_stream_and_unary(tmp_path):
    """register-bulk through one pod (the stream, then --unary); a pod started afterwards on the
    same etcd lists every record, and each invalid model was reported with its code."""
    from tests.etcd_server import EtcdServer

    lines = [json.dumps({"id": f"s{i:03d}" + ("\u0001" if i % 50 == 7 else ""), "path": f"/m/s{i}.onnx"})
             for i in range(200)]
    (tmp_path / "stream.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "unary.jsonl").write_text("\n".join(line.replace('"s', '"u', 1) for line in lines) + "\n")
    with EtcdServer() as etcd:
        pod = start_pod(tmp_path, "--etcd", etcd.endpoint, "--capacity", str(50_000_000))
        try:
            ep = ["--endpoint", pod.address]
            for name, flags in (("stream", ()), ("unary", ("--unary",))):
                bulk = modelmesh("models", "register-bulk", str(tmp_path / f"{name}.jsonl"), *flags, *ep, check=False)
                assert bulk.returncode == 1, bulk.stderr
                assert bulk.stdout.splitlines()[:2] == ["196 registered, 4 failed (of 200)", "INVALID_ARGUMENT: 4"]
        finally:
            assert pod.stop() == 0, pod.log()
        fresh = start_pod(tmp_path, "--etcd", etcd.endpoint, "--capacity", str(50_000_000))
        try:
            listed = modelmesh("models", "list", "--json", "--endpoint", fresh.address).stdout.splitlines()
        finally:
            assert fresh.stop() == 0, fresh.log()
    ids = {json.loads(line)["id"] for line in listed}
    assert len(ids) == 392
    assert {"s000", "s199", "u000", "u199"} <= ids and "s007" not in ids
