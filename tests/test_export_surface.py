"""What a version can carry: several named endpoints, a tf.Example-parsing signature, Keras `.keras`
files as checkpoints, and `tf-export predict` on a published version. Real TensorFlow, the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import assert_no_partial_versions, cli_env, make_workspace, one_line_error, run_cli


def _write_config(root: Path, **data) -> Path:
    path = root / "export.yaml"
    path.write_text(yaml.safe_dump({"training_dir": "./train", "export_base": "./serving/m", **data}))
    return path


def _versions(base: Path) -> list[int]:
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit()) if base.exists() else []


def _staging(base: Path) -> list[str]:
    return [p.name for p in base.iterdir() if p.name.startswith("temp-")] if base.exists() else []


# -- several endpoints -----------------------------------------------------------
ENDPOINTS_FACTORY = '''
import keras
import tensorflow as tf

from tf_export_pipeline.export.endpoints import Endpoints


def model():
    features = keras.Input(shape=(4,), name="features")
    weight = keras.Input(shape=(1,), name="weight")
    h = keras.layers.Concatenate()([features, weight])
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    return keras.Model({"features": features, "weight": weight},
                       {"score": keras.layers.Dense(1, name="score_head")(h),
                        "prob": keras.layers.Dense(1, activation="sigmoid", name="prob_head")(h)},
                       name="two_heads")


def build():
    m = model()
    signature = [{"features": tf.TensorSpec([None, 4], tf.float32),
                  "weight": tf.TensorSpec([None, 1], tf.float32)}]
    endpoints = Endpoints(m)
    endpoints.add_endpoint("call_inference", lambda x: m(x, training=False), signature)
    endpoints.add_endpoint("call_training", lambda x: m(x, training=True), signature)
    return endpoints
'''

LOAD_ENDPOINTS = """
import json, sys, numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
x = dict(np.load(sys.argv[2]))
feed = {k: tf.constant(v) for k, v in x.items()}
out = {}
for key in sorted(m.signatures.keys()):
    fn = m.signatures[key]
    out[key] = {"inputs": sorted(fn.structured_input_signature[1]),
                "outputs": {k: v.numpy().tolist() for k, v in fn(**feed).items()}}
