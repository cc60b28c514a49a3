#!/usr/bin/env bash
# A local MLflow tracking server for Forgetless runs, bound to loopback by default.
#   infra/mlflow/serve.sh [STORE_DIR] [PORT]
# then: forgetless run CONFIG mlflow.tracking_uri=http://127.0.0.1:PORT
# MLflow accepts only localhost Host headers unless told otherwise (DNS-rebinding guard): to serve
# a cluster, put it behind a proxy or set --host 0.0.0.0 with --allowed-hosts.
set -euo pipefail
store="${1:-$PWD/mlflow-server}"
port="${2:-5000}"
mkdir -p "$store"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec "$(dirname "$0")/../../.venv/bin/mlflow" server \
  --host 127.0.0.1 --port "$port" --workers 1 \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --artifacts-destination "$store/artifacts"
