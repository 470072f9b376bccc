"""A distributed Airflow on loopback: CeleryExecutor, PostgreSQL metadata DB, Redis broker, two workers.

:class:`Postgres` runs the distribution's server (``/usr/lib/postgresql/<v>/bin``)
in a temporary directory as the OS user ``postgres`` (the server refuses root),
listening on 127.0.0.1 and a socket in that directory, with fsync off: a
throw-away database. :class:`Redis` runs ``redis-server`` on a free loopback
port, without persistence. :class:`CeleryAirflow` is :class:`~tests.airflow.live.LiveAirflow`
(api-server, scheduler, dag-processor, triggerer) on those two, plus Celery
workers, each in its own session and working directory and, when we are root,
in its own UTS namespace (``unshare -u``) with a hostname of its own, so the
task instances' ``hostname`` says which worker ran them. Without root the
workers differ by ``--celery-hostname`` and by :func:`worker_hostname`.

A worker killed with SIGKILL (:meth:`CeleryAirflow.kill_worker`, every process
of its session) leaves its running tasks without heartbeat; the scheduler
fails them after ``[scheduler] task_instance_heartbeat_timeout`` and, with
retries left, runs them again on the worker that is left. The settings that
make that quick are in :data:`CELERY_ENV`.

Used by tests/airflow/test_celery.py and bench/celery_scale.py. Every wait is
bounded and says what it waited for; :meth:`CeleryAirflow.stop` ends every
process started here, the database and the broker included.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.airflow.conftest import AIRFLOW
from tests.airflow.live import LiveAirflow, free_port, wait_for

WORKER_HOST_VAR = "TF_EXPORT_TEST_WORKER_HOST"

#: What makes a lost worker's tasks run again elsewhere, quickly (Airflow 3.3, celery provider 3.x).
CELERY_ENV = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    # Acknowledge a Celery message only when its task is done (the provider's default, set to be sure),
    # one message per pool process at a time: a worker never holds queued work it is not running.
    "AIRFLOW__CELERY__TASK_ACKS_LATE": "True",
    "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
    "AIRFLOW__CELERY__WORKER_ENABLE_REMOTE_CONTROL": "False",
    "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
    # Workers import TensorFlow once, before their pool forks the task processes (as deployed).
    "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "tf_export_pipeline.operators.celery_worker.CELERY_CONFIG",
    # An unacknowledged message goes back to the queue after this long (Redis): longer than any task here.
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "3600",
    # A task whose supervisor stopped heartbeating (its worker is gone) is failed by the scheduler
    # after this many seconds, and retried (task retries come from the DAG's default_args).
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    # The supervisor beside each task heartbeats at least this often.
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "2",
    # A message a dead worker had taken but not started: its task instance stays queued; the scheduler
    # puts it back after this many seconds.
    "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "240",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
}


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the workers: the name given to this worker, else the host's name.

    No DNS look-up (``getfqdn`` of a name set in a private UTS namespace may wait for a resolver)."""
    return os.environ.get(WORKER_HOST_VAR) or socket.gethostname()


def can_unshare_uts() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-u", "true"], capture_output=True).returncode == 0


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise FileNotFoundError("no PostgreSQL server binaries (initdb, postgres): apt-get install postgresql")


def _stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, wait: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


