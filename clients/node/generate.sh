#!/usr/bin/env bash
# Regenerates clients/node/gen/ from protos/ (+ the vendored google.rpc / grpc.health protos) with
# the pinned buf and protoc-gen-es from node_modules. OUT overrides the output root (the drift test
# tests/test_node_client.py generates into a temp dir and compares with the committed gen/).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-.}
if [ ! -x node_modules/.bin/buf ] || [ ! -x node_modules/.bin/protoc-gen-es ]; then
  npm ci --no-audit --no-fund
fi
node_modules/.bin/buf generate --template buf.gen.yaml -o "$OUT"
