"""Cluster parameters an operator may change while the pods run: keys under ``<prefix>/<service>/config/``.

As in ModelMesh's dynamic configuration, each parameter is one key holding its value as plain
text, for example::

    etcdctl put mm/modelmesh/config/scaleup_rpm_threshold 500

Every pod watches the prefix (``watched.PrefixView``), so a change applies on every pod within a
watch round trip, with no restart. A value in the store takes precedence over the parameter's
environment variable; deleting the key returns to the environment's value. A value that does not
parse is logged and ignored (the environment's value applies), never a crash.

Parameters:

- ``scaleup_rpm_threshold``: requests per minute per copy above which a model gets more copies
  (``MM_SCALEUP_RPM_THRESHOLD``, default 2000); a positive integer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from modelmesh.kv.base import KVStore
from modelmesh.watched import PrefixView

__all__ = ["PARAMETERS", "SCALEUP_RPM_THRESHOLD", "DynamicConfig", "config_key", "parse_parameter"]

log = logging.getLogger(__name__)

SCALEUP_RPM_THRESHOLD: Final = "scaleup_rpm_threshold"


def _positive_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not an integer") from None
    if value <= 0:
        raise ValueError(f"{value} is not positive")
    return value


# each parameter's parser: text -> value, ValueError with the reason when it does not parse
PARAMETERS: Final[dict[str, Callable[[str], int]]] = {SCALEUP_RPM_THRESHOLD: _positive_int}


def config_key(key_root: str, name: str) -> str:
    return f"{key_root}/config/{name}"


def parse_parameter(name: str, text: str) -> int:
    """The parameter's value from its text; ValueError naming the parameter when either is wrong."""
    parse = PARAMETERS.get(name)
    if parse is None:
        raise ValueError(f"unknown parameter {name!r}; known: {', '.join(sorted(PARAMETERS))}")
    try:
        return parse(text)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


class DynamicConfig:
    """The parameters' current values: the store's where set and valid, else the environment's."""

    def __init__(self, store: KVStore, key_root: str, *, scaleup_rpm_threshold: int) -> None:
        self._defaults: dict[str, int] = {SCALEUP_RPM_THRESHOLD: scaleup_rpm_threshold}
        self._values: dict[str, int] = {}
        self.view: PrefixView[str] = PrefixView(store, f"{key_root}/config/", _text, name="config")
        self.view.on_changed.append(self._changed)
        self.view.on_removed.append(self._removed)

    async def start(self) -> None:
        await self.view.start()

    async def close(self) -> None:
        await self.view.close()

    def value(self, name: str) -> int:
        return self._values.get(name, self._defaults[name])

    def scaleup_rpm_threshold(self) -> float:
        return float(self.value(SCALEUP_RPM_THRESHOLD))

    def _changed(self, name: str, text: str) -> None:
        try:
            value = parse_parameter(name, text)
        except ValueError as err:
            self._values.pop(name, None)
            default = self._defaults.get(name)
            using = f"; using {default} from the environment" if default is not None else ""
            log.error("ignoring the store's config key %s%s: %s%s", self.view.prefix, name, err, using)
            return
        if self._values.get(name) != value:
            log.info("config: %s = %d (set in the store)", name, value)
        self._values[name] = value

    def _removed(self, name: str) -> None:
        if self._values.pop(name, None) is not None:
            log.info("config: %s = %d (the store's key was deleted; the environment's value)",
                     name, self._defaults[name])