class Postgres:
    """A PostgreSQL server of its own in a temporary directory; trust authentication on loopback."""

    def __init__(self, user: str = "airflow", database: str = "airflow"):
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="tf-export-pg-"))
        self.data, self.sock, self.log = self.root / "data", self.root / "sock", self.root / "postgres.log"
        self.port = free_port()
        self.user, self.database = user, database
        self.os_user = "postgres" if os.geteuid() == 0 else None  # the server refuses to run as root
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def start(self, limit: float = 60) -> Postgres:
        if self.os_user:
            shutil.chown(self.root, self.os_user)
        self.sock.mkdir()
        if self.os_user:
            shutil.chown(self.sock, self.os_user)
        init = subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                               "-E", "UTF8", "--no-sync", "--no-instructions"],
                              capture_output=True, text=True, user=self.os_user, timeout=120)
        assert init.returncode == 0, f"initdb failed:\n{init.stdout[-1500:]}{init.stderr[-1500:]}"
        out = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.sock), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=300", "-c", "shared_buffers=64MB"],
            stdout=out, stderr=subprocess.STDOUT, user=self.os_user, start_new_session=True)
        wait_for(f"PostgreSQL to accept connections on 127.0.0.1:{self.port}", self._ready, limit, interval=0.05,
                 on_timeout=lambda: self.log.read_text(errors="replace")[-2000:])
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.database}"')
        conn.close()
        return self

    def _ready(self) -> bool:
        import psycopg2

        if self.proc.poll() is not None:
            raise AssertionError(f"postgres exited with {self.proc.returncode}\n"
                                 f"{self.log.read_text(errors='replace')[-2000:]}")
        try:
            psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            return False

    def stop(self) -> None:
        _stop_group(self.proc, signal.SIGQUIT, wait=10)  # immediate shutdown: a throw-away database
        shutil.rmtree(self.root, ignore_errors=True)


