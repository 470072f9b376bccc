"""Shared fixtures: a small model trained for real, workspaces with a config, and a CLI runner."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.support.gcs_fixtures"] if (REPO / "tests" / "support" / "gcs_fixtures.py").exists() else []
pytest_plugins += ["tests.support.s3_fixtures"]
pytest_plugins += ["tests.support.azure_fixtures"]


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    @property
    def json(self):
        return json.loads(self.out)


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_EXPORT_TEST_HOLD", None)
    env.update(extra or {})
    return env


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tf_export_pipeline", *args]


_FORK_SERVER = None


def _fork_server():
    """This test process's CLI fork server (tests/support/cli_forkserver.py), started at first use."""
    global _FORK_SERVER
    if _FORK_SERVER is None or not _FORK_SERVER.alive():
        import atexit

        from tests.support.cli_forkserver import CliForkServer

        _FORK_SERVER = CliForkServer.start(cli_env())
        atexit.register(_FORK_SERVER.close)
    return _FORK_SERVER


def validations_forked():
    """A context in which the validation processes this test process starts itself (``ValidationSession``,
    a stage run in process, an Airflow task run by ``dag.test()``) fork from the CLI fork server, as those of
    the CLI's commands do, instead of starting Python and importing TensorFlow anew."""
    return _fork_server().validations_forked()


def forked_validation_python() -> tuple[str, dict[str, str]]:
    """For a Python this test starts itself: the launcher it takes as ``sys.executable`` and the environment
    naming the CLI fork server, so that its validation processes fork from that server."""
    from tests.support.cli_forkserver import SOCKET_ENV, launcher_of

    server = _fork_server()
    return launcher_of(server.path), {SOCKET_ENV: server.path}


@pytest.fixture
def forked_validation():
    """The test in :func:`validations_forked`."""
    with validations_forked():
        yield


def _in_mount_namespace(argv: list[str], pid: int | None, cwd: str | None) -> list[str]:
    return argv if pid is None else ["nsenter", "-t", str(pid), "-m", f"--wd={cwd or os.getcwd()}", *argv]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: str | None = None,
            fresh: bool = False, mount_namespace_of: int | None = None) -> CliResult:
    """``tf-export ARGS`` in a process of its own: forked from a process that imported TensorFlow once,
    or, with ``fresh`` (or TF_EXPORT_TEST_FRESH_CLI=1), started as ``python -m tf_export_pipeline``.
    With ``mount_namespace_of`` (a pid), the command runs in that process's mount namespace."""
    if fresh or os.environ.get("TF_EXPORT_TEST_FRESH_CLI"):
        proc = subprocess.run(_in_mount_namespace(cli_cmd(*args), mount_namespace_of, cwd), env=cli_env(env),
                              capture_output=True, text=True, timeout=timeout, cwd=cwd)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)
    rc, out, err = _fork_server().run(list(args), cli_env(env), cwd, timeout, mount_namespace_of)
    return CliResult(rc, out, err)


