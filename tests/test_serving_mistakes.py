"""Serving control meeting mistakes: a config copied with its model name, a policy switched, a version
that lost files, a history record edited by hand, and a failure after a run's commit point.

Model config files are read back with TF Serving's own protos (``model_server_config_pb2`` +
``text_format``), as in tests/test_serving.py, whose helpers these tests share.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, make_workspace, one_line_error
from tests.test_serving import (  # noqa: F401  (published: a fixture)
    CONFIG_REL,
    MODEL,
    SERVING,
    copy_of,
    entry,
    fake_version,
    model_config,
    parse,
    published,
    state,
)

pytestmark = pytest.mark.timeout(600)

HISTORY = ("_exports", "serving", "history")
SKIPPED = "skipping unreadable serving history record"


def _policy(data: bytes) -> str:
    return entry(parse(data)).model_version_policy.WhichOneof("policy_choice")


def _switch(ws, **serving) -> None:
    """Rewrite the workspace's config with other serving settings (everything else as copy_of writes it)."""
    from tf_export_pipeline.demo import write_config

    write_config(str(ws.root), versioning="step", serving={**SERVING, **serving})


# -- two configs, one model name, one model config file ------------------------------------------
def test_a_model_name_entry_belongs_to_one_export_base(tmp_path, trained_dir):
    shared = tmp_path / "tfs" / "models.config"
    serving = {**SERVING, "model_config_file": str(shared)}
    first = make_workspace(tmp_path / "first", trained_dir, versioning="step", serving=serving)
    copied = make_workspace(tmp_path / "copied", trained_dir, versioning="step", serving=serving)

    res = first.cli("run", "--json")
    assert res.rc == 0, res.err
    assert res.json["version"] == 30 and res.json["labels"] == {"stable": 30, "canary": 30}
    written = shared.read_bytes()

    # the copy publishes (its version is committed before the serving step) but leaves the entry alone
    res = copied.cli("run", "--json")
    assert res.rc == 0, res.err
    assert res.json["status"] == "published" and res.json["version"] == 30
    assert copied.versions() == [30]
    assert shared.read_bytes() == written
    ours = entry(parse(shared.read_bytes()))
    assert ours.base_path == str(first.base)
    assert state(shared.read_bytes()) == ([30], {"stable": 30, "canary": 30})
    warning = [line for line in res.err.splitlines() if "label was not set" in line]
    assert len(warning) == 1, res.err
    for name in (MODEL, str(first.base), str(copied.base), str(shared)):
        assert name in warning[0], (name, warning[0])
    assert "serving_error" in res.json
    assert not (copied.base / "_exports" / "serving" / "history").exists()

    for args in (("labels",), ("promote", "30", "--now"), ("rollback", "--to", "30", "--now"), ("status",),
                 ("gc",)):
        res = copied.cli(*args)
        assert res.rc == 2, (args, res.err)
        line = one_line_error(res)
        for name in (MODEL, str(first.base), str(copied.base), str(shared)):
            assert name in line, (args, name, line)
    assert shared.read_bytes() == written
    shown = first.cli("labels", "--json")
    assert shown.rc == 0, shown.err
    assert shown.json["labels"] == {"stable": 30, "canary": 30}


# -- switching serving.policy ---------------------------------------------------------------------
def test_status_serves_what_the_file_says_whatever_the_policy(tmp_path, published):
    ws = copy_of(published, tmp_path, serving=SERVING)
    target = model_config(ws)
    assert ws.cli("promote", "10", "--now").rc == 0          # the file lists 10 only; 20 is the highest
    st = ws.cli("status", "--json")
    assert st.rc == 0, st.err
    assert st.json["serving"] == 10 and st.json["labels"] == {"stable": 10}

    _switch(ws, policy="latest")                              # the next run rewrites the entry; none yet
    st = ws.cli("status", "--json")
    assert st.rc == 0, st.err
    assert st.json["serving"] == 10, "the file still lists 10 only"
    assert st.json["labels"] == {"stable": 10}
    assert [v["labels"] for v in st.json["versions"]] == [["stable"], []]
    assert "<- serving" in [line for line in ws.cli("status").out.splitlines() if line.startswith("10 ")][0]

    # a version name outside int64 is no version to TF Serving
    fake_version(ws.base, 2 ** 63, like=20)
    from google.protobuf import text_format

    config = parse(target.read_bytes())                      # as a person would switch it by hand
    e = entry(config)
    e.model_version_policy.latest.num_versions = 1
    e.ClearField("version_labels")
    target.write_text(text_format.MessageToString(config))
    assert _policy(target.read_bytes()) == "latest"
    st = ws.cli("status", "--json")
    assert st.rc == 0, st.err
    assert st.json["serving"] == 20 and st.json["labels"] == {}

    target.write_text("model_config_list { }\n")             # no entry: the server serves nothing of it
    st = ws.cli("status", "--json")
    assert st.rc == 0, st.err
    assert st.json["serving"] is None


