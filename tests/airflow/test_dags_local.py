"""The three DAGs on the demo model, on local disk, run by Airflow's ``dag.test()``.

``dag.test()`` runs the real operators, the sensor and its trigger (inline)
against the temporary metadata database; the tests read XCom values and asset
events back from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.airflow.conftest import (
    DAG_FILE,
    WhenDeferred,
    as_list,
    asset_events,
    manifest,
    model_dags,
    task_states,
    versions,
    xcom,
)
from tests.conftest import REPO, assert_no_partial_versions

pytestmark = pytest.mark.timeout(300, method="thread")

PARSE_SCRIPT = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"import_errors": {k: str(v)[-300:] for k, v in bag.import_errors.items()},
       "tensorflow": "tensorflow" in sys.modules, "keras": "keras" in sys.modules, "dags": {}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {
        "schedule": dag.schedule if isinstance(dag.schedule, str) or dag.schedule is None else "assets",
        "assets": [a.uri for a in getattr(getattr(dag.timetable, "asset_condition", None), "objects", [])],
        "catchup": dag.catchup,
        "params": sorted(dag.params.keys()),
        "tasks": {t.task_id: {"max_active_tis_per_dagrun": t.max_active_tis_per_dagrun,
                              "outlets": [getattr(o, "uri", None) or f"alias:{o.name}" for o in t.outlets],
                              "type": type(t).__name__,
                              "mapped": t.get_closest_mapped_task_group() is not None}
                  for t in dag.tasks},
    }
print(json.dumps(out))
"""


