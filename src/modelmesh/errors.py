"""The exception tree of modelmesh.

Every error a caller can see is a ``MeshError``; ``api/status.py`` maps each class to one gRPC status
code in a single table, so a new error needs one line there and nowhere else.

    MeshError
    ├── ModelNotFound            NOT_FOUND           no such model or vmodel id
    ├── InvalidRequest           INVALID_ARGUMENT    malformed request, bad tensor, bad model info
    ├── ModelExists              ALREADY_EXISTS      registered already with different info
    ├── CapacityExhausted        RESOURCE_EXHAUSTED  no room for the model, or it is larger than capacity
    ├── RequestTooLarge          RESOURCE_EXHAUSTED  message over the size limit
    ├── ModelLoadFailed          FAILED_PRECONDITION the model failed to load; retried after a while
    ├── PreconditionFailed       FAILED_PRECONDITION a conditional change whose condition does not hold
    ├── Conflict                 ABORTED             a compare-and-set lost a race too many times
    ├── Unavailable              UNAVAILABLE
    │   ├── StoreUnavailable                         the registry store cannot be reached
    │   └── RuntimeUnavailable                       the model runtime cannot be reached
    ├── NotImplementedYet        UNIMPLEMENTED
    └── UpstreamError            (the upstream code) a runtime or pod answered with a gRPC error

asyncio.TimeoutError maps to DEADLINE_EXCEEDED and asyncio.CancelledError to CANCELLED; anything
else is a bug and becomes INTERNAL with a generic message and a logged traceback.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error modelmesh raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(MeshError):
    pass


class InvalidRequest(MeshError):
    pass


class ModelExists(MeshError):
    pass


class CapacityExhausted(MeshError):
    pass


class RequestTooLarge(MeshError):
    pass


class ModelLoadFailed(MeshError):
    pass


class PreconditionFailed(MeshError):
    pass


class Conflict(MeshError):
    pass


class Unavailable(MeshError):
    pass


class StoreUnavailable(Unavailable):
    pass


class RuntimeUnavailable(Unavailable):
    pass


class NotImplementedYet(MeshError):
    pass


class UpstreamError(MeshError):
    """A gRPC error returned by a runtime or another pod, passed on with its code.

    ``code`` is the name of a ``grpc.StatusCode`` member (e.g. ``"INVALID_ARGUMENT"``), kept as a
    string so this module stays free of grpc.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
