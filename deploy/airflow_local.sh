#!/usr/bin/env bash
# `make airflow`: Airflow on this machine with the DAGs of dags/ and the demo config.
#
# Trains the demo model's checkpoints into build/airflow-demo/train (once), then
# starts Airflow listening on 127.0.0.1 only, prints where the UI is and its
# login, and stays in the foreground: Ctrl-C or SIGTERM stops everything it
# started (each component runs in a session of its own, ended as a whole).
# `airflow standalone` is not used: its scheduler and triggerer serve logs on
# every interface.
#
#   EXECUTOR=local (default)  api-server, scheduler, dag-processor, triggerer;
#                             LocalExecutor, SQLite in $AIRFLOW_HOME.
#   EXECUTOR=celery           the same four plus two Celery workers (worker-1, worker-2,
#   (make airflow             concurrency 2 each, own working directories in
#    EXECUTOR=celery)         $AIRFLOW_HOME/workers/, own hostnames via `unshare -u` when
#                             root), CeleryExecutor on a PostgreSQL server (the
#                             distribution's, data in $AIRFLOW_HOME/postgres, run as user
#                             postgres when root) and Redis as broker (no persistence),
#                             both started here on free loopback ports. The same stack
#                             as tests/airflow/test_celery.py, with its settings for
#                             retrying a lost worker's tasks on the other one.
#
# With the LocalExecutor the components serve no logs themselves; one process
# (tf_export_pipeline.operators.local_logs) serves the logs folder on 127.0.0.1
# for the UI's view of running and deferred tasks.
#
# The api-server's JWT secret and secret key are random, generated once and kept
# in $AIRFLOW_HOME (jwt_secret, api_secret_key; mode 600), shared by every component.
#
# Environment: EXECUTOR (local), AIRFLOW_PORT (8080), AIRFLOW_HOME (airflow-home),
# VENV (.venv), TF_EXPORT_CONFIG_DIR (dags/configs), AIRFLOW__CORE__PARALLELISM (4:
# task slots; LocalExecutor starts that many worker processes), CELERY_CONCURRENCY (2).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-.venv}
PORT=${AIRFLOW_PORT:-8080}
EXECUTOR=$(echo "${EXECUTOR:-local}" | tr '[:upper:]' '[:lower:]')
case "$EXECUTOR" in
  local|localexecutor) EXECUTOR=local ;;
  celery|celeryexecutor) EXECUTOR=celery ;;
  *) echo "EXECUTOR must be local or celery, not '$EXECUTOR'" >&2; exit 2 ;;
esac
CONCURRENCY=${CELERY_CONCURRENCY:-2}
export PATH="$REPO/$VENV/bin:$PATH"
export AIRFLOW_HOME=${AIRFLOW_HOME:-$REPO/airflow-home}
export AIRFLOW__CORE__DAGS_FOLDER=$REPO/dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS:-admin:admin}
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
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

secret() {  # a random secret kept in $AIRFLOW_HOME/$1, generated on first use
  local file=$AIRFLOW_HOME/$1
  if [ ! -s "$file" ]; then
    (umask 077; python -c "import secrets; print(secrets.token_hex($2))" > "$file")
  fi
  cat "$file"
}
export AIRFLOW__API_AUTH__JWT_SECRET=$(secret jwt_secret 32)   # 32 random bytes, 64 hex characters
export AIRFLOW__API__SECRET_KEY=$(secret api_secret_key 32)

free_port() { python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

PIDS=()      # Airflow components (session leaders), stopped first
SERVICES=()  # "pid:signal" of PostgreSQL and Redis, stopped after the components
stop() {
  trap - INT TERM EXIT
  echo "stopping ..."
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 1 16); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.5
  done
  # what is left in each component's session, task processes included (they get process groups of their own)
  for pid in "${PIDS[@]}"; do pkill -KILL -s "$pid" 2>/dev/null || true; done
  for svc in "${SERVICES[@]}"; do kill "-${svc#*:}" -- "-${svc%%:*}" 2>/dev/null || true; done
  for svc in "${SERVICES[@]}"; do
    for _ in $(seq 1 20); do kill -0 "${svc%%:*}" 2>/dev/null || break; sleep 0.5; done
    pkill -KILL -s "${svc%%:*}" 2>/dev/null || true
  done
}
trap stop INT TERM EXIT
start() {  # start NAME CMD...: CMD in a session (process group) of its own, so that stop() ends its children too
  local name=$1; shift
  setsid "$@" > "$LOGS/$name.log" 2>&1 &
  PIDS+=($!)
}

