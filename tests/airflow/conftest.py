"""Real Airflow for the tests in this folder: a temporary AIRFLOW_HOME with SQLite, migrated once.

Airflow reads its configuration when it is first imported, so the environment
is set by a package-scoped fixture before any test here imports it, and put
back when the last test of this folder is done: the other tests never see it.
Test modules here import Airflow (and ``operators``, which imports it) inside
their tests and fixtures, never at module level.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, made_once, shared_dir, validations_forked

DAG_FILE = REPO / "dags" / "tf_export_dags.py"
AIRFLOW = str(Path(sys.executable).parent / "airflow")


def airflow_env(home: Path) -> dict[str, str]:
    """The settings every Airflow process of these tests shares."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # dag.test() runs retries inline: none here, so a failing task fails at once.
        "TF_EXPORT_RETRIES": "0",
        "TF_EXPORT_POKE_SECONDS": "0.5",
        "TF_EXPORT_WAIT_SECONDS": "120",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }


def migrated_database(tmp_path_factory) -> Path:
    """An SQLite metadata database after ``airflow db migrate``, made once per test session; each
    worker's home starts from a copy of it."""
    folder = shared_dir(tmp_path_factory) / "airflow-migrated"
    with made_once(folder) as make:
        if make:
            env = {**os.environ, **airflow_env(folder)}
            env.pop("TF_EXPORT_CONFIG_DIR", None)
            t0 = time.monotonic()
            proc = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            print(f"airflow db migrate: {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return folder / "airflow.db"


@pytest.fixture(scope="package", autouse=True)
def airflow_home(tmp_path_factory):
    database = migrated_database(tmp_path_factory)
    home = Path(tempfile.mkdtemp(prefix="tf-export-airflow-"))
    shutil.copy2(database, home / "airflow.db")
    patch = pytest.MonkeyPatch()
    for key, value in airflow_env(home).items():
        patch.setenv(key, value)
    patch.delenv("TF_EXPORT_CONFIG_DIR", raising=False)
    try:
        yield home
    finally:
        patch.undo()
        shutil.rmtree(home, ignore_errors=True)


# -- reading what a run left in the metadata database ------------------------------------
def xcom(dr, task_id: str, map_index: int | None = None, key: str = "return_value"):
    """XCom values of a finished DagRun; a mapped task gives the list in map-index order."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as s:
        q = XComModel.get_many(run_id=dr.run_id, dag_ids=dr.dag_id, task_ids=task_id, key=key,
                               map_indexes=map_index)
        rows = s.scalars(q.order_by(None).order_by(XComModel.map_index)).all()
        values = [XComModel.deserialize_value(r) for r in rows]
    if map_index is not None or (len(values) == 1 and rows[0].map_index < 0):
        return values[0] if values else None
    return values


def as_list(value) -> list:
    """A publish over a mapped task's results returns a list, or one record when one instance ran."""
    return value if isinstance(value, list) else [value]


def task_states(dr) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ti in sorted(dr.get_task_instances(), key=lambda t: (t.task_id, t.map_index)):
        out.setdefault(ti.task_id, []).append(str(ti.state))
    return out


def asset_events(run_id: str) -> list[tuple[str, dict]]:
    """(asset URI, extra) of the asset events a run emitted."""
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as s:
        events = s.scalars(select(AssetEvent).where(AssetEvent.source_run_id == run_id)
                           .order_by(AssetEvent.id)).all()
        return [(e.asset.uri, dict(e.extra or {})) for e in events]


def deferred_triggers() -> int:
    """How many triggers of this project are in the database (a deferred sensor has one)."""
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as s:
        return s.scalar(select(func.count()).select_from(Trigger)
                        .where(Trigger.classpath.like("tf_export_pipeline.operators.triggers.%")))


class WhenDeferred:
    """Runs ``action`` in a thread once a sensor of this project has deferred to its trigger.

    ``deferred`` says whether that happened (so a test knows the trigger, not
    the sensor's first look, found the checkpoint).
    """

    def __init__(self, action, settle: float = 1.5, limit: float = 120.0):
        from airflow.models.trigger import Trigger  # noqa: F401  (imported here first: not from two threads)

        self.action, self.settle, self.limit = action, settle, limit
        self.deferred = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while deferred_triggers() == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        self.deferred = True
        time.sleep(self.settle)  # the trigger polls a few times and finds nothing yet
        self.action()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(timeout=10)


def register_dag(dag) -> None:
    """``dag.test()`` runs only DAGs serialized in the database (found in a bundle, normally the DAGs
    folder); a DAG built inside a test is written there first."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=os.devnull, collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)


# -- DAGs of one model config ---------------------------------------------------------
@dataclass
class ModelDags:
    model: str
    config: Path

    @contextlib.contextmanager
    def config_dir(self):
        """TF_EXPORT_CONFIG_DIR set to this model's folder while the DAG file is parsed (and run)."""
        before = os.environ.get("TF_EXPORT_CONFIG_DIR")
        os.environ["TF_EXPORT_CONFIG_DIR"] = str(self.config.parent)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TF_EXPORT_CONFIG_DIR", None)
            else:
                os.environ["TF_EXPORT_CONFIG_DIR"] = before

    def dag(self, kind: str):
        """A DAG of this model, parsed from the real DAG file with this config folder."""
        from airflow.dag_processing.dagbag import DagBag

        with self.config_dir():
            bag = DagBag(dag_folder=str(DAG_FILE))
        assert bag.import_errors == {}, bag.import_errors
        return bag.dags[f"export_{kind}__{self.model}"]

    def test(self, kind: str, conf: dict | None = None):
        """A run of the DAG by ``dag.test()``: its tasks run in this process, their validation processes
        forked as a forked command's are."""
        t0 = time.monotonic()
        dag = self.dag(kind)
        with self.config_dir(), validations_forked():
            dr = dag.test(run_conf=conf)
        print(f"dag.test export_{kind}__{self.model}: {dr.state} in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
        return dr


def model_dags(workdir: Path, model: str, trained_dir: Path | None = None, **overrides) -> ModelDags:
    """A config ``<workdir>/<model>.yaml`` for the demo model (its own folder, so one model per folder)."""
    from tf_export_pipeline.demo import write_config

    workdir.mkdir(parents=True, exist_ok=True)
    if trained_dir is not None:
        shutil.copytree(trained_dir, workdir / "train")
    config = Path(write_config(str(workdir), name=f"{model}.yaml", **overrides))
    return ModelDags(model, config)


def versions(base: Path) -> list[int]:
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit()) if base.exists() else []


def manifest(base: Path, version: int) -> dict:
    return json.loads((base / str(version) / "assets.extra" / "export_manifest.json").read_text())
