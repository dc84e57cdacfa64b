#!/usr/bin/env bash
# The main job on the embedded default backbone: export three real-data tasks, add them with the default
# `cit-trainer add-task` settings, start cit-server, and evaluate every held-out test request over gRPC: each test
# image asked with a training wording and with a held-out one, reported side by side (predictions.jsonl keeps
# every answer and its verdict).
# About 30 minutes on 2 CPU cores. Outputs: ./tasks, ./cit-registry, ./predictions.jsonl, and the report printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=${TASKS:-"fashion-mnist digits words"}
REGISTRY=${CIT_REGISTRY:-cit-registry}
PORT=${PORT:-50051}

cit-trainer export $TASKS --out tasks
for task in $TASKS; do
  cit-trainer add-task "tasks/$task" --registry "$REGISTRY"
done
cit-registry list --registry "$REGISTRY"
cit-registry similarity --registry "$REGISTRY"

cit-server --registry "$REGISTRY" --port "$PORT" > server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 120); do grep -q "listening on" server.log && break; sleep 1; done
grep "listening on" server.log

dirs=""; for task in $TASKS; do dirs="$dirs tasks/$task"; done
cit evaluate $dirs --server "127.0.0.1:$PORT" --predictions predictions.jsonl
