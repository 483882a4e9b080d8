"""``runtime.grpc_client.GrpcForwarder`` (the pod-to-pod hop and the runtime's data plane) against a
real gRPC server on loopback: what each failure becomes.

The server echoes the request body (after ``mm-sleep`` seconds), or answers ``mm-answer-bytes`` zero
bytes, or aborts with the status named in ``mm-abort`` (code) and ``mm-abort-details``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from modelmesh.api.status import status_for
from modelmesh.errors import RequestTooLarge, RuntimeUnavailable, UpstreamError
from modelmesh.peers import Peers
from modelmesh.runtime.grpc_client import PeerClient

METHOD = "/inference.GRPCInferenceService/ModelInfer"
LIMIT = 64 * 1024


async def handle(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
    md = dict(context.invocation_metadata() or ())
    if "mm-sleep" in md:
        await asyncio.sleep(float(md["mm-sleep"]))
    if "mm-abort" in md:
        await context.abort(grpc.StatusCode[md["mm-abort"]], md.get("mm-abort-details", ""))
    if "mm-answer-bytes" in md:
        return b"\0" * int(md["mm-answer-bytes"])
    return body


class Echo(grpc.GenericRpcHandler):
    def service(self, call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if call_details.method != METHOD:
            return None
        return grpc.unary_unary_rpc_method_handler(handle)  # no serializers: bytes both ways


@pytest.fixture
async def server() -> AsyncIterator[str]:
    # the server takes and sends far more than the client's limit: only the client's limit acts
    srv = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * LIMIT),
                                   ("grpc.max_send_message_length", 16 * LIMIT)])
    srv.add_generic_rpc_handlers((Echo(),))
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    yield f"127.0.0.1:{port}"
    await srv.stop(None)


@pytest.fixture
async def peer(server: str) -> AsyncIterator[PeerClient]:
    client = PeerClient(server, LIMIT)
    yield client
    await client.close()


async def test_bodies_pass_through_as_bytes(peer: PeerClient) -> None:
    body = bytes(range(256)) * 64
    assert await peer.invoke(METHOD, body, [], 10) == body


async def test_a_request_over_the_limit_is_request_too_large(peer: PeerClient, server: str) -> None:
    with pytest.raises(RequestTooLarge) as err:
        await peer.invoke(METHOD, b"\1" * (LIMIT + 1), [], 10)
    assert "larger than max" in err.value.message and str(LIMIT) in err.value.message
    assert "MM_SVC_GRPC_MAX_MSG_SIZE" in err.value.message and server in err.value.message
    assert status_for(err.value)[0] is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_an_answer_over_the_limit_is_request_too_large(peer: PeerClient) -> None:
    with pytest.raises(RequestTooLarge, match="larger than max"):
        await peer.invoke(METHOD, b"q", [("mm-answer-bytes", str(LIMIT + 1))], 10)
    # the channel goes on serving
    assert await peer.invoke(METHOD, b"q", [("mm-answer-bytes", str(LIMIT - 64))], 10) == b"\0" * (LIMIT - 64)


async def test_a_pod_that_passes_on_a_size_failure_is_heard_as_one(peer: PeerClient) -> None:
    # the next pod's own hop (or runtime) was over the limit: its status carries gRPC's words
    passed_on = "Received message larger than max (70000 vs. 65536) (the limit is MM_SVC_GRPC_MAX_MSG_SIZE)"
    with pytest.raises(RequestTooLarge):
        await peer.invoke(METHOD, b"q", [("mm-abort", "RESOURCE_EXHAUSTED"), ("mm-abort-details", passed_on)], 10)


async def test_no_room_stays_an_upstream_error_so_the_mesh_tries_another_pod(peer: PeerClient) -> None:
    with pytest.raises(UpstreamError) as err:
        await peer.invoke(METHOD, b"q", [("mm-abort", "RESOURCE_EXHAUSTED"),
                                         ("mm-abort-details", "cannot load 'm': not enough room")], 10)
    assert err.value.code == "RESOURCE_EXHAUSTED" and not isinstance(err.value, RequestTooLarge)


async def test_a_pod_that_is_not_there_is_unavailable() -> None:
    client = PeerClient("127.0.0.1:1", LIMIT)
    try:
        with pytest.raises(RuntimeUnavailable, match="pod at 127.0.0.1:1 is unavailable"):
            await client.invoke(METHOD, b"q", [], 5)
    finally:
        await client.close()


async def test_a_channel_closed_under_a_request_is_unavailable_not_cancelled(peer: PeerClient) -> None:
    # a pod that leaves the cluster has its channel closed; grpc.aio cancels the calls on it, and
    # the request (which did not fail there) must be free to go to another pod
    call = asyncio.create_task(peer.invoke(METHOD, b"q", [("mm-sleep", "5")], 10))
    await asyncio.sleep(0.2)
    await peer.close()
    with pytest.raises(RuntimeUnavailable, match="channel closed while the request was in flight"):
        await call
    assert status_for(RuntimeUnavailable("x"))[0] is grpc.StatusCode.UNAVAILABLE


async def test_a_caller_that_gives_up_is_still_cancelled(peer: PeerClient) -> None:
    call = asyncio.create_task(peer.invoke(METHOD, b"q", [("mm-sleep", "5")], 10))
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_a_departed_pods_client_lets_the_requests_on_it_finish(server: str) -> None:
    peers = Peers(lambda endpoint: PeerClient(endpoint, LIMIT), this_instance="pod-a")
    try:
        call = asyncio.create_task(peers.invoke("pod-b", server, METHOD, b"late", [("mm-sleep", "0.5")], 10))
        await asyncio.sleep(0.2)
        peers.forget("pod-b")  # it left the cluster while the request was on its way back
        assert await call == b"late"
    finally:
        await peers.close()