def shared_dir(tmp_path_factory) -> Path:
    """A folder every worker of this test session sees (pytest-xdist gives each worker a base
    temp folder of its own, side by side under one parent)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def made_once(folder: Path):
    """Yields True to the one process that must make ``folder``, False to the others, which wait for it.

    ``folder`` counts as made once its ``.done`` marker exists: a worker that
    died half-way leaves no marker, and the next one makes it again.
    """
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        done = folder / ".done"
        if done.exists():
            yield False
            return
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        yield True
        done.touch()


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory) -> Path:
    """ckpt-10, ckpt-20, ckpt-30 of the demo model, trained once per session and shared by its
    workers (tests copy it before changing anything)."""
    folder = shared_dir(tmp_path_factory) / "trained"
    with made_once(folder) as make:
        if make:
            from tf_export_pipeline.demo import train

            train(str(folder / "train"), steps=30, checkpoint_every=10)
    return folder / "train"


def cli_popen(*args: str, env: dict | None = None, cwd: str | None = None, start_new_session: bool = False,
              fresh: bool = False, mount_namespace_of: int | None = None, hostname: str | None = None):
    """``tf-export ARGS`` started and not waited for: ``subprocess.Popen`` with ``stdout`` and ``stderr`` piped
    as text, forked like :func:`run_cli` (or started anew with ``fresh`` or TF_EXPORT_TEST_FRESH_CLI=1).
    With ``hostname`` (root only) the command runs on a host of that name (``unshare -u``)."""
    if fresh or os.environ.get("TF_EXPORT_TEST_FRESH_CLI"):
        argv = _in_mount_namespace(cli_cmd(*args), mount_namespace_of, cwd)
        if hostname:
            argv = ["unshare", "-u", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh", *argv]
        return subprocess.Popen(argv, env=cli_env(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=start_new_session)
    return _fork_server().popen(list(args), cli_env(env), cwd, start_new_session=start_new_session,
                                mount_namespace_of=mount_namespace_of, hostname=hostname)


def kill_at_hold(point: str, *args: str, env: dict | None = None) -> None:
    """``tf-export ARGS`` with ``TF_EXPORT_TEST_HOLD=<point>``: wait until it holds there, then SIGKILL every
    process of its session (as a lost machine would stop it)."""
    import signal

    proc = cli_popen(*args, env={**(env or {}), "TF_EXPORT_TEST_HOLD": point}, start_new_session=True)
    try:
        for line in proc.stderr:
            if f"holding at {point}" in line:
                break
        else:
            raise AssertionError(f"tf-export {args[0]} ended before reaching {point} (exit {proc.wait()})")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


def assert_published_once(records: list[dict]) -> int:
    """Racers of one checkpoint: every record names the one version; the ledger's winner reports
    ``published``, and so does a racer that finished the winner's promotion (docs/export-base.md: it "finishes the
    committed publish and reports published"); the others ``skipped``. Returns the version."""
    statuses = [r["status"] for r in records]
    assert set(statuses) <= {"published", "skipped"} and "published" in statuses, statuses
    versions = {r["version"] for r in records}
    assert len(versions) == 1 and None not in versions, records
    return versions.pop()


def release_together(procs: list, release: Path, point: str = "publishing", limit: float = 180.0,
                     on_release=None):
    """Racers started with ``TF_EXPORT_TEST_HOLD=<point>@<release>``: wait (up to ``limit``) until each holds
    at ``point`` or one has ended, create ``release`` so they go on at one instant (and call ``on_release``
    right after), and wait for them. Returns (each one's stdout, each one's stderr, how many were holding
    when released)."""
    import threading
    import time

    errs: list[list[str]] = [[] for _ in procs]

    def drain(i: int) -> None:
        for line in procs[i].stderr:
            errs[i].append(line)

    readers = [threading.Thread(target=drain, args=(i,), daemon=True) for i in range(len(procs))]
    for t in readers:
        t.start()
    held = 0
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        held = sum(any(f"holding at {point}" in line for line in e) for e in errs)
        if held == len(procs) or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    release.touch()
    if on_release is not None:
        on_release()
    outs = [p.communicate(timeout=limit)[0] for p in procs]
    for t in readers:
        t.join(5)
    return outs, ["".join(e) for e in errs], held


@dataclass
class Workspace:
    root: Path
    train: Path
    base: Path
    config: Path

    def cli(self, *args: str, env: dict | None = None, config: bool = True, timeout: float = 300) -> CliResult:
        extra = ["--config", str(self.config)] if config else []
        return run_cli(*args, *extra, env=env, timeout=timeout)

    def versions(self) -> list[int]:
        if not self.base.exists():
            return []
        return sorted(int(p.name) for p in self.base.iterdir() if p.name.isdigit())

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.base.iterdir()) if self.base.exists() else []

    def train_more(self, steps: int = 10) -> list[str]:
        from tf_export_pipeline.demo import train

        return train(str(self.train), steps=steps, checkpoint_every=10)


def make_workspace(root: Path, trained_dir: Path, **overrides) -> Workspace:
    from tf_export_pipeline.demo import write_config

    train = root / "train"
    shutil.copytree(trained_dir, train)
    config = Path(write_config(str(root), **overrides))
    return Workspace(root, train, root / "serving" / "demo_regressor", config)


@pytest.fixture
def workspace(tmp_path, trained_dir) -> Workspace:
    return make_workspace(tmp_path, trained_dir)


