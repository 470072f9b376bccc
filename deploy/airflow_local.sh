#!/usr/bin/env bash
# `make airflow`: Airflow on this machine with the DAGs of dags/ and the demo config.
#
# Trains the demo model's checkpoints into build/airflow-demo/train (once), then
# starts the four Airflow components (api-server, scheduler, dag-processor,
# triggerer; LocalExecutor, SQLite in airflow-home/) listening on 127.0.0.1 only,
# prints where the UI is and its login, and stays in the foreground: Ctrl-C stops
# everything. `airflow standalone` is not used: its scheduler and triggerer serve
# logs on every interface.
#
# Environment: AIRFLOW_PORT (8080), AIRFLOW_HOME (airflow-home), VENV (.venv),
# TF_EXPORT_CONFIG_DIR (dags/configs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-.venv}
PORT=${AIRFLOW_PORT:-8080}
export PATH="$REPO/$VENV/bin:$PATH"
export AIRFLOW_HOME=${AIRFLOW_HOME:-$REPO/airflow-home}
export AIRFLOW__CORE__DAGS_FOLDER=$REPO/dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:///$AIRFLOW_HOME/airflow.db
export AIRFLOW__API__HOST=127.0.0.1
export AIRFLOW__API__PORT=$PORT
export AIRFLOW__API__WORKERS=1
export AIRFLOW__API__BASE_URL=http://127.0.0.1:$PORT
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=http://127.0.0.1:$PORT/execution/
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=${AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL:-30}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
mkdir -p "$AIRFLOW_HOME/component-logs"
LOGS=$AIRFLOW_HOME/component-logs

if ! ls build/airflow-demo/train/*.index >/dev/null 2>&1; then
  echo "training the demo model into build/airflow-demo/train ..."
  python -c "from tf_export_pipeline.demo import train; train('build/airflow-demo/train', steps=30, checkpoint_every=10)"
fi

echo "migrating the metadata database in $AIRFLOW_HOME ..."
airflow db migrate > "$LOGS/migrate.log" 2>&1 || { tail -20 "$LOGS/migrate.log"; exit 1; }

PIDS=()
stop() {
  trap - INT TERM EXIT
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 3
  # what is left in each component's session, task processes included (they get process groups of their own)
  for pid in "${PIDS[@]}"; do pkill -KILL -s "$pid" 2>/dev/null || true; done
}
trap stop INT TERM EXIT
start() {  # each component in its own process group, so that stop() ends its workers too
  setsid airflow "$@" > "$LOGS/$1.log" 2>&1 &
  PIDS+=($!)
}
start api-server
start scheduler --skip-serve-logs
start dag-processor
start triggerer --skip-serve-logs

healthy() {
  python - "$PORT" <<'EOF'
import json, sys, urllib.request
try:
    h = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/v2/monitor/health", timeout=2))
except Exception:
    sys.exit(1)
sys.exit(0 if all(h[k]["status"] == "healthy" for k in ("metadatabase", "scheduler", "triggerer", "dag_processor")) else 1)
EOF
}
for _ in $(seq 1 240); do
  healthy && break
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "an Airflow component exited; see $LOGS"; tail -5 "$LOGS"/*.log; exit 1; }
  done
  sleep 0.5
done
healthy || { echo "Airflow did not become healthy; see $LOGS"; exit 1; }

PASSWORDS=$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated
LOGIN=$(python -c "import json,sys; print(' '.join(f'{u} / {p}' for u, p in json.load(open(sys.argv[1])).items()))" "$PASSWORDS")
cat <<EOF

Airflow is up (LocalExecutor, SQLite, listening on 127.0.0.1 only).
  UI:     http://127.0.0.1:$PORT
  login:  $LOGIN
  DAGs:   export_nightly__demo, export_after_training__demo, export_backfill__demo
          (configs: ${TF_EXPORT_CONFIG_DIR:-dags/configs}; versions land in build/airflow-demo/serving/demo_regressor)
  logs:   $LOGS
Ctrl-C stops Airflow.
EOF
wait
