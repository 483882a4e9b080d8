"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.etcd_server import EtcdServer


@pytest.fixture(scope="module")
def etcd_server() -> Iterator[EtcdServer]:
    """A real etcd on free loopback ports with a fresh data dir, one per test module."""
    with EtcdServer() as server:
        yield server
