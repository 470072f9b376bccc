"""SIGKILL at several points of a publish: never a partial version, and a rerun publishes exactly one."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.conftest import (
    PartialVersionWatcher,
    assert_no_partial_versions,
    cli_popen,
    wait_until_lease_ran_out,
)

pytestmark = pytest.mark.slow


def _start(workspace, env=None, fresh=False):
    return cli_popen("run", "--config", str(workspace.config), "--json", env=env, start_new_session=True,
                     fresh=fresh)


def _wait_for(predicate, timeout=120.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_hold(proc, point):
    line = proc.stderr.readline()
    while line and f"holding at {point}" not in line:
        line = proc.stderr.readline()
    assert f"holding at {point}" in line, f"process ended before reaching {point} (exit {proc.poll()})"


def _kill(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _rerun_publishes_exactly_one(workspace, expected_version=None):
    res = workspace.cli("run", "--json")
    assert res.rc == 0, res.err
    assert res.json["status"] == "published"
    assert workspace.versions() == [res.json["version"]]
    if expected_version is not None:
        assert res.json["version"] == expected_version
    again = workspace.cli("run", "--json")
    assert again.json["status"] == "skipped" and again.json["version"] == res.json["version"]
    assert workspace.versions() == [res.json["version"]]
    assert_no_partial_versions(workspace.base)
    return res.json


@pytest.mark.parametrize("point", ["exported", "validating", "claimed", "ledgered"])
def test_killed_at_hold_point(workspace, point):
    with PartialVersionWatcher(workspace.base) as watcher:
        proc = _start(workspace, {"TF_EXPORT_TEST_HOLD": point})
        _wait_hold(proc, point)
        _kill(proc)
        assert workspace.versions() == []
        assert any(e.startswith("temp-") for e in workspace.entries()), "staging should be left by the kill"
        ledger_version = None
        if point == "ledgered":
            ledger = list((workspace.base / "_exports" / "ledger").iterdir())
            ledger_version = int(__import__("json").loads(ledger[0].read_text())["version"])
        rec = _rerun_publishes_exactly_one(workspace, ledger_version)
    assert watcher.violations == [] and watcher.polls > 10
    # the killed run's staging is garbage; gc removes it once its lease is over (rolled forward: none left)
    os.utime(workspace.base)
    res = workspace.cli("gc", "--json")
    assert res.rc == 0
    assert workspace.versions() == [rec["version"]]


def test_killed_during_export_as_staging_appears(workspace):
    with PartialVersionWatcher(workspace.base) as watcher:
        proc = _start(workspace)
        _wait_for(lambda: any(e.startswith("temp-") for e in workspace.entries()), what="staging directory")
        _kill(proc)
        assert workspace.versions() == []
        _rerun_publishes_exactly_one(workspace)
    assert watcher.violations == []


def test_killed_while_the_validation_process_runs(workspace):
    with PartialVersionWatcher(workspace.base) as watcher:
        # Started anew, so that its validation process is a new Python too: one forked by the tests' CLI
        # server validates in well under the half second this waits.
        proc = _start(workspace, fresh=True)

        def validating():
            # The validation process starts with the export; it validates once the export wrote its file list.
            if not list((workspace.base / "_exports" / "work").glob("temp-*/files.json")):
                return False
            try:
                kids = psutil.Process(proc.pid).children(recursive=True)
                return any("tf_export_pipeline.validate.worker" in " ".join(k.cmdline()) for k in kids)
            except psutil.Error:  # a child that just exited (a zombie) or the parent gone
                return False

        _wait_for(validating, what="validation process")
        time.sleep(0.5)
        _kill(proc)
        assert workspace.versions() == []
        _rerun_publishes_exactly_one(workspace)
    assert watcher.violations == []


def test_gc_clears_staging_of_killed_runs_after_the_lease(tmp_path, trained_dir):
    from tests.conftest import make_workspace

    ws = make_workspace(tmp_path, trained_dir, retention={"keep": 5, "lease_seconds": 6})
    proc = _start(ws, {"TF_EXPORT_TEST_HOLD": "exported"})
    _wait_hold(proc, "exported")
    _kill(proc)
    [staging] = [e for e in ws.entries() if e.startswith("temp-")]
    kept = ws.cli("gc", "--json")
    assert kept.rc == 0 and kept.json["removed_staging"] == [], "gc must not take staging within its lease"
    wait_until_lease_ran_out(ws.base, staging, 6)
    res = ws.cli("gc", "--json")
    assert res.rc == 0, res.err
    assert len(res.json["removed_staging"]) == 1
    assert not any(e.startswith("temp-") for e in ws.entries())
