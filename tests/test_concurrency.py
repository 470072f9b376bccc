"""Several `tf-export run` processes at once on one export base."""

from __future__ import annotations

import json

import pytest

from tests.conftest import PartialVersionWatcher, assert_no_partial_versions, assert_published_once, cli_popen

pytestmark = pytest.mark.slow


def _spawn(workspace, *args, env=None):
    return cli_popen("run", "--config", str(workspace.config), "--json", *args, env=env)


def test_four_processes_same_checkpoint_exactly_one_version(workspace):
    with PartialVersionWatcher(workspace.base) as watcher:
        procs = [_spawn(workspace, "--checkpoint", "ckpt-30") for _ in range(4)]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    version = assert_published_once(results)
    assert workspace.versions() == [version]
    assert len(list((workspace.base / "_exports" / "ledger").iterdir())) == 1
    assert not [e for e in workspace.entries() if e.startswith("temp-")]
    assert watcher.violations == []


def _race_four_checkpoints(workspace, tmp_path, *extra):
    """ckpt-10..40 exported and validated by four processes, released into publish at one instant."""
    workspace.train_more(10)  # ckpt-40: four checkpoints in all
    release = tmp_path / "release"
    env = {"TF_EXPORT_TEST_HOLD": f"publishing@{release}"}
    procs = [_spawn(workspace, "--checkpoint", f"ckpt-{s}", *extra, env=env) for s in (10, 20, 30, 40)]
    for p in procs:  # all four exported and validated, waiting at the start of publish
        line = p.stderr.readline()
        while line and "holding at publishing" not in line:
            line = p.stderr.readline()
        assert "holding at publishing" in line, p.communicate()[1]
    release.touch()  # released together: they claim within the same second
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        outcomes.append((p.returncode, json.loads(out) if p.returncode == 0 else None, err))
    return outcomes


def test_racing_runs_under_timestamp_never_serve_an_older_checkpoint_above_a_newer(workspace, tmp_path):
    with PartialVersionWatcher(workspace.base) as watcher:
        outcomes = _race_four_checkpoints(workspace, tmp_path)
    published = [rec for rc, rec, _ in outcomes if rc == 0]
    assert published and all(r["status"] == "published" for r in published)
    for rc, _, err in outcomes:
        if rc != 0:  # refused, naming the option that overrides it; nothing of it published
            assert rc == 1 and "--allow-outrank" in err and len(err.strip().splitlines()) == 1, err
    by_version = sorted((r["version"], r["step"]) for r in published)
    assert [s for _, s in by_version] == sorted(s for _, s in by_version), f"out of training order: {by_version}"
    assert workspace.versions() == [v for v, _ in by_version]
    assert watcher.violations == []
    assert_no_partial_versions(workspace.base)


def test_four_checkpoints_in_the_same_second_get_four_distinct_versions(workspace, tmp_path):
    outcomes = _race_four_checkpoints(workspace, tmp_path, "--allow-outrank")
    for rc, _, err in outcomes:
        assert rc == 0, err
    results = [rec for _, rec, _ in outcomes]
    assert all(r["status"] == "published" for r in results)
    versions = sorted(r["version"] for r in results)
    assert len(set(versions)) == 4
    # all started from the same timestamp: the three that lost a claim moved on to the next numbers
    assert versions == list(range(versions[0], versions[0] + 4))
    assert workspace.versions() == versions
    assert sorted(int(p.name) for p in (workspace.base / "_exports" / "claims").iterdir()) == versions
    steps = {r["version"]: r["step"] for r in results}
    for v, step in steps.items():
        manifest = json.loads((workspace.base / str(v) / "assets.extra" / "export_manifest.json").read_text())
        assert manifest["checkpoint"]["step"] == step and manifest["version"] == v
    assert_no_partial_versions(workspace.base)
