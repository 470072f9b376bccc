"""Build once, restore many: the fast SavedModel writes are correct SavedModels, and parallel backfills keep order."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tests.conftest import cli_env, make_workspace

CHECK = r"""
import json, sys, numpy as np, tensorflow as tf
from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting
x = np.load(sys.argv[1])
for path in sys.argv[2:]:
    m = tf.saved_model.load(path)
    fp = tf.saved_model.experimental.read_fingerprint(path)
    fresh = tf.saved_model.experimental.Fingerprint.from_proto(
        __import__("tensorflow.core.protobuf.fingerprint_pb2", fromlist=["x"]).FingerprintDef.FromString(
            fingerprinting.CreateFingerprintDef(path)))
    print(json.dumps({"score": m.signatures["serving_default"](features=tf.constant(x))["score"].numpy().tolist(),
                      "fingerprint_ok": fp == fresh, "checkpoint_hash": fp.checkpoint_hash,
                      "saved_model_checksum": fp.saved_model_checksum}))
"""


def _inspect(paths, x_file):
    """Each SavedModel of ``paths`` loaded (one after the other) by a new Python that never held the
    exporter's objects: its scores on ``x_file`` and its fingerprint, one dict per path."""
    proc = subprocess.run([sys.executable, "-c", CHECK, str(x_file), *map(str, paths)], env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reports = [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(paths):]]
    assert len(reports) == len(paths), proc.stdout
    return reports


