"""Chaos on local disk: ``tf-export`` processes SIGKILLed at random instants, then convergence.

The harness behind ``tests/test_chaos.py`` and ``bench/chaos.py``. Three parts:

- :class:`ServingWatcher` applies TF Serving's rule the whole time: every
  integer-named child of the export base is a whole SavedModel the moment it
  is seen (``saved_model.pb``, ``variables/variables.index``, and every file
  that ``assets.extra/export_manifest.json`` lists under ``"files"``, at that
  size), and it never changes while it stays visible (the names and sizes of
  its files are recorded at the first sighting; a version that disappears
  entirely, as retention removes it, may come back later as a new directory).
  Two visible versions of the same checkpoint are a duplicate.
- :class:`Chaos` drives ``tf-export run|backfill|gc --config ... --json``
  processes, each in its own session, and SIGKILLs the whole process group
  after a uniform random delay whose range comes from an uninterrupted first
  run (counted from the process's start, or from when its staging or its
  claim appears: see :meth:`Chaos.calibrate`), so kills land anywhere in
  export, validation, publish and retention, never at hold points. Every
  second retry runs under another host name (``unshare -u``, as root).
  Retention (``gc``, ``retention.keep`` 3, a one-hour lease) runs beside the
  exports. Just before the SIGKILL the process dumps its Python stacks
  (SIGUSR1, see ``chaos_site/sitecustomize.py``), which tells the phase the
  kill interrupted.
- Convergence and checks: ``backfill`` and ``run`` without kills until there
  is nothing left to do, ``gc`` with a one-second lease, then exactly once
  per checkpoint, serving order, no staging left, and every version loaded
  with TF Serving's loader (``tf.compat.v1.saved_model.loader.load``) giving
  the outputs of the model restored from its checkpoint.

Example::

    config = prepare(root, train_dir)          # versioning checkpoint_time, keep 3
    chaos = Chaos(root, config, base, train_dir, seed=7)
    with ServingWatcher(base) as watcher:
        chaos.calibrate()
        chaos.run_chaos(kills=8)
        chaos.converge()
        chaos.final_gc()
    problems = chaos.verify(watcher)
    print(chaos.table(watcher, problems))
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SITE_DIR = Path(__file__).resolve().parent / "chaos_site"
MANIFEST = "assets.extra/export_manifest.json"
PHASES = ("startup", "discover", "export", "validation", "publish", "gc", "exit")
CHAOS_CONFIG = {"versioning": "checkpoint_time", "retention": {"keep": 3, "lease_seconds": 3600}}
PROCESS_TIMEOUT = 300.0
CHAOS_ROLES = ("primary", "companion", "retention")  # the processes started during the chaos


# -- environment ----------------------------------------------------------------------
def chaos_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    paths = [str(REPO), str(SITE_DIR), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_EXPORT_TEST_HOLD", None)
    env.pop("TF_CHAOS_STACKS", None)
    env.update(extra or {})
    return env


def tf_export_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tf_export_pipeline", *args]


def host_switching() -> tuple[bool, str]:
    """Whether commands can run under another host name; else the reason they cannot."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "not root: unshare -u needs CAP_SYS_ADMIN"
    if shutil.which("unshare") is None:
        return False, "no unshare command"
    probe = subprocess.run(["unshare", "-u", "sh", "-c", 'hostname chaos-probe && exec "$@"', "sh", "hostname"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or probe.stdout.strip() != "chaos-probe":
        return False, f"unshare -u failed here: {probe.stderr.strip() or probe.returncode}"
    return True, ""


def on_host(cmd: list[str], host: str) -> list[str]:
    return ["unshare", "-u", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]


def spread_checkpoint_times(train_dir: Path, gap: float = 5.0) -> dict[str, float]:
    """Make consecutive checkpoints ``gap`` seconds apart, the newest ``gap`` seconds ago.

    The test trainer writes a checkpoint every few hundred milliseconds, so
    several share one second; under ``checkpoint_time`` a checkpoint whose
    second is already taken by a newer published version can never be
    published (see the report of this suite). A real training job writes
    checkpoints minutes apart; this rewrites the state file's timestamps (and
    the files' mtimes) to that shape. Returns name -> new time.
    """
    state = train_dir / "checkpoint"
    lines = state.read_text().splitlines()
    names = [re.search(r'"(.*)"', ln).group(1).rsplit("/", 1)[-1]
             for ln in lines if ln.startswith("all_model_checkpoint_paths:")]
    now = time.time()
    times = {name: now - gap * (len(names) - i) for i, name in enumerate(names)}
    stamps = iter(times.values())
    out = []
    for ln in lines:
        if ln.startswith("all_model_checkpoint_timestamps:"):
            ln = f"all_model_checkpoint_timestamps: {next(stamps)!r}"
        out.append(ln)
    state.write_text("\n".join(out) + "\n")
    for name, t in times.items():
        for f in train_dir.glob(name + ".*"):
            os.utime(f, (t, t))
    return times


# -- the watcher ----------------------------------------------------------------------
@dataclass
class Sighting:
    inode: int
    files: dict[str, int]
    key: str | None
    flagged: bool = False


def version_contents(path: str) -> dict[str, int]:
    """Relative path -> size of every file below ``path`` (files vanishing meanwhile are left out)."""
    files: dict[str, int] = {}
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            try:
                files[os.path.relpath(full, path).replace(os.sep, "/")] = os.lstat(full).st_size
            except FileNotFoundError:
                pass
    return files


def version_problems(path: str, files: dict[str, int]) -> tuple[list[str], str | None]:
    """What makes the version at ``path`` not whole for TF Serving, and its ledger key."""
    if not os.path.isdir(path):
        return ["not a directory"], None
    problems = [f"no {rel}" for rel in ("saved_model.pb", "variables/variables.index") if rel not in files]
    key = None
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as err:
        return problems + [f"no readable manifest ({type(err).__name__})"], None
    key = manifest.get("ledger_key")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        problems.append("manifest has no file list")
    else:
        for rel, want in sorted(listed.items()):
            have = files.get(rel)
            if have is None:
                problems.append(f"missing {rel}")
            elif have != want.get("size"):
                problems.append(f"{rel} has {have} bytes, the manifest says {want.get('size')}")
    return problems, key


class ServingWatcher:
    """Polls the export base every ``interval`` seconds, as TF Serving does (much faster), and records
    every version that is not whole when seen, changes while visible, or duplicates another's checkpoint.

    A first sighting is checked at once; versions already seen are walked again
    every ``recheck_every`` polls. Violations found on a version that has
    meanwhile disappeared (retention renames it away) are not counted.
    """

    def __init__(self, base: Path, interval: float = 0.002, recheck_every: int = 20):
        self.base = str(base)
        self.interval = interval
        self.recheck_every = recheck_every
        self.violations: list[str] = []
        self.partial = 0          # version directories not whole when first seen
        self.changed = 0          # version directories that changed while visible
        self.duplicates = 0       # a version of a checkpoint while another version of it was visible
        self.sightings = 0        # first sightings (a version that came back counts again)
        self.disappearances = 0   # versions seen going away (retention)
        self.polls = 0
        self.errors: list[str] = []
        self.seen: dict[str, Sighting] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serving-watcher", daemon=True)

    def __enter__(self) -> ServingWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001 - a watcher bug must show, not end the watching
                self.errors.append(f"{type(err).__name__}: {err}")
            self._stop.wait(self.interval)

    def _inode(self, path: str) -> int | None:
        try:
            return os.stat(path).st_ino
        except (FileNotFoundError, NotADirectoryError):
            return None

    def poll(self) -> None:
        self.polls += 1
        try:
            names = os.listdir(self.base)
        except FileNotFoundError:
            names = []
        present: dict[str, int] = {}
        for name in names:
            if name.isdigit():  # TF Serving: every child whose name parses as an integer is a version
                inode = self._inode(os.path.join(self.base, name))
                if inode is not None:
                    present[name] = inode
        for name in list(self.seen):
            if name not in present:
                del self.seen[name]
                self.disappearances += 1
        for name, inode in present.items():
            known = self.seen.get(name)
            if known is None or known.inode != inode:
                self._first_sight(name, inode)
            elif self.polls % self.recheck_every == 0:
                self._recheck(name, known)

    def _still(self, path: str, inode: int) -> bool:
        return self._inode(path) == inode

    def _first_sight(self, name: str, inode: int) -> None:
        path = os.path.join(self.base, name)
        files = version_contents(path)
        problems, key = version_problems(path, files)
        if not self._still(path, inode):
            return  # removed while being looked at: TF Serving would see it go, not a partial version
        sighting = Sighting(inode, files, key)
        self.seen[name] = sighting
        self.sightings += 1
        if problems:
            sighting.flagged = True
            self.partial += 1
            self.violations.append(f"partial version {name} when first seen: {'; '.join(problems[:4])}")
        if key is not None:
            twins = [n for n, s in self.seen.items() if n != name and s.key == key
                     and self._still(os.path.join(self.base, n), s.inode)]
            if twins:
                self.duplicates += 1
                self.violations.append(f"duplicate: version {name} is of the same checkpoint as visible "
                                       f"version(s) {', '.join(twins)} (ledger key {key})")

    def _recheck(self, name: str, known: Sighting) -> None:
        path = os.path.join(self.base, name)
        files = version_contents(path)
        if files == known.files or not self._still(path, known.inode):
            return
        if not known.flagged:
            self.changed += 1
            known.flagged = True
        gone = sorted(set(known.files) - set(files))
        new = sorted(set(files) - set(known.files))
        resized = sorted(k for k in set(files) & set(known.files) if files[k] != known.files[k])
        self.violations.append(f"version {name} changed while visible: removed {gone[:3]}, added {new[:3]}, "
                               f"resized {resized[:3]}")
        known.files = files


# -- processes --------------------------------------------------------------------------
@dataclass
class ProcRecord:
    n: int
    kind: str                  # run | backfill | gc
    args: list[str]
    role: str                  # calibration | primary | companion | retention | converge | final
    host: str | None
    started: float = 0.0
    delay: float | None = None  # planned kill delay
    kill_from: str | None = None  # start | staging | claim: what the delay is counted from
    seconds: float = 0.0
    killed: bool = False
    phase: str | None = None
    rc: int | None = None
    outcomes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    base_at_kill: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)

    def line(self) -> str:
        what = " ".join([self.kind, *self.args])
        host = f" @{self.host}" if self.host else ""
        if self.killed:
            end = f"KILLED at {self.seconds:.2f}s in {self.phase}"
        else:
            end = f"rc={self.rc} {self.seconds:.2f}s {','.join(self.outcomes)}"
        return f"#{self.n:03d} {self.role:<11} {what}{host}: {end}"


class Running:
    def __init__(self, rec: ProcRecord, popen: subprocess.Popen, out_path: Path, err_path: Path,
                 stacks: Path, handles: list):
        self.rec = rec
        self.popen = popen
        self.out_path = out_path
        self.err_path = err_path
        self.stacks = stacks
        self.handles = handles
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def alive(self) -> bool:
        return self.popen.poll() is None


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line \d+ in (?P<func>\S+)')
# (phase, file ending, function): the innermost match in a thread's stack names its phase.
_STAGES = (
    ("exit", "pipeline/validate/__init__.py", "__exit__"),  # a backfill closing its validation process, all done
    ("publish", "pipeline/publish/publisher.py", "_finish"),
    ("gc", "pipeline/retention.py", "prune"),
    ("gc", "pipeline/stages/prune.py", "stage_prune"),
    ("gc", "pipeline/cli/export_base.py", "cmd_gc"),
    ("publish", "pipeline/stages/publish.py", "stage_publish"),
    ("validation", "pipeline/stages/validate.py", "stage_validate"),
    ("validation", "pipeline/backfill/overlap.py", "validate_timed"),
    ("discover", "pipeline/stages/discover.py", "choose"),
    ("discover", "pipeline/stages/discover.py", "list_pending"),
    ("discover", "pipeline/stages/discover.py", "discover"),
    ("export", "pipeline/stages/export.py", "stage_export"),
)
_PRIORITY = {p: i for i, p in enumerate(PHASES)}


def phase_of_stacks(text: str) -> str:
    """The phase a process was in, from faulthandler's dump of all its threads.

    The innermost pipeline stage of each thread names that thread's phase; the
    process's phase is the furthest along of its threads (gc > publish >
    validation > export > discover > startup). No stage anywhere: start-up
    (imports, config, the CLI). ``exit``: the work is done (a backfill closing
    its validation process, or, told from stdout by the caller, the result
    already printed).
    """
    best = "startup"
    for block in re.split(r"\n(?=(?:Current thread|Thread) 0x)", text):
        for m in _FRAME.finditer(block):  # innermost first
            path, func = m.group("file"), m.group("func")
            hit = next((p for p, f, fn in _STAGES if path.endswith(f) and func == fn), None)
            if hit:
                if _PRIORITY[hit] > _PRIORITY[best]:
                    best = hit
                break
    return best


def _stderr_lines(err: str) -> list[str]:
    """stderr lines without tqdm's progress bar."""
    out = []
    for piece in re.split(r"[\r\n]+", err):
        piece = piece.strip()
        if piece and not piece.startswith("backfill:"):
            out.append(piece)
    return out


def one_line_failure(err: str) -> bool:
    lines = [ln for ln in _stderr_lines(err) if not ln.startswith("tf-export: warning:")]
    return "Traceback" not in err and len(lines) == 1 and lines[0].startswith("tf-export: error: ")


def _complete_json(path: Path) -> bool:
    try:
        text = path.read_text().strip()
        json.loads(text)
        return bool(text)
    except (OSError, ValueError):
        return False


def _pgid_members(pgid: int) -> list[str]:
    """Processes still in process group ``pgid`` (a SIGKILLed group must leave none)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) == pgid:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    state = fh.read().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    out.append(f"{entry} {cmd[:120]}")
        except (ProcessLookupError, FileNotFoundError, PermissionError, IndexError):
            continue
    return out


# -- the driver ---------------------------------------------------------------------------
class Chaos:
    """Starts, kills and judges ``tf-export`` processes on one export base."""

    WEIGHTS = {"run": 0.45, "backfill": 0.35, "gc": 0.20}
    COMPANION_GC = 0.4   # chance that a gc runs beside a run or backfill
    PLAIN_RUN = 0.5      # chance that a run takes the newest checkpoint when it has no version yet
    IDLE_GC = 0.8        # chance of a gc first when a run or backfill would find every checkpoint exported
    KILL_FROM = (0.4, 0.35, 0.25)  # weights of counting a kill from the start, the staging, the claim

    def __init__(self, root: Path, config: Path, base: Path, train: Path, seed: int | None = None,
                 log=None):
        self.root = Path(root)
        self.config = Path(config)
        self.base = Path(base)
        self.train = Path(train)
        self.seed = seed if seed is not None else time.time_ns() % 2**32
        self.rng = random.Random(self.seed)
        self.log = log or (lambda msg: None)
        self.logdir = self.root / "chaos-logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[ProcRecord] = []
        self.kills = 0
        self.retries = 0
        self.other_host_retries = 0
        self.hosts_ok, self.hosts_reason = host_switching()
        self.durations: dict[str, list[float]] = {}
        self.windows: dict[str, list[float]] = {}
        self.calibration: dict[str, float] = {}
        self.converged_after: int | None = None
        self.convergence_log: list[str] = []
        self.final: ProcRecord | None = None
        self.t0 = time.monotonic()

    # -- one process ----------------------------------------------------------------------
    def start(self, kind: str, args: list[str], role: str, host: str | None = None,
              config: Path | None = None) -> Running:
        if kind == "backfill" and config is None:
            # History comes back after gc removed it (--include-removed), under a keep that lets the
            # backfill through; gc with the config's own keep 3 still races it. Retention is not part
            # of the config hash, so both configs name the same ledger entries.
            config, args = self._backfill_config(), ["--include-removed", *args]
        n = len(self.procs)
        rec = ProcRecord(n, kind, list(args), role, host)
        self.procs.append(rec)
        stem = self.logdir / f"{n:03d}-{role}-{kind}"
        out_path, err_path, stacks = (Path(f"{stem}.{ext}") for ext in ("out", "err", "stacks"))
        cmd = tf_export_cmd(kind, "--config", str(config or self.config), "--json", *args)
        if host:
            cmd = on_host(cmd, host)
        out, err = open(out_path, "w"), open(err_path, "w")  # noqa: SIM115 - closed in finish()
        popen = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=str(self.root),
                                 env=chaos_env({"TF_CHAOS_STACKS": str(stacks)}), start_new_session=True)
        rec.started = time.time()
        return Running(rec, popen, out_path, err_path, stacks, [out, err])

    def _backfill_config(self) -> Path:
        import yaml

        path = self.config.with_name("chaos-backfill.yaml")
        if not path.exists():
            data = yaml.safe_load(self.config.read_text())
            data["retention"] = {**(data.get("retention") or {}), "keep": 1000}
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def kill(self, running: Running) -> None:
        """Dump the stacks (SIGUSR1), then SIGKILL the whole process group at once."""
        rec, pid = running.rec, running.popen.pid
        try:
            rec.base_at_kill = sorted(os.listdir(self.base))
        except FileNotFoundError:
            rec.base_at_kill = []
        before = running.stacks.read_text() if running.stacks.exists() else ""
        printed = _complete_json(running.out_path)
        # A process that printed its result may be shutting down, when faulthandler is already
        # unregistered and SIGUSR1 would end it: no dump then, the phase is ``exit``.
        if before.startswith("ready") and not printed and running.alive():
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            # SIGKILL as soon as the dump is written (no growth for 1 ms), so that the phase it
            # shows is the phase the kill interrupts, give or take a millisecond or two.
            deadline, size, quiet_since = time.monotonic() + 0.3, len(before), None
            while time.monotonic() < deadline:
                now = os.stat(running.stacks).st_size
                if now > len(before) and now == size:
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since >= 0.001:
                        break
                else:
                    quiet_since = None
                size = now
                time.sleep(0.0002)
        printed = printed or _complete_json(running.out_path)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        running.popen.wait(timeout=60)
        rec.seconds = running.elapsed()
        # SIGUSR1 ends a process that reached its shutdown between the check above and the signal.
        rec.killed = running.popen.returncode in (-signal.SIGKILL, -signal.SIGUSR1)
        deadline = time.monotonic() + 10
        rec.survivors = _pgid_members(pid)
        while rec.survivors and time.monotonic() < deadline:  # a big process takes a moment to die
            time.sleep(0.05)
            rec.survivors = _pgid_members(pid)
        dump = running.stacks.read_text()[len(before):] if running.stacks.exists() else ""
        rec.phase = phase_of_stacks(dump) if rec.killed else None
        if rec.killed and (printed or running.popen.returncode == -signal.SIGUSR1):
            rec.phase = "exit"  # its work was done and its result printed: killed while shutting down
        self._close(running)
        if rec.killed:
            self.kills += 1
            rec.outcomes = ["killed"]
        else:
            self._judge(rec)

    def finish(self, running: Running, timeout: float = PROCESS_TIMEOUT) -> ProcRecord:
        try:
            running.popen.wait(timeout=max(0.0, timeout - running.elapsed()))
        except subprocess.TimeoutExpired:
            os.killpg(running.popen.pid, signal.SIGKILL)
            running.popen.wait(timeout=60)
            running.rec.errors.append(f"hung: still running after {timeout:.0f} s, killed by the harness")
        running.rec.seconds = running.elapsed()
        self._close(running)
        self._judge(running.rec)
        return running.rec

    def _close(self, running: Running) -> None:
        for h in running.handles:
            h.close()
        rec = running.rec
        rec.rc = running.popen.returncode
        rec.stdout = running.out_path.read_text()
        rec.stderr = running.err_path.read_text()

    def _judge(self, rec: ProcRecord) -> None:
        """Outcomes of a process that ran to its end: published/skipped/... or failed (one line or not)."""
        try:
            data = json.loads(rec.stdout) if rec.stdout.strip() else None
        except ValueError:
            data = None
            rec.errors.append("stdout is not one JSON document")
        failed = "failed one-line" if one_line_failure(rec.stderr) else "failed NOT one-line"
        if rec.kind == "gc":
            rec.outcomes = ["gc ok" if rec.rc == 0 else failed]
        elif rec.kind == "run":
            rec.outcomes = [data["status"]] if rec.rc == 0 and isinstance(data, dict) else [failed]
        elif isinstance(data, list):  # backfill: one record per checkpoint
            rec.outcomes = [failed if r["status"] == "failed" else r["status"] for r in data] or ["nothing"]
            rec.errors += [f"{Path(str(r.get('checkpoint'))).name}: {r.get('error')}"
                           for r in data if r["status"] == "failed"]
            if rec.rc != 0 and not any(r["status"] == "failed" for r in data):
                rec.outcomes.append(failed)
        else:
            rec.outcomes = [failed]
        if rec.rc != 0 and not rec.errors:
            lines = _stderr_lines(rec.stderr)
            rec.errors.append(lines[-1] if lines else f"exit {rec.rc} with nothing on stderr")
        warnings = [ln for ln in _stderr_lines(rec.stderr) if ln.startswith("tf-export: warning:")]
        rec.errors += warnings

    # -- phases of the whole scenario -----------------------------------------------------
    def calibrate(self) -> None:
        """One uninterrupted run and one gc: their timings set the first ranges of the kill delays.

        Each kill is a uniform random delay counted from one of three instants
        of the process, all observed from outside (no hold points):

        - ``start``: from 0 to 1.05 times the expected duration (gc: from 0.5
          to 1.1, its prune comes last): anywhere, start-up included;
        - ``staging`` (processes with work): from when its staging directory
          appears to when its result is printed, in the last uninterrupted
          runs: export, validation, publish, retention;
        - ``claim`` (processes with work): from when its first version claim
          appears to when its result is printed: publish and retention,
          which last tens of milliseconds and would hardly ever be hit from
          the start, since start-up times vary by seconds under load.

        Expectations are per kind of process and whether it has work, and are
        refined by every process that ends before its kill (the longest of the
        last three), as load and the page cache change the speed.
        """
        running = self.start("run", [], "calibration")
        marks = self._watch_marks(running)
        rec = self.finish(running)
        if rec.rc != 0:
            raise RuntimeError(f"calibration run failed: {rec.stderr.strip()}")
        gc = self.finish(self.start("gc", [], "calibration"))
        if gc.rc != 0:
            raise RuntimeError(f"calibration gc failed: {gc.stderr.strip()}")
        self.calibration = {"run_s": rec.seconds, **{f"{k}_s": v for k, v in marks.items()}, "gc_s": gc.seconds}
        if "staging" not in marks or "claim" not in marks or "printed" not in marks:
            raise RuntimeError(f"calibration run showed no staging, claim or result: {marks}")
        t_stage, t_claim, t_printed = marks["staging"], marks["claim"], marks["printed"]
        self.durations = {"run:work": [rec.seconds], "run:idle": [t_stage], "backfill:work": [1.3 * rec.seconds],
                          "backfill:idle": [t_stage], "gc": [gc.seconds]}
        self.windows = {"staging": [t_printed - t_stage], "claim": [t_printed - t_claim]}
        self.log(f"calibration: run {rec.seconds:.2f}s (staging at {t_stage:.2f}s, claim at {t_claim:.2f}s, "
                 f"result at {t_printed:.2f}s), gc {gc.seconds:.2f}s")

    def _watch_marks(self, running: Running, until=None) -> dict[str, float]:
        """Poll until the process ends (or ``until(t, marks)`` is true): when its staging, its first
        claim and its result appeared. Only one process at a time makes staging and claims here."""
        staging0, claims0 = self._staging(), self._claims()
        marks: dict[str, float] = {}
        while running.alive() and running.elapsed() < PROCESS_TIMEOUT:
            t = running.elapsed()
            if "staging" not in marks and self._staging() - staging0:
                marks["staging"] = t
            if "claim" not in marks and self._claims() - claims0:
                marks["claim"] = t
            if "printed" not in marks and running.out_path.stat().st_size and _complete_json(running.out_path):
                marks["printed"] = t
            if until is not None and until(t, marks):
                break
            time.sleep(0.002)
        return marks

    def _claims(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.base / "_exports" / "claims") if n.isdigit()}
        except FileNotFoundError:
            return set()

    def plan_kill(self, category: str) -> tuple[str, float]:
        """(the instant a kill is counted from, the delay after it)."""
        expected = max(self.durations[category][-3:])
        if category == "gc":  # mostly Python's start-up and imports; the prune comes last
            return "start", self.rng.uniform(0.5 * expected, 1.1 * expected)
        if category.endswith(":work"):
            mode = self.rng.choices(("start", "staging", "claim"), weights=self.KILL_FROM)[0]
            if mode != "start":
                return mode, self.rng.uniform(0, max(self.windows[mode][-3:]))
        return "start", self.rng.uniform(0, 1.05 * expected)

    def _staging(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.base) if n.startswith("temp-") and not n.startswith("temp-deleting")}
        except FileNotFoundError:
            return set()

    def _host_for_retry(self) -> str | None:
        """None for a first attempt; every second retry runs under another host name."""
        if self.kills == 0:
            return None
        self.retries += 1
        if self.retries % 2 == 0:
            return None
        if not self.hosts_ok:
            return None
        self.other_host_retries += 1
        return f"chaos-host-{self.other_host_retries}"

    def _unexported(self) -> list[str]:
        """Checkpoints with no ledger entry right now."""
        done = set()
        ledger = self.base / "_exports" / "ledger"
        if ledger.is_dir():
            for p in ledger.iterdir():
                if p.name.startswith("."):
                    continue
                try:
                    done.add(Path(json.loads(p.read_text())["checkpoint"]).name)
                except (OSError, ValueError, KeyError):
                    pass
        names = sorted({p.name[:-len(".index")] for p in self.train.glob("*.index")},
                       key=lambda n: int(re.search(r"(\d+)$", n).group(1)))
        return [n for n in names if n not in done]

    def run_chaos(self, kills: int, max_rounds: int | None = None) -> None:
        """Rounds of one process killed after a random delay (sometimes with a gc beside it) until
        ``kills`` SIGKILLs have landed on running processes."""
        if not self.durations:
            self.calibrate()
        max_rounds = max_rounds or kills * 5
        rounds = 0
        while self.kills < kills and rounds < max_rounds:
            rounds += 1
            kind = self.rng.choices(list(self.WEIGHTS), weights=list(self.WEIGHTS.values()))[0]
            todo = self._unexported()
            if not todo and kind != "gc" and self.rng.random() < self.IDLE_GC:
                # Nothing to export: an uninterrupted gc (keep 3 of 6) makes work again.
                gc = self.finish(self.start("gc", [], "retention", host=self._host_for_retry()))
                self.log(gc.line())
                todo = self._unexported()
            args: list[str] = []
            work = bool(todo)
            if kind == "run":
                newest = self.checkpoints()[-1]
                if not (newest in todo and self.rng.random() < self.PLAIN_RUN):  # a plain run takes the newest
                    args = ["--checkpoint", self.rng.choice(todo or self.checkpoints())]
            category = "gc" if kind == "gc" else f"{kind}:{'work' if work else 'idle'}"
            mode, delay = self.plan_kill(category)
            primary = self.start(kind, args, "primary", host=self._host_for_retry())
            primary.rec.delay, primary.rec.kill_from = delay, mode
            companion_at = self.rng.uniform(0, max(self.durations[category][-3:])) \
                if kind != "gc" and self.rng.random() < self.COMPANION_GC else None
            companion: list[Running] = []

            def due(t: float, marks: dict, companion_at=companion_at, companion=companion, mode=mode,
                    delay=delay) -> bool:
                if companion_at is not None and not companion and t >= companion_at:
                    companion.append(self.start("gc", [], "companion", host=self._host_for_retry()))
                origin = 0.0 if mode == "start" else marks.get(mode)
                return origin is not None and t >= origin + delay

            marks = self._watch_marks(primary, until=due)
            if primary.alive() and primary.elapsed() < PROCESS_TIMEOUT:
                self.kill(primary)
            else:
                rec = self.finish(primary)
                if rec.rc == 0 and not rec.killed:
                    self.durations[category].append(rec.seconds)
                    if {"staging", "claim", "printed"} <= set(marks) and kind == "run":
                        self.windows["staging"].append(marks["printed"] - marks["staging"])
                        self.windows["claim"].append(marks["printed"] - marks["claim"])
            for c in companion:
                self.finish(c)
            self.log(primary.rec.line() + f" [{category}, kill {delay:.2f}s after {mode}]" +
                     "".join(f" | {c.rec.line()}" for c in companion))

    def converge(self, max_rounds: int = 4) -> bool:
        """``backfill`` then ``run`` without kills until both exit 0 with nothing left to do."""
        for i in range(1, max_rounds + 1):
            back = self.finish(self.start("backfill", [], "converge"))
            run = self.finish(self.start("run", [], "converge"))
            self.convergence_log += [back.line(), run.line()]
            self.log(back.line())
            self.log(run.line())
            done = (back.rc == 0 and back.outcomes == ["nothing"] and run.rc == 0
                    and run.outcomes[0] in ("skipped", "no_new_checkpoint"))
            if done:
                self.converged_after = i
                return True
        return False

    def final_gc(self, lease_seconds: int = 1) -> ProcRecord:
        """gc with a short lease (and a large keep), once the lease of every staging has run out."""
        import yaml

        data = yaml.safe_load(self.config.read_text())
        data["retention"] = {**(data.get("retention") or {}), "lease_seconds": lease_seconds, "keep": 1000}
        config = self.config.with_name("chaos-final-gc.yaml")
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        time.sleep(lease_seconds + 1.1)
        self.final = self.finish(self.start("gc", [], "final", config=config))
        self.log(self.final.line())
        return self.final

    # -- judgement --------------------------------------------------------------------------
    def checkpoints(self) -> list[str]:
        return sorted((p.name[:-len(".index")] for p in self.train.glob("*.index")),
                      key=lambda n: int(re.search(r"(\d+)$", n).group(1)))

    def versions(self) -> dict[int, dict]:
        out = {}
        for p in self.base.iterdir():
            if p.name.isdigit():
                try:
                    out[int(p.name)] = json.loads((p / MANIFEST).read_text())
                except (OSError, ValueError):
                    out[int(p.name)] = {}
        return dict(sorted(out.items()))

    def ledger(self) -> dict[str, dict]:
        d = self.base / "_exports" / "ledger"
        return {p.name: json.loads(p.read_text()) for p in sorted(d.iterdir()) if not p.name.startswith(".")} \
            if d.is_dir() else {}

    def duplicates(self) -> int:
        names = [Path(str((m.get("checkpoint") or {}).get("path"))).name for m in self.versions().values()]
        ledger = [Path(str(e.get("checkpoint"))).name for e in self.ledger().values()]
        return sum(c - 1 for c in collections.Counter(names).values() if c > 1) + \
            sum(c - 1 for c in collections.Counter(ledger).values() if c > 1)

    def verify(self, watcher: ServingWatcher | None = None, parity: bool = True) -> list[str]:
        """Every problem left after convergence and the final gc (an empty list when all holds)."""
        problems: list[str] = []
        if watcher is not None:
            problems += watcher.violations[:20]
            problems += [f"watcher error: {e}" for e in watcher.errors[:5]]
        if self.converged_after is None:
            problems.append("no convergence: backfill/run still had work or failed:\n  " +
                            "\n  ".join(self.convergence_log[-4:]))
        for rec in self.procs:
            if rec.survivors:
                problems.append(f"process group of #{rec.n} not empty after SIGKILL: {rec.survivors}")
            if any(o == "failed NOT one-line" for o in rec.outcomes):
                problems.append(f"#{rec.n} {rec.kind} failed without a one-line error:\n{rec.stderr[-2000:]}")
            if rec.role in ("companion", "retention") and rec.rc != 0:
                problems.append(f"concurrent gc #{rec.n} failed: {rec.errors}")
            if any(e.startswith("hung") for e in rec.errors):
                problems.append(f"#{rec.n} {rec.kind} hung")
        if self.final is not None and self.final.rc != 0:
            problems.append(f"final gc failed: {self.final.stderr.strip()}")

        checkpoints = self.checkpoints()
        versions = self.versions()
        ledger = self.ledger()
        by_ckpt = collections.defaultdict(list)
        for key, entry in ledger.items():
            by_ckpt[Path(str(entry.get("checkpoint"))).name].append((key, entry))
        for name in checkpoints:
            entries = by_ckpt.get(name, [])
            if len(entries) != 1:
                problems.append(f"{name} has {len(entries)} ledger entries")
        for name in set(by_ckpt) - set(checkpoints):
            problems.append(f"ledger entry for unknown checkpoint {name}")
        for key, entry in ledger.items():
            v = entry.get("version")
            m = versions.get(v)
            if m is None:
                staging_name = Path(str(entry.get('staging'))).name
                problems.append(f"ledger entry {key} ({Path(str(entry.get('checkpoint'))).name}) names version {v}, "
                                f"which does not exist (staging {staging_name} "
                                f"{'still there' if (self.base / staging_name).exists() else 'gone'})")
            elif m.get("ledger_key") != key:
                problems.append(f"version {v} carries ledger key {m.get('ledger_key')}, its ledger entry is {key}")
        named = collections.Counter()
        for v, m in versions.items():
            ck = m.get("checkpoint") or {}
            if not m:
                problems.append(f"version {v} has no readable manifest")
                continue
            named[Path(str(ck.get("path"))).name] += 1
            if v not in {e.get("version") for e in ledger.values()}:
                problems.append(f"version {v} ({Path(str(ck.get('path'))).name}) has no ledger entry")
        for name, count in named.items():
            if count > 1:
                problems.append(f"{name} is published as {count} versions")
        steps = [(m.get("checkpoint") or {}).get("step") for m in versions.values()]
        if steps != sorted(steps):
            problems.append(f"versions out of training order: {list(zip(versions, steps))}")
        left = sorted(p.name for p in self.base.iterdir() if p.name.startswith("temp-"))
        if left:
            problems.append(f"staging left after gc with a 1 s lease: {left}")
        for sub in ("work", "leases"):
            d = self.base / "_exports" / sub
            rest = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
            if rest:
                problems.append(f"_exports/{sub} not empty after gc with a 1 s lease: {rest}")
        if parity and versions:
            problems += self.check_loads(versions)
        return problems

    def check_loads(self, versions: dict[int, dict]) -> list[str]:
        """Every version through TF Serving's loader in one fresh process, against its checkpoint."""
        import numpy as np

        x = np.random.default_rng(11).standard_normal((5, 4)).astype("float32")
        x_path, y_path = self.logdir / "x.npy", self.logdir / "served.npz"
        np.save(x_path, x)
        paths = {str(v): str(self.base / str(v)) for v in versions}
        proc = subprocess.run([sys.executable, "-c", LOAD_ALL, json.dumps(paths), str(x_path), str(y_path)],
                              env=chaos_env(), capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return [f"TF Serving's loader failed: {proc.stderr.strip()[-3000:]}"]
        served = np.load(y_path)
        import tensorflow as tf

        from tf_export_pipeline.demo import build

        problems = []
        for v, m in versions.items():
            prefix = (m.get("checkpoint") or {}).get("path")
            model = build()
            status = tf.train.Checkpoint(model=model).read(prefix)
            status.assert_existing_objects_matched()
            status.expect_partial()  # the optimizer's slots are not wanted here
            restored = model(x, training=False).numpy()
            got = served[str(v)]
            if got.shape != restored.shape or not np.allclose(got, restored, rtol=1e-5, atol=1e-6):
                problems.append(f"version {v} serves other outputs than {prefix}: max diff "
                                f"{float(np.max(np.abs(got - restored))) if got.shape == restored.shape else 'shape'}")
        return problems

    # -- the table ------------------------------------------------------------------------------
    def summary(self, watcher: ServingWatcher | None = None) -> dict:
        killed = [r for r in self.procs if r.killed]
        phases = collections.Counter(r.phase for r in killed)
        by_kind = collections.Counter(r.kind for r in killed)
        outcomes = collections.Counter(o for r in self.procs if r.role in CHAOS_ROLES for o in r.outcomes)
        failures = collections.Counter()
        for r in self.procs:
            if r.role in CHAOS_ROLES:
                for e in r.errors:
                    failures[re.sub(r"\d{6,}|temp-\S+|/\S+", "…", e)[:200]] += 1
        return {
            "seed": self.seed,
            "kills": len(killed),
            "kills_by_command": dict(by_kind),
            "kills_per_phase": {p: phases.get(p, 0) for p in PHASES},
            "kills_counted_from": dict(collections.Counter(r.kill_from for r in killed)),
            "processes": sum(1 for r in self.procs if r.role in CHAOS_ROLES),
            "retries": self.retries,
            "retries_other_host": self.other_host_retries,
            "other_host_skipped": "" if self.hosts_ok else self.hosts_reason,
            "partial_versions_seen": watcher.partial if watcher else None,
            "changed_versions_seen": watcher.changed if watcher else None,
            "duplicates_seen": watcher.duplicates if watcher else None,
            "duplicates_final": self.duplicates(),
            "watcher_polls": watcher.polls if watcher else None,
            "versions_sighted": watcher.sightings if watcher else None,
            "versions_removed_seen": watcher.disappearances if watcher else None,
            "outcomes": dict(outcomes),
            "failure_messages": dict(failures),
            "converged_after_rounds": self.converged_after,
            "calibration": {k: round(v, 2) for k, v in self.calibration.items()},
        }

    def table(self, watcher: ServingWatcher | None = None, problems: list[str] | None = None) -> str:
        s = self.summary(watcher)
        phases = ", ".join(f"{p} {n}" for p, n in s["kills_per_phase"].items())
        order = ("published", "skipped", "no_new_checkpoint", "nothing", "gc ok", "failed one-line",
                 "failed NOT one-line", "killed")
        outcomes = ", ".join(f"{k} {s['outcomes'][k]}" for k in order if k in s["outcomes"])
        host = str(s["retries_other_host"]) + (f" (skipped: {s['other_host_skipped']})"
                                               if s["other_host_skipped"] else f" of {s['retries']} retries")
        rows = [
            ("kills (SIGKILL of the process group)",
             f"{s['kills']} ({', '.join(f'{k} {v}' for k, v in sorted(s['kills_by_command'].items()))})"),
            ("kills per phase", phases),
            ("kill delay counted from (process start / its staging appearing / its claim appearing)",
             " / ".join(str(s["kills_counted_from"].get(k, 0)) for k in ("start", "staging", "claim"))),
            ("retries from another host", host),
            ("partial versions seen by the watcher", s["partial_versions_seen"]),
            ("versions changed while visible", s["changed_versions_seen"]),
            ("duplicates (seen while running / at the end)", f"{s['duplicates_seen']} / {s['duplicates_final']}"),
            ("outcomes of the chaos processes", outcomes),
            ("converged after (backfill+run rounds)", s["converged_after_rounds"]),
            ("problems after convergence", len(problems) if problems is not None else "not checked"),
            ("watcher polls / version sightings / removals seen",
             f"{s['watcher_polls']} / {s['versions_sighted']} / {s['versions_removed_seen']}"),
            ("wall time (s)", f"{time.monotonic() - self.t0:.0f}"),
            ("calibration (s)", ", ".join(f"{k} {v}" for k, v in s["calibration"].items())),
            ("seed", s["seed"]),
        ]
        lines = ["| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
        if s["failure_messages"]:
            lines += ["", "One-line failures and warnings of processes that were not killed:", ""]
            lines += [f"- {n} x `{msg}`" for msg, n in sorted(s["failure_messages"].items(), key=lambda kv: -kv[1])]
        if problems:
            lines += ["", "Problems:", ""] + [f"- {p}" for p in problems]
        return "\n".join(lines)


LOAD_ALL = r"""
import json, sys
import numpy as np
import tensorflow as tf

paths, x = json.loads(sys.argv[1]), np.load(sys.argv[2])
out = {}
for version, path in paths.items():
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, [tf.saved_model.SERVING], path)
        sig = meta.signature_def["serving_default"]
        (_, given), = sig.inputs.items()
        (_, wanted), = sig.outputs.items()
        out[version] = sess.run(wanted.name, {given.name: x})
np.savez(sys.argv[3], **out)
"""


def prepare(root: Path, train_dir: Path, gap: float = 5.0, **overrides) -> Path:
    """The chaos config in ``root`` for checkpoints in ``train_dir``; spreads their write times."""
    from tf_export_pipeline.demo import write_config

    spread_checkpoint_times(train_dir, gap)
    cfg = {**CHAOS_CONFIG, **overrides}
    cfg["training_dir"] = str(train_dir)
    return Path(write_config(str(root), name="chaos.yaml", **cfg))
