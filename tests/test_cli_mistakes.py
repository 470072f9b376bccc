"""Mistakes and surprises at the command line: a clear line and the right exit status, never a wrong version.

Each test goes through the real ``tf-export`` command on a workspace of the demo model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from tests.conftest import cli_cmd, cli_env, cli_popen, make_workspace, one_line_error, run_cli

HUGE_STEP = "99999999999999999999"  # above 2**63 - 1, the largest version TF Serving reads


def _no_staging_or_leases(ws) -> None:
    assert not [e for e in ws.entries() if e.startswith("temp-")], ws.entries()
    leases = ws.base / "_exports" / "leases"
    assert not (leases.exists() and list(leases.iterdir())), list(leases.iterdir())


def _error_lines(err: str) -> list[str]:
    """stderr without the hold point's own line."""
    return [line for line in err.strip().splitlines() if line.strip() and "holding at" not in line]


# -- run --json on failure ------------------------------------------------------------
def test_run_json_prints_a_failed_record_with_the_exit_status(workspace):
    missing = workspace.cli("run", "--json", "--checkpoint", "ckpt-999")
    assert missing.rc == 2
    line = one_line_error(missing)
    record = json.loads(missing.out)
    assert record["status"] == "failed" and record["exit_code"] == 2
    assert record["error"] in line and "ckpt-999" in record["error"]

    shutil.rmtree(workspace.train)
    failed = workspace.cli("run", "--json")
    assert failed.rc == 1
    line = one_line_error(failed)
    record = json.loads(failed.out)
    assert record["status"] == "failed" and record["exit_code"] == 1 and record["version"] is None
    assert "training directory does not exist" in record["error"] and record["error"] in line


# -- --checkpoint as a path relative to the working directory -----------------------------
def test_checkpoint_path_relative_to_the_working_directory(workspace):
    res = run_cli("run", "--config", str(workspace.config), "--json", "--checkpoint", "./train/ckpt-20",
                  cwd=str(workspace.root))
    assert res.rc == 0, res.err
    assert res.json["status"] == "published" and res.json["step"] == 20
    assert res.json["checkpoint"] == str(workspace.train / "ckpt-20")
    assert workspace.versions() == [res.json["version"]]


# -- backfill's own usage errors ------------------------------------------------------------
def test_inverted_step_range_is_a_usage_error(workspace):
    res = workspace.cli("backfill", "--from-step", "30", "--to-step", "10")
    assert res.rc == 2
    line = one_line_error(res)
    assert "30" in line and "10" in line and "step" in line and str(workspace.config) in line
    assert workspace.versions() == []


def test_jobs_zero_is_refused_before_any_progress_bar(workspace):
    res = workspace.cli("backfill", "--jobs", "0")
    assert res.rc == 2
    assert "--jobs" in one_line_error(res)  # one line: no bar drawn around it
    assert workspace.versions() == []


# -- a URL whose fsspec implementation is not installed -----------------------------------
def _scheme_not_installed() -> tuple[str, str]:
    """A scheme fsspec knows whose package is not installed here, and that package."""
    from fsspec.registry import known_implementations

    for scheme in ("s3", "az", "abfs", "oci"):
        package = known_implementations[scheme]["class"].split(".")[0]
        if importlib.util.find_spec(package) is None:
            return scheme, package
    pytest.skip("every object-store package fsspec knows is installed here")


def test_url_scheme_without_its_package_is_a_config_error(workspace):
    scheme, package = _scheme_not_installed()
    url = f"{scheme}://some-bucket/models/demo"
    data = yaml.safe_load(workspace.config.read_text())
    data["export_base"] = url
    workspace.config.write_text(yaml.safe_dump(data))
    res = workspace.cli("run")
    assert res.rc == 2
    line = one_line_error(res)
    assert f"'{scheme}://'" in line and package in line and line.endswith(url)

    data["export_base"] = "nosuchscheme://bucket/models/demo"
    workspace.config.write_text(yaml.safe_dump(data))
    res = workspace.cli("status")
    assert res.rc == 2
    line = one_line_error(res)
    assert "'nosuchscheme://'" in line and line.endswith("nosuchscheme://bucket/models/demo")


