"""Builds the pod's gRPC server: management API (and its bulk extension), data plane, health and
reflection on one port.

Every handler is wrapped by ``api/status.py`` here, in one place, so servicers never map errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from modelmesh.api import bulk, dataplane, management
from modelmesh.api.status import guard_stream, guard_unary
from modelmesh.proto import grpc_predict_v2_pb2 as pb
from modelmesh.proto import model_mesh_pb2 as mpb
from modelmesh.proto._pool import POOL

log = logging.getLogger(__name__)


def _identity(x: bytes) -> bytes:
    return x


def _unary(fn: Callable[..., Any], method: str, req: Any = None, resp: Any = None) -> grpc.RpcMethodHandler:
    """A unary handler; without ``req``/``resp`` the body stays bytes both ways."""
    return grpc.unary_unary_rpc_method_handler(
        guard_unary(fn, method),
        request_deserializer=req.FromString if req else None,
        response_serializer=resp.SerializeToString if resp else None,
    )


def management_handler(servicer: management.ManagementServicer) -> grpc.GenericRpcHandler:
    service = mpb.DESCRIPTOR.services_by_name["ModelMesh"]
    handlers = {}
    for method in service.methods:
        req = getattr(mpb, method.input_type.name)
        resp = getattr(mpb, method.output_type.name)
        handlers[method.name] = _unary(
            getattr(servicer, method.name), f"{management.SERVICE}/{method.name}", req, resp
        )
    return grpc.method_handlers_generic_handler(management.SERVICE, handlers)


def bulk_handler(servicer: bulk.BulkRegistrationServicer) -> grpc.GenericRpcHandler:
    handlers = {
        "registerModels": grpc.stream_stream_rpc_method_handler(
            guard_stream(servicer.registerModels, bulk.METHOD),
            request_deserializer=mpb.RegisterModelRequest.FromString,
            response_serializer=mpb.RegisterModelsResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(bulk.SERVICE, handlers)


def dataplane_handler(dp: dataplane.DataPlane) -> grpc.GenericRpcHandler:
    s = dataplane.SERVICE
    handlers = {
        "ModelInfer": _unary(dp.model_infer, f"{s}/ModelInfer"),
        "ModelMetadata": _unary(dp.model_metadata, f"{s}/ModelMetadata"),
        "ModelReady": _unary(dp.model_ready, f"{s}/ModelReady", None, pb.ModelReadyResponse),
        "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
            guard_stream(dp.model_stream_infer, f"{s}/ModelStreamInfer")),
        "ServerLive": _unary(dp.server_live, f"{s}/ServerLive", pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": _unary(dp.server_ready, f"{s}/ServerReady", pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ServerMetadata": _unary(dp.server_metadata, f"{s}/ServerMetadata", pb.ServerMetadataRequest,
                                 pb.ServerMetadataResponse),
        "RepositoryIndex": _unary(dp.repository_index, f"{s}/RepositoryIndex", pb.RepositoryIndexRequest,
                                  pb.RepositoryIndexResponse),
        "RepositoryModelLoad": _unary(dp.repository_model_load, f"{s}/RepositoryModelLoad",
                                      pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse),
        "RepositoryModelUnload": _unary(dp.repository_model_unload, f"{s}/RepositoryModelUnload",
                                        pb.RepositoryModelUnloadRequest, pb.RepositoryModelUnloadResponse),
    }
    return grpc.method_handlers_generic_handler(s, handlers)


def _add_to_pool(*files: Any) -> None:
    """Put health and reflection's descriptors beside ours, so reflection can describe them."""
    for fd in files:
        try:
            POOL.FindFileByName(fd.name)
        except KeyError:
            POOL.AddSerializedFile(fd.serialized_pb)


def build_server(
    *,
    management_servicer: management.ManagementServicer,
    bulk_servicer: bulk.BulkRegistrationServicer,
    data_plane: dataplane.DataPlane,
    health_servicer: health.aio.HealthServicer,
    max_msg_size: int,
) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_msg_size),
            ("grpc.max_send_message_length", max_msg_size),
            # a second pod on the same port must fail to start, not silently share it
            ("grpc.so_reuseport", 0),
        ]
    )
    server.add_generic_rpc_handlers(
        (management_handler(management_servicer), bulk_handler(bulk_servicer), dataplane_handler(data_plane))
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_to_pool(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
    reflection.enable_server_reflection(
        (management.SERVICE, bulk.SERVICE, dataplane.SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
        pool=POOL,
    )
    return server
