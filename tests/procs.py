"""Start and stop real modelmesh processes in tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SERVING_RE = re.compile(r"modelmesh serving on (\S+):(\d+) \(metrics on :(\d+)\)")


def stop_process(proc: subprocess.Popen[str], timeout_s: float = 20) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; closes its stdout pipe and
    returns the exit code. Used by the tests and the benchmarks alike."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


@dataclass
class PodProcess:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        """The pod's Prometheus samples, keyed by the sample line's name and labels."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def kill(self) -> None:
        """SIGKILL: no shutdown, no lease revoke; its built-in runtime child dies with it."""
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def stop(self) -> int:
        return stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_pod(tmp_path: Path, *args: str, timeout_s: float = 60, env: dict[str, str] | None = None) -> PodProcess:
    """``modelmesh serve`` on free loopback ports; returns once it prints that it serves."""
    log_path = tmp_path / f"pod-{time.monotonic_ns()}.log"
    log_file = open(log_path, "w")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MM_", "KV_STORE", "INTERNAL_GRPC"))}
    env = {**base, **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelmesh.cli", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
         "--metrics-port", "0", *args],
        stdout=subprocess.PIPE, stderr=log_file, text=True, env=env,
    )
    log_file.close()
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise RuntimeError(f"pod exited with {proc.returncode}:\n{log_path.read_text()}")
        m = SERVING_RE.search(line)
        if m:
            return PodProcess(proc, int(m.group(2)), int(m.group(3)), log_path)
    proc.kill()
    raise RuntimeError(f"pod did not start in {timeout_s} s:\n{log_path.read_text()}")
