"""The DAGs run by a real Airflow: scheduler, dag-processor, triggerer and api-server (LocalExecutor, SQLite).

1. A training job posts an asset event through the REST API while its
   checkpoint is still being written: the after-training DAG starts, its
   sensor defers to the real triggerer, and once the checkpoint is complete
   the version appears and the run succeeds.
2. The publish task is killed (SIGKILL) after its ledger entry and before the
   promotion; Airflow retries it, and the retry finishes that version: one
   version, not two, and one asset event.

Everything listens on 127.0.0.1 only; the components are stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.airflow.conftest import migrated_database, model_dags, versions
from tests.airflow.live import LiveAirflow, wait_for
from tests.conftest import assert_no_partial_versions

pytestmark = pytest.mark.timeout(600, method="thread")

MODEL = "live"
AFTER = f"export_after_training__{MODEL}"
NIGHTLY = f"export_nightly__{MODEL}"


def _state_file(train: Path, names: list[str]) -> None:
    lines = [f'model_checkpoint_path: "{names[-1]}"'] + [f'all_model_checkpoint_paths: "{n}"' for n in names]
    (train / "checkpoint").write_text("\n".join(lines) + "\n")


def _copy(trained_dir: Path, train: Path, pattern: str) -> None:
    for f in sorted(trained_dir.glob(pattern)):
        shutil.copy2(f, train / f.name)


@pytest.fixture(scope="module")
def live(tmp_path_factory, trained_dir):
    root = tmp_path_factory.mktemp("live")
    m = model_dags(root / "ws", MODEL, airflow={"schedule": None})  # the nightly DAG is run by hand here
    train = m.config.parent / "train"
    train.mkdir()
    (m.config.parent / "broken.yaml").write_text("training_dir: ./train\nno_such_key: 1\n")
    release = root / "release-publish"
    release.touch()
    airflow = LiveAirflow(root / "home", {
        "TF_EXPORT_CONFIG_DIR": str(m.config.parent),
        "TF_EXPORT_POKE_SECONDS": "0.5",
        "TF_EXPORT_WAIT_SECONDS": "300",
        "TF_EXPORT_RETRIES": "1",
        "TF_EXPORT_RETRY_DELAY_SECONDS": "1",
        # A publish holds after its ledger entry until this file exists (see pipeline/faults.py).
        "TF_EXPORT_TEST_HOLD": f"ledgered@{release}",
    })
    try:
        airflow.start(migrated=migrated_database(tmp_path_factory))  # a copy of the session's migrated DB
        airflow.wait_dag(AFTER)
        airflow.wait_dag(NIGHTLY)
        airflow.train, airflow.trained, airflow.release = train, trained_dir, release
        airflow.base = m.config.parent / "serving" / "demo_regressor"
        airflow.configs = m.config.parent
        yield airflow
    finally:
        airflow.stop()


def test_components_listen_on_loopback_only(live):
    addresses = live.listening()
    assert f"127.0.0.1:{live.port}" in addresses
    assert all(a.startswith("127.0.0.1:") for a in addresses), addresses


def test_asset_event_while_checkpoint_is_written_starts_after_training_export(live):
    train, base = live.train, live.base
    _copy(live.trained, train, "ckpt-10.data-*")  # the training job is writing ckpt-10: data, no index yet
    prefix = str(train / "ckpt-10")
    known = {r["dag_run_id"] for r in live.runs(AFTER)}

    training_asset = live.asset_id("file://" + str(train))
    event = live.post("/api/v2/assets/events", {"asset_id": training_asset, "extra": {"checkpoint": prefix}})
    assert event["extra"]["checkpoint"] == prefix

    run = wait_for(f"a run of {AFTER} for the event",
                   lambda: next((r for r in live.runs(AFTER) if r["dag_run_id"] not in known), None), 60,
                   on_timeout=live.tails)
    run_id = run["dag_run_id"]
    assert run["run_type"] == "asset_triggered"
    wait_for("the sensor to defer to the triggerer",
             lambda: live.task_instance(AFTER, run_id, "wait_for_checkpoint").get("state") == "deferred", 120,
             on_timeout=lambda: live.task_log(AFTER, run_id, "wait_for_checkpoint") + live.tails())
    assert versions(base) == []
    # The UI's log of the deferred sensor: its own lines, read without a "Could not read served logs".
    shown = live.client.get(f"/api/v2/dags/{AFTER}/dagRuns/{run_id}/taskInstances/wait_for_checkpoint/logs/1",
                            headers={"Accept": "application/json"})
    assert shown.status_code == 200, shown.text[:500]
    assert "deferring" in shown.text and "Could not read served logs" not in shown.text, shown.text[-3000:]

    shutil.copy2(live.trained / "ckpt-10.index", train / "ckpt-10.index")  # TensorFlow: the index, then
    _state_file(train, ["ckpt-10"])                                       # the state file

    done = live.wait_run_done(AFTER, run_id, 300)
    assert done["state"] == "success", live.task_log(AFTER, run_id, "export_each.export")
    [version] = versions(base)
    assert_no_partial_versions(base)
    found = live.xcom(AFTER, run_id, "wait_for_checkpoint")
    assert found["prefix"] == prefix and found["version"] is None
    published = live.xcom(AFTER, run_id, "publish")  # one checkpoint: one record
    assert published["status"] == "published" and published["version"] == version and published["step"] == 10

    export_asset = live.asset_id("file://" + str(base))
    events = live.get("/api/v2/assets/events", asset_id=export_asset)["asset_events"]
    assert [(e["source_run_id"], e["extra"]["version"]) for e in events] == [(run_id, version)]


def test_publish_killed_after_its_ledger_entry_is_retried_into_one_version(live):
    import psutil

    train, base = live.train, live.base
    before = versions(base)
    ledger, claims = base / "_exports" / "ledger", base / "_exports" / "claims"
    n_ledger = len(list(ledger.iterdir()))
    _copy(live.trained, train, "ckpt-20.*")
    _state_file(train, ["ckpt-10", "ckpt-20"])
    live.release.unlink()

    run_id = live.post(f"/api/v2/dags/{NIGHTLY}/dagRuns", {"logical_date": None, "conf": {}})["dag_run_id"]
    wait_for("the publish to hold after its ledger entry",
             lambda: len(list(ledger.iterdir())) > n_ledger and
             live.task_instance(NIGHTLY, run_id, "publish").get("state") == "running", 300,
             on_timeout=lambda: live.task_log(NIGHTLY, run_id, "publish") + live.tails())
    ti = live.task_instance(NIGHTLY, run_id, "publish")
    assert ti["try_number"] == 1
    task = psutil.Process(ti["pid"])
    assert task.pid in live.pids()  # a process of the Airflow started here
    assert ti["id"] in " ".join([task.name(), *task.cmdline()])  # the process running this very try
    entry = json.loads(max(ledger.iterdir(), key=lambda p: p.stat().st_mtime).read_text())
    assert versions(base) == before  # claimed and in the ledger, not promoted yet
    os.kill(task.pid, signal.SIGKILL)
    task.wait(timeout=30)
    live.release.touch()  # let any later publish through

    done = live.wait_run_done(NIGHTLY, run_id, 300)
    assert done["state"] == "success", live.task_log(NIGHTLY, run_id, "publish")
    ti = live.task_instance(NIGHTLY, run_id, "publish")
    assert ti["try_number"] == 2 and ti["state"] == "success"
    assert versions(base) == sorted(before + [entry["version"]])  # one new version: the one in the ledger
    assert len(list(claims.iterdir())) == len(versions(base))      # the retry claimed no second number
    assert_no_partial_versions(base)
    published = live.xcom(NIGHTLY, run_id, "publish")
    assert published["status"] == "published" and published["version"] == entry["version"]
    assert published["step"] == 20

    export_asset = live.asset_id("file://" + str(base))
    events = live.get("/api/v2/assets/events", asset_id=export_asset)["asset_events"]
    assert [e["extra"]["version"] for e in events if e["source_run_id"] == run_id] == [entry["version"]]


def test_broken_config_is_an_import_error_of_its_own_and_other_models_run(live):
    def listed():
        errors = live.get("/api/v2/importErrors")["import_errors"]
        return [e for e in errors if e["filename"].endswith("broken.yaml")] or None

    [error] = wait_for("the broken config among the import errors", listed, 60, interval=0.5, on_timeout=live.tails)
    assert error["stack_trace"].startswith("ConfigError: invalid config: missing key 'export_base'")
    assert str(live.configs / "broken.yaml") in error["stack_trace"]
    # Only the config: the DAG file itself carries no error, and the good model's DAGs are not marked broken.
    files = {e["filename"] for e in live.get("/api/v2/importErrors")["import_errors"]}
    assert not any(f.endswith(".py") for f in files), files
    for dag_id in (AFTER, NIGHTLY):
        assert live.get(f"/api/v2/dags/{dag_id}")["has_import_errors"] is False

    # Fixed, the config gets its DAGs and its error goes away.
    from tf_export_pipeline.demo import write_config

    write_config(str(live.configs), name="broken.yaml", airflow={"schedule": None})
    live.wait_dag("export_nightly__broken")
    wait_for("the fixed config's import error to clear", lambda: listed() is None, 60, interval=0.5,
             on_timeout=live.tails)
