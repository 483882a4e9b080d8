import asyncio

import grpc
import pytest

from modelmesh import errors
from modelmesh.api.status import STATUS_TABLE, status_for

CASES = [
    (errors.ModelNotFound("model 'x' not found"), grpc.StatusCode.NOT_FOUND),
    (errors.InvalidRequest("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelExists("dup"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.CapacityExhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.RequestTooLarge("big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ModelLoadFailed("corrupt"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Conflict("race"), grpc.StatusCode.ABORTED),
    (errors.StoreUnavailable("etcd down"), grpc.StatusCode.UNAVAILABLE),
    (errors.RuntimeUnavailable("runtime gone"), grpc.StatusCode.UNAVAILABLE),
    (errors.NotImplementedYet("later"), grpc.StatusCode.UNIMPLEMENTED),
    (errors.UpstreamError("INVALID_ARGUMENT", "wrong shape"), grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("exc,code", CASES, ids=lambda x: type(x).__name__ if isinstance(x, Exception) else "")
def test_domain_errors_keep_their_message(exc, code):
    assert status_for(exc) == (code, exc.message)


def test_every_mesh_error_class_is_mapped():
    def leaves(cls):
        subs = cls.__subclasses__()
        return [cls] if not subs else [x for s in subs for x in leaves(s)]

    mapped = [cls for cls, _ in STATUS_TABLE]
    for cls in leaves(errors.MeshError):
        if cls is errors.UpstreamError or cls.__module__ != "modelmesh.errors":
            continue
        assert any(issubclass(cls, m) for m in mapped), cls


def test_deadline_and_cancel():
    assert status_for(asyncio.TimeoutError())[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_for(asyncio.CancelledError())[0] is grpc.StatusCode.CANCELLED


def test_unknown_errors_are_internal_without_leaking_details():
    code, message = status_for(KeyError("secret internals"))
    assert code is grpc.StatusCode.INTERNAL and "secret" not in message


def test_upstream_unknown_never_passes_through_bare():
    assert status_for(errors.UpstreamError("UNKNOWN", "?"))[0] is grpc.StatusCode.INTERNAL
    assert status_for(errors.UpstreamError("NOT_A_CODE", "?"))[0] is grpc.StatusCode.INTERNAL
