"""The pieces under the DAGs: connections to storage options, checkpoint selection, the trigger, the sensor's modes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.airflow.conftest import model_dags, register_dag, task_states, xcom

pytestmark = pytest.mark.timeout(240, method="thread")


# -- connections -------------------------------------------------------------------------
def _conn(conn_type: str, extra: dict | None = None, **fields):
    from airflow.sdk import Connection

    return Connection(conn_id="storage_conn", conn_type=conn_type, extra=json.dumps(extra or {}), **fields)


def test_google_connection_becomes_gcsfs_options():
    from tf_export_pipeline.operators.connections import options_from_connection

    keyfile = {"type": "service_account", "project_id": "proj-a", "client_email": "exporter@proj-a.iam"}
    assert options_from_connection(_conn("google_cloud_platform", {"keyfile_dict": json.dumps(keyfile),
                                                                   "project": "proj-a"})) == \
        {"token": keyfile, "project": "proj-a"}
    assert options_from_connection(_conn("google_cloud_platform", {
        "extra__google_cloud_platform__key_path": "/secrets/sa.json",
        "extra__google_cloud_platform__project": "proj-b"})) == {"token": "/secrets/sa.json", "project": "proj-b"}
    assert options_from_connection(_conn("google_cloud_platform")) == {"token": "google_default"}
    assert options_from_connection(_conn("google_cloud_platform", {
        "anonymous": True, "gcs.endpoint": "http://127.0.0.1:4443", "gcs.requester-pays": "true",
        "gcs.session-kwargs": '{"trust_env": false}'})) == {
        "token": "anon", "endpoint_url": "http://127.0.0.1:4443", "requester_pays": True,
        "session_kwargs": {"trust_env": False}}


def test_aws_and_generic_connections_and_a_clear_error_for_others():
    from tf_export_pipeline.operators.connections import ConnectionOptionsError, options_from_connection

    assert options_from_connection(_conn("aws", {"endpoint_url": "http://minio:9000", "region_name": "eu-west-1"},
                                         login="AKIA123", password="s3cr3t-value")) == {
        "key": "AKIA123", "secret": "s3cr3t-value", "endpoint_url": "http://minio:9000",
        "client_kwargs": {"region_name": "eu-west-1"}}
    assert options_from_connection(_conn("generic", {"storage_options": {"anon": True}})) == {"anon": True}
    assert options_from_connection(_conn("google_cloud_platform", {"storage_options": {"token": "cloud"}}))["token"] \
        == "cloud"
    with pytest.raises(ConnectionOptionsError, match="'storage_conn' has type 'postgres'"):
        options_from_connection(_conn("postgres"))


def test_config_takes_the_connection_named_in_it(tmp_path, monkeypatch):
    from tf_export_pipeline.operators.base import load

    monkeypatch.setenv("AIRFLOW_CONN_MODELS_BUCKET", json.dumps(
        {"conn_type": "google_cloud_platform", "extra": {"project": "proj-c", "anonymous": True}}))
    m = model_dags(tmp_path, "conn", storage_options={"endpoint_url": "http://127.0.0.1:1"},
                   airflow={"conn_id": "models_bucket"})
    cfg = load(str(m.config))
    assert cfg.storage_options == {"endpoint_url": "http://127.0.0.1:1", "token": "anon", "project": "proj-c"}
    assert load(str(m.config), conn_id="models_bucket").config_hash == cfg.config_hash  # not part of the ledger key


# -- which checkpoint counts as new ------------------------------------------------------------
def _rec(name, step, complete=True, version=None, listed=True, missing=(), crc="AAAA"):
    return {"prefix": f"/t/{name}", "name": name, "step": step, "written_at": float(step), "complete": complete,
            "version": version, "listed": listed, "missing": list(missing), "index_crc32c": crc if complete else None,
            "writing": False}


def test_new_checkpoint_waits_for_one_being_written_and_ignores_abandoned_ones():
    from tf_export_pipeline.operators.selection import in_progress, new_checkpoint, newest

    done10, done20 = _rec("ckpt-10", 10, version=111), _rec("ckpt-20", 20)
    writing30 = _rec("ckpt-30", 30, complete=False, listed=False, missing=["ckpt-30.index"])
    abandoned5 = _rec("ckpt-5", 5, complete=False, listed=False, missing=["ckpt-5.index"])
    assert in_progress(writing30) and not in_progress(done20)
    assert new_checkpoint([done10, done20, writing30]) is None  # wait: ckpt-30 is on its way
    assert new_checkpoint([abandoned5, done10, done20])["name"] == "ckpt-20"
    assert new_checkpoint([abandoned5, done10, done20])["pending"] == 1
    assert new_checkpoint([done10]) is None  # everything has a version
    assert new_checkpoint([done10, writing30], "ckpt-30") is None
    assert new_checkpoint([done10, writing30], "/t/ckpt-10")["version"] == 111  # named and complete
    assert new_checkpoint([done10, done20], "20")["name"] == "ckpt-20"
    assert newest([done10, done20, writing30])["name"] == "ckpt-20"


def test_only_checkpoints_newer_than_the_exported_ones_are_new():
    from tf_export_pipeline.operators.selection import new_checkpoint, new_since_exported

    straggler10, live20 = _rec("ckpt-10", 10), _rec("ckpt-20", 20, version=222)
    done30, done40 = _rec("ckpt-30", 30), _rec("ckpt-40", 40)
    # ckpt-10 was never exported; after the live ckpt-20 it would be served above it: left to a backfill.
    assert [r["name"] for r in new_since_exported([straggler10, live20, done30, done40])] == ["ckpt-30", "ckpt-40"]
    assert new_since_exported([straggler10, live20]) == []
    assert new_checkpoint([straggler10, live20]) is None
    assert [r["name"] for r in new_since_exported([straggler10, done30])] == ["ckpt-10", "ckpt-30"]


# -- the trigger -----------------------------------------------------------------------------
def _trigger_config(tmp_path: Path):
    m = model_dags(tmp_path, "trig")
    (m.config.parent / "train").mkdir()
    return m.config, m.config.parent / "train"


def test_trigger_serializes_to_an_importable_classpath():
    import importlib

    from tf_export_pipeline.operators.triggers import NewCheckpointTrigger

    trigger = NewCheckpointTrigger(config_path="/c/m.yaml", checkpoint="ckpt-5", conn_id="gcs", poll_interval=2,
                                   max_polls=7)
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    assert json.loads(json.dumps(kwargs)) == kwargs


async def _collect(trigger, ticks: list[float]):
    async def ticker():
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    tick = asyncio.ensure_future(ticker())
    try:
        return [event.payload async for event in trigger.run()]
    finally:
        tick.cancel()


def test_trigger_finds_a_checkpoint_without_blocking_the_event_loop(tmp_path, trained_dir, monkeypatch):
    import tf_export_pipeline.operators.triggers as triggers

    config, train = _trigger_config(tmp_path)
    for f in trained_dir.glob("ckpt-10.data-*"):
        shutil.copy2(f, train / f.name)
    real = triggers.look_at
    calls = []

    def slow_look(*args):  # a slow listing: it must not stall the other triggers of the event loop
        calls.append(time.monotonic())
        time.sleep(0.3)
        if len(calls) == 3:
            shutil.copy2(trained_dir / "ckpt-10.index", train / "ckpt-10.index")
        return real(*args)

    monkeypatch.setattr(triggers, "look_at", slow_look)
    ticks: list[float] = []
    trigger = triggers.NewCheckpointTrigger(config_path=str(config), poll_interval=0.1, max_polls=20)
    [event] = asyncio.run(_collect(trigger, ticks))
    assert event["status"] == "found" and event["checkpoint"]["name"] == "ckpt-10" and event["polls"] == 3
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 15 and max(gaps) < 0.25, max(gaps)  # the loop kept running during each 0.3 s look


def test_trigger_ends_itself_after_max_polls_and_reports_bad_config(tmp_path):
    from tf_export_pipeline.operators.triggers import NewCheckpointTrigger

    config, _ = _trigger_config(tmp_path)
    t0 = time.monotonic()
    [event] = asyncio.run(_collect(NewCheckpointTrigger(config_path=str(config), poll_interval=0.05,
                                                        max_polls=4), []))
    assert event["status"] == "timeout" and event["polls"] == 4 and "no checkpoints" in event["reason"]
    assert time.monotonic() - t0 < 5
    [bad] = asyncio.run(_collect(NewCheckpointTrigger(config_path=str(tmp_path / "nope.yaml")), []))
    assert bad["status"] == "error" and "config file not found" in bad["message"]


# -- the sensor in each mode, run by dag.test() ---------------------------------------------------
def _sensor_dag(dag_id: str, config: Path, **sensors):
    import pendulum
    from airflow.sdk import DAG

    from tf_export_pipeline.operators.sensors import NewCheckpointSensor

    with DAG(dag_id, schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False) as dag:
        for task_id, kwargs in sensors.items():
            NewCheckpointSensor(task_id=task_id, config_path=str(config), retries=0, **kwargs)
    register_dag(dag)
    return dag


def _complete_later(trained_dir: Path, train: Path, delay: float) -> threading.Thread:
    def run():
        time.sleep(delay)
        shutil.copy2(trained_dir / "ckpt-10.index", train / "ckpt-10.index")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("mode", ["poke", "reschedule"])
def test_sensor_waits_in_the_worker_in_poke_and_reschedule_modes(tmp_path, trained_dir, mode):
    config, train = _trigger_config(tmp_path)
    for f in trained_dir.glob("ckpt-10.data-*"):
        shutil.copy2(f, train / f.name)
    dag = _sensor_dag(f"sensor_{mode}", config,
                      wait=dict(deferrable=False, mode=mode, poke_interval=0.5, timeout=60))
    finisher = _complete_later(trained_dir, train, 1.5)
    t0 = time.monotonic()
    dr = dag.test()
    finisher.join()
    assert dr.state == "success", task_states(dr)
    found = xcom(dr, "wait")
    assert found["name"] == "ckpt-10" and found["version"] is None and found["pending"] == 1
    assert time.monotonic() - t0 >= 1.5


def test_deferred_sensor_skips_when_nothing_new_and_fails_for_a_named_checkpoint(tmp_path):
    config, _ = _trigger_config(tmp_path)
    dag = _sensor_dag("sensor_deadlines", config,
                      anything_new=dict(deferrable=True, poke_interval=0.3, timeout=1.5),
                      named=dict(deferrable=True, checkpoint="ckpt-99", poke_interval=0.3, timeout=1.5))
    t0 = time.monotonic()
    dr = dag.test()
    assert time.monotonic() - t0 < 60  # each trigger ended itself: dag.test() does not enforce defer timeouts
    assert task_states(dr) == {"anything_new": ["skipped"], "named": ["failed"]}


@pytest.mark.parametrize("deferrable", [True, False])
def test_sensor_fails_at_once_for_a_checkpoint_that_does_not_exist(tmp_path, trained_dir, deferrable):
    config, train = _trigger_config(tmp_path)
    for f in trained_dir.iterdir():
        shutil.copy2(f, train / f.name)  # ckpt-10, ckpt-20, ckpt-30
    wait = dict(deferrable=deferrable, poke_interval=0.3, timeout=120)
    dag = _sensor_dag(f"sensor_missing_{deferrable}", config,
                      older=dict(checkpoint="ckpt-5", **wait),  # below the newest: a typo, never coming
                      unknown=dict(checkpoint="ckpt-999", missing_grace=1.5, **wait),  # nothing after the grace
                      coming=dict(checkpoint="ckpt-40", missing_grace=60, **{**wait, "timeout": 2}))
    for task in dag.tasks:
        task.retries = 2  # a failure that no retry can mend must not use them
    t0 = time.monotonic()
    dr = dag.test()
    assert time.monotonic() - t0 < 60, "the missing checkpoints were waited for"
    states = task_states(dr)
    assert states["older"] == ["failed"] and states["unknown"] == ["failed"]
    assert states["coming"] in (["failed"], ["up_for_retry"])  # timed out: a checkpoint that may still come
    tis = {ti.task_id: ti for ti in dr.get_task_instances()}
    assert tis["older"].try_number == 1 and tis["unknown"].try_number == 1


def test_missing_checkpoint_failure_names_the_newest_one(tmp_path, trained_dir):
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.errors import CheckpointMissingError
    from tf_export_pipeline.operators.triggers import look

    config, train = _trigger_config(tmp_path)
    for f in trained_dir.iterdir():
        shutil.copy2(f, train / f.name)
    cfg = load_config(str(config))
    with pytest.raises(CheckpointMissingError, match="checkpoint ckpt-5 does not exist and is older than the "
                                                     "newest one, ckpt-30"):
        look(cfg, "ckpt-5")
    assert look(cfg, "ckpt-999", missing_since=time.time(), grace=300) == (None, "checkpoint ckpt-999 is not "
                                                                                  "complete yet")
    with pytest.raises(CheckpointMissingError, match="ckpt-999 matches nothing in .* after 1 s; the newest is ckpt-30"):
        look(cfg, "ckpt-999", missing_since=time.time() - 5, grace=1)
    assert look(cfg, "ckpt-20")[0]["name"] == "ckpt-20"


def test_sensor_deferrable_default_follows_airflow_config(tmp_path):
    script = ("from tf_export_pipeline.operators.sensors import NewCheckpointSensor as S; "
              "print(S(task_id='w', config_path='c.yaml').deferrable)")
    for value in ("True", "False"):
        env = {**os.environ, "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": value}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == value


# -- which errors are retried --------------------------------------------------------------
def test_validate_operator_takes_allow_regression_and_hands_on_the_ratios():
    from tf_export_pipeline.operators.export import ValidateExportOperator

    asked = []

    class Hook:
        def validate(self, staged, allow_regression=False):
            asked.append(allow_regression)
            return {**staged, "status": "validated", "validation": {"ok": True, "checks": [],
                                                                    "performance": {"size_ratio": 3.1,
                                                                                    "latency_ratio": 1.2}}}

    op = ValidateExportOperator(task_id="validate", config_path="/c/m.yaml", allow_regression="True",
                                staged={"status": "staged", "staging": "/b/temp-1-ab", "checkpoint": "/t/ckpt-1"})
    assert "allow_regression" in op.template_fields  # a DAG param renders into it
    op.hook = Hook()
    record = op.execute({})
    assert asked == [True] and record["size_ratio"] == 3.1 and record["latency_ratio"] == 1.2


def test_errors_no_retry_can_mend_fail_at_once_and_transient_ones_are_retried():
    from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

    from tf_export_pipeline.errors import (
        CheckpointError,
        ConfigError,
        ModelMismatchError,
        PipelineError,
        ServingOrderError,
        ValidationError,
    )
    from tf_export_pipeline.operators.base import stage_errors
    from tf_export_pipeline.publish.staging import StagingGone

    permanent = [ConfigError("unknown factory 'x:y': c.yaml"), ModelMismatchError("checkpoint is of a different "
                 "model: /t/ckpt-1"), ValidationError("contract violated: /s"), StagingGone("staging is gone: /s"),
                 ServingOrderError("would give ckpt-1 version 5 above ...: /t/ckpt-1"),
                 AirflowNotFoundException("The conn_id `nope` isn't defined")]
    for err in permanent:
        with pytest.raises(AirflowFailException, match=str(err)[:20].replace("(", r"\(").replace(")", r"\)")):
            with stage_errors():
                raise err
    for err in (PipelineError("storage unavailable after retries (HTTP 503) while listing: gs://b/m"),
                CheckpointError("checkpoint index vanished while reading: gs://b/t/ckpt-1"), ConnectionError("reset")):
        with pytest.raises(type(err)):
            with stage_errors():
                raise err
