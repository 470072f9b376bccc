"""A full disk (ENOSPC) at many points of an export and publish.

The guarantee (DESIGN.md rule 8, docs/command-line.md "Exit status"): a full disk is bad
input like any other. Whatever write it hits,

- ``tf-export run`` exits 1 with exactly one stderr line ``tf-export: error: ...``
  naming the cause;
- nothing partial is visible: every integer-named directory of the export
  base is a whole SavedModel with its manifest;
- nothing is left that stops later runs: with the space back (and no hand
  edit) the next run publishes the checkpoint and exits 0, and the one after
  reports ``skipped`` with the same version. With ``versioning: step`` that
  version is the checkpoint's step.

How: the export base (and nothing else: training directory and config stay on
normal disk) lives on a small tmpfs mounted in a private mount namespace
(``unshare -m``), kept alive by a ``sleep`` process; every command enters it
(``nsenter -t PID -m``, or setns(2) in the child the test CLI forks) and the test reads the tmpfs through
``/proc/PID/root``. Nothing is mounted on the host.

First a whole publish is measured: the space in use when its ledger entry has
just been written (hold point ``ledgered``), which is the most the export base
ever holds during a run (staging, validation samples, claim, manifest, ledger
entry). Then, for each K, a filler file leaves K bytes free and the export
runs. tmpfs counts whole pages, so K is rounded down to pages; the values are
spread over [0, whole publish] with four at the tail, one page apart, where
the last small writes of a publish land (claim, manifest, ledger entry).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (
    CliResult,
    PartialVersionWatcher,
    assert_no_partial_versions,
    cli_popen,
    make_workspace,
    one_line_error,
    run_cli,
)

TMPFS_SIZE = 16 << 20  # bytes; a whole publish of the demo model takes ~60 KB
STEP = 30  # the newest checkpoint of the trained_dir fixture; versioning: step makes it version 30
NO_SPACE = re.compile(r"no space left on device|disk is full|disk full|ENOSPC|errno 28", re.IGNORECASE)

# (test id, how to compute the free bytes from the measured whole publish U and the page size P)
POINTS = [
    ("free-0", lambda u, p: 0),
    ("free-300B", lambda u, p: 300),
    ("free-third", lambda u, p: (u // 3) // p * p + 300),
    ("free-two-thirds", lambda u, p: (2 * u // 3) // p * p + 300),
    ("free-all-but-4-pages", lambda u, p: u - 4 * p + 300),
    ("free-all-but-3-pages", lambda u, p: u - 3 * p + 300),
    ("free-all-but-2-pages", lambda u, p: u - 2 * p + 300),
    ("free-all-but-1-page", lambda u, p: u - 1 * p + 300),
    ("free-whole-publish", lambda u, p: u + 300),
]


class TmpfsNamespace:
    """A tmpfs mounted at ``mountpoint`` in a private mount namespace held open by ``sleep``."""

    def __init__(self, mountpoint: Path, size: int):
        self.mountpoint = mountpoint
        self.size = size
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        for tool in ("unshare", "nsenter", "mount"):
            if shutil.which(tool) is None:
                pytest.skip(f"needs '{tool}' to mount a tmpfs in a private mount namespace")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && echo ready && exec sleep 86400'
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(self.size),
             str(self.mountpoint)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            err = ""
            try:
                _, err = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.close()
            pytest.skip(f"cannot mount a tmpfs in a private mount namespace (unshare -m; mount -t tmpfs): "
                        f"{(err or '').strip() or 'no output'}")
        probe = subprocess.run(self.enter(["true"]), capture_output=True, text=True)
        if probe.returncode != 0:
            self.close()
            pytest.skip(f"cannot enter the mount namespace with nsenter: {probe.stderr.strip()}")
        # The mount must be private: the host sees no tmpfs there.
        assert not os.path.ismount(self.mountpoint), "the tmpfs leaked into the host's mount namespace"
        assert os.path.ismount(self.view(self.mountpoint)), "the tmpfs is not mounted in the namespace"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def enter(self, argv: list[str], cwd: str = "/") -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", f"--wd={cwd}", *argv]

    def view(self, path: Path) -> Path:
        """``path`` as this process sees it inside the namespace."""
        return Path(f"/proc/{self.pid}/root") / Path(path).resolve().relative_to("/")

    # -- space ---------------------------------------------------------------
    def page(self) -> int:
        return os.statvfs(self.view(self.mountpoint)).f_frsize

    def free(self) -> int:
        st = os.statvfs(self.view(self.mountpoint))
        return st.f_bavail * st.f_frsize

    def used(self) -> int:
        st = os.statvfs(self.view(self.mountpoint))
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    @property
    def filler(self) -> Path:
        return self.view(self.mountpoint) / "filler"

    def fill_leaving(self, k: int) -> int:
        """Fill the tmpfs so that ``k`` bytes are left (rounded down to pages); returns the bytes left."""
        self.unfill()
        size = self.free() - k
        if size > 0:
            fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        return self.free()

    def unfill(self) -> None:
        try:
            os.remove(self.filler)
        except FileNotFoundError:
            pass


class DiskFullBed:
    """The workspace whose export base is on the namespace's tmpfs, and the CLI run inside it."""

    def __init__(self, ns: TmpfsNamespace, ws):
        self.ns = ns
        self.ws = ws
        self.base = ns.view(ws.base)  # the export base as the namespace sees it
        self.whole_publish = 0  # bytes (pages) in use at the peak of a whole publish
        self.published_bytes = 0  # du -sb of the export base after a whole publish
        self.measure_note = ""

    def args(self, *args: str) -> list[str]:
        return [*args, "--config", str(self.ws.config), "--json"]

    def cli(self, *args: str, env: dict | None = None, timeout: float = 300) -> CliResult:
        return run_cli(*self.args(*args), env=env, timeout=timeout, cwd=str(self.ws.root),
                       mount_namespace_of=self.ns.pid)

    def reset(self) -> None:
        self.ns.unfill()
        if self.base.exists():
            shutil.rmtree(self.base)
        assert self.ns.used() == 0, \
            f"tmpfs not empty after reset: {sorted(os.listdir(self.ns.view(self.ns.mountpoint)))}"

    def versions(self) -> list[int]:
        if not self.base.exists():
            return []
        return sorted(int(p.name) for p in self.base.iterdir() if p.name.isdigit())

    def listing(self) -> list[str]:
        """Every file and directory below the export base, relative, with the size of files."""
        out = []
        if not self.base.exists():
            return out
        for dirpath, dirs, files in os.walk(self.base):
            rel = os.path.relpath(dirpath, self.base)
            for d in dirs:
                out.append(os.path.normpath(os.path.join(rel, d)) + "/")
            for f in files:
                full = os.path.join(dirpath, f)
                try:
                    size = os.path.getsize(full)
                except FileNotFoundError:
                    continue
                out.append(f"{os.path.normpath(os.path.join(rel, f))} ({size} B)")
        return sorted(out)

    def blocking_records(self) -> list[str]:
        """Ledger entries and claims that are empty or not JSON: what would stop or shift later runs."""
        bad = []
        for kind in ("ledger", "claims"):
            folder = self.base / "_exports" / kind
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if not p.is_file():
                    continue
                data = p.read_bytes()
                if not data:
                    bad.append(f"0-byte file _exports/{kind}/{p.name}")
                    continue
                if p.name.startswith("."):
                    continue  # a temporary name of a create-only write, not an entry
                try:
                    json.loads(data)
                except ValueError:
                    bad.append(f"torn (not JSON, {len(data)} B) _exports/{kind}/{p.name}")
        return bad

    def measure(self) -> None:
        """One whole publish on the empty tmpfs: the peak space it takes, held at its ledger entry."""
        self.reset()
        release = self.ws.root / "measure.release"
        proc = cli_popen(*self.args("run"), env={"TF_EXPORT_TEST_HOLD": f"ledgered@{release}"},
                         cwd=str(self.ws.root), mount_namespace_of=self.ns.pid)
        err_lines: list[str] = []
        held_at = None
        for line in proc.stderr:
            err_lines.append(line)
            if "holding at ledgered" in line:
                held_at = self.ns.used()
                break
        release.touch()
        out, rest = proc.communicate(timeout=300)
        err = "".join(err_lines) + rest
        assert proc.returncode == 0 and json.loads(out)["status"] == "published", \
            f"a publish on the roomy tmpfs failed (exit {proc.returncode}):\n{err}"
        final = self.ns.used()
        self.published_bytes = sum(int(p.stat().st_size) for p in self.base.rglob("*") if p.is_file())
        if held_at is None:  # no hold point: the final size (it lacks the validation samples)
            self.measure_note = "hold point 'ledgered' not reached; whole publish taken as the final size"
            held_at = final
        self.whole_publish = max(held_at, final)
        assert 0 < self.whole_publish < self.ns.size // 4, f"unexpected size of a whole publish: {self.whole_publish}"
        self.reset()


