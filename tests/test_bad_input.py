"""Bad input: one line naming the cause and the path, a non-zero exit, nothing published, the live version untouched."""

from __future__ import annotations

import os
import shutil
import textwrap

import pytest
import yaml

from tests.conftest import make_workspace, one_line_error, run_cli


def _nothing_changed(ws, before):
    assert ws.versions() == before
    assert not [e for e in ws.entries() if e.startswith("temp-")]


@pytest.fixture
def live(workspace):
    """A workspace with version of ckpt-30 live."""
    res = workspace.cli("run", "--json")
    assert res.json["status"] == "published"
    return workspace


def test_training_dir_missing(workspace):
    shutil.rmtree(workspace.train)
    res = workspace.cli("run")
    assert res.rc == 1
    assert "training directory does not exist" in one_line_error(res) and str(workspace.train) in res.err
    _nothing_changed(workspace, [])


def test_training_dir_empty(workspace):
    shutil.rmtree(workspace.train)
    workspace.train.mkdir()
    res = workspace.cli("run")
    assert res.rc == 1
    assert "holds no checkpoints" in one_line_error(res) and str(workspace.train) in res.err
    _nothing_changed(workspace, [])


def test_missing_data_shard_of_newest_checkpoint(live):
    before = live.versions()
    live.train_more(10)
    os.remove(live.train / "ckpt-40.data-00000-of-00001")
    res = live.cli("run")
    assert res.rc == 1
    line = one_line_error(res)
    assert "incomplete" in line and "ckpt-40.data-00000-of-00001" in line and str(live.train / "ckpt-40") in line
    _nothing_changed(live, before)
    listing = live.cli("discover", "--json").json
    assert [d["complete"] for d in listing if d["step"] == 40] == [False]


def test_truncated_data_shard(live):
    before = live.versions()
    live.train_more(10)
    shard = live.train / "ckpt-40.data-00000-of-00001"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    res = live.cli("run")
    assert res.rc == 1
    line = one_line_error(res)
    assert "truncated or corrupt" in line and str(live.train / "ckpt-40") in line
    _nothing_changed(live, before)


def test_missing_index_of_a_listed_checkpoint(live):
    before = live.versions()
    live.train_more(10)
    os.remove(live.train / "ckpt-40.index")
    res = live.cli("run")
    assert res.rc == 1
    assert "ckpt-40.index" in one_line_error(res)
    _nothing_changed(live, before)


def test_checkpoint_of_a_different_model(tmp_path, trained_dir):
    from tf_export_pipeline.demo import build_wide, train

    ws = make_workspace(tmp_path, trained_dir)
    assert ws.cli("run").rc == 0
    before = ws.versions()
    train(str(ws.train), steps=10, checkpoint_every=10, start_step=40, factory=build_wide, resume=False)
    res = ws.cli("run", "--checkpoint", "ckpt-50")
    assert res.rc == 1
    line = one_line_error(res)
    assert "different model" in line and str(ws.train / "ckpt-50") in line
    _nothing_changed(ws, before)


def test_checkpoint_saved_under_another_key(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, model={"checkpoint_key": "net"})
    res = ws.cli("run")
    assert res.rc == 1
    assert "does not hold this model under key 'net'" in one_line_error(res)
    _nothing_changed(ws, [])


def test_factory_cannot_be_imported(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, model={"factory": "no_such_pkg.models:build"})
    res = ws.cli("run")
    assert res.rc == 2
    assert "cannot import model factory module 'no_such_pkg.models'" in one_line_error(res)
    _nothing_changed(ws, [])


def test_factory_raises(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, model={"factory": "broken_factory:build"})
    (tmp_path / "broken_factory.py").write_text(textwrap.dedent("""
        def build():
            raise RuntimeError("weights layout unknown")
    """))
    res = ws.cli("run")
    assert res.rc == 2
    line = one_line_error(res)
    assert "model factory raised RuntimeError: weights layout unknown" in line and "broken_factory:build" in line
    _nothing_changed(ws, [])


def test_factory_from_the_config_folder_is_importable(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, model={"factory": "my_model:build"})
    (tmp_path / "my_model.py").write_text("from tf_export_pipeline.demo import build\n")
    res = ws.cli("run", "--json")
    assert res.rc == 0, res.err
    assert res.json["status"] == "published"


def test_savedmodel_without_serving_signature(tmp_path):
    import tensorflow as tf

    module = tf.Module()
    module.v = tf.Variable(1.0)
    module.f = tf.function(lambda x: x * module.v, input_signature=[tf.TensorSpec([None], tf.float32)])
    path = tmp_path / "no_signature"
    tf.saved_model.save(module, str(path), signatures={})
    res = run_cli("validate", str(path))
    assert res.rc == 1
    line = one_line_error(res)
    assert "no 'serving_default' signature" in line and str(path) in line


def test_module_factory_without_serving_function(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, model={"factory": "bare_module:build"})
    (tmp_path / "bare_module.py").write_text("import tensorflow as tf\n\ndef build():\n    m = tf.Module()\n"
                                             "    m.v = tf.Variable(1.0)\n    return m\n")
    res = ws.cli("run")
    assert res.rc == 2
    assert "no serving function" in one_line_error(res)
    _nothing_changed(ws, [])


def test_export_base_is_a_file(workspace):
    workspace.base.parent.mkdir(parents=True)
    workspace.base.write_text("not a directory")
    res = workspace.cli("run")
    assert res.rc == 2
    assert "export_base is a file" in one_line_error(res) and str(workspace.base) in res.err
    assert workspace.base.read_text() == "not a directory"


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(colour="blue"), "unknown key 'colour'"),
    (lambda d: d["model"].update(facotry="x:y"), "unknown key 'model.facotry'"),
    (lambda d: d.pop("export_base"), "missing key 'export_base'"),
    (lambda d: d.update(versioning="daily"), "bad value for 'versioning'"),
    (lambda d: d["model"].update(factory="no_colon"), "bad value for 'model.factory'"),
])
def test_config_errors(workspace, mutate, expected):
    data = yaml.safe_load(workspace.config.read_text())
    mutate(data)
    workspace.config.write_text(yaml.safe_dump(data))
    for cmd in ("run", "discover", "status"):
        res = workspace.cli(cmd)
        assert res.rc == 2
        line = one_line_error(res)
        assert expected in line and str(workspace.config) in line
    _nothing_changed(workspace, [])


def test_config_file_missing_or_not_yaml(tmp_path):
    res = run_cli("run", "--config", str(tmp_path / "nope.yaml"))
    assert res.rc == 2 and "config file not found" in one_line_error(res)
    bad = tmp_path / "bad.yaml"
    bad.write_text("training_dir: [unclosed\n")
    res = run_cli("status", "--config", str(bad))
    assert res.rc == 2 and "not valid YAML" in one_line_error(res) and str(bad) in res.err


def test_checkpoint_that_does_not_exist(live):
    before = live.versions()
    res = live.cli("run", "--checkpoint", "ckpt-999")
    assert res.rc == 2
    assert "checkpoint not found: ckpt-999" in one_line_error(res)
    _nothing_changed(live, before)


def test_verbose_shows_the_traceback(workspace):
    shutil.rmtree(workspace.train)
    res = workspace.cli("run", "--verbose")
    assert res.rc == 1 and "Traceback" in res.err
