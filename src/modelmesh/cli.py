"""Command-line entry point: argument parsing only; the work happens in the modules it calls.

    modelmesh serve        a mesh pod (starts its built-in runtime unless --runtime-endpoint)
    modelmesh runtime      the built-in ONNX runtime alone
    modelmesh models ...   operator commands against a running pod
    modelmesh config ...   run-time parameters in the cluster's etcd
    modelmesh demo-models  write small ONNX models to try things with
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from modelmesh import __version__


class SettingsError(Exception):
    """Settings from the environment or flags that cannot be used; reported without a traceback."""


def _serve(args: argparse.Namespace) -> int:
    from modelmesh.app import run_mesh
    from modelmesh.settings import MeshSettings

    try:
        settings = MeshSettings.from_env(
            os.environ,
            host=args.host,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            runtime_capacity_bytes=args.capacity,
            runtime_endpoint=args.runtime_endpoint,
            runtime_mode=args.runtime,
            kv_store=args.etcd and f"etcd:{args.etcd}",
            instance_id=args.instance_id,
            log_level=args.log_level,
            event_loop=args.event_loop,
            demo_models=args.demo_models,
            demo_dir=args.demo_dir,
            advertise_host=args.advertise_address,
        )
    except ValueError as err:
        raise SettingsError(err) from err
    return run_mesh(settings)


def _runtime(args: argparse.Namespace) -> int:
    from modelmesh.runtime.onnx.server import run_runtime
    from modelmesh.settings import RuntimeSettings

    try:
        settings = RuntimeSettings.from_env(
            os.environ,
            host=args.host,
            grpc_port=args.grpc_port,
            socket_path=args.socket_path,
            capacity_bytes=args.capacity,
            max_loading_concurrency=args.max_loading_concurrency,
            log_level=args.log_level,
        )
    except ValueError as err:
        raise SettingsError(err) from err
    return run_runtime(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelmesh", description="A multi-model serving mesh.")
    parser.add_argument("--version", action="version", version=f"modelmesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a mesh pod")
    serve.add_argument("--host", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--grpc-port", type=int, help="external gRPC port (MM_SVC_GRPC_PORT, default 8033)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port; 0 any free port, -1 disables (MM_METRICS_PORT, default 2112)")
    serve.add_argument("--capacity", type=int, metavar="BYTES",
                       help="memory for models, passed to the built-in runtime (MM_RUNTIME_CAPACITY_BYTES)")
    serve.add_argument("--runtime-endpoint", metavar="HOST:PORT",
                       help="use a running runtime instead of starting the built-in one "
                            "(INTERNAL_GRPC_PORT / INTERNAL_GRPC_SOCKET_PATH)")
    serve.add_argument("--runtime", choices=("process", "inprocess"),
                       help="run the built-in runtime inside the pod's process (default) or as a child "
                            "process (MM_RUNTIME_MODE)")
    serve.add_argument("--etcd", metavar="URL", help="etcd endpoint for cluster mode (KV_STORE=etcd:URL)")
    serve.add_argument("--instance-id", help="this pod's id (MM_INSTANCE_ID)")
    serve.add_argument("--advertise-address", metavar="HOST",
                       help="host other pods use to reach this one (MM_ADVERTISE_ADDRESS)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (MM_LOG_LEVEL)")
    serve.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"),
                       help="the pod's event loop; auto: uvloop when installed (MM_EVENT_LOOP, default auto)")
    serve.add_argument("--demo-models", type=int, metavar="N",
                       help="try-it mode: write N demo ONNX models and register them at start")
    serve.add_argument("--demo-dir", help="where --demo-models writes them (default ./modelmesh-demo-models)")
    serve.set_defaults(func=_serve)

    runtime = sub.add_parser("runtime", help="run the built-in ONNX runtime alone")
    runtime.add_argument("--host", help="address to bind (default 127.0.0.1)")
    runtime.add_argument("--grpc-port", type=int, help="gRPC port, 0 for any free one (INTERNAL_GRPC_PORT, default 8085)")
    runtime.add_argument("--socket-path", help="listen on this Unix socket instead (INTERNAL_GRPC_SOCKET_PATH)")
    runtime.add_argument("--capacity", type=int, metavar="BYTES",
                         help="memory for models (MM_RUNTIME_CAPACITY_BYTES; default half of available memory)")
    runtime.add_argument("--max-loading-concurrency", type=int, help="loads at once (default 2)")
    runtime.add_argument("--log-level", help="DEBUG, INFO, WARNING (MM_LOG_LEVEL)")
    runtime.set_defaults(func=_runtime)

    from modelmesh.admin import add_models_parser
    from modelmesh.configcmd import add_config_parser
    from modelmesh.demo import add_demo_parser

    add_models_parser(sub)
    add_config_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SettingsError as err:
        print(f"modelmesh: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
