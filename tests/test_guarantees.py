"""The publish guarantees under the faults production brings, one test per way they used to break.

Each test runs the real ``tf-export`` and reads the export base back from disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    CliResult,
    PartialVersionWatcher,
    assert_no_partial_versions,
    cli_cmd,
    cli_env,
    cli_popen,
    make_workspace,
    one_line_error,
    run_cli,
    wait_until_lease_ran_out,
)
from tests.test_crash_safety import _kill, _start, _wait_hold

pytestmark = pytest.mark.timeout(600)


def _ledger(ws) -> dict[str, dict]:
    d = ws.base / "_exports" / "ledger"
    return {p.name: json.loads(p.read_text()) for p in d.iterdir() if not p.name.startswith(".")} if d.exists() else {}


def _staging(ws) -> list[Path]:
    return [p for p in ws.base.iterdir() if p.name.startswith("temp-") and not p.name.startswith("temp-deleting")]


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _other_host(cmd: list[str], host: str) -> list[str]:
    return ["unshare", "-u", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-u", "true"], capture_output=True).returncode == 0


# 1. staging removed between validation and publish --------------------------------------------
def test_publish_whose_staging_was_removed_fails_cleanly_and_the_next_run_exports_again(workspace, tmp_path):
    release = tmp_path / "release"
    proc = _start(workspace, {"TF_EXPORT_TEST_HOLD": f"publishing@{release}"})
    _wait_hold(proc, "publishing")
    [staging] = _staging(workspace)
    shutil.rmtree(staging)  # what a gc after the lease, or a hand, does while the publish waits
    release.touch()
    rc, out, err = _finish(proc)
    assert rc == 1, err
    line = one_line_error(CliResult(rc, out, err))
    assert "staging is gone" in line and staging.name in line
    assert workspace.versions() == [] and _ledger(workspace) == {}
    assert not staging.exists(), "staging must not be re-created by the manifest write"

    again = workspace.cli("run", "--json")
    assert again.rc == 0 and again.json["status"] == "published", again.err
    assert workspace.versions() == [again.json["version"]]
    assert_no_partial_versions(workspace.base)


def test_gc_leaves_leased_staging_alone_and_a_publish_past_its_lease_refuses(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, retention={"keep": 5, "lease_seconds": 10})
    release = tmp_path / "release"
    proc = _start(ws, {"TF_EXPORT_TEST_HOLD": f"publishing@{release}"})
    _wait_hold(proc, "publishing")
    [staging] = _staging(ws)
    first = ws.cli("gc", "--json")  # the lease was renewed when validation ended
    assert first.rc == 0 and first.json["removed_staging"] == [], first.out
    assert staging.is_dir()
    wait_until_lease_ran_out(ws.base, staging.name, 10)  # the publish pauses past its lease (a paused DAG)
    second = ws.cli("gc", "--json")
    assert second.rc == 0 and second.json["removed_staging"] == [staging.name]
    release.touch()
    rc, _, err = _finish(proc)
    assert rc == 1 and ("staging is gone" in err or "lease ran out" in err), err
    assert ws.versions() == [] and _ledger(ws) == {}
    again = ws.cli("run", "--json")
    assert again.rc == 0 and again.json["status"] == "published", again.err


# 2. killed after the commit point, retried on another host --------------------------------------
@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare -u for another hostname")
def test_commit_killed_then_retried_from_another_host_is_finished_there(workspace):
    proc = _start(workspace, {"TF_EXPORT_TEST_HOLD": "ledgered"})
    _wait_hold(proc, "ledgered")
    _kill(proc)
    [entry] = _ledger(workspace).values()
    assert workspace.versions() == []
    retry = subprocess.run(_other_host(cli_cmd("run", "--config", str(workspace.config), "--json"), "retry-pod-2"),
                           env=cli_env(), capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stderr
    rec = json.loads(retry.stdout)
    assert rec["status"] == "published" and rec["version"] == entry["version"], rec
    assert Path(rec["path"]).is_dir() and workspace.versions() == [entry["version"]]
    assert_no_partial_versions(workspace.base)


def test_several_finishers_of_one_commit_at_once_make_one_whole_version(workspace):
    proc = _start(workspace, {"TF_EXPORT_TEST_HOLD": "ledgered"})
    _wait_hold(proc, "ledgered")
    _kill(proc)
    [entry] = _ledger(workspace).values()
    with PartialVersionWatcher(workspace.base) as watcher:
        procs = [cli_popen("run", "--config", str(workspace.config), "--json") for _ in range(3)]
        results = [_finish(p) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err
        rec = json.loads(out)
        assert rec["status"] in ("published", "skipped") and rec["version"] == entry["version"]
        assert Path(rec["path"]).is_dir()
    assert workspace.versions() == [entry["version"]]
    assert watcher.violations == []


# 3. serving order --------------------------------------------------------------------------------
def test_run_refuses_to_serve_an_older_checkpoint_above_a_newer_one(workspace):
    newest = workspace.cli("run", "--json")
    assert newest.json["step"] == 30
    older = workspace.cli("run", "--checkpoint", "ckpt-20", "--json")
    assert older.rc == 1
    line = one_line_error(older)
    assert "ckpt-20" in line and "newer checkpoint ckpt-30" in line and "--allow-outrank" in line
    assert workspace.versions() == [newest.json["version"]]
    claims = sorted(p.name for p in (workspace.base / "_exports" / "claims").iterdir())
    assert claims == [str(newest.json["version"])], "a refused publish must release its claim"
    allowed = workspace.cli("run", "--checkpoint", "ckpt-20", "--allow-outrank", "--json")
    assert allowed.rc == 0 and allowed.json["status"] == "published", allowed.err
    assert allowed.json["version"] > newest.json["version"]


def test_checkpoint_time_message_does_not_suggest_what_is_already_set(workspace):
    older = workspace.cli("run", "--checkpoint", "ckpt-20", "--json")  # timestamp: numbered now
    assert older.rc == 0, older.err
    res = workspace.cli("run", "--versioning", "checkpoint_time", "--json")  # ckpt-30, numbered by its write time
    assert res.rc == 1
    line = one_line_error(res)
    assert "ckpt-30" in line and "below version" in line and "older checkpoint ckpt-20" in line
    assert "--allow-outrank" in line and "use --versioning checkpoint_time" not in line
    assert workspace.versions() == [older.json["version"]]


# 4. a run never removes what it just published ------------------------------------------------------
def test_run_keeps_the_version_it_publishes_even_outside_retention(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, retention={"keep": 1})
    newest = ws.cli("run", "--json").json
    res = ws.cli("run", "--checkpoint", "ckpt-10", "--versioning", "step", "--json")
    assert res.rc == 0, res.err
    assert res.json["status"] == "published" and res.json["version"] == 10
    assert Path(res.json["path"]).is_dir(), "a record must never say published for a path that does not exist"
    assert ws.versions() == [10, newest["version"]]
    # the next prune applies retention to it, and forgets it in the ledger, so it can be exported again
    gc = ws.cli("gc", "--json")
    assert gc.json["removed_versions"] == [10]
    listed = {i["step"]: i["version"] for i in ws.cli("discover", "--json").json}
    assert listed[10] is None and listed[30] == newest["version"]


# 5. torn ledger entries and unreadable ledgers --------------------------------------------------------
def test_an_empty_ledger_entry_is_repaired_by_the_next_run(workspace):
    key = {i["step"]: i["ledger_key"] for i in workspace.cli("discover", "--json").json}[30]
    ledger = workspace.base / "_exports" / "ledger"
    ledger.mkdir(parents=True)
    (ledger / key).write_bytes(b"")  # what a full disk or a kill left behind in older releases
    res = workspace.cli("run", "--json")
    assert res.rc == 0 and res.json["status"] == "published", res.err
    assert json.loads((ledger / key).read_text())["version"] == res.json["version"]


def test_an_export_base_below_a_regular_file_is_named_as_such(tmp_path, trained_dir):
    (tmp_path / "blocker").write_text("not a directory")
    ws = make_workspace(tmp_path, trained_dir, export_base=str(tmp_path / "blocker" / "models" / "m"))
    res = ws.cli("run", "--json")
    assert res.rc == 2
    line = one_line_error(res)
    assert "below a file" in line and "blocker" in line and "remove it" not in line


# 6. concurrent gc and prunes ------------------------------------------------------------------------
def test_concurrent_gcs_and_a_runs_prune_tolerate_each_other(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, retention={"keep": 5, "lease_seconds": 5})
    ws.train_more(30)  # six checkpoints
    back = ws.cli("backfill", "--to-step", "50", "--json")
    assert back.rc == 0, back.err
    assert len(ws.versions()) == 5
    # Then retention tightened to one version: the run's prune and four gcs remove the backfilled ones.
    ws.config.write_text(ws.config.read_text().replace("keep: 5", "keep: 1"))
    for i in range(4):  # abandoned staging for gc to collect
        (ws.base / f"temp-{int(time.time()) - 60}-dead{i:04x}" / "variables").mkdir(parents=True)
    commands = [("gc", "--config", str(ws.config), "--json")] * 4 + [("run", "--config", str(ws.config), "--json")]
    procs = [cli_popen(*c) for c in commands]
    results = [_finish(p) for p in procs]
    for rc, _, err in results:
        assert rc == 0, err
    run = json.loads(results[-1][1])
    assert run["status"] == "published" and Path(run["path"]).is_dir()
    assert ws.versions() == [run["version"]]
    assert _staging(ws) == []


# 8. identity is the checkpoint, not its spelling ------------------------------------------------------
def test_the_same_checkpoint_through_another_path_spelling_is_not_published_twice(workspace, tmp_path):
    first = workspace.cli("run", "--json").json
    link = tmp_path / "mounted-elsewhere"
    link.symlink_to(workspace.train)
    from tf_export_pipeline.demo import write_config

    for name, training_dir in (("via-link.yaml", str(link)), ("slash.yaml", str(workspace.train) + "/"),
                               ("relative.yaml", "./train")):
        config = write_config(str(workspace.root), name=name, training_dir=training_dir)
        res = run_cli("run", "--config", config, "--json")
        assert res.rc == 0, res.err
        rec = res.json
        assert rec["status"] == "skipped" and rec["version"] == first["version"], (name, rec)
    assert workspace.versions() == [first["version"]]
    assert len(_ledger(workspace)) == 1


# create-only writes ----------------------------------------------------------------------------------
def test_create_only_refuses_backends_without_an_atomic_create(tmp_path):
    from tf_export_pipeline.errors import PipelineError
    from tf_export_pipeline.storage import open_storage

    store = open_storage("memory://tf-export-test/base")
    with pytest.raises(PipelineError, match="no atomic create-only write"):
        store.create_only("/tf-export-test/base/_exports/claims/1", b"x")


def test_create_only_leaves_nothing_torn_when_the_write_fails(tmp_path, monkeypatch):
    from tf_export_pipeline.storage import open_storage

    store = open_storage(str(tmp_path))
    target = tmp_path / "_exports" / "ledger" / "k"
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, bytes(data)[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError):
        store.create_only(str(target), b'{"version": 1}')
    monkeypatch.setattr(os, "write", real_write)
    assert not target.exists() and list(target.parent.iterdir()) == []
    assert store.create_only(str(target), b'{"version": 1}') is True
    assert json.loads(target.read_text()) == {"version": 1}




# a commit whose process died is finished even when no run meets its checkpoint again ---------------
def test_a_backfill_killed_after_a_commit_is_finished_by_the_next_backfill_and_by_gc(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, versioning="checkpoint_time")
    proc = cli_popen("backfill", "--config", str(ws.config), "--json", env={"TF_EXPORT_TEST_HOLD": "ledgered"},
                     start_new_session=True)
    _wait_hold(proc, "ledgered")
    _kill(proc)
    [entry] = _ledger(ws).values()
    assert ws.versions() == []
    listed = {i["step"]: i for i in ws.cli("discover", "--json").json}
    assert listed[10]["version"] is None and listed[10]["committed"] is True  # not named as done
    again = ws.cli("backfill", "--json")
    assert again.rc == 0, again.err
    assert sorted(r["step"] for r in again.json if r["status"] == "published") == [10, 20, 30]
    assert entry["version"] in ws.versions() and len(ws.versions()) == 3
    assert_no_partial_versions(ws.base)


def test_gc_finishes_a_commit_and_forgets_an_entry_whose_version_was_removed(tmp_path, trained_dir):
    ws = make_workspace(tmp_path, trained_dir, versioning="step")  # the demo writes checkpoints within a second
    proc = _start(ws, {"TF_EXPORT_TEST_HOLD": "ledgered"})  # run: ckpt-30
    _wait_hold(proc, "ledgered")
    _kill(proc)
    back = ws.cli("backfill", "--to-step", "20", "--versioning", "step", "--json")
    assert back.rc == 0, back.err
    v10 = {r["step"]: r["version"] for r in back.json}[10]
    # a prune killed between moving a version out of sight and forgetting it in the ledger
    (ws.base / str(v10)).rename(ws.base / f"temp-deleting-{v10}-0000dead")
    gc = ws.cli("gc", "--json")
    assert gc.rc == 0, gc.err
    [v30] = [e["version"] for e in _ledger(ws).values() if e["step"] == 30]
    assert v30 in ws.versions(), "gc finishes the committed publish of ckpt-30"
    assert v10 not in {e["version"] for e in _ledger(ws).values()}, "the entry of a removed version is forgotten"
    redo = ws.cli("backfill", "--versioning", "step", "--json")
    assert redo.rc == 0 and [r["step"] for r in redo.json] == [10], redo.out
    assert len(ws.versions()) == 3
    assert_no_partial_versions(ws.base)
