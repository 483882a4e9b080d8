"""``mmesh.ModelMeshBulk``: many registrations over one stream (our extension of the management API).

A unary registerModel costs the pod about half a millisecond of gRPC's own work per call, several
times what the registration itself costs; over one stream that cost is paid once. The stream
carries ``RegisterModelRequest`` messages exactly as registerModel takes them, and each goes
through the same ``management.register`` -> ``Mesh.register``.

Flow: one task reads requests and starts a registration for each, at most ``in_flight`` at once;
the handler writes results as they complete, every result ready at that moment in one message.
A request's slot is freed only once its result has been written, so a client that stops reading
answers stops the pod reading requests (and HTTP/2 flow control then stops the client): nothing is
read further ahead than ``in_flight``. A failed registration is a result carrying the code and
message the unary call would have answered with (``status.py``'s one table); the stream goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from modelmesh.api.management import register
from modelmesh.api.status import reported_status
from modelmesh.mesh import Mesh
from modelmesh.proto import model_mesh_pb2 as mpb

SERVICE = "mmesh.ModelMeshBulk"
METHOD = f"{SERVICE}/registerModels"
DEFAULT_IN_FLIGHT = 64


class BulkRegistrationServicer:
    """Method names are the RPC names of ``mmesh.ModelMeshBulk``."""

    def __init__(self, mesh: Mesh, *, in_flight: int = DEFAULT_IN_FLIGHT) -> None:
        self._mesh = mesh
        self._in_flight = in_flight

    async def registerModels(
        self, requests: AsyncIterator[mpb.RegisterModelRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[mpb.RegisterModelsResponse]:
        slots = asyncio.Semaphore(self._in_flight)
        # completed results, and None once every request has been read
        results: asyncio.Queue[mpb.RegisterModelResult | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        started = 0

        async def register_one(index: int, request: mpb.RegisterModelRequest) -> None:
            try:
                status = await register(self._mesh, request)
            except (Exception, asyncio.CancelledError) as exc:  # one model's failure is its result
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                    raise  # the stream is ending: no one will read a result
                code, message = reported_status(exc, METHOD)
                result = mpb.RegisterModelResult(index=index, modelId=request.modelId, code=code.value[0],
                                                 message=message)
            else:
                result = mpb.RegisterModelResult(index=index, modelId=request.modelId, status=status)
            results.put_nowait(result)

        async def read() -> None:
            nonlocal started
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.create_task(register_one(started, request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    started += 1
            finally:
                results.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            answered, all_read = 0, False
            while not all_read or answered < started:
                batch = []
                item = await results.get()
                while True:
                    if item is None:
                        all_read = True
                        await reader  # a broken request stream ends the call with its error
                    else:
                        batch.append(item)
                    if results.empty():
                        break
                    item = results.get_nowait()
                if batch:
                    yield mpb.RegisterModelsResponse(results=batch)
                    answered += len(batch)
                    for _ in batch:
                        slots.release()
        finally:
            reader.cancel()
            for task in running:
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)
