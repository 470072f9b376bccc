"""Retention and backfill agree: history a backfill writes is not silently pruned, and what
retention removed is marked removed, left out of backfills unless asked for.
"""

from __future__ import annotations

from tests.conftest import make_workspace, one_line_error


def _by_name(items: list[dict]) -> dict[str, dict]:
    return {i["name"]: i for i in items}


def test_removed_versions_are_marked_and_only_exported_again_when_asked(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, retention={"keep": 1})
    published = {}
    for step in (10, 20, 30):
        r = ws.cli("run", "--checkpoint", f"ckpt-{step}", "--versioning", "step", "--json")
        assert r.rc == 0, r.err
        published[step] = r.json["version"]
    assert ws.versions() == [30]  # keep: 1

    found = _by_name(ws.cli("discover", "--json").json)
    assert found["ckpt-30"]["version"] == 30 and found["ckpt-30"]["removed"] is None
    for name, version in (("ckpt-10", 10), ("ckpt-20", 20)):
        assert found[name]["version"] is None and found[name]["committed"] is False
        assert found[name]["removed"]["version"] == version and found[name]["removed"]["removed_at"] > 0
    table = ws.cli("discover").out
    assert "removed (was 10" in table and "removed (was 20" in table

    status = ws.cli("status", "--json").json
    assert [(r["version"], r["step"]) for r in status["removed"]] == [(10, 10), (20, 20)]
    assert "removed by retention: 2 version(s)" in ws.cli("status").out

    # A backfill leaves removed history alone: nothing to do, nothing published.
    plain = ws.cli("backfill", "--json")
    assert plain.rc == 0 and plain.json == []
    assert ws.versions() == [30]


def test_backfill_that_retention_would_undo_is_refused_up_front(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, retention={"keep": 2})
    assert ws.cli("run", "--checkpoint", "ckpt-30", "--versioning", "step").rc == 0
    before = ws.entries()

    refused = ws.cli("backfill", "--versioning", "step")
    line = one_line_error(refused)
    assert refused.rc != 0
    assert "retention.keep: 2" in line and "would remove 1 of them, ckpt-10 first" in line
    assert "at least 3" in line and str(ws.config) in line
    assert ws.entries() == before  # nothing exported, nothing published

    # The range retention keeps goes through.
    ok = ws.cli("backfill", "--from-step", "20", "--versioning", "step", "--json")
    assert ok.rc == 0, ok.err
    assert [(r["status"], r["step"]) for r in ok.json] == [("published", 20)]
    assert ws.versions() == [20, 30]


def test_include_removed_exports_removed_history_again(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, retention={"keep": 1})
    for step in (10, 30):
        assert ws.cli("run", "--checkpoint", f"ckpt-{step}", "--versioning", "step").rc == 0
    assert ws.versions() == [30]
    # keep: 1 would remove ckpt-10 again at once: refused even with --include-removed.
    refused = ws.cli("backfill", "--include-removed", "--to-step", "10", "--versioning", "step")
    assert refused.rc != 0 and "retention.keep" in one_line_error(refused)

    ws.config.write_text(ws.config.read_text().replace("keep: 1", "keep: 3"))
    again = ws.cli("backfill", "--include-removed", "--to-step", "10", "--versioning", "step", "--json")
    assert again.rc == 0, again.err
    assert [(r["status"], r["version"]) for r in again.json] == [("published", 10)]
    assert ws.versions() == [10, 30]
    found = _by_name(ws.cli("discover", "--json").json)
    assert found["ckpt-10"]["version"] == 10 and found["ckpt-10"]["removed"] is None
    assert ws.cli("status", "--json").json["removed"] == []
