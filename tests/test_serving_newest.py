"""``serving.policy: newest``: the model config file lists the newest whole version alone, no labels.

Files are read back with TF Serving's own protos, never through pipeline code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Workspace, make_workspace, one_line_error

pytestmark = pytest.mark.timeout(300)

MODEL = "demo"
CONFIG_REL = "tfs/models.config"
NEWEST = {"model_name": MODEL, "model_config_file": f"./{CONFIG_REL}", "policy": "newest", "reload_seconds": 0}


def entry_of(ws: Workspace):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((ws.root / CONFIG_REL).read_text(), config)
    found = [e for e in config.model_config_list.config if e.name == MODEL]
    assert len(found) == 1, config
    return found[0]


def served(ws: Workspace) -> tuple[str, list[int], dict[str, int]]:
    """(version policy, specific versions, labels) of the model's entry."""
    e = entry_of(ws)
    which = e.model_version_policy.WhichOneof("policy_choice")
    return which, list(e.model_version_policy.specific.versions), dict(e.version_labels)


def switch(ws: Workspace, policy: str) -> None:
    from tf_export_pipeline.demo import write_config

    write_config(str(ws.root), name=Path(ws.config).name, versioning="step", serving={**NEWEST, "policy": policy})


def test_newest_lists_each_new_version_alone_and_never_goes_back(tmp_path, trained_dir):
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.serving import ServingControl

    ws = make_workspace(tmp_path, trained_dir, versioning="step", serving=NEWEST)
    res = ws.cli("run", "--checkpoint", "ckpt-20", "--json")
    assert res.rc == 0 and res.json["version"] == 20, res.err
    assert "serving_error" not in res.json and "serving_advice" not in res.json  # local disk: one rename
    assert served(ws) == ("specific", [20], {})
    assert entry_of(ws).base_path == str(ws.base)

    res = ws.cli("run", "--json")                                # ckpt-30
    assert res.rc == 0 and res.json["version"] == 30, res.err
    assert "is now" not in res.err                               # the same policy: no switch to report
    assert served(ws) == ("specific", [30], {})
    st = ws.cli("status", "--json")
    assert st.rc == 0 and st.json["serving"] == 30 and st.json["labels"] == {}, st.err

    # An older checkpoint published now outranks nothing: the file keeps the newer version.
    res = ws.cli("run", "--checkpoint", "ckpt-10", "--json")
    assert res.rc == 0 and res.json["version"] == 10, res.err
    assert served(ws) == ("specific", [30], {})
    control = ServingControl.from_config(load_config(str(ws.config)))
    rec = control.on_publish(10, now=True)
    assert rec["written"] is False and served(ws) == ("specific", [30], {})

    for args in (("promote", "30", "--now"), ("rollback", "--now"), ("promote", "20", "--label", "canary")):
        refused = ws.cli(*args)
        assert refused.rc == 2, (args, refused.err)
        line = one_line_error(refused)
        assert "serving.policy is 'newest'" in line and "labels need policy: labels" in line
    assert served(ws) == ("specific", [30], {})
    view = ws.cli("labels", "--json")
    assert view.rc == 0 and view.json["entry_policy"] == "specific" and view.json["versions"] == [30]
    history = ws.cli("history", "--json").json
    assert [(r["phase"], r["versions_after"]) for r in history] == [("entry", [20]), ("version", [30])]


def test_switching_to_newest_rewrites_the_entry_at_the_next_publish(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, versioning="step", serving={**NEWEST, "policy": "latest"})
    assert ws.cli("run", "--checkpoint", "ckpt-10").rc == 0
    assert served(ws)[0] == "latest"

    switch(ws, "newest")
    res = ws.cli("run", "--checkpoint", "ckpt-20", "--json")
    assert res.rc == 0 and res.json["version"] == 20, res.err
    assert "serving.policy is now 'newest'" in res.err and "the highest version" in res.err
    assert served(ws) == ("specific", [20], {})

    switch(ws, "labels")
    res = ws.cli("run", "--json")                                # ckpt-30
    assert res.rc == 0 and res.json["version"] == 30, res.err
    _, listed, labels = served(ws)
    assert labels["canary"] == 30 and 30 in listed

    switch(ws, "newest")
    ws.train_more(10)                                            # ckpt-40
    res = ws.cli("run", "--json")
    assert res.rc == 0 and res.json["version"] == 40, res.err
    assert "serving_error" not in res.json
    assert "serving.policy is now 'newest'" in res.err and "canary=30" in res.err
    assert served(ws) == ("specific", [40], {})
    st = ws.cli("status", "--json")
    assert st.rc == 0 and st.json["serving"] == 40 and st.json["labels"] == {}, st.err
    assert [v["labels"] for v in st.json["versions"]] == [[]] * len(st.json["versions"])
    phases = [r["phase"] for r in ws.cli("history", "--json").json]
    assert phases[0] == "entry" and phases[1] == "policy" and phases[-1] == "policy"


def test_status_follows_the_file_until_the_next_publish(tmp_path, trained_dir):
    """The file decides what is served: a hand-edited list under newest is reported as it is."""
    ws = make_workspace(tmp_path, trained_dir, versioning="step", serving=NEWEST)
    assert ws.cli("run", "--checkpoint", "ckpt-10").rc == 0
    assert ws.cli("run", "--checkpoint", "ckpt-20").rc == 0
    assert served(ws) == ("specific", [20], {})
    target = ws.root / CONFIG_REL
    target.write_text(target.read_text().replace("versions: 20", "versions: 10"))
    st = ws.cli("status", "--json")
    assert st.rc == 0 and st.json["serving"] == 10, st.err


def test_newest_is_recommended_where_versions_appear_object_by_object():
    from tf_export_pipeline.config import ServingConfig
    from tf_export_pipeline.serving import newest_advice

    def cfg(policy: str) -> ServingConfig:
        return ServingConfig(**{**NEWEST, "policy": policy})

    assert "add a serving: section with policy: newest" in newest_advice("object_move", None)
    assert "set serving.policy: newest" in newest_advice("object_move", cfg("latest"))
    assert newest_advice("object_move", cfg("newest")) is None
    assert newest_advice("object_move", cfg("labels")) is None
    assert newest_advice("rename", None) is None and newest_advice("rename", cfg("latest")) is None


def test_check_storage_on_local_disk_recommends_nothing(workspace):
    res = workspace.cli("check-storage", "--json")
    assert res.rc == 0, res.err
    assert "recommendation" not in res.json and "newest" not in res.err
