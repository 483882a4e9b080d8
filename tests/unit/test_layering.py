"""The layering of ARCHITECTURE.md, checked on the source: inner layers import nothing outer, and
each third-party transport is imported only by its adapter."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "src" / "modelmesh"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def modules(*patterns: str) -> list[Path]:
    found = sorted({p for pattern in patterns for p in PKG.glob(pattern)})
    assert found, patterns
    return found


def rel(path: Path) -> str:
    return str(path.relative_to(PKG))


PURE = ["errors.py", "types.py", "clock.py", "placement/*.py"]


@pytest.mark.parametrize("path", modules(*PURE), ids=rel)
def test_pure_modules_import_no_io_and_nothing_outer(path):
    bad = {m for m in imports_of(path)
           if m.split(".")[0] in {"asyncio", "grpc", "aetcd", "logging", "prometheus_client", "onnxruntime"}
           or (m.startswith("modelmesh.") and m.split(".")[1] not in {"errors", "types", "clock", "placement"})}
    assert not bad, f"{rel(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("**/*.py"), ids=rel)
def test_only_the_etcd_adapter_imports_aetcd(path):
    if rel(path) != "kv/etcd.py":
        assert not any(m.split(".")[0] == "aetcd" for m in imports_of(path)), rel(path)


# the core speaks dataclasses: grpc and generated protos stay in the adapters
CORE = ["mesh.py", "peers.py", "registry.py", "cluster.py", "watched.py", "routing.py", "rates.py", "scaling.py", "dynamic.py",
        "vmodels.py", "localcopy.py", "podviews.py",
        "kv/base.py", "kv/memory.py", "runtime/base.py", "metrics.py", "settings.py"]


@pytest.mark.parametrize("path", modules(*CORE), ids=rel)
def test_core_modules_import_no_grpc_or_protos(path):
    bad = {m for m in imports_of(path)
           if m.split(".")[0] in {"grpc", "grpc_health", "grpc_reflection", "aetcd"}
           or m.startswith(("modelmesh.proto", "modelmesh.api", "modelmesh.app", "modelmesh.cli",
                            "modelmesh.kv.etcd", "modelmesh.runtime.grpc_client"))}
    assert not bad, f"{rel(path)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules("**/*.py"), ids=rel)
def test_environment_is_read_only_in_settings(path):
    if rel(path) in {"settings.py", "cli.py", "admin.py", "configcmd.py", "app.py"}:
        return  # settings parses it; the entry points hand os.environ to it
    assert "os.environ" not in path.read_text(), rel(path)
