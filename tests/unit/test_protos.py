"""The generated code matches protos/, and the protos match the published wire contracts."""

import importlib.util
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from modelmesh.proto import grpc_predict_v2_pb2 as ours

ROOT = Path(__file__).resolve().parents[2]


def load_gen_script():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_has_not_drifted():
    gen = load_gen_script()
    assert gen.drifted(gen.generate()) == []


def fields(message):
    return {f.name: (f.number, f.type, f.is_repeated) for f in message.fields}


def test_inference_messages_match_the_published_layout_tritonclient_uses():
    """Every message we share with the KServe v2 protocol has the same field numbers and types as
    tritonclient's copy, the client our users have."""
    triton = pytest.importorskip("tritonclient.grpc.service_pb2")
    theirs = triton.DESCRIPTOR
    checked = 0
    for name, desc in ours.DESCRIPTOR.message_types_by_name.items():
        other = theirs.message_types_by_name[name]
        for f in desc.fields:
            o = other.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated) == (o.number, o.type, o.is_repeated), f"{name}.{f.name}"
            checked += 1
        for nested in desc.nested_types:
            if nested.GetOptions().map_entry:
                continue
            assert fields(nested).items() <= fields(other.nested_types_by_name[nested.name]).items(), nested.name
    assert checked >= 56  # every top-level field of the shared messages
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_service = theirs.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        other = their_service.methods_by_name[method.name]
        assert method.input_type.name == other.input_type.name
        assert (method.client_streaming, method.server_streaming) == (other.client_streaming, other.server_streaming)


def test_repository_load_request_layout():
    f = fields(ours.RepositoryModelLoadRequest.DESCRIPTOR)
    assert f["repository_name"][0] == 1 and f["model_name"][0] == 2 and f["parameters"][0] == 3


def test_modelmesh_contracts():
    from modelmesh.proto import model_mesh_pb2 as mm
    from modelmesh.proto import model_runtime_pb2 as rt

    svc = mm.DESCRIPTOR.services_by_name["ModelMesh"]
    assert mm.DESCRIPTOR.package == "mmesh"
    assert [m.name for m in svc.methods] == [
        "registerModel", "unregisterModel", "getModelStatus", "ensureLoaded",
        "setVModel", "deleteVModel", "getVModelStatus"]
    status = mm.ModelStatusInfo.ModelStatus
    assert [status.Value(n) for n in ("NOT_FOUND", "NOT_LOADED", "LOADING", "LOADED", "LOADING_FAILED", "UNKNOWN")] \
        == [0, 1, 2, 3, 4, 5]
    assert fields(mm.RegisterModelRequest.DESCRIPTOR) == {
        "modelId": (1, FieldDescriptor.TYPE_STRING, False),
        "modelInfo": (2, FieldDescriptor.TYPE_MESSAGE, False),
        "loadNow": (3, FieldDescriptor.TYPE_BOOL, False),
        "sync": (4, FieldDescriptor.TYPE_BOOL, False),
        "lastUsedTime": (5, FieldDescriptor.TYPE_UINT64, False),
        # our extension, beside ModelMesh's five (older clients never send it)
        "placement": (20, FieldDescriptor.TYPE_MESSAGE, False),
    }
    assert fields(mm.SetVModelRequest.DESCRIPTOR)["owner"][0] == 10
    # our bulk extension is a service of its own: ModelMesh's clients never see it
    bulk = mm.DESCRIPTOR.services_by_name["ModelMeshBulk"]
    (register_models,) = bulk.methods
    assert (register_models.name, register_models.client_streaming, register_models.server_streaming) == (
        "registerModels", True, True)
    assert register_models.input_type is mm.RegisterModelRequest.DESCRIPTOR
    assert {k: v[0] for k, v in fields(mm.RegisterModelResult.DESCRIPTOR).items()} == {
        "index": 1, "modelId": 2, "code": 3, "message": 4, "status": 5}
    rsvc = rt.DESCRIPTOR.services_by_name["ModelRuntime"]
    assert [m.name for m in rsvc.methods] == [
        "loadModel", "unloadModel", "predictModelSize", "modelSize", "runtimeStatus"]
    r = fields(rt.RuntimeStatusResponse.DESCRIPTOR)
    assert {k: v[0] for k, v in r.items()} == {
        "status": 1, "capacityInBytes": 2, "maxLoadingConcurrency": 3, "modelLoadingTimeoutMs": 4,
        "defaultModelSizeInBytes": 5, "runtimeVersion": 6, "numericRuntimeVersion": 7, "methodInfos": 8,
        "limitModelConcurrency": 9, "allowAnyMethod": 10}


def test_our_protos_live_beside_tritonclients():
    """Both define inference.ModelInferRequest; our private pool keeps them from colliding."""
    import tritonclient.grpc  # noqa: F401  (registers its copy in the default pool)

    from modelmesh.proto._pool import POOL

    assert ours.DESCRIPTOR.pool is POOL
    req = ours.ModelInferRequest(model_name="m")
    assert ours.ModelInferRequest.FromString(req.SerializeToString()).model_name == "m"
