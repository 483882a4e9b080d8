"""Settings parsed from the environment and flags, and the event loop they choose."""

from __future__ import annotations

import asyncio
import sys

import pytest

from modelmesh.app import event_loop_factory
from modelmesh.settings import MeshSettings


def test_event_loop_defaults_to_auto():
    assert MeshSettings.from_env({}).event_loop == "auto"


@pytest.mark.parametrize("value", ["auto", "uvloop", "asyncio"])
def test_event_loop_from_env(value):
    assert MeshSettings.from_env({"MM_EVENT_LOOP": value}).event_loop == value


def test_event_loop_flag_wins_over_env():
    assert MeshSettings.from_env({"MM_EVENT_LOOP": "uvloop"}, event_loop="asyncio").event_loop == "asyncio"


def test_unknown_event_loop_is_refused():
    with pytest.raises(ValueError, match="MM_EVENT_LOOP='trio'"):
        MeshSettings.from_env({"MM_EVENT_LOOP": "trio"})


def test_asyncio_is_the_standard_loop():
    assert event_loop_factory("asyncio") == ("asyncio", None)


def test_auto_without_uvloop_falls_back_to_asyncio(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert event_loop_factory("auto") == ("asyncio", None)


def test_uvloop_asked_for_but_missing_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(ValueError, match="uvloop is not installed"):
        event_loop_factory("uvloop")


@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_uvloop_when_installed(choice):
    uvloop = pytest.importorskip("uvloop")
    name, factory = event_loop_factory(choice)
    assert name == "uvloop" and factory is not None
    with asyncio.Runner(loop_factory=factory) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)


@pytest.mark.parametrize(("value", "expected"), [(None, 20.0), ("", 20.0), ("0", 0.0), ("45", 45.0), ("-3", 0.0)])
def test_shutdown_rehome_budget_from_env(value, expected):
    env = {} if value is None else {"MM_SHUTDOWN_REHOME_S": value}
    assert MeshSettings.from_env(env).shutdown_rehome_s == expected


@pytest.mark.parametrize(("value", "expected"), [(None, 0), ("", 0), ("0", 0), ("25", 25)])
def test_per_model_metrics_from_env(value, expected):
    env = {} if value is None else {"MM_PER_MODEL_METRICS": value}
    assert MeshSettings.from_env(env).per_model_metrics == expected


@pytest.mark.parametrize("value", ["-1", "many"])
def test_a_bad_per_model_metrics_count_is_refused(value):
    with pytest.raises(ValueError, match="MM_PER_MODEL_METRICS"):
        MeshSettings.from_env({"MM_PER_MODEL_METRICS": value})