def test_fast_writes_equal_full_saves(tmp_path, trained_dir):
    import tensorflow as tf

    from tf_export_pipeline.demo import build
    from tf_export_pipeline.export import Exporter

    exporter = Exporter(build())
    modes = []
    for step in (10, 20, 30):
        exporter.restore(str(trained_dir / f"ckpt-{step}"))
        exporter.write(str(tmp_path / f"fast-{step}"))
        modes.append((exporter._writer.full_writes, exporter._writer.fast_writes))
    assert modes == [(1, 0), (1, 1), (1, 2)]  # one full save, then the fast path

    x = np.random.default_rng(0).standard_normal((4, 4)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    seen = {}
    inspected = _inspect([tmp_path / f"fast-{step}" for step in (10, 20, 30)], tmp_path / "x.npy")
    for step, got in zip((10, 20, 30), inspected):
        assert got["fingerprint_ok"], f"fingerprint.pb of step {step} does not describe its files"
        model = build()
        tf.train.Checkpoint(model=model).read(str(trained_dir / f"ckpt-{step}")).expect_partial()
        np.testing.assert_allclose(np.array(got["score"]), model(x).numpy(), rtol=1e-6, atol=1e-6)
        seen[step] = got
        # the same signatures as a full save of the same checkpoint
        full = tmp_path / f"full-{step}"
        tf.saved_model.save(exporter.serving.root, str(full), signatures=exporter.serving.signatures) \
            if step == 30 else None
    assert len({g["checkpoint_hash"] for g in seen.values()}) == 3  # each version's own variables
    assert len({g["saved_model_checksum"] for g in seen.values()}) == 1  # one graph
    from tf_export_pipeline.validate import signatures_of

    assert signatures_of(str(tmp_path / "fast-30")) == signatures_of(str(tmp_path / "full-30"))


def test_saved_model_cli_runs_a_fast_written_version(tmp_path, trained_dir):
    from tf_export_pipeline.demo import build
    from tf_export_pipeline.export import Exporter

    exporter = Exporter(build())
    for step in (10, 20):
        exporter.restore(str(trained_dir / f"ckpt-{step}"))
        exporter.write(str(tmp_path / str(step)))
    assert exporter._writer.fast_writes == 1
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    show = subprocess.run(cli + ["show", "--dir", str(tmp_path / "20"), "--all"], env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0, show.stderr
    assert "signature_def['serving_default']" in show.stdout and "features" in show.stdout
    np.save(tmp_path / "x.npy", np.ones((2, 4), dtype="float32"))
    run = subprocess.run(cli + ["run", "--dir", str(tmp_path / "20"), "--tag_set", "serve", "--signature_def",
                                "serving_default", "--inputs", f"features={tmp_path / 'x.npy'}"],
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "score" in run.stdout


def test_parallel_backfill_publishes_in_checkpoint_order_exactly_once(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir)
    ws.train_more(20)  # ckpt-40, ckpt-50
    res = ws.cli("backfill", "--jobs", "2", "--json")
    assert res.rc == 0, res.err
    records = res.json
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50]
    assert all(r["status"] == "published" for r in records)
    versions = [r["version"] for r in records]
    assert versions == sorted(versions) and len(set(versions)) == 5
    assert ws.versions() == versions
    assert "ckpt/s" in res.err or "s/ckpt" in res.err  # progress bar with its rate
    again = ws.cli("backfill", "--jobs", "2", "--json")
    assert again.rc == 0 and again.json == []
    ledger = list((ws.base / "_exports" / "ledger").iterdir())
    assert len(ledger) == 5


def test_one_validation_process_still_checks_each_version_on_its_own(tmp_path, trained_dir, forked_validation):
    from tf_export_pipeline.demo import build
    from tf_export_pipeline.export import Exporter
    from tf_export_pipeline.validate import ValidationSession

    exporter = Exporter(build())
    for step in (10, 20):
        exporter.restore(str(trained_dir / f"ckpt-{step}"))
        exporter.write(str(tmp_path / str(step)))
    data = tmp_path / "20" / "variables" / "variables.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:16])
    with ValidationSession() as session:
        good = session.validate(str(tmp_path / "10"))
        bad = session.validate(str(tmp_path / "20"))
        good_again = session.validate(str(tmp_path / "10"))
        pid = session._proc.pid
    assert good["ok"] and good_again["ok"]
    assert not bad["ok"] and "does not load" in bad["reason"]
    assert pid  # one process served all three


def test_each_variable_is_stored_once(tmp_path, trained_dir):
    import tensorflow as tf

    from tf_export_pipeline.demo import build
    from tf_export_pipeline.export import Exporter

    exporter = Exporter(build())
    for step in (10, 20):  # a full save, then a fast one
        exporter.restore(str(trained_dir / f"ckpt-{step}"))
        exporter.write(str(tmp_path / str(step)))
        names = [n for n, _ in tf.train.list_variables(str(tmp_path / str(step) / "variables" / "variables"))
                 if n != "_CHECKPOINTABLE_OBJECT_GRAPH"]
        assert len(names) == len(exporter.model.variables), names  # no variable twice (Keras wrapper + value)


CHUNK = r"""
import json, sys
from tf_export_pipeline.backfill import export_chunk
from tf_export_pipeline.config import load_config
from tf_export_pipeline.records import to_json
print(json.dumps([to_json(r) for r in export_chunk(load_config(sys.argv[1]), sys.argv[3:], sys.argv[2])]))
"""


def test_a_chunk_killed_midway_is_finished_by_its_retry_without_exporting_anything_twice(tmp_path, trained_dir,
                                                                                         forked_validation):
    import os
    import signal
    import time

    from tf_export_pipeline.backfill import export_chunk
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import discover, publish_in_order

    ws = make_workspace(tmp_path, trained_dir, versioning="step")
    cfg = load_config(str(ws.config))
    prefixes = [item.prefix for item in discover(cfg)]
    # The first try holds once its second export is recorded (the first is validated meanwhile) and is
    # killed there.
    env = cli_env({"TF_EXPORT_TEST_HOLD": f"staged#2@{tmp_path / 'never'}"})
    proc = subprocess.Popen([sys.executable, "-c", CHUNK, str(ws.config), "dag/run-1", *prefixes], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stderr:
            if "holding at staged" in line:
                break
        else:
            raise AssertionError(f"the first try ended without holding: {proc.wait()}")
        work = ws.base / "_exports" / "work"
        deadline = time.monotonic() + 60
        while sum('"validated"' in p.read_text() for p in work.glob("*/resume.json")) < 1:
            assert time.monotonic() < deadline, "the first checkpoint was not validated"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first_try = {p.name for p in ws.base.iterdir() if p.name.startswith("temp-")}
    assert len(first_try) == 2

    # Another run's retry takes nothing of this one's.
    other = export_chunk(cfg, prefixes[:1], "dag/run-2", resume=True)
    assert other[0].status == "validated" and not other[0].resumed
    publish_in_order(cfg, other)  # ckpt-10 published by that run: this run's retry finds it done

    records = export_chunk(cfg, prefixes, "dag/run-1", resume=True)
    assert [r.status for r in records] == ["validated"] * 3, records
    assert [bool(r.resumed) for r in records] == [True, True, False]
    # ckpt-10 validated and ckpt-20 staged by the first try: neither exported again, only ckpt-30 is.
    assert {os.path.basename(r.staging) for r in records[:2]} == first_try
    staged = {p.name for p in ws.base.iterdir() if p.name.startswith("temp-")}
    assert len(staged - first_try) == 1
    published, failures = publish_in_order(cfg, records)
    # ckpt-10 was published by the other run meanwhile: its staging here is dropped, not published twice.
    assert failures == [] and [r.status for r in published] == ["skipped", "published", "published"]
    assert ws.versions() == [10, 20, 30]
    assert [p.name for p in ws.base.iterdir() if p.name.startswith("temp-")] == []
    ledger = list((ws.base / "_exports" / "ledger").iterdir())
    assert len(ledger) == 3