print(json.dumps(out))
"""


def test_two_endpoints_become_signatures_with_the_models_names(tmp_path):
    import importlib.util

    import tensorflow as tf

    (tmp_path / "two_heads.py").write_text(ENDPOINTS_FACTORY)
    spec = importlib.util.spec_from_file_location("two_heads_for_training", tmp_path / "two_heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.model()
    rng = np.random.default_rng(0)
    optimizer = tf.keras.optimizers.Adam(0.05)
    for _ in range(5):
        x = {"features": rng.standard_normal((32, 4)).astype("float32"),
             "weight": rng.random((32, 1)).astype("float32")}
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True)["score"] - x["features"][:, :1]))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    tf.train.Checkpoint(model=model).write(str(tmp_path / "train" / "ckpt-5"))
    config = _write_config(tmp_path, model={"factory": "two_heads:build"})

    res = run_cli("run", "--config", str(config), "--json")
    assert res.rc == 0, res.err
    rec = res.json
    assert rec["status"] == "published" and rec["step"] == 5
    assert_no_partial_versions(tmp_path / "serving" / "m")

    x = {"features": rng.standard_normal((16, 4)).astype("float32"), "weight": rng.random((16, 1)).astype("float32")}
    np.savez(tmp_path / "x.npz", **x)
    proc = subprocess.run([sys.executable, "-c", LOAD_ENDPOINTS, rec["path"], str(tmp_path / "x.npz")],
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sigs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(sigs) == ["call_inference", "call_training", "serving_default"]
    for sig in sigs.values():
        assert sig["inputs"] == ["features", "weight"]  # the model's own names, not x / x_1
        assert sorted(sig["outputs"]) == ["prob", "score"]  # the dict output's keys, not output_0
    inference = sigs["call_inference"]["outputs"]
    assert sigs["serving_default"]["outputs"] == inference  # the first endpoint is the default
    restored = model(x, training=False)
    np.testing.assert_allclose(inference["score"], restored["score"].numpy(), rtol=1e-5, atol=1e-6)
    # call_training runs the dropout: not the inference outputs
    assert not np.allclose(sigs["call_training"]["outputs"]["score"], inference["score"])

    manifest = json.loads((Path(rec["path"]) / "assets.extra" / "export_manifest.json").read_text())
    assert manifest["validation"]["ok"] is True


def test_keras_export_archive_and_unnamed_outputs_in_process():
    import keras
    import tensorflow as tf

    from tf_export_pipeline.demo import build
    from tf_export_pipeline.errors import ConfigError
    from tf_export_pipeline.export import Exporter

    model = build()
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda x: model(x, training=False), [tf.TensorSpec([None, 4], tf.float32)])
    archive.add_endpoint("doubled", lambda x: {"twice": 2.0 * model(x)}, [tf.TensorSpec([None, 4], tf.float32)])
    sigs = Exporter(archive).serving.signatures
    assert sorted(sigs) == ["doubled", "serve", "serving_default"]
    assert [s.name for s in sigs["serving_default"].structured_input_signature[0]] == ["features"]
    assert list(sigs["serve"].structured_outputs) == ["score"]
    assert list(sigs["doubled"].structured_outputs) == ["twice"]

    from tf_export_pipeline.export.endpoints import Endpoints

    loose = Endpoints(model)
    loose.add_endpoint("pair", lambda x: (model(x), model(x)), [tf.TensorSpec([None, 4], tf.float32)])
    with pytest.raises(ConfigError, match="return a dict of named tensors"):
        Exporter(loose)


# -- the tf.Example signature and predict ------------------------------------------
EXAMPLE_SIGNATURE = {"name": "from_examples", "features": {"features": {"dtype": "float32", "shape": [4]}}}


@pytest.fixture(scope="module")
def published(tmp_path_factory, trained_dir):
    """The demo model with a tf.Example signature, ckpt-30 published once for the tests below."""
    ws = make_workspace(tmp_path_factory.mktemp("examples"), trained_dir,
                        model={"example_signature": EXAMPLE_SIGNATURE})
    res = ws.cli("run", "--json")
    assert res.rc == 0, res.err
    assert res.json["status"] == "published"
    return ws, res.json


def test_example_signature_matches_raw_signature_in_validation(published):
    ws, rec = published
    path = Path(rec["path"])
    manifest = json.loads((path / "assets.extra" / "export_manifest.json").read_text())
    checks = {c["name"]: c for c in manifest["validation"]["checks"]}
    assert checks["example_signature_parity"]["ok"], checks["example_signature_parity"]
    sigs = manifest["validation"]["signatures"]
    assert sigs["from_examples"]["inputs"] == {"examples": {"dtype": "string", "shape": [-1]}}
    assert sigs["from_examples"]["outputs"] == sigs["serving_default"]["outputs"]
    spec = json.loads((path / "assets.extra" / "example_signature.json").read_text())
    assert spec["name"] == "from_examples" and spec["features"]["features"]["shape"] == [4]


def test_predict_on_published_version_with_arrays_and_with_examples(published, tmp_path):
    ws, rec = published
    x = np.random.default_rng(3).standard_normal((3, 4)).astype("float32")
    np.savez(tmp_path / "x.npz", features=x)
    (tmp_path / "x.json").write_text(json.dumps([{"features": row.tolist()} for row in x]))

    raw = ws.cli("predict", str(rec["version"]), "--inputs", str(tmp_path / "x.npz"), "--json")
    assert raw.rc == 0, raw.err
    assert raw.json["signature"] == "serving_default"
    parsed = ws.cli("predict", str(rec["version"]), "--examples", str(tmp_path / "x.json"), "--json")
    assert parsed.rc == 0, parsed.err
    assert parsed.json["signature"] == "from_examples"
    np.testing.assert_allclose(parsed.json["outputs"]["score"], raw.json["outputs"]["score"], rtol=1e-6)

    import tensorflow as tf

    from tf_export_pipeline.demo import build

    model = build()
    tf.train.Checkpoint(model=model).read(str(ws.train / "ckpt-30")).expect_partial()
    np.testing.assert_allclose(raw.json["outputs"]["score"], model(x).numpy(), rtol=1e-5, atol=1e-6)

    human = run_cli("predict", rec["path"], "--inputs", str(tmp_path / "x.npz"))  # a directory, no config
    assert human.rc == 0, human.err
    assert human.out.startswith("Result for output key score:\n[[")


def test_predict_bad_input_isone_line_error(published, tmp_path):
    ws, rec = published
    np.savez(tmp_path / "pickled.npz", features=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "wrong.npz", feature=np.zeros((2, 4), "float32"))
    cases = [
        (["predict", str(rec["version"]), "--inputs", str(tmp_path / "wrong.npz")], False, "needs --config"),
        (["predict", str(rec["version"]), "--inputs", str(tmp_path / "pickled.npz")], True, "pickled"),
        (["predict", str(rec["version"]), "--inputs", str(tmp_path / "wrong.npz")], True, "lacks ['features']"),
        (["predict", "999", "--inputs", str(tmp_path / "wrong.npz")], True, "version 999 is not published"),
    ]
    for args, with_config, expected in cases:
        res = ws.cli(*args, config=with_config)
        assert res.rc == 2, (args, res.err)
        assert expected in one_line_error(res), res.err


def test_feature_spec_that_does_not_match_the_model_fails_and_publishes_nothing(workspace):
    workspace.config.write_text(workspace.config.read_text().replace(
        "  checkpoint_key: model\n",
        "  checkpoint_key: model\n  example_signature:\n    features:\n"
        "      feature: {dtype: float32, shape: [4]}\n"))
    res = workspace.cli("run")
    assert res.rc == 2
    line = one_line_error(res)
    assert "example_signature does not match the inputs of serving_default" in line
    assert "['feature']" in line and str(workspace.config) in line
    assert workspace.versions() == [] and _staging(workspace.base) == []


def test_feature_spec_dtype_and_shape_mismatch_in_process():
    from tf_export_pipeline.config import ExampleSignatureConfig
    from tf_export_pipeline.demo import build
    from tf_export_pipeline.errors import ConfigError
    from tf_export_pipeline.export import Exporter

    def spec(**feature):
        return ExampleSignatureConfig.model_validate({"features": {"features": feature}})

    with pytest.raises(ConfigError, match="is string, but the model's input 'features' is float32"):
        Exporter(build(), example_signature=spec(dtype="string", shape=[4]))
    with pytest.raises(ConfigError, match=r"has shape \[3\] per example, but the model's input 'features' takes \[4\]"):
        Exporter(build(), example_signature=spec(dtype="float32", shape=[3]))
    with pytest.raises(ConfigError, match="already a signature"):
        Exporter(build(), example_signature=ExampleSignatureConfig.model_validate(
            {"name": "serving_default", "features": {"features": {"dtype": "float32", "shape": [4]}}}))


# -- Keras .keras files --------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_train(tmp_path_factory) -> Path:
    """model-1.keras .. model-3.keras written by ModelCheckpoint over three epochs."""
    import keras

    from tf_export_pipeline.demo import build

    d = tmp_path_factory.mktemp("keras") / "train"
    d.mkdir()
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    model.fit(x, y, epochs=3, batch_size=16, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(str(d / "model-{epoch}.keras"))])
    return d


def _keras_workspace(root: Path, keras_train: Path, **model) -> tuple[Path, Path]:
    import shutil

    shutil.copytree(keras_train, root / "train")
    return _write_config(root, model={"format": "keras", **model}), root / "serving" / "m"


def test_model_checkpoint_files_export_without_a_factory(tmp_path, keras_train):
    config, base = _keras_workspace(tmp_path, keras_train)
    assert "factory" not in config.read_text()
    found = run_cli("discover", "--config", str(config), "--json")
    assert found.rc == 0, found.err
    assert [(c["name"], c["step"], c["complete"]) for c in found.json] == \
        [("model-1.keras", 1, True), ("model-2.keras", 2, True), ("model-3.keras", 3, True)]

    res = run_cli("run", "--config", str(config), "--json")
    assert res.rc == 0, res.err
    rec = res.json
    assert rec["status"] == "published" and rec["step"] == 3  # the newest epoch
    assert rec["checkpoint"] == str(tmp_path / "train" / "model-3.keras")
    assert_no_partial_versions(base)
    manifest = json.loads((Path(rec["path"]) / "assets.extra" / "export_manifest.json").read_text())
    checks = {c["name"]: c["ok"] for c in manifest["validation"]["checks"]}
    assert checks["parity_with_checkpoint"] and checks["load_as_tf_serving"]
    assert manifest["checkpoint"]["index_size"] == (tmp_path / "train" / "model-3.keras").stat().st_size

    again = run_cli("run", "--config", str(config), "--json")
    assert again.rc == 0, again.err
    assert again.json == {**rec, "status": "skipped"}
    assert _versions(base) == [rec["version"]]

    import keras
    import tensorflow as tf

    x = np.random.default_rng(5).standard_normal((4, 4)).astype("float32")
    served = tf.saved_model.load(rec["path"]).signatures["serving_default"](features=tf.constant(x))["score"]
    direct = keras.saving.load_model(str(tmp_path / "train" / "model-3.keras"), compile=False)(x)
    np.testing.assert_allclose(served.numpy(), np.asarray(direct), rtol=1e-5, atol=1e-6)


def test_bad_keras_file_fails_with_one_line_and_publishes_nothing(tmp_path, keras_train):
    config, base = _keras_workspace(tmp_path, keras_train)
    bad = tmp_path / "train" / "model-4.keras"
    bad.write_bytes((tmp_path / "train" / "model-3.keras").read_bytes()[:300])  # truncated
    old = time.time() - 3600
    os.utime(bad, (old, old))
    res = run_cli("run", "--config", str(config))
    assert res.rc == 1
    line = one_line_error(res)
    assert "truncated" in line and str(bad) in line
    assert _versions(base) == [] and _staging(base) == []

    with zipfile.ZipFile(bad, "w") as zf:  # a zip, but not a Keras model
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", b"not hdf5")
    res = run_cli("run", "--config", str(config))
    assert res.rc == 1
    line = one_line_error(res)
    assert "cannot load Keras model file" in line and "model-4.keras" in line
    assert _versions(base) == [] and _staging(base) == []


def test_keras_discovery_rules(tmp_path, keras_train):
    import shutil

    from tf_export_pipeline.checkpoints import discover_checkpoints
    from tf_export_pipeline.config import config_from_dict
    from tf_export_pipeline.errors import ConfigError
    from tf_export_pipeline.storage import open_storage

    train = tmp_path / "train"
    shutil.copytree(keras_train, train)
    auto = discover_checkpoints(open_storage(str(train)))  # detected: .keras files, no TF checkpoint
    assert [(c.kind, c.step) for c in auto] == [("keras", 1), ("keras", 2), ("keras", 3)]
    (train / "model-4.keras").write_bytes(b"PK\x03\x04 half")  # just now: still being written
    custom = discover_checkpoints(open_storage(str(train)), fmt="keras", step_pattern=r"model-(\d+)")
    assert custom[-1].name == "model-4.keras" and custom[-1].writing and not custom[-1].complete
    (train / "best.keras").write_bytes((train / "model-1.keras").read_bytes())
    assert [c.step for c in discover_checkpoints(open_storage(str(train)), fmt="keras")][0] is None
    assert discover_checkpoints(open_storage(str(train)), fmt="checkpoint") == []

    base = {"training_dir": "t", "export_base": "e"}
    with pytest.raises(ConfigError, match="missing key 'model.factory'"):
        config_from_dict({**base, "model": {"format": "checkpoint"}}, str(tmp_path))
    assert config_from_dict({**base, "model": {"format": "keras"}}, str(tmp_path)).model.factory is None
    with pytest.raises(ConfigError, match="step_pattern"):
        config_from_dict({**base, "model": {"format": "keras", "step_pattern": "model-"}}, str(tmp_path))
    # how checkpoints are found does not change what a version is: same ledger keys
    plain = config_from_dict({**base, "model": {"factory": "a.b:c"}}, str(tmp_path))
    found_as = config_from_dict({**base, "model": {"factory": "a.b:c", "format": "checkpoint"}}, str(tmp_path))
    assert plain.config_hash == found_as.config_hash


def test_help_lists_predict():
    res = run_cli("predict", "--help")
    assert res.rc == 0 and "usage: tf-export predict" in res.out and "allow_pickle=False" in res.out
    assert "predict" in run_cli("--help").out