def parse_in_fresh_process(env_extra: dict | None = None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", PARSE_SCRIPT, str(DAG_FILE)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dag_file_parses_without_tensorflow_and_yields_three_dags_per_config(tmp_path):
    demo = parse_in_fresh_process()
    assert demo["import_errors"] == {}
    assert demo["tensorflow"] is False and demo["keras"] is False
    assert set(demo["dags"]) == {"export_nightly__demo", "export_after_training__demo", "export_backfill__demo"}
    nightly = demo["dags"]["export_nightly__demo"]
    assert nightly["schedule"] == "@daily" and nightly["catchup"] is False
    assert list(nightly["tasks"]) == ["discover", "export", "validate", "publish", "prune"]
    serving = "file://" + str(REPO / "build" / "airflow-demo" / "serving" / "demo_regressor")
    assert nightly["tasks"]["publish"]["outlets"] == [serving]
    after = demo["dags"]["export_after_training__demo"]
    assert after["schedule"] == "assets"
    assert after["assets"] == ["file://" + str(REPO / "build" / "airflow-demo" / "train")]
    assert after["tasks"]["wait_for_checkpoint"]["type"] == "NewCheckpointSensor"
    assert after["tasks"]["publish"]["outlets"] == ["alias:tf_export__demo__publish"]  # one event per version
    assert after["tasks"]["export_each.export"]["mapped"] and not after["tasks"]["publish"]["mapped"]
    backfill = demo["dags"]["export_backfill__demo"]
    assert backfill["schedule"] is None
    assert backfill["params"] == ["allow_outrank", "allow_regression", "chunk_size", "from_step", "include_removed",
                                  "to_step", "versioning"]
    assert nightly["params"] == ["allow_regression"] and "allow_regression" in after["params"]
    # One mapped task per chunk of checkpoints: export and validate in one process.
    assert list(backfill["tasks"]) == ["list_checkpoints", "export_chunk", "publish", "done"]
    assert backfill["tasks"]["export_chunk"]["max_active_tis_per_dagrun"] == 2  # dags/configs/demo.yaml
    assert backfill["tasks"]["export_chunk"]["type"] == "MappedOperator"
    # One publish over the mapped results: history is numbered in checkpoint order.
    assert backfill["tasks"]["publish"]["mapped"] is False
    assert backfill["tasks"]["publish"]["outlets"] == ["alias:tf_export__demo__backfill"]

    # Another folder: two models, one with its own schedule and limit, and a broken file that is left out.
    folder = tmp_path / "configs"
    folder.mkdir()
    from tf_export_pipeline.demo import write_config

    write_config(str(folder), name="alpha.yaml", airflow={"schedule": "0 3 * * *", "max_active_tis_per_dagrun": 5})
    write_config(str(folder), name="beta.yaml", export_base="gs://models-bucket/beta/serving",
                 training_dir="gs://models-bucket/beta/train", airflow={"conn_id": "google_cloud_default"})
    (folder / "broken.yaml").write_text("training_dir: ./train\nno_such_key: 1\n")
    (folder / "notes.txt").write_text("not a config")
    other = parse_in_fresh_process({"TF_EXPORT_CONFIG_DIR": str(folder)})
    # The broken config is an import error of its own, under its path; the DAG file has none.
    [(where, why)] = other["import_errors"].items()
    assert where == str(folder / "broken.yaml") and why.startswith("ConfigError: invalid config")
    assert str(folder / "broken.yaml") in why and other["tensorflow"] is False
    assert sorted(other["dags"]) == sorted([f"export_{k}__{m}" for k in ("nightly", "after_training", "backfill")
                                            for m in ("alpha", "beta")] + ["export_finish__beta"])  # gs://
    assert other["dags"]["export_nightly__alpha"]["schedule"] == "0 3 * * *"
    assert other["dags"]["export_backfill__alpha"]["tasks"]["export_chunk"]["max_active_tis_per_dagrun"] == 5
    assert other["dags"]["export_after_training__beta"]["assets"] == ["gs://models-bucket/beta/train"]
    assert other["dags"]["export_nightly__beta"]["tasks"]["publish"]["outlets"] == ["gs://models-bucket/beta/serving"]


def test_nightly_publishes_newest_checkpoint_then_skips(tmp_path, trained_dir):
    m = model_dags(tmp_path / "ws", "nightly_local", trained_dir)
    base = m.config.parent / "serving" / "demo_regressor"

    dr = m.test("nightly")
    assert dr.state == "success", task_states(dr)
    found = xcom(dr, "discover")
    assert found["status"] == "new" and found["step"] == 30 and found["checkpoint"].endswith("/train/ckpt-30")
    staged = xcom(dr, "export")
    assert staged["status"] == "staged" and Path(staged["staging"]).name.startswith("temp-")
    validated = xcom(dr, "validate")
    assert validated["status"] == "validated" and validated["validation"]["ok"] is True
    assert validated["size_ratio"] is None  # the first publish has no reference version
    published = xcom(dr, "publish")
    version = published["version"]
    assert published["status"] == "published" and published["step"] == 30
    assert published["path"] == str(base / str(version))
    assert xcom(dr, "prune") == {"removed_versions": [], "removed_staging": [], "removed_claims": [], "dry_run": False}
    assert versions(base) == [version]
    assert not Path(staged["staging"]).exists()
    assert_no_partial_versions(base)
    assert manifest(base, version)["checkpoint"]["step"] == 30
    assert asset_events(dr.run_id) == [("file://" + str(base), {"version": version, "path": str(base / str(version)),
                                                                 "checkpoint": found["checkpoint"], "step": 30})]

    again = m.test("nightly")
    assert again.state == "success"
    assert all(states == ["skipped"] for states in task_states(again).values()), task_states(again)
    assert xcom(again, "discover") == {"status": "skipped", "checkpoint": found["checkpoint"], "step": 30,
                                       "version": version}
    assert versions(base) == [version]
    assert asset_events(again.run_id) == []


def _partial_checkpoint_dir(trained_dir: Path, train: Path, complete: list[str], writing: str) -> None:
    """A training directory where ``writing`` has its data but not yet its index nor a state-file entry."""
    train.mkdir(parents=True)
    for name in complete:
        for f in trained_dir.glob(f"{name}.*"):
            shutil.copy2(f, train / f.name)
    for f in trained_dir.glob(f"{writing}.data-*"):
        shutil.copy2(f, train / f.name)
    _state_file(train, complete)


def _state_file(train: Path, names: list[str], times: list[float] | None = None) -> None:
    lines = [f'model_checkpoint_path: "{names[-1]}"'] + [f'all_model_checkpoint_paths: "{n}"' for n in names]
    lines += [f"all_model_checkpoint_timestamps: {t}" for t in times or []]
    (train / "checkpoint").write_text("\n".join(lines) + "\n")


def test_after_training_waits_for_checkpoint_being_written_then_exports_all_new_oldest_first(tmp_path, trained_dir):
    m = model_dags(tmp_path / "ws", "after_local")
    train, base = m.config.parent / "train", m.config.parent / "serving" / "demo_regressor"
    # ckpt-10 is complete and unexported; ckpt-20 is still being written: the sensor must wait for it
    # rather than export ckpt-10 alone and leave ckpt-20 to a later event.
    _partial_checkpoint_dir(trained_dir, train, ["ckpt-10"], "ckpt-20")

    def finish_writing():  # as TensorFlow does: the index, then the state file
        shutil.copy2(trained_dir / "ckpt-20.index", train / "ckpt-20.index")
        _state_file(train, ["ckpt-10", "ckpt-20"])

    with WhenDeferred(finish_writing) as finisher:
        dr = m.test("after_training")
    assert finisher.deferred
    assert dr.state == "success", task_states(dr)
    found = xcom(dr, "wait_for_checkpoint")
    assert found["name"] == "ckpt-20" and found["pending"] == 2 and found["version"] is None
    pending = xcom(dr, "list_new")
    assert [p["name"] for p in pending] == ["ckpt-10", "ckpt-20"]
    published = xcom(dr, "publish")  # one task publishes the list in order
    assert [(p["status"], p["step"]) for p in published] == [("published", 10), ("published", 20)]
    v10, v20 = (p["version"] for p in published)
    assert v10 < v20 and versions(base) == [v10, v20]  # the newest is published last: it is served
    assert task_states(dr)["prune"] == ["success"]
    assert [extra["step"] for _, extra in asset_events(dr.run_id)] == [10, 20]
    assert_no_partial_versions(base)

    # A manual run naming a checkpoint that is already exported has nothing to do.
    again = m.test("after_training", conf={"checkpoint": str(train / "ckpt-20")})
    assert again.state == "success"
    assert xcom(again, "wait_for_checkpoint")["version"] == v20
    assert xcom(again, "list_new") == []
    assert task_states(again)["publish"] == ["skipped"] and task_states(again)["prune"] == ["skipped"]
    assert versions(base) == [v10, v20]


def test_backfill_maps_over_a_step_range_and_refuses_to_outrank_the_live_version(tmp_path, trained_dir):
    m = model_dags(tmp_path / "ws", "backfill_local", trained_dir, airflow={"max_active_tis_per_dagrun": 2})
    base = m.config.parent / "serving" / "demo_regressor"
    assert m.dag("backfill").get_task("export_chunk").max_active_tis_per_dagrun == 2
    # Checkpoints an hour apart, as a training job writes them (the demo writes them within a second).
    written = {"ckpt-10": time.time() - 3 * 3600, "ckpt-20": time.time() - 2 * 3600, "ckpt-30": time.time() - 3600}
    _state_file(m.config.parent / "train", list(written), list(written.values()))

    dr = m.test("backfill", conf={"from_step": 20})
    assert dr.state == "success", task_states(dr)
    assert [[c["name"] for c in chunk] for chunk in xcom(dr, "list_checkpoints")] == [["ckpt-20", "ckpt-30"]]
    assert task_states(dr)["export_chunk"] == ["success"]
    published = xcom(dr, "publish")
    assert [(p["status"], p["step"]) for p in published] == [("published", 20), ("published", 30)]
    v20, v30 = (p["version"] for p in published)
    # checkpoint_time: numbered by when each checkpoint was written, so history stays in training order
    assert (v20, v30) == (int(written["ckpt-20"]), int(written["ckpt-30"]))
    assert versions(base) == [v20, v30]
    assert {manifest(base, v)["versioning"] for v in (v20, v30)} == {"checkpoint_time"}
    assert len(asset_events(dr.run_id)) == 2

    # ckpt-10 under 'timestamp' would be served above ckpt-30: refused, nothing published.
    refused = m.test("backfill", conf={"to_step": 10, "versioning": "timestamp"})
    assert refused.state == "failed"
    assert task_states(refused)["publish"] == ["failed"]
    assert versions(base) == [v20, v30]
    assert asset_events(refused.run_id) == []
    assert [p.name for p in base.iterdir() if p.name.startswith("temp-")] == []

    allowed = m.test("backfill", conf={"to_step": 10, "versioning": "timestamp", "allow_outrank": True})
    assert allowed.state == "success", task_states(allowed)
    [p10] = as_list(xcom(allowed, "publish"))
    assert p10["status"] == "published" and p10["step"] == 10 and p10["version"] > v30
    assert versions(base) == [v20, v30, p10["version"]]


def test_backfill_dag_publishes_checkpoints_written_in_one_second_in_checkpoint_order(tmp_path, trained_dir):
    m = model_dags(tmp_path / "ws", "backfill_order", trained_dir, airflow={"max_active_tis_per_dagrun": 3})
    base = m.config.parent / "serving" / "demo_regressor"
    same_second = float(int(time.time()) - 600)
    _state_file(m.config.parent / "train", ["ckpt-10", "ckpt-20", "ckpt-30"], [same_second + 0.1, same_second + 0.5,
                                                                              same_second + 0.9])
    dr = m.test("backfill", conf={"chunk_size": 1})  # three chunks, whatever order they finish in
    assert dr.state == "success", task_states(dr)
    assert task_states(dr)["export_chunk"] == ["success"] * 3
    published = xcom(dr, "publish")
    assert [p["step"] for p in published] == [10, 20, 30]
    numbers = [p["version"] for p in published]
    # checkpoint_time: one second for all three, so collisions move each up by one, in training order.
    assert numbers == sorted(numbers) and len(set(numbers)) == 3 and numbers[0] == int(same_second)
    assert versions(base) == numbers
    assert [e[1]["step"] for e in asset_events(dr.run_id)] == [10, 20, 30]


def test_backfill_dag_refuses_history_that_retention_would_remove(tmp_path, trained_dir):
    m = model_dags(tmp_path / "ws", "backfill_keep", trained_dir, retention={"keep": 1})
    base = m.config.parent / "serving" / "demo_regressor"
    nightly = m.test("nightly")
    assert nightly.state == "success", task_states(nightly)
    live = xcom(nightly, "publish")["version"]

    refused = m.test("backfill")
    assert refused.state == "failed"
    states = task_states(refused)
    assert states["list_checkpoints"] == ["failed"]
    assert states.get("publish") in (None, ["upstream_failed"])
    assert versions(base) == [live]
    assert asset_events(refused.run_id) == []


def test_backfill_run_fails_when_a_checkpoint_fails_though_the_others_are_published(tmp_path, trained_dir):
    from tf_export_pipeline.demo import build_wide, train

    m = model_dags(tmp_path / "ws", "backfill_fail", trained_dir)
    train_dir = m.config.parent / "train"
    # ckpt-50 is a checkpoint of another model: its export fails at once, without retries.
    train(str(train_dir), steps=10, checkpoint_every=10, start_step=40, factory=build_wide, resume=False)
    _state_file(train_dir, ["ckpt-10", "ckpt-20", "ckpt-30", "ckpt-50"])
    base = m.config.parent / "serving" / "demo_regressor"
    dr = m.test("backfill", conf={"chunk_size": 2})
    states = task_states(dr)
    # The chunk goes on past the checkpoint that failed; the run's verdict fails, once the others are out.
    assert states["export_chunk"] == ["success", "success"], states
    assert states["publish"] == ["success"] and states["done"] == ["failed"]
    assert dr.state == "failed"
    chunk = xcom(dr, "export_chunk", map_index=1)
    assert [(r["status"], r["step"]) for r in chunk] == [("validated", 30), ("failed", 50)]
    assert "ckpt-50" in chunk[1]["error"]
    assert [(r["step"], r["status"]) for r in xcom(dr, "publish")] == \
        [(10, "published"), (20, "published"), (30, "published"), (50, "failed")]
    assert len(versions(base)) == 3
    assert [e[1]["step"] for e in asset_events(dr.run_id)] == [10, 20, 30]


def test_backfill_dag_keeps_a_step_config_numbering_and_refuses_to_mix_units(tmp_path, trained_dir):
    m = model_dags(tmp_path / "ws", "backfill_step", trained_dir, versioning="step")
    base = m.config.parent / "serving" / "demo_regressor"
    assert m.dag("backfill").params["versioning"] == "step"  # the config's, the run's default

    dr = m.test("backfill", conf={"to_step": 20})
    assert dr.state == "success", task_states(dr)
    assert [(p["step"], p["version"]) for p in xcom(dr, "publish")] == [(10, 10), (20, 20)]
    assert {manifest(base, v)["versioning"] for v in versions(base)} == {"step"}

    # checkpoint_time would put ckpt-30 at ~1.7e9, above every step number for good: refused up front.
    refused = m.test("backfill", conf={"versioning": "checkpoint_time"})
    assert refused.state == "failed"
    states = task_states(refused)
    assert states["list_checkpoints"] == ["failed"] and states.get("export_chunk") in (None, ["upstream_failed"])
    assert versions(base) == [10, 20]
    assert [p.name for p in base.iterdir() if p.name.startswith("temp-")] == []