@pytest.fixture(scope="module")
def bed(tmp_path_factory, trained_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs in a private mount namespace (unshare -m)")
    root = tmp_path_factory.mktemp("diskfull")
    ws = make_workspace(root, trained_dir, versioning="step")
    # Only the export base's parent is the tmpfs: training directory and config stay on normal disk.
    ns = TmpfsNamespace(ws.base.parent, TMPFS_SIZE)
    try:
        ns.start()
        assert ws.base.parent != ws.train.parent and not str(ws.config).startswith(str(ws.base.parent))
        b = DiskFullBed(ns, ws)
        started = time.monotonic()
        b.measure()
        print(f"\n[disk-full] whole publish: {b.whole_publish} B in use at its peak "
              f"({b.whole_publish // ns.page()} pages of {ns.page()} B); export base after it: "
              f"{b.published_bytes} B (du -sb); measured in {time.monotonic() - started:.1f} s"
              + (f"; {b.measure_note}" if b.measure_note else ""))
        yield b
    finally:
        ns.close()


def _check_failed_run(bed: DiskFullBed, res: CliResult, problems: list[str]) -> str:
    """The one-line error of a run that hit ENOSPC, its checks added to ``problems``."""
    try:
        line = one_line_error(res)
    except AssertionError:
        problems.append(f"stderr is not one 'tf-export: error:' line:\n{res.err.rstrip()}")
        return res.err.strip().splitlines()[-1] if res.err.strip() else ""
    if not NO_SPACE.search(line):
        problems.append(f"the error line does not name the cause (no space left on device): {line}")
    if str(bed.ws.base) not in line:
        problems.append(f"the error line does not name the export base {bed.ws.base}: {line}")
    return line


@pytest.mark.parametrize("point", [p[0] for p in POINTS])
def test_disk_full_at_every_point_then_recovers(bed, point):
    compute = dict(POINTS)[point]
    page = bed.ns.page()
    k = compute(bed.whole_publish, page)
    bed.reset()
    problems: list[str] = []
    free = bed.ns.fill_leaving(k)
    assert free == k // page * page, f"filler left {free} B free, wanted {k // page * page}"

    # 1. The run on the full disk: exit 1 with one line (or, with room for it all, a publish).
    with PartialVersionWatcher(bed.base) as watcher:
        first = bed.cli("run")
    line = ""
    if first.rc == 1:
        line = _check_failed_run(bed, first, problems)
    elif first.rc == 0:
        status = first.json["status"]
        if status != "published":
            problems.append(f"run with {free} B free exited 0 with status {status!r}")
        if free < bed.whole_publish:
            problems.append(f"run published with {free} B free, less than the {bed.whole_publish} B measured")
    else:
        problems.append(f"run on the full disk exited {first.rc}, not 1:\n{first.err.rstrip()}")
    if watcher.violations:
        problems.append(f"partial version seen during the full-disk run: {watcher.violations[:3]}")
    try:
        assert_no_partial_versions(bed.base)
    except AssertionError as err:
        problems.append(f"after the full-disk run: {err}")
    left = bed.listing()
    blocking = bed.blocking_records()
    if blocking:
        problems.append(f"the full-disk run left {blocking}")

    # 2. Space back (the filler removed), no hand edit: the next run publishes, exit 0.
    bed.ns.unfill()
    with PartialVersionWatcher(bed.base) as watcher:
        second = bed.cli("run")
    version = None
    expected = "skipped" if first.rc == 0 else "published"
    if second.rc != 0:
        problems.append(f"the run with space back exited {second.rc} (wanted 0, {expected}):\n{second.err.rstrip()}")
    else:
        rec = second.json
        version = rec["version"]
        if rec["status"] != expected:
            problems.append(f"the run with space back reported {rec['status']!r}, wanted {expected!r}: {rec}")
        if version != STEP:
            problems.append(f"the run with space back published version {version}, not {STEP} "
                            f"(versioning: step; a claim left by the full-disk run?); export base: {bed.listing()}")
    if watcher.violations:
        problems.append(f"partial version seen during the run with space back: {watcher.violations[:3]}")

    # 3. A third run: skipped, the same version, exactly one version there.
    third = bed.cli("run")
    if third.rc != 0 or third.json["status"] != "skipped" or (version is not None and third.json["version"] != version):
        problems.append(f"the third run did not report skipped with version {version}: exit {third.rc}, "
                        f"{third.out.strip()!r} {third.err.strip()!r}")
    if version is not None and bed.versions() != [version]:
        problems.append(f"versions after recovery: {bed.versions()}, wanted [{version}]")
    try:
        assert_no_partial_versions(bed.base)
    except AssertionError as err:
        problems.append(f"after recovery: {err}")
    remaining = bed.blocking_records()
    if remaining:
        problems.append(f"still there after recovery: {remaining}")

    summary = (f"{point}: {free} B free of a {bed.whole_publish} B publish; full-disk run exit {first.rc}"
               f"{': ' + line if line else ''}\n  left by it: {left}")
    print("\n[disk-full] " + summary)
    assert not problems, summary + "\n" + "\n".join(f"- {p}" for p in problems)
