#!/usr/bin/env bash
# Regenerates the Python stubs of proto/cit_proto/*.proto (the public API and the LM worker's) into the same package.
# Usage: scripts/gen_proto.sh [OUT_DIR]   (OUT_DIR defaults to proto/, the committed location)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/proto}
mkdir -p "$out/cit_proto"
python -m grpc_tools.protoc -I "$root/proto" --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  "$root/proto/cit_proto/cit.proto" "$root/proto/cit_proto/lm_worker.proto"