def assert_no_partial_versions(base: Path) -> None:
    """TF Serving's rule: every integer-named child must be a whole SavedModel with its manifest."""
    if not base.exists():
        return
    for child in base.iterdir():
        if child.name.isdigit():
            assert (child / "saved_model.pb").is_file(), f"partial version {child}"
            assert (child / "variables" / "variables.index").is_file(), f"partial version {child}"
            assert (child / "assets.extra" / "export_manifest.json").is_file(), f"version without manifest {child}"


class PartialVersionWatcher:
    """Polls an export base every few milliseconds, as TF Serving would, and records violations.

    A violation is an integer-named directory that is not a whole SavedModel
    with its manifest at the moment it is seen.
    """

    def __init__(self, base: Path, interval: float = 0.002):
        import threading

        self.base = base
        self.interval = interval
        self.violations: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.polls += 1
            try:
                children = list(self.base.iterdir()) if self.base.exists() else []
            except FileNotFoundError:
                children = []
            for child in children:
                if not child.name.isdigit():
                    continue
                try:
                    assert_no_partial_versions_one(child)
                except AssertionError as err:
                    if child.exists():  # not a version removed by retention mid-check
                        self.violations.append(str(err))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def assert_no_partial_versions_one(child: Path) -> None:
    for rel in ("saved_model.pb", "variables/variables.index", "assets.extra/export_manifest.json"):
        assert (child / rel).is_file(), f"partial version {child}: no {rel}"


def one_line_error(res) -> str:
    """The single stderr line of a failed command; fails the test if there is more, or a traceback."""
    lines = [line for line in res.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{res.err}"
    assert lines[0].startswith("tf-export: error: ") and "Traceback" not in res.err
    return lines[0]


# A worker shares the cores with the others: a test's time limit (a guard against hangs, not a
# measure of speed) stretches by this factor under pytest-xdist.
XDIST_TIMEOUT_FACTOR = 2.5


def worker_group_of(nodeid: str) -> str:
    """What runs on one pytest-xdist worker, start to end: a test module (its tests share the servers it
    starts), and all of tests/airflow/ (Airflow reads its settings once per process)."""
    path = nodeid.split("::", 1)[0]
    return "tests/airflow" if path.startswith("tests/airflow/") else path


def pytest_addoption(parser):
    parser.addoption("--group-by-test", action="store_true",
                     help="pytest-xdist hands out one test at a time instead of whole modules (the `alone` part: "
                          "its tests share only session-wide servers, and a module of them would keep one worker "
                          "busy while the other waits)")


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    if config.getoption("dist") != "loadscope":
        return None  # another --dist asked for: pytest-xdist's own scheduler
    by_test = config.getoption("group_by_test")

    class TestGroups(LoadScopeScheduling):
        """Hands out whole groups (:func:`worker_group_of`, or single tests with ``--group-by-test``), the
        largest first."""

        def _split_scope(self, nodeid: str) -> str:
            return nodeid if by_test else worker_group_of(nodeid)

    return TestGroups(config, log)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        limit = (marker.args[0] if marker and marker.args else marker.kwargs.get("timeout") if marker else None) \
            or config.getini("timeout")
        if limit:
            kwargs = dict(marker.kwargs) if marker else {}
            kwargs["timeout"] = float(limit) * XDIST_TIMEOUT_FACTOR
            item.add_marker(pytest.mark.timeout(**kwargs), append=False)


def wait_until_lease_ran_out(base: Path, staging: str, lease_seconds: float, limit: float = 120.0) -> None:
    """Wait until the lease of local staging ``staging`` (its name) has run out: its last renewal (the
    lease file's time, else the time in its name) is more than ``lease_seconds`` ago. Bounded by ``limit``."""
    import time

    lease = base / "_exports" / "leases" / staging
    deadline = time.monotonic() + limit
    while True:
        stamps = [float(staging.split("-")[1])]
        try:
            stamps.append(lease.stat().st_mtime)
        except FileNotFoundError:
            pass
        left = max(stamps) + lease_seconds - time.time()
        if left < -0.05:
            return
        assert time.monotonic() < deadline, f"the lease of {staging} is still running after {limit} s"
        time.sleep(min(max(left + 0.1, 0.02), 0.5))
