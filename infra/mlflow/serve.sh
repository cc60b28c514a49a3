#!/usr/bin/env bash
# A MLflow tracking server for Forgetless runs, bound to loopback by default.
#   infra/mlflow/serve.sh [STORE_DIR] [PORT]
# then: forgetless run CONFIG mlflow.tracking_uri=http://127.0.0.1:PORT
#
# With MLFLOW_AUTH_ADMIN_PASSWORD set, MLflow's basic-auth app guards it (user `admin`, that
# password; the user store and a Flask secret of its own kept in STORE_DIR, mode 600), and runs
# reach it with MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... in their environment.
# Anything but loopback (MLFLOW_HOST=0.0.0.0) is refused without it: nothing Forgetless starts
# listens beyond loopback unauthenticated. MLflow accepts only localhost Host headers unless told
# otherwise (DNS-rebinding guard): name the host clients use with MLFLOW_ALLOWED_HOSTS.
set -euo pipefail
store="${1:-$PWD/mlflow-server}"
port="${2:-5000}"
host="${MLFLOW_HOST:-127.0.0.1}"
args=()
if [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then
  mkdir -p "$store"
  umask 077
  [ -f "$store/basic_auth.ini" ] || printf '%s\n' '[mlflow]' 'default_permission = NO_PERMISSIONS' \
    "database_uri = sqlite:///$store/auth.db" 'admin_username = admin' \
    'authorization_function = mlflow.server.auth:authenticate_request_basic_auth' > "$store/basic_auth.ini"
  [ -f "$store/.flask_secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$store/.flask_secret"
  export MLFLOW_AUTH_CONFIG_PATH="$store/basic_auth.ini"
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$store/.flask_secret")"
  export MLFLOW_FLASK_SERVER_SECRET_KEY
  args+=(--app-name basic-auth)
elif [ "$host" != 127.0.0.1 ] && [ "$host" != localhost ] && [ "$host" != ::1 ]; then
  echo "serve.sh: refusing to serve MLflow on $host without authentication: set MLFLOW_AUTH_ADMIN_PASSWORD" \
       "(MLflow's basic-auth app), or keep MLFLOW_HOST on loopback" >&2
  exit 2
fi
[ -z "${MLFLOW_ALLOWED_HOSTS:-}" ] || args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
mkdir -p "$store"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec "$(dirname "$0")/../../.venv/bin/mlflow" server \
  --host "$host" --port "$port" --workers 1 "${args[@]}" \
  --backend-store-uri "sqlite:///$store/mlflow.db" \
  --artifacts-destination "$store/artifacts"
