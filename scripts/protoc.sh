#!/usr/bin/env bash
# Regenerates the committed Python code from protos/ (ftps/v1/*_pb2*.py and .pyi stubs) with the
# pinned grpcio-tools, and ftps/v1/ftps_v1.binpb: the descriptor set with comments that reflection
# serves. OUT overrides the output root (the drift test generates into a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-.}
mkdir -p "$OUT/ftps/v1"
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  --include_source_info --descriptor_set_out="$OUT/ftps/v1/ftps_v1.binpb" \
  protos/ftps/v1/*.proto
touch "$OUT/ftps/v1/__init__.py"