class Redis:
    """``redis-server`` on a free loopback port, nothing saved to disk."""

    def __init__(self):
        self.exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(self.exe):
            raise FileNotFoundError("no redis-server: apt-get install redis-server")
        self.root = Path(tempfile.mkdtemp(prefix="tf-export-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, limit: float = 30) -> Redis:
        self.wait_ready(self.start_soon(), limit)
        return self

    def start_soon(self) -> float:
        """Start the server without waiting for it; returns the start time for :meth:`wait_ready`."""
        out = open(self.root / "redis.log", "wb")
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root), "--daemonize", "no", "--protected-mode", "yes"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return time.monotonic()

    def wait_ready(self, started: float, limit: float = 30) -> None:
        wait_for(f"redis-server to answer PING on 127.0.0.1:{self.port}", self._ready,
                 max(limit - (time.monotonic() - started), 1), interval=0.05,
                 on_timeout=lambda: (self.root / "redis.log").read_text(errors="replace")[-2000:])

    def _ready(self) -> bool:
        import redis

        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}\n"
                                 f"{(self.root / 'redis.log').read_text(errors='replace')[-2000:]}")
        try:
            return bool(redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        _stop_group(self.proc, signal.SIGTERM, wait=10)
        shutil.rmtree(self.root, ignore_errors=True)


class CeleryAirflow(LiveAirflow):
    """LiveAirflow on PostgreSQL and Redis with the CeleryExecutor and ``workers`` Celery workers."""

    def __init__(self, home: Path, extra_env: dict[str, str], workers: tuple[str, ...] = ("worker-a", "worker-b"),
                 concurrency: int = 2):
        self.postgres = Postgres()
        self.redis = Redis()
        self.worker_names = workers
        self.concurrency = concurrency
        self.unshare = can_unshare_uts()
        super().__init__(home, {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.url,
            "AIRFLOW__CELERY__BROKER_URL": self.redis.url,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.postgres.url}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
            # as many task slots as the workers have: tasks wait in the scheduler, not in the broker
            "AIRFLOW__CORE__PARALLELISM": str(concurrency * len(workers)),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.airflow.celery_cluster.worker_hostname",
            # the same signing key in every process: the scheduler signs the workloads' tokens
            "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(32).hex(),
            "AIRFLOW__API__SECRET_KEY": os.urandom(16).hex(),
            **CELERY_ENV,
            **extra_env,
        })
        self.prepared = False
        self.workers: dict[str, subprocess.Popen] = {}
        self.worker_env: dict[str, dict[str, str]] = {}  # extra environment of one worker
        self.killed: set[str] = set()

    def start(self, limit: float = 240, migrated: Path | None = None) -> CeleryAirflow:
        """:meth:`prepare` (unless done), then the components and the workers, started side by side (a worker
        needs only the migrated database and the broker to start); returns once all of them are ready."""
        t0 = time.monotonic()
        try:
            if not self.prepared:
                self.prepare(migrated)
            self.launch()
            for name in self.worker_names:
                self.start_worker(name)
            self.wait_healthy(limit)
            for name in self.worker_names:
                wait_for(f"Celery worker {name} to be ready", lambda n=name: self._worker_ready(n), limit,
                         interval=0.2, on_timeout=self.tails)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def prepare(self, migrated: Path | None = None) -> CeleryAirflow:
        """PostgreSQL and Redis started and the metadata database migrated: what :meth:`start` needs first, which
        a caller may do (in a thread) while it makes something else, such as the models' checkpoints."""
        try:
            redis = self.redis.start_soon()
            self.postgres.start()
            self.redis.wait_ready(redis)
            self.migrate(migrated)
        except BaseException:
            self.stop()
            raise
        self.prepared = True
        return self

    def start_worker(self, name: str) -> None:
        workdir = self.home / "workers" / name
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        cmd = [AIRFLOW, "celery", "worker", "--concurrency", str(self.concurrency),
               "--celery-hostname", f"celery@{name}", "--skip-serve-logs"]
        if self.unshare:  # a UTS namespace of its own: the worker's real hostname is `name`
            cmd = ["unshare", "-u", "sh", "-c", f'hostname {name} && exec "$@"', "sh", *cmd]
        env = {**self.env, WORKER_HOST_VAR: name, "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(workdir / "logs"),
               **self.worker_env.get(name, {})}
        out = open(self.logs / f"{name}.log", "wb")
        self.workers[name] = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True)
        self.killed.discard(name)

    def _worker_ready(self, name: str) -> bool:
        proc = self.workers[name]
        if proc.poll() is not None:
            raise AssertionError(f"worker {name} exited with {proc.returncode}\n{self.tails()}")
        return f"celery@{name} ready" in (self.logs / f"{name}.log").read_text(errors="replace")

    def sessions(self) -> set[int]:
        return {p.pid for p in self.procs.values()} | {p.pid for p in self.workers.values()}

    def pids(self) -> list[int]:
        import psutil

        sessions = self.sessions()
        out = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) in sessions:
                    out.append(proc.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return out

    def worker_pids(self, name: str) -> list[int]:
        """Every process of a worker's session: the worker, its pool, the task supervisors and tasks."""
        import psutil

        sid = self.workers[name].pid
        out = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) == sid:
                    out.append(proc.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return out

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL to every process of the worker's session (its process group and the task processes'
        groups in it); returns the pids killed."""
        pids = self.worker_pids(name)
        try:
            os.killpg(self.workers[name].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.workers[name].wait(timeout=30)
        wait_for(f"every process of worker {name} to be gone", lambda: not self.worker_pids(name), 30)
        self.killed.add(name)
        return pids

    def stop(self) -> None:
        """The workers and the components stopped together (SIGTERM, a short grace, then SIGKILL to every process
        of their sessions), then the broker and the database."""
        if self._client is not None:
            self._client.close()
        try:
            self._stop_sessions([*self.workers.values(), *self.procs.values()])
        finally:
            self.redis.stop()
            self.postgres.stop()

    def task_log(self, dag_id: str, run_id: str, task_id: str, lines: int = 60) -> str:
        """A task's log files, from every worker's log folder (each worker writes its own)."""
        out = []
        pattern = f"workers/*/logs/dag_id={dag_id}/run_id={run_id}/task_id={task_id}/**/*.log"
        for path in sorted(self.home.glob(pattern)):
            out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # -- reading the metadata database --------------------------------------------------
    def sql(self, query: str, *args) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.postgres.port, user=self.postgres.user,
                                dbname=self.postgres.database)
        try:
            with conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall()
        finally:
            conn.close()

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=1000)["task_instances"]

    def tries(self, dag_id: str, run_id: str) -> list[dict]:
        """Every try of every task of a run (the task instance history and the current try)."""
        rows = self.sql(
            "SELECT task_id, map_index, try_number, state, hostname FROM task_instance_history "
            "WHERE dag_id = %s AND run_id = %s UNION ALL "
            "SELECT task_id, map_index, try_number, state, hostname FROM task_instance "
            "WHERE dag_id = %s AND run_id = %s", dag_id, run_id, dag_id, run_id)
        return [dict(zip(("task_id", "map_index", "try_number", "state", "hostname"), r)) for r in rows]