if ! ls build/airflow-demo/train/*.index >/dev/null 2>&1; then
  echo "training the demo model into build/airflow-demo/train ..."
  python -c "from tf_export_pipeline.demo import train; train('build/airflow-demo/train', steps=30, checkpoint_every=10)"
fi

if [ "$EXECUTOR" = celery ]; then
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$PGBIN" ] || PGBIN=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
  [ -x "$PGBIN/initdb" ] || { echo "EXECUTOR=celery needs the PostgreSQL server: apt-get install postgresql" >&2; exit 1; }
  command -v redis-server >/dev/null || { echo "EXECUTOR=celery needs redis-server: apt-get install redis-server" >&2; exit 1; }
  PGDATA=$AIRFLOW_HOME/postgres
  AS_PG=()
  if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root
    AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --reset-env --)
  fi
  mkdir -p "$PGDATA/sock" "$AIRFLOW_HOME/redis"
  [ "$(id -u)" = 0 ] && chown -R postgres: "$PGDATA"
  if [ ! -f "$PGDATA/data/PG_VERSION" ]; then
    echo "creating the PostgreSQL cluster in $PGDATA/data ..."
    "${AS_PG[@]}" "$PGBIN/initdb" -D "$PGDATA/data" -U airflow --auth=trust -E UTF8 > "$LOGS/initdb.log" 2>&1 \
      || { tail -20 "$LOGS/initdb.log"; exit 1; }
  fi
  PG_PORT=$(free_port)
  setsid "${AS_PG[@]}" "$PGBIN/postgres" -D "$PGDATA/data" -h 127.0.0.1 -p "$PG_PORT" -k "$PGDATA/sock" \
    -c max_connections=200 > "$LOGS/postgres.log" 2>&1 &
  SERVICES+=("$!:INT")  # SIGINT: fast shutdown (SIGTERM would wait for every client to leave)
  REDIS_PORT=$(free_port)
  setsid redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --protected-mode yes --save "" --appendonly no \
    --dir "$AIRFLOW_HOME/redis" --daemonize no > "$LOGS/redis.log" 2>&1 &
  SERVICES+=("$!:TERM")
  for i in $(seq 1 120); do
    pg_ok=0; redis_ok=0
    psql -h 127.0.0.1 -p "$PG_PORT" -U airflow -d postgres -Atqc 'select 1' >/dev/null 2>&1 && pg_ok=1
    python -c "import redis, sys; sys.exit(0 if redis.Redis(port=$REDIS_PORT, socket_timeout=1).ping() else 1)" \
      >/dev/null 2>&1 && redis_ok=1
    [ $pg_ok = 1 ] && [ $redis_ok = 1 ] && break
    [ "$i" = 120 ] && { echo "PostgreSQL or Redis did not start; see $LOGS/postgres.log, $LOGS/redis.log"; exit 1; }
    sleep 0.5
  done
  psql -h 127.0.0.1 -p "$PG_PORT" -U airflow -d postgres -Atqc "select 1 from pg_database where datname = 'airflow'" \
    | grep -q 1 || psql -h 127.0.0.1 -p "$PG_PORT" -U airflow -d postgres -qc 'create database airflow'
  DB=postgresql+psycopg2://airflow@127.0.0.1:$PG_PORT/airflow
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=$DB
  export AIRFLOW__CORE__EXECUTOR=CeleryExecutor
  export AIRFLOW__CELERY__BROKER_URL=redis://127.0.0.1:$REDIS_PORT/0
  export AIRFLOW__CELERY__RESULT_BACKEND=db+$DB
  export AIRFLOW__CELERY__WORKER_CONCURRENCY=$CONCURRENCY
  # A lost worker's tasks run again on the other one (see tests/airflow/celery_cluster.py, CELERY_ENV):
  # messages acknowledged only when their task is done, one per pool process; a task whose supervisor
  # stops heartbeating is failed by the scheduler after the timeout and retried (the DAGs' retries).
  export AIRFLOW__CELERY__TASK_ACKS_LATE=True
  export AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER=1
  export AIRFLOW__CELERY__WORKER_ENABLE_REMOTE_CONTROL=False
  # Each worker imports TensorFlow once, before its pool forks the task processes.
  export AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS=tf_export_pipeline.operators.celery_worker.CELERY_CONFIG
  export AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT=${AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT:-21600}
  export AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=${AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT:-60}
  export AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL=5
  export AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL=5
  export AIRFLOW__CORE__HOSTNAME_CALLABLE=socket.gethostname
else
  export AIRFLOW__CORE__EXECUTOR=LocalExecutor
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:///$AIRFLOW_HOME/airflow.db
  # One machine: task logs of running and deferred tasks served on loopback (the UI asks 127.0.0.1).
  export AIRFLOW__CORE__HOSTNAME_CALLABLE=tf_export_pipeline.operators.local_logs.loopback_hostname
fi

echo "migrating the metadata database ($EXECUTOR executor) ..."
airflow db migrate > "$LOGS/migrate.log" 2>&1 || { tail -20 "$LOGS/migrate.log"; exit 1; }

start api-server airflow api-server
start scheduler airflow scheduler --skip-serve-logs
start dag-processor airflow dag-processor
start triggerer airflow triggerer --skip-serve-logs
if [ "$EXECUTOR" = local ]; then start log-server python -m tf_export_pipeline.operators.local_logs; fi
WORKERS=()
if [ "$EXECUTOR" = celery ]; then
  UNSHARE=0
  [ "$(id -u)" = 0 ] && unshare -u true 2>/dev/null && UNSHARE=1
  for n in 1 2; do
    w=worker-$n
    mkdir -p "$AIRFLOW_HOME/workers/$w"
    cmd=(airflow celery worker --concurrency "$CONCURRENCY" --celery-hostname "celery@$w" --skip-serve-logs)
    [ $UNSHARE = 1 ] && cmd=(unshare -u sh -c "hostname $w && exec \"\$@\"" sh "${cmd[@]}")
    (cd "$AIRFLOW_HOME/workers/$w" && AIRFLOW__LOGGING__BASE_LOG_FOLDER=$AIRFLOW_HOME/workers/$w/logs \
      exec setsid "${cmd[@]}" > "$LOGS/$w.log" 2>&1) &
    PIDS+=($!)
    WORKERS+=("$w")
  done
fi

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
workers_ready() {
  for w in "${WORKERS[@]}"; do grep -q "celery@$w ready" "$LOGS/$w.log" 2>/dev/null || return 1; done
}
for _ in $(seq 1 240); do
  healthy && workers_ready && break
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "an Airflow component exited; see $LOGS"; tail -5 "$LOGS"/*.log; exit 1; }
  done
  sleep 0.5
done
healthy && workers_ready || { echo "Airflow did not become healthy; see $LOGS"; exit 1; }

PASSWORDS=$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated
LOGIN=$(python -c "import json,sys; print(' '.join(f'{u} / {p}' for u, p in json.load(open(sys.argv[1])).items()))" "$PASSWORDS")
if [ "$EXECUTOR" = celery ]; then
  STACK="CeleryExecutor, workers ${WORKERS[*]} (concurrency $CONCURRENCY each), PostgreSQL on 127.0.0.1:$PG_PORT, Redis on 127.0.0.1:$REDIS_PORT"
else
  STACK="LocalExecutor, SQLite"
fi
cat <<EOF

Airflow is up ($STACK; listening on 127.0.0.1 only).
  UI:     http://127.0.0.1:$PORT
  login:  $LOGIN
  DAGs:   export_nightly__demo, export_after_training__demo, export_backfill__demo
          (configs: ${TF_EXPORT_CONFIG_DIR:-dags/configs}; versions land in build/airflow-demo/serving/demo_regressor)
  logs:   $LOGS
Ctrl-C (or SIGTERM to this script, pid $$) stops Airflow.
EOF
wait
