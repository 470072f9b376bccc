"""A backfill numbers versions as the config says (timestamp aside), and refuses to mix units of numbering."""

from __future__ import annotations

import json

from tests.conftest import make_workspace, one_line_error


def _manifest_versioning(ws, version: int) -> str:
    return json.loads((ws.base / str(version) / "assets.extra" / "export_manifest.json").read_text())["versioning"]


def test_a_step_config_backfills_with_step_numbers(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, versioning="step")
    res = ws.cli("backfill", "--json")
    assert res.rc == 0, res.err
    assert [(r["status"], r["step"], r["version"]) for r in res.json] == \
        [("published", 10, 10), ("published", 20, 20), ("published", 30, 30)]
    assert ws.versions() == [10, 20, 30]
    assert {_manifest_versioning(ws, v) for v in ws.versions()} == {"step"}
    assert "versioning checkpoint_time" not in res.err  # the config's own versioning: nothing to say

    # A run of the same config after the backfill goes on in the same numbering.
    ws.train_more(10)
    run = ws.cli("run", "--json")
    assert run.rc == 0, run.err
    assert run.json["version"] == 40


def test_a_timestamp_config_backfills_by_checkpoint_time_and_says_so(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir)  # versioning: timestamp (the default)
    res = ws.cli("backfill", "--to-step", "20", "--json")
    assert res.rc == 0, res.err
    assert "versioning checkpoint_time for this backfill" in res.err and str(ws.config) in res.err
    assert {_manifest_versioning(ws, v) for v in ws.versions()} == {"checkpoint_time"}
    assert len(ws.versions()) == 2


def test_a_versioning_that_mixes_units_with_the_live_version_is_refused_in_one_line(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, versioning="step")
    assert ws.cli("run", "--checkpoint", "ckpt-30").rc == 0  # version 30, numbered by step
    before = ws.entries()

    refused = ws.cli("backfill", "--versioning", "checkpoint_time")
    assert refused.rc == 2, refused.err
    line = one_line_error(refused)
    assert "versioning 'checkpoint_time'" in line and "live version 30 is numbered by 'step'" in line
    assert "--allow-outrank" in line and line.endswith(str(ws.base))
    assert refused.out == ""
    assert ws.entries() == before  # nothing exported, nothing published

    # The same unit as the live version's goes through; so does another one when told.
    same = ws.cli("backfill", "--versioning", "step", "--to-step", "10", "--json")
    assert same.rc == 0, same.err
    assert [(r["status"], r["version"]) for r in same.json] == [("published", 10)]
    told = ws.cli("backfill", "--versioning", "timestamp", "--allow-outrank", "--json")
    assert told.rc == 0, told.err
    [record] = told.json
    assert record["status"] == "published" and record["step"] == 20 and record["version"] > 30


def test_a_timestamp_base_takes_checkpoint_time_as_its_own_unit(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir)
    assert ws.cli("run", "--checkpoint", "ckpt-30").rc == 0  # numbered by the export time
    ok = ws.cli("backfill", "--versioning", "checkpoint_time", "--json")
    assert ok.rc == 0, ok.err
    assert [r["step"] for r in ok.json] == [10, 20]
    refused = ws.cli("backfill", "--versioning", "step")  # nothing pending, but refused first anyway
    assert refused.rc == 2 and "numbered by 'timestamp'" in one_line_error(refused)
