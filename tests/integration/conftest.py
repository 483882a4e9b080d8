"""Fixtures for integration tests: a real built-in runtime process and demo models on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelmesh.demo import write_demo_models
from tests.procs import stop_process

LISTENING_PREFIX = "modelmesh runtime listening on "
DEMO_FEATURES = 64
DEMO_COUNT = 24


@dataclass
class RuntimeProcess:
    proc: subprocess.Popen[str]
    address: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not stop in time; the exit code."""
        return stop_process(self.proc, timeout_s=15)


def start_runtime_process(log_dir: Path, *args: str, timeout_s: float = 30) -> RuntimeProcess:
    """``modelmesh runtime`` on a free loopback port; returns once it prints where it listens."""
    log_path = log_dir / f"runtime-{time.monotonic_ns()}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MM_", "INTERNAL_GRPC"))}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelmesh.cli", "runtime", "--host", "127.0.0.1", "--grpc-port", "0",
             "--log-level", "INFO", *args],
            stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            proc.stdout.close()
            raise RuntimeError(f"runtime exited with {proc.returncode}:\n{log_path.read_text()}")
        if line.startswith(LISTENING_PREFIX):
            return RuntimeProcess(proc, line[len(LISTENING_PREFIX):].strip(), log_path)
    RuntimeProcess(proc, "", log_path).stop()
    raise RuntimeError(f"runtime did not start in {timeout_s} s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("demo")
    write_demo_models(directory, DEMO_COUNT, DEMO_FEATURES)
    return directory


@pytest.fixture(scope="module")
def runtime_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    runtime = start_runtime_process(tmp_path_factory.mktemp("runtime"), "--capacity", str(1 << 30))
    try:
        yield runtime
    finally:
        code = runtime.stop()
    assert code == 0, f"runtime did not stop cleanly (exit {code}):\n{runtime.log()}"
