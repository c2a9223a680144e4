#!/usr/bin/env bash
# buf (from clients/node's pinned @bufbuild/buf) on protos/:
#   scripts/buf.sh lint                 STANDARD lint, exceptions in protos/buf.yaml
#   scripts/buf.sh breaking [REF]       breaking changes of the working tree against REF's protos
#                                       (default HEAD~1; see tests/test_protos.py for the rule)
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=clients/node/node_modules/.bin/buf
if [[ ! -x $BUF ]]; then
  echo "buf is not installed: run \`npm ci --prefix clients/node\` (scripts/bootstrap.sh does)" >&2
  exit 2
fi
case "${1:-}" in
  lint) exec "$BUF" lint protos ;;
  breaking) exec "$BUF" breaking protos --against ".git#ref=${2:-HEAD~1},subdir=protos" ;;
  *) echo "usage: scripts/buf.sh lint | breaking [REF]" >&2; exit 2 ;;
esac
