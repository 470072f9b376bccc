"""The validation gate: each check failed on purpose, and models of other shapes passing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from tests.conftest import (
    assert_no_partial_versions,
    cli_popen,
    make_workspace,
    one_line_error,
    run_cli,
)
from tests.models import save_checkpoints

CONTRACT = {
    "signatures": {
        "serving_default": {
            "method": "tensorflow/serving/predict",
            "inputs": {"features": {"dtype": "float32", "shape": [-1, 4]}},
            "outputs": {"score": {"dtype": "float32", "shape": [None, 1]}},
        }
    }
}



def _failed_cleanly(ws, res, before):
    assert res.rc == 1, res.err
    line = one_line_error(res)
    assert line.startswith("tf-export: error: validation failed: ")
    assert ws.versions() == before
    assert not [e for e in ws.entries() if e.startswith("temp-")]
    work = ws.base / "_exports" / "work"
    assert not work.exists() or not list(work.iterdir())
    return line


def _with_contract(tmp_path, trained_dir, contract, **overrides):
    (tmp_path / "contract.yaml").write_text(yaml.safe_dump(contract))
    return make_workspace(tmp_path, trained_dir, validation={"contract": "contract.yaml"}, **overrides)


def test_contract_that_holds_passes_and_is_reported(tmp_path, trained_dir):
    ws = _with_contract(tmp_path, trained_dir, CONTRACT)
    rec = ws.cli("run", "--json")
    assert rec.rc == 0, rec.err
    manifest = json.loads((ws.base / str(rec.json["version"]) / "assets.extra" / "export_manifest.json").read_text())
    checks = {c["name"]: c for c in manifest["validation"]["checks"]}
    assert checks["signature_contract"]["ok"] is True


def test_contract_dtype_mismatch(tmp_path, trained_dir):
    contract = json.loads(json.dumps(CONTRACT))
    contract["signatures"]["serving_default"]["inputs"]["features"]["dtype"] = "int64"
    ws = _with_contract(tmp_path, trained_dir, contract)
    line = _failed_cleanly(ws, ws.cli("run"), [])
    assert "signature 'serving_default' input 'features': expected int64 [-1, 4], found float32 [-1, 4]" in line
    assert str(ws.base) in line


def test_contract_missing_input(tmp_path, trained_dir):
    contract = json.loads(json.dumps(CONTRACT))
    contract["signatures"]["serving_default"]["inputs"]["age"] = {"dtype": "float32", "shape": [-1, 1]}
    ws = _with_contract(tmp_path, trained_dir, contract)
    line = _failed_cleanly(ws, ws.cli("run"), [])
    assert "input 'age': expected float32 [-1, 1], found nothing (missing)" in line


def test_contract_shape_mismatch_and_extra_output(tmp_path, trained_dir):
    contract = json.loads(json.dumps(CONTRACT))
    contract["signatures"]["serving_default"]["outputs"] = {"score": {"dtype": "float32", "shape": [-1, 2]}}
    ws = _with_contract(tmp_path, trained_dir, contract)
    line = _failed_cleanly(ws, ws.cli("run"), [])
    assert "output 'score': expected float32 [-1, 2], found float32 [-1, 1]" in line


def test_renamed_output_against_the_live_version(workspace):
    live = workspace.cli("run", "--checkpoint", "ckpt-20", "--json").json
    data = yaml.safe_load(workspace.config.read_text())
    data["model"]["factory"] = "tests.models:renamed_output"
    workspace.config.write_text(yaml.safe_dump(data))
    line = _failed_cleanly(workspace, workspace.cli("run"), [live["version"]])
    assert "signature 'serving_default' output 'score' removed or renamed" in line
    # allowed explicitly, the same export publishes and the diff is recorded
    data["validation"] = {"allow_breaking": True}
    workspace.config.write_text(yaml.safe_dump(data))
    res = workspace.cli("run", "--json")
    assert res.rc == 0, res.err
    manifest = json.loads(
        (workspace.base / str(res.json["version"]) / "assets.extra" / "export_manifest.json").read_text())
    diff = manifest["validation"]["diff"]
    assert diff["against"] == live["version"]
    assert diff["breaking"] == ["signature 'serving_default' output 'score' removed or renamed"]
    assert diff["additions"] == ["signature 'serving_default' output 'prediction' added"]


def test_shape_narrowing_against_the_live_version(workspace):
    live = workspace.cli("run", "--checkpoint", "ckpt-20", "--json").json
    data = yaml.safe_load(workspace.config.read_text())
    data["model"]["factory"] = "tests.models:fixed_batch"
    workspace.config.write_text(yaml.safe_dump(data))
    line = _failed_cleanly(workspace, workspace.cli("run"), [live["version"]])
    assert "input 'features': shape narrowed from [-1, 4] to [8, 4]" in line


def test_nan_in_the_weights(workspace):
    import tensorflow as tf

    from tf_export_pipeline.demo import build

    before = [workspace.cli("run", "--json").json["version"]]
    model = build()
    tf.train.Checkpoint(model=model).read(str(workspace.train / "ckpt-30")).expect_partial()
    model.get_layer("score").kernel.assign(np.full((8, 1), np.nan, dtype="float32"))
    tf.train.Checkpoint(model=model).write(str(workspace.train / "ckpt-40"))
    line = _failed_cleanly(workspace, workspace.cli("run", "--checkpoint", "ckpt-40"), before)
    assert "non-finite values in output(s) ['score']" in line


def test_parity_break_between_serving_function_and_restored_model(tmp_path):
    from tests.models import noisy_serving
    from tf_export_pipeline.demo import write_config

    save_checkpoints(noisy_serving, str(tmp_path / "train"), steps=(10,))
    config = write_config(str(tmp_path), model={"factory": "tests.models:noisy_serving"})
    res = run_cli("run", "--config", config)
    assert res.rc == 1, res.err
    line = one_line_error(res)
    assert "output 'python_noise' differs from the restored checkpoint by up to" in line
    assert not (tmp_path / "serving" / "demo_regressor").exists() or not [
        p for p in (tmp_path / "serving" / "demo_regressor").iterdir()
        if p.name.isdigit() or p.name.startswith("temp-")]


def _corrupt_staging(ws, tmp_path, corrupt):
    release = tmp_path / "release"
    proc = cli_popen("run", "--config", str(ws.config), env={"TF_EXPORT_TEST_HOLD": f"exported@{release}"})
    line = proc.stderr.readline()
    assert "holding at exported" in line, proc.communicate()[1]
    staging = next(p for p in ws.base.iterdir() if p.name.startswith("temp-"))
    corrupt(staging)
    release.touch()
    out, err = proc.communicate(timeout=300)
    return type("R", (), {"rc": proc.returncode, "err": err, "out": out})()


def test_truncated_variables_in_staging_are_caught_by_the_fresh_load(workspace, tmp_path):
    before = [workspace.cli("run", "--checkpoint", "ckpt-20", "--json").json["version"]]

    def truncate(staging):
        data_file = staging / "variables" / "variables.data-00000-of-00001"
        data_file.write_bytes(data_file.read_bytes()[:20])

    res = _corrupt_staging(workspace, tmp_path, truncate)
    line = _failed_cleanly(workspace, res, before)
    assert "SavedModel does not load as TF Serving loads it: its restore op failed on variables/" in line


def test_missing_saved_model_pb_in_staging(workspace, tmp_path):
    res = _corrupt_staging(workspace, tmp_path, lambda staging: (staging / "saved_model.pb").unlink())
    line = _failed_cleanly(workspace, res, [])
    assert "saved_model.pb is missing" in line


def test_savedmodel_without_a_serve_meta_graph_is_refused(tmp_path):
    import tensorflow as tf

    path = tmp_path / "train_only"
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        features = tf.compat.v1.placeholder(tf.float32, [None, 4], name="features")
        weights = tf.compat.v1.get_variable("w", initializer=tf.ones([4, 1]))
        score = tf.matmul(features, weights, name="score")
        sess.run(tf.compat.v1.global_variables_initializer())
        builder = tf.compat.v1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(sess, ["train"], signature_def_map={
            "serving_default": tf.compat.v1.saved_model.predict_signature_def({"features": features},
                                                                              {"score": score})})
        builder.save()
    # tf.saved_model.load takes the only meta graph, whatever its tags; TF Serving looks for "serve" only.
    loaded = tf.saved_model.load(str(path))
    out = loaded.signatures["serving_default"](features=tf.ones([2, 4]))["score"].numpy()
    np.testing.assert_array_equal(out, np.full((2, 1), 4.0, "float32"))

    res = run_cli("validate", str(path), "--json")
    assert res.rc == 1, res.err
    line = one_line_error(res)
    assert line == ("tf-export: error: validation failed: SavedModel does not load as TF Serving loads it: "
                    f"no meta graph tagged 'serve' (tag-sets found: [['train']]): {path}")
    assert res.json["ok"] is False and res.json["loader"] == "session"
    assert [(c["name"], c["ok"]) for c in res.json["checks"]] == [("saved_model_pb", True),
                                                                  ("load_as_tf_serving", False)]


def test_every_signature_runs_and_the_init_op_runs_as_tf_serving_runs_them(tmp_path, forked_validation):
    import tensorflow as tf

    from tf_export_pipeline.validate import ValidationSession

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\nc\n")

    class Model(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.lookup.StaticHashTable(tf.lookup.TextFileInitializer(
                str(vocab), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER), -1)
            self.w = tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
        def serve(self, features):
            return {"score": tf.reduce_sum(features, axis=1, keepdims=True) * self.w}

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="features")])
        def strict(self, features):
            tf.debugging.assert_less(features, -50.0, message="features must be below -50")
            return {"y": features * self.w}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="word")])
        def lookup(self, word):
            return {"index": self.table.lookup(word)}

    model = Model()
    tf.saved_model.save(model, str(tmp_path / "good"), signatures={"serving_default": model.serve,
                                                                   "lookup": model.lookup})
    tf.saved_model.save(model, str(tmp_path / "strict"), signatures={"serving_default": model.serve,
                                                                     "strict": model.strict})
    shutil.copytree(tmp_path / "good", tmp_path / "no_vocab")
    (tmp_path / "no_vocab" / "assets" / "vocab.txt").unlink()
    with ValidationSession() as session:
        good, strict, no_vocab = (session.validate(str(tmp_path / name)) for name in ("good", "strict", "no_vocab"))

    assert good["ok"], good["reason"]
    checks = {c["name"]: c for c in good["checks"]}
    assert checks["load_as_tf_serving"]["detail"] == "tag serve, 2 signatures"
    # the samples are serving_default's: a signature with other inputs is named, not failed
    assert checks["run_signature_lookup"] == {"name": "run_signature_lookup", "ok": True,
                                              "detail": "not run: the samples lack its input(s) ['word']"}
    assert not strict["ok"]
    assert strict["reason"].startswith("signature 'strict' failed to run (InvalidArgumentError: assertion failed: "
                                       "[features must be below -50]")
    assert not no_vocab["ok"]
    assert no_vocab["reason"].startswith("SavedModel does not load as TF Serving loads it: its init op (tables, "
                                         "assets) failed (NotFoundError: ")
    assert "vocab.txt" in no_vocab["reason"]
    assert {r["loader"] for r in (good, strict, no_vocab)} == {"session"}


def _metrics(ws, values: dict[int, float]):
    for step, loss in values.items():
        (ws.train / f"metrics-{step}.json").write_text(json.dumps({"step": step, "metrics": {"val_loss": loss}}))


def test_metric_gate_holds_back_a_worse_checkpoint(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir,
                        gate={"metric": "val_loss", "mode": "min", "source": "train/metrics-{step}.json"})
    _metrics(ws, {10: 0.30, 20: 0.50, 30: 0.90})
    first = ws.cli("run", "--checkpoint", "ckpt-20", "--json").json
    assert first["status"] == "published"
    manifest = json.loads((ws.base / str(first["version"]) / "assets.extra" / "export_manifest.json").read_text())
    assert manifest["gate"]["metric"] == "val_loss" and manifest["gate"]["value"] == 0.5

    worse = ws.cli("run", "--json")
    assert worse.rc == 0, worse.err
    assert worse.json["status"] == "gated" and worse.json["step"] == 30
    assert worse.json["value"] == 0.9 and worse.json["live_value"] == 0.5
    assert worse.json["live_version"] == first["version"] and worse.json["metric"] == "val_loss"
    assert ws.versions() == [first["version"]]
    human = ws.cli("run")
    assert "gated" in human.out and "val_loss=0.9" in human.out

    forced = ws.cli("run", "--force", "--json")
    assert forced.json["status"] == "published" and forced.json["step"] == 30
    assert len(ws.versions()) == 2


def test_metric_gate_reads_tensorboard_scalars(tmp_path):
    import tensorflow as tf

    from tf_export_pipeline.gate import compare, read_metric

    logdir = tmp_path / "events"
    writer = tf.summary.create_file_writer(str(logdir))
    with writer.as_default():
        for step, acc in ((10, 0.7), (20, 0.8), (30, 0.75)):
            tf.summary.scalar("accuracy", acc, step=step)
            tf.summary.scalar("loss", 1 - acc, step=step)
    writer.close()
    assert read_metric(str(logdir), "accuracy", step=20, name="ckpt-20") == pytest.approx(0.8)
    assert read_metric(str(logdir), "loss", step=30, name="ckpt-30") == pytest.approx(0.25)
    assert compare("max", 0.75, 0.8)["worse"] is True
    assert compare("max", 0.8, 0.8)["worse"] is False
    from tf_export_pipeline.gate import GateError

    with pytest.raises(GateError, match="no scalar 'accuracy' at step 40"):
        read_metric(str(logdir), "accuracy", step=40, name="ckpt-40")


def test_warmup_records_parse_back_and_match_the_samples(tmp_path, trained_dir):
    samples = np.random.default_rng(3).standard_normal((3, 4)).astype("float32")
    np.savez(tmp_path / "samples.npz", features=samples)
    ws = make_workspace(tmp_path, trained_dir, validation={"samples": "samples.npz", "warmup": True})
    rec = ws.cli("run", "--json")
    assert rec.rc == 0, rec.err
    path = ws.base / str(rec.json["version"]) / "assets.extra" / "tf_serving_warmup_requests"
    import tensorflow as tf

    from tf_export_pipeline.validate.warmup import read_warmup

    logs = read_warmup(str(path))
    assert len(logs) == 3
    rows = [tf.make_ndarray(log.predict_log.request.inputs["features"]) for log in logs]
    assert all(log.predict_log.request.model_spec.signature_name == "serving_default" for log in logs)
    np.testing.assert_array_equal(np.concatenate(rows), samples)
    manifest = json.loads((path.parent / "export_manifest.json").read_text())
    checks = {c["name"]: c for c in manifest["validation"]["checks"]}
    assert checks["warmup_records"]["ok"] and "3 PredictionLog" in checks["warmup_records"]["detail"]
    assert checks["smoke_inference"]["detail"] == "batch of 3"


def test_samples_that_do_not_fit_the_model_are_a_config_error(tmp_path, trained_dir):
    np.savez(tmp_path / "samples.npz", feature=np.zeros((2, 4), "float32"))
    ws = make_workspace(tmp_path, trained_dir, validation={"samples": "samples.npz"})
    res = ws.cli("run")
    assert res.rc == 2
    assert "missing ['features'], extra ['feature']" in one_line_error(res)
    assert ws.versions() == []


@pytest.mark.parametrize("factory, inputs", [
    ("tests.models:two_inputs", {"age": "float32", "tokens": "int32"}),
    ("tests.models:scorer_module", {"x": "float32"}),
    ("tests.models:lookup_model", {"word": "string"}),
])
def test_other_model_shapes_pass(tmp_path, factory, inputs):
    import importlib

    from tf_export_pipeline.demo import write_config

    module, name = factory.split(":")
    save_checkpoints(getattr(importlib.import_module(module), name), str(tmp_path / "train"), steps=(5, 10))
    config = write_config(str(tmp_path), model={"factory": factory})
    res = run_cli("run", "--config", config, "--json")
    assert res.rc == 0, res.err
    assert res.json["status"] == "published" and res.json["step"] == 10
    version_dir = tmp_path / "serving" / "demo_regressor" / str(res.json["version"])
    manifest = json.loads((version_dir / "assets.extra" / "export_manifest.json").read_text())
    sig = manifest["validation"]["signatures"]["serving_default"]
    assert {k: v["dtype"] for k, v in sig["inputs"].items()} == inputs
    assert manifest["validation"]["parity_max_abs_diff"] < 1e-5
    assert_no_partial_versions(version_dir.parent)


def test_validate_against_reports_the_diff(workspace):
    live = workspace.cli("run", "--checkpoint", "ckpt-20", "--json").json
    data = yaml.safe_load(workspace.config.read_text())
    data["model"]["factory"] = "tests.models:renamed_output"
    data["validation"] = {"allow_breaking": True}
    workspace.config.write_text(yaml.safe_dump(data))
    new = workspace.cli("run", "--json").json
    res = run_cli("validate", new["path"], "--against", live["path"], "--json")
    assert res.rc == 1
    assert res.json["diff"]["breaking"] == ["signature 'serving_default' output 'score' removed or renamed"]
    human = run_cli("validate", new["path"], "--against", live["path"], "--config", str(workspace.config))
    assert human.rc == 0, human.err
    assert f"Against version {live['version']}:" in human.out and "breaking: signature 'serving_default'" in human.out
