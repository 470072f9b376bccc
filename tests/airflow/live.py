"""A real Airflow on loopback: api-server, scheduler, dag-processor and triggerer as four processes.

LocalExecutor, SQLite, a temporary AIRFLOW_HOME. Each component runs in its
own session (process group), killed at :meth:`LiveAirflow.stop`. The
scheduler and the triggerer start without their log servers (which would
listen on every interface); the api-server listens on 127.0.0.1 only.
Every wait is bounded and says what it waited for.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.airflow.conftest import AIRFLOW, airflow_env

COMPONENTS = {
    "api-server": ["api-server"],
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, predicate: Callable[[], Any], limit: float, interval: float = 0.25,
             on_timeout: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + limit
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {limit:.0f} s waiting for {what}\n{detail}")
        time.sleep(interval)


class LiveAirflow:
    def __init__(self, home: Path, extra_env: dict[str, str]):
        self.home = home
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **airflow_env(home),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            # the same signing keys in every component (the scheduler signs the workloads' tokens)
            "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(32).hex(),
            "AIRFLOW__API__SECRET_KEY": os.urandom(16).hex(),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            # Task logs served on loopback by one process of our own (see operators/local_logs.py).
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tf_export_pipeline.operators.local_logs.loopback_hostname",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            **extra_env,
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = home / "component-logs"
        self._client = None

    # -- processes ---------------------------------------------------------------
    def start(self, limit: float = 180, migrated: Path | None = None) -> LiveAirflow:
        """Migrate the metadata database and start the components; returns once all four are healthy.

        With ``migrated`` (an SQLite database ``airflow db migrate`` made, see
        ``tests.airflow.conftest.migrated_database``) and an SQLite connection, the database starts as a copy of
        it instead of being migrated anew."""
        self.migrate(migrated)
        self.launch()
        self.wait_healthy(limit)
        return self

    def migrate(self, migrated: Path | None = None) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        conn = self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        if migrated is not None and conn.startswith("sqlite:///"):
            shutil.copy2(migrated, conn[len("sqlite:///"):])
            # What the migration's Airflow would write first: a config file, so that the components started next
            # do not each write one of their own (with secrets of their own) at once. The settings are in
            # self.env; the signing keys too, shared by every component.
            (self.home / "airflow.cfg").write_text("# settings: AIRFLOW__* in the environment (live.py)\n")
            return
        migrate = subprocess.run([AIRFLOW, "db", "migrate"], env=self.env, capture_output=True, text=True,
                                 timeout=300)
        assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]

    def launch(self) -> None:
        """Start the components (and the log server) without waiting for them."""
        commands = {name: [AIRFLOW, *args] for name, args in COMPONENTS.items()}
        commands["log-server"] = [sys.executable, "-m", "tf_export_pipeline.operators.local_logs"]
        for name, command in commands.items():
            out = open(self.logs / f"{name}.log", "wb")
            self.procs[name] = subprocess.Popen(command, env=self.env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, limit: float = 180) -> None:
        wait_for("all four components healthy", self._healthy, limit, interval=0.2, on_timeout=self.tails)

    def _healthy(self) -> bool:
        import httpx

        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}\n{self.tails()}")
        try:
            health = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        return all((health.get(k) or {}).get("status") == "healthy"
                   for k in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

    def pids(self) -> list[int]:
        """Every process of the four components' sessions (their workers and task processes too)."""
        import psutil

        out = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getsid(proc.pid) in {p.pid for p in self.procs.values()}:
                    out.append(proc.pid)
            except (ProcessLookupError, PermissionError):
                continue
        return out

    def listening(self) -> set[str]:
        """The addresses the components listen on."""
        import psutil

        found = set()
        for pid in self.pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            found |= {f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN}
        return found

    #: How long the components get to exit after SIGTERM before every process of their sessions gets SIGKILL.
    #: Nothing here needs a graceful exit (a throw-away home and database), and some components take seconds
    #: to wind down: a short grace, then SIGKILL.
    STOP_GRACE = 2.0

    def stop(self) -> None:
        """SIGTERM to each component's process group, then SIGKILL to whatever is left in their sessions
        (task processes run in process groups of their own)."""
        if self._client is not None:
            self._client.close()
        self._stop_sessions(list(self.procs.values()))

    def _stop_sessions(self, procs: list[subprocess.Popen]) -> None:
        """SIGTERM to every process group of ``procs`` at once, :attr:`STOP_GRACE` seconds for all of them
        together, then SIGKILL to every process left in their sessions; waits for each of ``procs``."""
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.STOP_GRACE
        for proc in procs:
            try:
                proc.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # Every process left in their sessions (by session id, which a process keeps when its parent is gone),
        # again until none is left: one may have forked after the first look (a pool replacing a child).
        deadline = time.monotonic() + 15
        while (left := self.pids()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for proc in procs:
                proc.poll()  # reaps a component that is gone
            time.sleep(0.05)
        for proc in procs:
            proc.wait(timeout=10)

    def tails(self, lines: int = 25) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def task_log(self, dag_id: str, run_id: str, task_id: str, lines: int = 60) -> str:
        out = []
        for path in sorted((self.home / "logs").glob(f"dag_id={dag_id}/run_id={run_id}/task_id={task_id}/**/*.log")):
            out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    # -- REST ----------------------------------------------------------------------
    @property
    def client(self):
        import httpx

        if self._client is None:
            token = httpx.get(f"{self.base_url}/auth/token", timeout=10).json()["access_token"]
            self._client = httpx.Client(base_url=self.base_url, timeout=15,
                                        headers={"Authorization": f"Bearer {token}"})
        return self._client

    def get(self, path: str, **params) -> Any:
        r = self.client.get(path, params=params or None)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict) -> Any:
        r = self.client.post(path, json=body)
        assert r.status_code in (200, 201), f"POST {path}: {r.status_code} {r.text[:500]}"
        return r.json()

    def wait_dag(self, dag_id: str, limit: float = 120) -> dict:
        def registered():
            r = self.client.get(f"/api/v2/dags/{dag_id}")
            return r.json() if r.status_code == 200 else None

        return wait_for(f"DAG {dag_id} to be parsed", registered, limit, interval=0.25, on_timeout=self.tails)

    def asset_id(self, uri: str) -> int:
        assets = self.get("/api/v2/assets", uri_pattern=uri)["assets"]
        [asset] = [a for a in assets if a["uri"] == uri]
        return asset["id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns", order_by="-run_after", limit=20)["dag_runs"]

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int | None = None) -> dict:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        if map_index is not None:
            path += f"/{map_index}"
        r = self.client.get(path)
        return r.json() if r.status_code == 200 else {}

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int | None = None) -> Any:
        params = {"map_index": map_index} if map_index is not None else {}
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
                        **params)["value"]

    def wait_run_done(self, dag_id: str, run_id: str, limit: float) -> dict:
        def done():
            run = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            return run if run["state"] in ("success", "failed") else None

        def why() -> str:
            tis = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
            states = ", ".join(f"{t['task_id']}[{t['map_index']}]={t['state']}" for t in tis)
            return f"task states: {states}\n{self.tails()}"

        return wait_for(f"run {run_id} of {dag_id} to finish", done, limit, interval=0.25, on_timeout=why)
