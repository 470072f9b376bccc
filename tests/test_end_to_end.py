"""The whole pipeline on local disk, through the real `tf-export` command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.conftest import assert_no_partial_versions, cli_env


def test_publish_rerun_skip_then_newer_checkpoint_gets_higher_version(workspace):
    first = workspace.cli("run", "--json")
    assert first.rc == 0, first.err
    rec = first.json
    assert rec["status"] == "published"
    assert rec["step"] == 30 and rec["checkpoint"].endswith("ckpt-30")
    assert workspace.versions() == [rec["version"]]
    assert rec["path"] == str(workspace.base / str(rec["version"]))
    assert_no_partial_versions(workspace.base)
    # no staging is left behind
    assert [e for e in workspace.entries() if e.startswith("temp-")] == []

    again = workspace.cli("run", "--json")
    assert again.rc == 0, again.err
    assert again.json == {**rec, "status": "skipped"}
    assert workspace.versions() == [rec["version"]]

    workspace.train_more(10)  # writes ckpt-40
    newer = workspace.cli("run", "--json")
    assert newer.rc == 0, newer.err
    assert newer.json["status"] == "published" and newer.json["step"] == 40
    assert newer.json["version"] > rec["version"]
    assert workspace.versions() == [rec["version"], newer.json["version"]]

    status = workspace.cli("status", "--json").json
    assert [v["version"] for v in status["versions"]] == workspace.versions()
    assert status["serving"] == max(workspace.versions())
    assert [v["step"] for v in status["versions"]] == [30, 40]

    discovered = workspace.cli("discover", "--json").json
    on_disk = {p.name.split(".")[0] for p in workspace.train.glob("ckpt-*.index")}
    assert {d["name"] for d in discovered} == on_disk
    exported = {d["step"]: d["version"] for d in discovered if d["version"] is not None}
    assert exported == {30: rec["version"], 40: newer.json["version"]}
    assert all(d["complete"] for d in discovered)


def test_manifest_records_provenance(workspace):
    rec = workspace.cli("run", "--json").json
    manifest = json.loads((workspace.base / str(rec["version"]) / "assets.extra" / "export_manifest.json").read_text())
    assert manifest["version"] == rec["version"]
    ck = manifest["checkpoint"]
    assert ck["path"] == rec["checkpoint"] and ck["step"] == 30
    index = (workspace.train / "ckpt-30.index")
    assert ck["index_size"] == index.stat().st_size
    from tf_export_pipeline.checkpoints import crc32c_b64

    assert ck["index_crc32c"] == crc32c_b64(index.read_bytes())
    assert manifest["validation"]["ok"] is True
    assert manifest["validation"]["loader"] == "session"
    assert {c["name"] for c in manifest["validation"]["checks"]} >= {"load_as_tf_serving", "smoke_inference",
                                                                    "finite_outputs", "parity_with_checkpoint"}
    assert manifest["tool"]["name"] == "tf-export-pipeline"
    assert len(manifest["config_hash"]) == 16
    ledger = list((workspace.base / "_exports" / "ledger").iterdir())
    assert len(ledger) == 1 and json.loads(ledger[0].read_text())["version"] == rec["version"]
    assert (workspace.base / "_exports" / "claims" / str(rec["version"])).is_file()


LOAD_SCRIPT = """
import sys, json, numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
fn = m.signatures["serving_default"]
x = np.load(sys.argv[2])
out = fn(features=tf.constant(x))
np.save(sys.argv[3], out["score"].numpy())
print(json.dumps(sorted(m.signatures.keys())))
"""


def test_published_version_loads_in_fresh_process_and_matches_checkpoint(workspace, tmp_path):
    rec = workspace.cli("run", "--json").json
    x = np.random.default_rng(7).standard_normal((5, 4)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, rec["path"], str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["serving_default"]
    served = np.load(tmp_path / "y.npy")

    import tensorflow as tf

    from tf_export_pipeline.demo import build

    model = build()
    tf.train.Checkpoint(model=model).read(str(workspace.train / "ckpt-30")).assert_existing_objects_matched()
    restored = model(x, training=False).numpy()
    np.testing.assert_allclose(served, restored, rtol=1e-6, atol=1e-6)
    # and the model really learned something: it is not the untrained initialisation
    assert not np.allclose(restored, build()(x).numpy())


def test_checkpoint_option_exports_an_older_checkpoint_by_name_or_step(workspace):
    by_name = workspace.cli("run", "--checkpoint", "ckpt-10", "--json")
    assert by_name.rc == 0, by_name.err
    assert by_name.json["status"] == "published" and by_name.json["step"] == 10
    by_step = workspace.cli("run", "--checkpoint", "10", "--json")
    assert by_step.json["status"] == "skipped" and by_step.json["version"] == by_name.json["version"]


def test_backfill_oldest_first_with_checkpoint_time_versions(workspace):
    live = workspace.cli("run", "--json").json  # step 30, timestamp version
    res = workspace.cli("backfill", "--json")
    assert res.rc == 0, res.err
    records = res.json
    assert [r["step"] for r in records] == [10, 20]
    assert all(r["status"] == "published" for r in records)
    # checkpoint_time versions: in training order and below the live (export-time) version
    assert records[0]["version"] < records[1]["version"] < live["version"]
    assert max(workspace.versions()) == live["version"]
    assert "backfill" in res.err  # the progress bar
    # nothing left to do
    again = workspace.cli("backfill", "--json")
    assert again.rc == 0 and again.json == []


def test_backfill_step_range(workspace):
    res = workspace.cli("backfill", "--from-step", "15", "--to-step", "25", "--json")
    assert res.rc == 0, res.err
    assert [r["step"] for r in res.json] == [20]


def test_backfill_refuses_to_outrank_live_with_an_older_checkpoint(workspace):
    workspace.cli("run", "--checkpoint", "ckpt-30", "--versioning", "checkpoint_time")
    res = workspace.cli("backfill", "--versioning", "timestamp", "--to-step", "20", "--json")
    assert res.rc == 1
    assert "newer checkpoint ckpt-30" in res.err and "ckpt-10" in res.err
    assert "--versioning checkpoint_time" in res.err and "--allow-outrank" in res.err
    assert len(workspace.versions()) == 1
    forced = workspace.cli("backfill", "--versioning", "timestamp", "--to-step", "20", "--allow-outrank", "--json")
    assert forced.rc == 0, forced.err
    assert len(workspace.versions()) == 3


def test_validate_command_reports_a_published_version(workspace):
    rec = workspace.cli("run", "--json").json
    human = workspace.cli("validate", rec["path"], config=False)
    assert human.rc == 0, human.err
    assert "Result: PASS" in human.out and "signature_def['serving_default']" in human.out
    assert "features: dtype=float32 shape=[-1, 4]" in human.out
    js = workspace.cli("validate", rec["path"], "--json", config=False).json
    assert js["ok"] is True and js["signatures"]["serving_default"]["outputs"]["score"]["dtype"] == "float32"


def test_retention_keeps_newest_and_gc_removes_abandoned_staging(tmp_path, trained_dir):
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path, trained_dir, retention={"keep": 2, "lease_seconds": 3600})
    versions = []
    for step in (10, 20, 30):
        r = ws.cli("run", "--checkpoint", f"ckpt-{step}", "--versioning", "step", "--json").json
        versions.append(r["version"])
    assert versions == [10, 20, 30]
    assert ws.versions() == [20, 30]  # run prunes after publishing
    old = ws.base / "temp-1000-deadbeef"
    (old / "variables").mkdir(parents=True)
    fresh = ws.base / f"temp-{int(__import__('time').time())}-cafe0001"
    fresh.mkdir()
    dry = ws.cli("gc", "--dry-run", "--json").json
    assert dry["removed_staging"] == ["temp-1000-deadbeef"] and old.exists()
    done = ws.cli("gc", "--json")
    assert done.rc == 0 and not old.exists() and fresh.exists()
    assert ws.versions() == [20, 30]


def test_help_explains_every_command():
    from tests.conftest import run_cli

    top = run_cli("--help")
    assert top.rc == 0
    for cmd in ("discover", "run", "backfill", "status", "validate", "gc", "demo"):
        assert cmd in top.out
        sub = run_cli(cmd, "--help")
        assert sub.rc == 0 and "usage: tf-export " + cmd in sub.out
    assert "--config" in run_cli("run", "--help").out