def test_policy_switch_rewrites_the_entry_at_the_next_publish(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, versioning="step", serving=SERVING)
    target = model_config(ws)
    assert ws.cli("run", "--checkpoint", "ckpt-20").rc == 0
    res = ws.cli("run", "--json")
    assert res.rc == 0 and res.json["labels"] == {"stable": 20, "canary": 30}, res.err
    assert state(target.read_bytes()) == ([20, 30], {"stable": 20, "canary": 30})

    _switch(ws, policy="latest")
    ws.train_more()                                           # ckpt-40
    res = ws.cli("run", "--json")
    assert res.rc == 0, res.err
    assert res.json["status"] == "published" and res.json["version"] == 40
    assert "serving_error" not in res.json and "retention failed" not in res.err
    assert "serving.policy is now 'latest'" in res.err and str(target) in res.err
    e = entry(parse(target.read_bytes()))
    assert e.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert e.model_version_policy.latest.num_versions == 1
    assert not e.version_labels and e.base_path == str(ws.base)
    st = ws.cli("status", "--json")
    assert st.rc == 0, st.err
    assert st.json["serving"] == 40 and st.json["labels"] == {}
    assert ws.cli("labels", "--json").json["entry_policy"] == "latest"

    _switch(ws, policy="labels")
    ws.train_more()                                           # ckpt-50
    res = ws.cli("run", "--json")
    assert res.rc == 0, res.err
    assert res.json["version"] == 50 and res.json["labels"] == {"stable": 50, "canary": 50}
    assert "serving.policy is now 'labels'" in res.err
    assert _policy(target.read_bytes()) == "specific"
    assert state(target.read_bytes()) == ([50], {"stable": 50, "canary": 50})
    st = ws.cli("status", "--json")
    assert st.rc == 0 and st.json["serving"] == 50 and st.json["labels"] == {"stable": 50, "canary": 50}
    records = ws.cli("history", "--json").json
    assert [(r["command"], r["phase"]) for r in records][-3:] == [
        ("publish", "policy"), ("publish", "list"), ("publish", "labels")]


# -- promoting a version that lost files -----------------------------------------------------------
@pytest.mark.parametrize("damage", ["variables removed", "a file changed size"])
def test_promote_checks_the_version_against_its_manifest(tmp_path, published, damage):
    ws = copy_of(published, tmp_path, serving=SERVING)
    assert ws.cli("promote", "10", "--now").rc == 0
    before = model_config(ws).read_bytes()
    version = ws.base / "20"
    if damage == "variables removed":
        shutil.rmtree(version / "variables")
        named = "variables/"
    else:
        with open(version / "fingerprint.pb", "ab") as fh:
            fh.write(b"\x00")
        named = "fingerprint.pb"
    for args in (("promote", "20", "--now"), ("promote", "20", "--label", "canary", "--now"),
                 ("rollback", "--to", "20", "--now")):
        res = ws.cli(*args)
        assert res.rc == 2, (args, res.err)
        line = one_line_error(res)
        assert "version 20" in line and "not whole" in line and str(version) in line and named in line, line
        assert model_config(ws).read_bytes() == before
    view = ws.cli("labels", "--json").json
    assert view["labels"] == {"stable": 10}
    assert ws.cli("promote", "10", "--label", "canary", "--now").rc == 0  # a whole one still moves


# -- a hand-edited history record -----------------------------------------------------------------
def _record(**fields) -> dict:
    rec = {"id": "1700000000000000000-0badc0de", "at": 1700000000.0, "command": "promote", "phase": "labels",
           "model": MODEL, "file": "models.config", "versions_before": [10], "versions_after": [10],
           "labels_before": {"stable": 10}, "labels_after": {"stable": 10}, "host": "h", "written": True}
    return {**rec, **fields}


