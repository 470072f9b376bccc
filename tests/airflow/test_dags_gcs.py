"""The DAGs on gs://, against fake-gcs-server, with storage credentials from an Airflow connection.

The configs name a connection (``airflow.conn_id``) and carry no
``storage_options`` of their own: everything gcsfs needs to reach the
emulator comes from the connection, defined the way a deployment would
(``AIRFLOW_CONN_<ID>``), and is resolved by the operators and the trigger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.airflow.conftest import WhenDeferred, as_list, asset_events, model_dags, task_states, xcom
from tests.support.gcs_emulator import DEFAULT_PROJECT
from tests.support.gcs_fixtures import GcsBucket, gcs_bucket, gcs_server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300, method="thread")

CONN_ID = "tf_export_gcs"
BASE = "serving/demo_regressor"


@pytest.fixture
def gcs_connection(monkeypatch, gcs_bucket):
    extra = {"project": DEFAULT_PROJECT, "anonymous": True, "gcs.endpoint": gcs_bucket.endpoint}
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}",
                       json.dumps({"conn_type": "google_cloud_platform", "extra": extra}))
    return CONN_ID


def upload(bucket: GcsBucket, local: Path, names: list[str], prefix: str = "train") -> None:
    fs = bucket.fs()
    for name in names:
        fs.put_file(str(local / name), bucket.path(prefix, name))


def checkpoint_files(trained_dir: Path, *steps: int) -> list[str]:
    names = [p.name for s in steps for p in sorted(trained_dir.glob(f"ckpt-{s}.*"))]
    return sorted(names, key=lambda n: n.endswith(".index"))  # data shards first, then the index


def versions_in(bucket: GcsBucket) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    prefix = BASE + "/"
    for obj in bucket.server.list_objects(bucket.name, prefix):
        head, _, rest = obj["name"][len(prefix):].partition("/")
        if head.isdigit() and rest:
            out.setdefault(int(head), set()).add(rest)
    return out


def assert_whole(bucket: GcsBucket) -> None:
    for version, files in versions_in(bucket).items():
        for required in ("saved_model.pb", "variables/variables.index", "assets.extra/export_manifest.json"):
            assert required in files, f"partial version {version}: no {required}"


def gcs_model(tmp_path: Path, model: str, bucket: GcsBucket):
    return model_dags(tmp_path / "ws", model, training_dir=bucket.url("train"), export_base=bucket.url(BASE),
                      airflow={"conn_id": CONN_ID})


def test_nightly_then_backfill_on_gcs_through_a_connection(tmp_path, trained_dir, gcs_bucket, gcs_connection):
    upload(gcs_bucket, trained_dir, checkpoint_files(trained_dir, 10, 20, 30) + ["checkpoint"])
    m = gcs_model(tmp_path, "nightly_gcs", gcs_bucket)
    assert "storage_options" not in m.config.read_text()  # every gcsfs option comes from the connection

    dr = m.test("nightly")
    assert dr.state == "success", task_states(dr)
    published = xcom(dr, "publish")
    live = published["version"]
    assert published["status"] == "published" and published["step"] == 30
    assert published["checkpoint"] == gcs_bucket.url("train", "ckpt-30")
    assert published["path"] == gcs_bucket.url(BASE, str(live))
    assert xcom(dr, "export")["staging"].startswith(gcs_bucket.url(BASE, "temp-"))
    assert list(versions_in(gcs_bucket)) == [live]
    assert_whole(gcs_bucket)
    assert asset_events(dr.run_id) == [(gcs_bucket.url(BASE), {"version": live, "path": published["path"],
                                                               "checkpoint": published["checkpoint"], "step": 30})]

    backfill = m.test("backfill", conf={"from_step": 20})
    assert backfill.state == "success", task_states(backfill)
    # One chunk of the one pending checkpoint: ckpt-30 has its version
    assert [[c["name"] for c in chunk] for chunk in xcom(backfill, "list_checkpoints")] == [["ckpt-20"]]
    [p20] = as_list(xcom(backfill, "publish"))
    assert p20["status"] == "published" and p20["step"] == 20 and p20["version"] < live
    assert sorted(versions_in(gcs_bucket)) == [p20["version"], live]
    assert_whole(gcs_bucket)
    leftovers = {o["name"].split("/")[2] for o in gcs_bucket.server.list_objects(gcs_bucket.name, BASE + "/")}
    assert leftovers == {str(live), str(p20["version"]), "_exports"}  # no staging left behind


def test_after_training_on_gcs_waits_for_an_object_checkpoint_still_uploading(
        tmp_path, trained_dir, gcs_bucket, gcs_connection):
    files = checkpoint_files(trained_dir, 10)
    data = [n for n in files if not n.endswith(".index")]
    upload(gcs_bucket, trained_dir, data)  # the training job has uploaded the data shards, not the index yet
    m = gcs_model(tmp_path, "after_gcs", gcs_bucket)
    prefix = gcs_bucket.url("train", "ckpt-10")

    def finish_upload():
        upload(gcs_bucket, trained_dir, ["ckpt-10.index"])
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / "checkpoint").write_text('model_checkpoint_path: "ckpt-10"\n'
                                                      'all_model_checkpoint_paths: "ckpt-10"\n')
        upload(gcs_bucket, tmp_path / "state", ["checkpoint"])

    with WhenDeferred(finish_upload) as finisher:
        dr = m.test("after_training", conf={"checkpoint": prefix})
    assert finisher.deferred
    assert dr.state == "success", task_states(dr)
    found = xcom(dr, "wait_for_checkpoint")
    assert found["prefix"] == prefix and found["version"] is None and found["pending"] == 1
    published = xcom(dr, "publish")  # one checkpoint: Airflow hands the one record on, not a list
    assert published["status"] == "published" and published["checkpoint"] == prefix
    assert list(versions_in(gcs_bucket)) == [published["version"]]
    assert_whole(gcs_bucket)
    assert [uri for uri, _ in asset_events(dr.run_id)] == [gcs_bucket.url(BASE)]
