"""Server reflection, ``grpc.reflection.v1`` and ``v1alpha``, with the protos' comments.

grpcio-reflection serves only ``v1alpha``, and from the generated modules' descriptors, which
protoc strips of comments. Tools have moved to ``v1`` (grpcurl, Postman, buf curl try it first),
and an outside team browsing the API wants the documentation the protos carry. So:

- ``v1`` is the same servicer under the ``v1`` service name: the two protocols' messages are
  field-for-field identical (grpc-go serves both from one implementation the same way), so the
  ``v1alpha`` message classes (de)serialize ``v1`` calls exactly.
- Our own files are answered from ``ftps/v1/ftps_v1.binpb``, a descriptor set protoc writes with
  ``--include_source_info`` next to the generated code (``scripts/protoc.sh``; the drift test keeps
  it current), so every message, field and RPC comes with its comment.
"""

from __future__ import annotations

import functools
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
DESCRIPTOR_SET = Path(__file__).resolve().parents[1] / "v1" / "ftps_v1.binpb"


@functools.cache
def documented_files() -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with source info, for our own protos."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    return {f.name: f.SerializeToString() for f in fds.file if f.name.startswith("ftps/")}


class _DocumentedReflection(reflection.ReflectionServicer):
    """The stock servicer, answering our files with their comments."""

    def ServerReflectionInfo(self, request_iterator, context):
        docs = documented_files()
        for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                for i, raw in enumerate(files):
                    name = descriptor_pb2.FileDescriptorProto.FromString(raw).name
                    if name in docs:
                        files[i] = docs[name]
            yield response


def enable(service_names: list[str], server: grpc.Server) -> None:
    """Serve reflection (both versions) for ``service_names`` (which should list SERVICE_NAMES)."""
    servicer = _DocumentedReflection(service_names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}) for name in SERVICE_NAMES])