CORRUPT = {
    "at is text": json.dumps(_record(at="2023-11-14 22:13")),
    "not JSON": "{\"at\": 17000",
    "not an object": json.dumps([_record()]),
    "labels not a mapping": json.dumps(_record(labels_after=[10])),
    "versions not numbers": json.dumps(_record(versions_after=["10"])),
}


def _corrupt(ws, kind: str = "at is text") -> Path:
    path = ws.base.joinpath(*HISTORY, "1700000000000000000-0badc0de.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(CORRUPT[kind])
    return path


def _warned(res, path: Path) -> bool:
    return any(SKIPPED in line and str(path) in line for line in res.err.splitlines())


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_labels_and_history_skip_an_unreadable_history_record(tmp_path, published, kind):
    ws = copy_of(published, tmp_path, serving=SERVING)
    assert ws.cli("promote", "10", "--now").rc == 0
    assert ws.cli("promote", "20", "--now").rc == 0
    path = _corrupt(ws, kind)
    res = ws.cli("labels", "--json")
    assert res.rc == 0, res.err
    assert res.json["labels"] == {"stable": 20} and res.json["rollback_to"] == 10
    assert _warned(res, path), res.err
    res = ws.cli("history", "--json")
    assert res.rc == 0, res.err
    assert [r["labels_after"] for r in res.json] == [{}, {"stable": 10}, {"stable": 10}, {"stable": 20}]
    assert _warned(res, path), res.err
    assert ws.cli("history").rc == 0


def test_rollback_skips_an_unreadable_history_record(tmp_path, published):
    ws = copy_of(published, tmp_path, serving=SERVING)
    assert ws.cli("promote", "10", "--now").rc == 0
    assert ws.cli("promote", "20", "--now").rc == 0
    path = _corrupt(ws)
    res = ws.cli("rollback", "--now", "--json")
    assert res.rc == 0, res.err
    assert res.json["labels_after"] == {"stable": 10}
    assert state(model_config(ws).read_bytes())[1] == {"stable": 10}
    assert _warned(res, path), res.err


def test_gc_skips_an_unreadable_history_record(tmp_path, published):
    ws = copy_of(published, tmp_path, serving=SERVING, retention={"keep": 1})
    assert ws.cli("promote", "10", "--now").rc == 0
    assert ws.cli("promote", "20", "--now").rc == 0
    path = _corrupt(ws)
    res = ws.cli("gc", "--json")
    assert res.rc == 0, res.err
    assert res.json["removed_versions"] == []                # 10 is the rollback target, 20 stable
    assert ws.versions() == [10, 20]
    assert _warned(res, path), res.err


def test_run_skips_an_unreadable_history_record(tmp_path, published):
    ws = copy_of(published, tmp_path, serving=SERVING)
    assert ws.cli("promote", "20", "--now").rc == 0
    path = _corrupt(ws)
    res = ws.cli("run", "--json")
    assert res.rc == 0, res.err
    assert res.json["status"] == "published" and res.json["version"] == 30
    assert res.json["labels"] == {"stable": 20, "canary": 30}
    assert "serving_error" not in res.json
    assert "label was not set" not in res.err and "retention failed" not in res.err
    assert _warned(res, path), res.err
    assert state(model_config(ws).read_bytes()) == ([20, 30], {"stable": 20, "canary": 30})


# -- a failure of any kind after a run's commit point -----------------------------------------------
BREAK_SITE = '''
import os
_what = os.environ.get("TF_TEST_BREAK")
if _what:
    from tf_export_pipeline import serving as _serving

    def _broken(self, *args, **kwargs):
        raise TypeError("injected: " + _what)

    setattr(_serving.ServingControl, _what, _broken)
'''


@pytest.mark.parametrize("broken", ["on_publish", "protected_versions"])
def test_a_failure_after_the_commit_point_of_run_is_a_warning(tmp_path, published, broken):
    ws = copy_of(published, tmp_path, serving=SERVING)
    site = tmp_path / "break_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BREAK_SITE)
    env = {"PYTHONPATH": f"{site}:{REPO}", "TF_TEST_BREAK": broken}
    res = ws.cli("run", "--json", env=env)
    assert res.rc == 0, res.err
    assert res.json["status"] == "published" and res.json["version"] == 30
    assert ws.versions() == [10, 20, 30]
    warnings = [line for line in res.err.splitlines() if line.startswith("tf-export: warning: published, but")]
    assert len(warnings) == 1 and f"injected: {broken}" in warnings[0], res.err
    assert "tf-export: error" not in res.err
    if broken == "on_publish":
        assert "injected" in res.json["serving_error"]
