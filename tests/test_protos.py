"""The committed generated code matches protos/, and messages round-trip."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ftps.common import archives, serde
from ftps.common.errors import InvalidArgument
from ftps.v1 import common_pb2, gateway_pb2, registry_pb2, scorer_pb2, worker_pb2
from tests.node_packages import require

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_does_not_drift(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable)
    subprocess.run(["bash", str(ROOT / "scripts" / "protoc.sh")], check=True, env=env, cwd=ROOT)
    generated = sorted(p.name for p in (tmp_path / "ftps" / "v1").iterdir() if p.suffix in (".py", ".pyi", ".binpb"))
    committed = sorted(p.name for p in (ROOT / "ftps" / "v1").iterdir() if p.suffix in (".py", ".pyi", ".binpb"))
    assert generated == committed
    drifted = [n for n in generated if not filecmp.cmp(tmp_path / "ftps" / "v1" / n, ROOT / "ftps" / "v1" / n,
                                                       shallow=False)]
    assert not drifted, f"regenerate with `make protos`: {drifted} differ from protos/"


def test_every_service_is_declared():
    assert set(registry_pb2.DESCRIPTOR.services_by_name) == {"BuilderRegistryService"}
    assert set(gateway_pb2.DESCRIPTOR.services_by_name) == {"ContributorGatewayService"}
    assert set(worker_pb2.DESCRIPTOR.services_by_name) == {"FinetuneWorkerService"}
    assert set(scorer_pb2.DESCRIPTOR.services_by_name) == {"LiraScorerService"}


FILES = (common_pb2, gateway_pb2, registry_pb2, scorer_pb2, worker_pb2)


def test_every_request_is_named_for_its_rpc_and_used_once():
    # protos/buf.yaml switches off RPC_REQUEST_RESPONSE_UNIQUE (resources are responses of several
    # RPCs, as in Google's AIPs); requests must still be <Rpc>Request, one per RPC.
    seen: dict[str, str] = {}
    for module in FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                request = method.input_type.name
                assert request == f"{method.name}Request", f"{service.name}.{method.name} takes {request}"
                assert request not in seen, f"{request} is the request of {seen[request]} and {method.name}"
                seen[request] = method.name


def _undocumented() -> list[str]:
    """Every service, RPC, message, field, enum and enum value of our protos without a comment
    (leading or trailing), from the descriptor set with source info that reflection serves."""
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "ftps" / "v1" / "ftps_v1.binpb").read_bytes())
    missing = []
    for f in fds.file:
        if not f.name.startswith("ftps/"):
            continue
        documented = {tuple(loc.path) for loc in f.source_code_info.location
                      if loc.leading_comments.strip() or loc.trailing_comments.strip()}

        def need(path, what):
            if tuple(path) not in documented:
                missing.append(f"{f.name}: {what}")

        def enum(e, path, scope):
            need(path, f"enum {scope}{e.name}")
            for k, v in enumerate(e.value):
                need(path + [2, k], f"enum value {scope}{e.name}.{v.name}")

        def message(m, path, scope):
            # Request/response wrappers are named for their RPC, which is documented; their fields are not.
            if not m.name.endswith(("Request", "Response")):
                need(path, f"message {scope}{m.name}")
            for k, fld in enumerate(m.field):
                need(path + [2, k], f"field {scope}{m.name}.{fld.name}")
            for k, nested in enumerate(m.nested_type):
                if not nested.options.map_entry:
                    message(nested, path + [3, k], f"{scope}{m.name}.")
            for k, e in enumerate(m.enum_type):
                enum(e, path + [4, k], f"{scope}{m.name}.")

        for i, m in enumerate(f.message_type):
            message(m, [4, i], "")
        for i, e in enumerate(f.enum_type):
            enum(e, [5, i], "")
        for i, svc in enumerate(f.service):
            need([6, i], f"service {svc.name}")
            for j, meth in enumerate(svc.method):
                need([6, i, 2, j], f"rpc {svc.name}.{meth.name}")
    return missing


def test_every_service_rpc_message_field_and_enum_value_is_documented():
    missing = _undocumented()
    assert not missing, f"{len(missing)} without a comment:\n" + "\n".join(missing)


def test_buf_lint_is_clean():
    require("buf")
    run = subprocess.run(["bash", "scripts/buf.sh", "lint"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _has_contract(ref: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{ref}:protos/buf.yaml"], cwd=ROOT,
                          capture_output=True).returncode == 0


def test_no_breaking_change_against_the_previous_contract():
    """The working tree's protos against the last commit's (uncommitted changes) and the one before
    (what this commit changed): a breaking change fails. Where protos/buf.yaml is not there yet,
    there was no contract to keep (the renames that came with buf.yaml landed at once)."""
    require("buf")
    refs = [ref for ref in ("HEAD", "HEAD~1") if _has_contract(ref)]
    if not refs:
        pytest.skip("no earlier contract: protos/buf.yaml is not in HEAD or HEAD~1 (a new or shallow clone)")
    for ref in refs:
        run = subprocess.run(["bash", "scripts/buf.sh", "breaking", ref], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, f"breaking changes against {ref}:\n{run.stdout}{run.stderr}"


@pytest.mark.parametrize("dtype", ["float32", "float64", "uint8", "int64", "bool"])
def test_tensor_round_trip(dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    t = serde.tensor_from_array(a)
    back = serde.array_from_tensor(common_pb2.Tensor.FromString(t.SerializeToString()))
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)


def test_tensor_with_wrong_byte_count_names_the_field():
    t = serde.tensor_from_array(np.zeros((2, 2), np.float32))
    t.data = t.data[:-1]
    with pytest.raises(InvalidArgument, match="records.x.data"):
        serde.array_from_tensor(t, field="records.x")


def test_tensor_with_unset_dtype_is_refused():
    with pytest.raises(InvalidArgument, match="dtype"):
        serde.array_from_tensor(common_pb2.Tensor(shape=[1], data=b"\0"))


def test_job_round_trip():
    job = worker_pb2.FinetuneJob(task_id="t-1", job_id="r-1-j0", builder_mix=3,
                                 models=[worker_pb2.ModelSpec(index=5, seed=2**63 - 1, mask=b"\x01\x00")])
    back = worker_pb2.FinetuneJob.FromString(job.SerializeToString())
    assert back == job and back.models[0].seed == 2**63 - 1


def test_npz_refuses_pickled_object_arrays():
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"evil": 1}], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(InvalidArgument, match="pickle"):
        archives.npz_arrays(buf.getvalue())


def test_method_names_cover_the_enum():
    names = {v.name for v in common_pb2.Method.DESCRIPTOR.values if v.number}
    assert {f"METHOD_{n.upper().replace('-', '_')}" for n in serde.METHOD_ENUMS} == names


def test_records_npz_is_deterministic_and_loadable():
    x = np.random.default_rng(0).random((3, 1, 2, 2), dtype=np.float32)
    y = np.arange(3)
    a = archives.records_to_npz(x, y)
    assert a == archives.records_to_npz(x.copy(), y.copy())  # content-addressed: same arrays, same sha256
    back = archives.npz_arrays(a)
    np.testing.assert_array_equal(back["x"], x)
    np.testing.assert_array_equal(back["y"], y)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_serves_both_versions_with_the_protos_comments(version):
    """grpcurl / buf curl / Postman speak reflection v1 (older tools v1alpha); the files they get
    carry the protos' comments, so the API documents itself to whoever browses it."""
    import grpc
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from ftps.common import grpcutil

    server = grpcutil.Server()
    port = server.start("127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                     request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        listed, found = call(iter([
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="ftps.v1.ContributorGatewayService"),
        ]), timeout=10)
        assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= {
            s.name for s in listed.list_services_response.service}
        files = {f.name: f for f in (descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in
                                     found.file_descriptor_response.file_descriptor_proto)}
        gateway = files["ftps/v1/gateway.proto"]
        comments = " ".join(loc.leading_comments for loc in gateway.source_code_info.location)
        assert "authorization: Bearer <token>" in comments and "idempotency_key" in comments
    finally:
        channel.close()
        server.stop(0)


def test_every_error_reason_the_protos_name_is_in_the_reasons_table():
    """The protos document reasons as "(REASON)"; the README's table and the code use errors.REASONS."""
    import re

    from ftps.common.errors import REASONS

    named = set()
    for proto in (ROOT / "protos" / "ftps" / "v1").glob("*.proto"):
        named |= set(re.findall(r"\(([A-Z][A-Z0-9]+(?:_[A-Z0-9]+)+)[:;)]", proto.read_text()))
    assert named, "the protos name no reasons"
    assert not named - set(REASONS), f"named in protos/ but not in ftps.common.errors.REASONS: {named - set(REASONS)}"
