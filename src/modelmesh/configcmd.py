"""``modelmesh config``: read and change the cluster's run-time parameters in its etcd.

    modelmesh config list  --etcd URL
    modelmesh config get   NAME --etcd URL
    modelmesh config set   NAME VALUE --etcd URL
    modelmesh config unset NAME --etcd URL

The keys are those ``dynamic.DynamicConfig`` watches (``<prefix>/<service>/config/<name>``, the
prefix and service from MM_KVSTORE_PREFIX / MM_SERVICE_NAME as for the pods); every pod applies a
change within a watch round trip. A value is checked before it is written, so a typo never reaches
the pods. A single-node pod's in-memory store lives inside its process: these commands need etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from modelmesh.dynamic import PARAMETERS, config_key, parse_parameter
from modelmesh.errors import MeshError
from modelmesh.settings import MeshSettings

__all__ = ["add_config_parser"]


def _fail(message: str) -> int:
    print(f"modelmesh config: error: {message}", file=sys.stderr)
    return 2


async def _run(args: argparse.Namespace, settings: MeshSettings) -> int:
    from modelmesh.kv.etcd import EtcdStore

    store = EtcdStore(settings.kv_store.removeprefix("etcd:"), timeout_s=args.timeout)
    root = settings.key_root
    try:
        if args.action == "list":
            listing = await store.list_prefix(f"{root}/config/")
            values = {kv.key.rsplit("/", 1)[-1]: kv.value.decode(errors="replace") for kv in listing.items}
            defaults = {"scaleup_rpm_threshold": settings.scaleup_rpm_threshold}
            for name in sorted(PARAMETERS.keys() | values.keys()):
                if name in values:
                    print(f"{name} = {values[name]} (set in the store)")
                else:
                    print(f"{name} = {defaults.get(name, '')} (not set: each pod's environment)")
            return 0
        key = config_key(root, args.name)
        if args.action == "get":
            found = await store.get(key)
            if found is None:
                print(f"{args.name} is not set in the store (each pod uses its environment's value)")
                return 1
            print(found.value.decode(errors="replace"))
            return 0
        if args.action == "set":
            await store.put(key, str(parse_parameter(args.name, args.value)).encode())
            print(f"{args.name} = {args.value.strip()}: set in the store; every pod applies it")
            return 0
        deleted = await store.delete(key)
        print(f"{args.name}: {'unset' if deleted else 'was not set'}; the pods use their environment's value")
        return 0
    finally:
        await store.close()


def _config(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {"kv_store": f"etcd:{args.etcd}"} if args.etcd else {}
    try:
        settings = MeshSettings.from_env(os.environ, **overrides)
        if args.action in ("get", "set", "unset") and args.name not in PARAMETERS:
            raise ValueError(f"unknown parameter {args.name!r}; known: {', '.join(sorted(PARAMETERS))}")
        if args.action == "set":
            parse_parameter(args.name, args.value)
    except ValueError as err:
        return _fail(str(err))
    if not settings.kv_store.startswith("etcd:"):
        return _fail("run-time parameters live in the cluster's etcd: pass --etcd URL (or set KV_STORE); "
                     "a single-node pod's in-memory store is inside its process")
    try:
        return asyncio.run(_run(args, settings))
    except MeshError as err:
        return _fail(str(err))


def add_config_parser(sub: Any) -> None:
    config = sub.add_parser("config", help="read and change run-time parameters in the cluster's etcd")
    actions = config.add_subparsers(dest="action", required=True)
    for action, what in (("list", "every parameter and where its value comes from"),
                         ("get", "a parameter's value in the store"),
                         ("set", "set a parameter for every pod, at once"),
                         ("unset", "delete the parameter: pods return to their environment's value")):
        cmd = actions.add_parser(action, help=what)
        if action != "list":
            cmd.add_argument("name", help=f"one of: {', '.join(sorted(PARAMETERS))}")
        if action == "set":
            cmd.add_argument("value")
        cmd.add_argument("--etcd", metavar="URL", help="the cluster's etcd (KV_STORE=etcd:URL)")
        cmd.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for etcd (default 10)")
        cmd.set_defaults(func=_config)
