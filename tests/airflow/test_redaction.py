"""No secret through Airflow: the trigger's events and log, operator errors, XCom and the task log.

The leak is produced by the real parts: a connection whose storage options
hold a raw token (gcsfs sends it to Google's tokeninfo endpoint as
``?access_token=...``) while HTTPS goes through a proxy on a closed port, so
requests fails at once with an error that names the URL, token included, as
it would on any network failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
import uuid

import pytest

from tests.airflow.conftest import model_dags, register_dag, task_states, xcom

pytestmark = pytest.mark.timeout(120, method="thread")

CLOSED = "http://127.0.0.1:1"
CONN_ID = "leaky_gcs"


@pytest.fixture
def leaky(tmp_path, monkeypatch):
    """(config path, the raw token): a GCS config whose connection holds a raw token, every request refused."""
    token = f"ya29.raw-{uuid.uuid4().hex}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({
        "conn_type": "google_cloud_platform",
        "extra": {"project": "proj-redact", "storage_options": {"token": token, "endpoint_url": CLOSED}}}))
    monkeypatch.setenv("HTTPS_PROXY", CLOSED)
    monkeypatch.setenv("https_proxy", CLOSED)
    for name in ("NO_PROXY", "no_proxy", "FETCH_RAW_TOKEN_EXPIRY"):
        monkeypatch.delenv(name, raising=False)
    m = model_dags(tmp_path, "leaky", training_dir="gs://bucket/train", export_base="gs://bucket/serving",
                   airflow={"conn_id": CONN_ID})
    return m, token


async def _events(trigger) -> list[dict]:
    return [event.payload async for event in trigger.run()]


def test_trigger_event_and_log_carry_no_secret(leaky, caplog, capfd):
    from tf_export_pipeline.operators.triggers import MAX_ERRORS_IN_A_ROW, NewCheckpointTrigger

    m, token = leaky
    trigger = NewCheckpointTrigger(config_path=str(m.config), conn_id=CONN_ID, poll_interval=0.01, max_polls=50)
    classpath, kwargs = trigger.serialize()
    assert token not in json.dumps(kwargs)  # what the triggerer stores names the connection, not its options
    with caplog.at_level(logging.INFO):
        [event] = asyncio.run(_events(trigger))
    assert event["status"] == "error" and event["polls"] == MAX_ERRORS_IN_A_ROW
    # The real error did carry the token in a URL: it is there, masked.
    assert "ProxyError" in event["message"] and "/tokeninfo?access_token=***" in event["message"]
    out, err = capfd.readouterr()
    for shown in (json.dumps(event), caplog.text, out, err):
        assert token not in shown
    assert "poll 1 failed" in caplog.text or "poll 1 failed" in out + err


def test_operator_failure_and_sensor_carry_no_secret(leaky):
    from airflow.sdk.exceptions import AirflowFailException

    from tf_export_pipeline.operators.export import DiscoverCheckpointsOperator
    from tf_export_pipeline.operators.sensors import NewCheckpointSensor

    m, token = leaky
    for task in (DiscoverCheckpointsOperator(task_id="discover", config_path=str(m.config)),
                 NewCheckpointSensor(task_id="wait", config_path=str(m.config), deferrable=False)):
        with pytest.raises(Exception) as caught:
            task.execute(context={})
        err = caught.value
        shown = "".join(traceback.format_exception(err))
        assert token not in shown, shown[-2000:]
        assert "access_token=***" in shown
        assert not isinstance(err, AirflowFailException)  # a storage error: left to the retries, as before


def test_airflow_masker_learns_the_secrets_of_connection_and_config(leaky, tmp_path):
    """structlog loggers (a task's ``self.log``) bypass stdlib filters; Airflow's own masker hides them there."""
    from airflow.sdk._shared.secrets_masker import redact as airflow_redact

    from tf_export_pipeline.operators.base import load

    m, token = leaky
    header = f"header-{uuid.uuid4().hex}"
    cfg_only = model_dags(tmp_path / "other", "other", training_dir="gs://bucket/train",
                          export_base="gs://bucket/serving",
                          storage_options={"token": "anon", "session_kwargs": {"headers": {"X-Credential": header}}})
    load(str(m.config))
    load(str(cfg_only.config))
    assert token not in str(airflow_redact(f"url ?x={token}"))
    assert header not in str(airflow_redact(f"sent {header}"))


def test_dag_run_with_a_failing_storage_leaves_no_secret_in_the_task_log_or_xcom(leaky, capfd):
    import pendulum
    from airflow.sdk import DAG

    from tf_export_pipeline.operators.export import DiscoverCheckpointsOperator

    m, token = leaky
    with DAG("redaction_discover", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
             catchup=False) as dag:
        DiscoverCheckpointsOperator(task_id="discover", config_path=str(m.config), retries=0)
    register_dag(dag)
    dr = dag.test()
    out, err = capfd.readouterr()
    assert task_states(dr) == {"discover": ["failed"]}
    assert token not in out + err
    assert "access_token=***" in out + err  # the task log shows the failure, masked
    assert token not in json.dumps(xcom(dr, "discover"), default=str)
