"""``export_finish__<model>``: promotions cut short are finished on a short schedule, not at the next export.

Built for every config whose export base is a cloud URL (``airflow.finish_schedule: auto``: every 3
minutes, inside TF Serving's 5 load retries a minute apart), for a local one only when asked (a rename
leaves nothing half-moved), never with ``finish_schedule: null``. A run of it finishes a publish whose
process was SIGKILLed after its commit point.
"""

from __future__ import annotations

import json

import pytest

from tests.airflow.conftest import model_dags, task_states, versions, xcom
from tests.airflow.test_dags_local import parse_in_fresh_process
from tests.conftest import kill_at_hold, run_cli

pytestmark = pytest.mark.timeout(300, method="thread")


def test_finish_dag_for_cloud_export_bases_and_when_asked(tmp_path):
    from tf_export_pipeline.config import FINISH_EVERY
    from tf_export_pipeline.demo import write_config

    folder = tmp_path / "configs"
    folder.mkdir()
    cloud = {"export_base": "gs://models-bucket/m/serving", "training_dir": "gs://models-bucket/m/train"}
    write_config(str(folder), name="cloud.yaml", **cloud)
    write_config(str(folder), name="cloud_off.yaml", **cloud, airflow={"finish_schedule": None})
    write_config(str(folder), name="local.yaml")
    write_config(str(folder), name="local_on.yaml", airflow={"finish_schedule": "*/10 * * * *"})
    out = parse_in_fresh_process({"TF_EXPORT_CONFIG_DIR": str(folder)})
    assert out["import_errors"] == {} and out["tensorflow"] is False
    finish = {d: v for d, v in out["dags"].items() if d.startswith("export_finish__")}
    assert sorted(finish) == ["export_finish__cloud", "export_finish__local_on"]
    assert finish["export_finish__cloud"]["schedule"] == FINISH_EVERY == "*/3 * * * *"
    assert finish["export_finish__local_on"]["schedule"] == "*/10 * * * *"
    assert {t: v["type"] for t, v in finish["export_finish__cloud"]["tasks"].items()} == {
        "finish": "FinishPublishesOperator"}


def test_a_finish_schedule_that_is_not_cron_is_refused(tmp_path):
    from tf_export_pipeline.demo import write_config

    config = write_config(str(tmp_path), airflow={"finish_schedule": "every 3 minutes"})
    res = run_cli("status", "--config", config)
    assert res.rc == 2 and "airflow.finish_schedule" in res.err and "not a cron expression" in res.err, res.err


def test_a_run_of_the_finish_dag_finishes_a_publish_killed_after_its_commit(tmp_path, trained_dir):
    m = model_dags(tmp_path / "ws", "finisher", trained_dir, versioning="step",
                   airflow={"finish_schedule": "@hourly"})
    base = m.config.parent / "serving" / "demo_regressor"
    kill_at_hold("ledgered", "run", "--json", "--config", str(m.config))
    [entry] = [json.loads(p.read_text()) for p in (base / "_exports" / "ledger").iterdir()]
    assert versions(base) == []  # committed, not promoted

    dr = m.test("finish")
    assert task_states(dr) == {"finish": ["success"]}
    assert xcom(dr, "finish") == {"finished": [entry["version"]]} and entry["version"] == 30
    assert versions(base) == [30]
    again = m.test("finish")
    assert xcom(again, "finish") == {"finished": []}