# -- versions TF Serving cannot read ----------------------------------------------------
def test_step_beyond_int64_is_refused_before_the_claim(workspace):
    huge = workspace.train / f"ckpt-{HUGE_STEP}"
    for src in workspace.train.glob("ckpt-30.*"):
        shutil.copyfile(src, str(huge) + src.name[len("ckpt-30"):])
    res = workspace.cli("run", "--versioning", "step", "--json")
    assert res.rc == 2, (res.rc, res.out, res.err)
    line = one_line_error(res)
    assert HUGE_STEP in line and "'step'" in line and line.endswith(str(huge))
    assert res.json["status"] == "failed" and res.json["exit_code"] == 2
    assert workspace.versions() == []
    claims = workspace.base / "_exports" / "claims"
    assert not (claims.exists() and list(claims.iterdir()))
    _no_staging_or_leases(workspace)


# -- a checkpoint rewritten while it is exported ------------------------------------------
def test_checkpoint_rewritten_while_exported_is_refused(workspace, tmp_path):
    release = tmp_path / "release"
    proc = cli_popen("run", "--config", str(workspace.config), "--json",
                     env={"TF_EXPORT_TEST_HOLD": f"restored@{release}"}, start_new_session=True)
    try:
        seen = []
        line = proc.stderr.readline()
        while line and "holding at restored" not in line:
            seen.append(line)
            line = proc.stderr.readline()
        assert "holding at restored" in line, f"never held after the restore: {''.join(seen)}"
        # The training job restarted from step 10 and saves ckpt-30 again, over the files read.
        for src in workspace.train.glob("ckpt-10.*"):
            shutil.copyfile(src, workspace.train / ("ckpt-30" + src.name[len("ckpt-10"):]))
        release.touch()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, (out, err)
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == ("tf-export: error: checkpoint changed while it was exported (rewritten by the "
                        f"training job?): {workspace.train / 'ckpt-30'}")
    assert json.loads(out)["status"] == "failed"
    assert workspace.versions() == []
    _no_staging_or_leases(workspace)
    # The rewritten checkpoint is a new one: the next run publishes it under its new identity.
    again = workspace.cli("run", "--json")
    assert again.rc == 0 and again.json["status"] == "published", again.err


# -- Ctrl-C during a parallel backfill -----------------------------------------------------
def test_ctrl_c_during_parallel_backfill(tmp_path, trained_dir):
    ws = make_workspace(tmp_path / "ws", trained_dir, retention={"keep": 20})
    ws.train_more(60)  # ckpt-40 .. ckpt-90: nine checkpoints
    out_file, err_file = tmp_path / "out", tmp_path / "err"
    with open(out_file, "w") as out, open(err_file, "w") as err:
        proc = subprocess.Popen(cli_cmd("backfill", "--config", str(ws.config), "--jobs", "2", "--json"),
                                env=cli_env(), stdout=out, stderr=err, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ws.versions() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ws.versions() and proc.poll() is None, err_file.read_text()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err_file.read_text()
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # The interrupted line is the last thing on stderr: the bar was closed before it.
    tail = err[err.index("tf-export: interrupted; "):]
    assert "\r" not in tail and len(tail.strip().splitlines()) == 1, repr(tail)
    records = json.loads(out_file.read_text())
    assert isinstance(records, list) and records
    assert all(r["status"] == "published" for r in records), records
    assert sorted(r["version"] for r in records) == ws.versions()  # every version published, and no other
    assert len(records) < 9
    _no_staging_or_leases(ws)
    work = ws.base / "_exports" / "work"
    assert not (work.exists() and list(work.iterdir())), list(work.iterdir())
    # Workers and their validation processes are gone with the command.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("processes of the backfill outlived it")
    # The rest is exported by the next backfill.
    rest = ws.cli("backfill", "--jobs", "2", "--json")
    assert rest.rc == 0, rest.err
    assert len(records) + len(rest.json) == 9
