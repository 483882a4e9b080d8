"""Run-time parameters from the store (``dynamic.py``): on the in-memory store and on a real etcd."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from modelmesh.dynamic import SCALEUP_RPM_THRESHOLD, DynamicConfig, config_key, parse_parameter
from modelmesh.kv.base import KVStore
from modelmesh.kv.etcd import EtcdStore
from modelmesh.kv.memory import MemoryStore

ROOT = "mm/dyn"
KEY = config_key(ROOT, SCALEUP_RPM_THRESHOLD)


@pytest.fixture(params=["memory", "etcd"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[KVStore]:
    if request.param == "memory":
        made: KVStore = MemoryStore()
    else:
        made = EtcdStore(request.getfixturevalue("etcd_server").endpoint, timeout_s=5.0)
        await made.delete(KEY)
    try:
        yield made
    finally:
        await made.close()


async def until(predicate, what: str, timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_the_store_value_overrides_the_environment_and_deleting_it_restores_it(store):
    config = DynamicConfig(store, ROOT, scaleup_rpm_threshold=2000)
    await config.start()
    try:
        assert config.scaleup_rpm_threshold() == 2000
        await store.put(KEY, b"500")
        await until(lambda: config.scaleup_rpm_threshold() == 500, "the new value")
        await store.put(KEY, b" 750\n")
        await until(lambda: config.scaleup_rpm_threshold() == 750, "the changed value")
        await store.delete(KEY)
        await until(lambda: config.scaleup_rpm_threshold() == 2000, "the environment's value")
    finally:
        await config.close()


async def test_a_value_set_before_the_pod_starts_applies_at_start(store):
    await store.put(KEY, b"300")
    config = DynamicConfig(store, ROOT, scaleup_rpm_threshold=2000)
    await config.start()
    try:
        assert config.scaleup_rpm_threshold() == 300
    finally:
        await config.close()


async def test_a_bad_value_is_logged_and_the_environment_applies(store, caplog):
    config = DynamicConfig(store, ROOT, scaleup_rpm_threshold=2000)
    await config.start()
    try:
        await store.put(KEY, b"400")
        await until(lambda: config.scaleup_rpm_threshold() == 400, "a good value")
        with caplog.at_level(logging.ERROR, logger="modelmesh.dynamic"):
            await store.put(KEY, b"lots")
            await until(lambda: config.scaleup_rpm_threshold() == 2000, "the environment's value")
        assert "scaleup_rpm_threshold" in caplog.text and "'lots' is not an integer" in caplog.text
        await store.put(KEY, b"-5")
        await store.put(config_key(ROOT, "no_such_parameter"), b"1")
        await store.put(KEY, b"900")
        await until(lambda: config.scaleup_rpm_threshold() == 900, "the next good value")
    finally:
        await config.close()


def test_parse_parameter_names_what_is_wrong():
    assert parse_parameter(SCALEUP_RPM_THRESHOLD, "1200") == 1200
    with pytest.raises(ValueError, match="scaleup_rpm_threshold: 0 is not positive"):
        parse_parameter(SCALEUP_RPM_THRESHOLD, "0")
    with pytest.raises(ValueError, match="unknown parameter 'scaleup'"):
        parse_parameter("scaleup", "10")


# ---- `modelmesh config` against a real etcd

def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from modelmesh.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_the_config_command_sets_gets_lists_and_unsets(etcd_server, capsys):
    url = etcd_server.endpoint
    run = lambda *a: asyncio.to_thread(run_cli, capsys, *a)  # noqa: E731 - the CLI runs its own loop
    assert (await run("config", "unset", SCALEUP_RPM_THRESHOLD, "--etcd", url))[0] == 0
    code, out, _ = await run("config", "get", SCALEUP_RPM_THRESHOLD, "--etcd", url)
    assert code == 1 and "not set" in out
    code, out, _ = await run("config", "set", SCALEUP_RPM_THRESHOLD, "650", "--etcd", url)
    assert code == 0, out
    store = EtcdStore(url)
    try:
        assert (await store.get(config_key("mm/modelmesh", SCALEUP_RPM_THRESHOLD))).value == b"650"
    finally:
        await store.close()
    assert (await run("config", "get", SCALEUP_RPM_THRESHOLD, "--etcd", url))[1].strip() == "650"
    code, out, _ = await run("config", "list", "--etcd", url)
    assert code == 0 and "scaleup_rpm_threshold = 650 (set in the store)" in out
    # refused before anything is written
    code, _, err = await run("config", "set", SCALEUP_RPM_THRESHOLD, "fast", "--etcd", url)
    assert code == 2 and "'fast' is not an integer" in err
    code, _, err = await run("config", "set", "scaleup", "10", "--etcd", url)
    assert code == 2 and "unknown parameter 'scaleup'" in err
    assert (await run("config", "get", SCALEUP_RPM_THRESHOLD, "--etcd", url))[1].strip() == "650"
    code, out, _ = await run("config", "unset", SCALEUP_RPM_THRESHOLD, "--etcd", url)
    assert code == 0 and "unset" in out
    code, out, _ = await run("config", "list", "--etcd", url)
    assert "scaleup_rpm_threshold = 2000 (not set" in out


def test_the_config_command_needs_etcd(capsys, monkeypatch):
    monkeypatch.delenv("KV_STORE", raising=False)
    code, _, err = run_cli(capsys, "config", "get", SCALEUP_RPM_THRESHOLD)
    assert code == 2 and "pass --etcd URL" in err
