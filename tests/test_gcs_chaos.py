"""Chaos on gs://: kills at random instants and storage faults of every kind, against a real GCS server.

Each scenario runs against the emulator (fake-gcs-server) while a watcher lists
the export base every 10 ms, as TF Serving polls it, and checks at the end:
each checkpoint exactly once (one ledger entry per checkpoint, no two versions
from one checkpoint by their manifests, ledger and manifests naming each
other), every version whole (``saved_model.pb``, and every file of its
manifest's ``files`` map with that size and crc32c), and no listing that showed
``saved_model.pb`` in a version without all of its files.

1. Kills: ``tf-export run`` and ``backfill`` in their own session, the process
   group (validation worker included) SIGKILLed after a random delay
   calibrated from one uninterrupted run (half anywhere from its first write to
   its end, half around the instant it claimed its version), 7 kills while the
   training job keeps writing checkpoints; then ``backfill`` and ``run``, as an
   operator would, must converge.
2. Faults in process: 32 publishes of pre-uploaded staging copies through a
   proxy failing ~10% of requests (503, reset before the server acted, answer
   cut after it acted, read timeout), then 16 more with outages (7 faults in a
   row, past gcsfs's 6 attempts). Every outcome is published, skipped or a
   one-line PipelineError; with the faults off, the failed ones converge.
3. Faults through the real CLI (``backfill`` and ``run`` via the proxy, gcsfs's
   own back-off), then convergence without faults.
4. Targeted reproductions of the ways the protocol was found to break: a
   commit cut short mid-promotion, a ledger entry whose answer was lost, two
   finishers of one commit, a cleanup failing after the version is whole.

The figures of each scenario are printed (``pytest -s``, lines starting
``[chaos figures]``) and written as JSON to the file named by
``TF_EXPORT_CHAOS_FIGURES`` if set. ``TF_EXPORT_CHAOS_SEED`` changes the seed
of the kill delays and of the faults.

What the tests read back, they read through the emulator's own JSON API or a
fresh gcsfs instance, never through the pipeline's storage layer.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import cli_cmd, cli_env, run_cli
from tests.support.fault_proxy import DROP, DROP_AFTER, FAIL_503, FaultProxy
from tests.support.gcs_fixtures import GcsBucket
from tests.test_gcs_end_to_end import (
    BASE,
    BucketWatcher,
    fake_saved_model,
    make_gcs_workspace,
    objects,
    versions_in,
)
from tf_export_pipeline.checkpoints import Checkpoint
from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.layout import MANIFEST
from tf_export_pipeline.publish import Publisher
from tf_export_pipeline.publish.staging import file_list
from tf_export_pipeline.publish.storage_check import check_storage, record_verdict
from tf_export_pipeline.storage import open_storage

pytestmark = pytest.mark.timeout(420)

SEED = int(os.environ.get("TF_EXPORT_CHAOS_SEED", "20261123"))
FIGURES: dict[str, dict] = {}


def record_figures(name: str, figures: dict) -> None:
    FIGURES[name] = figures
    print(f"\n[chaos figures] {name}: {json.dumps(figures, sort_keys=True)}")
    target = os.environ.get("TF_EXPORT_CHAOS_FIGURES")
    if target:
        Path(target).write_text(json.dumps(FIGURES, indent=1, sort_keys=True))


# -- what the bucket holds -------------------------------------------------------------
class Watcher(BucketWatcher):
    """:class:`BucketWatcher` that survives a failed listing, remembers the versions it saw
    unfinished, and keeps a timeline: when objects of each kind first appeared since :meth:`mark`."""

    KINDS = (("_exports/work/", "work"), ("temp-", "staging"), ("_exports/claims/", "claim"),
             ("_exports/ledger/", "ledger"))

    def __init__(self, bucket: GcsBucket, base: str = BASE, interval: float = 0.01):
        super().__init__(bucket, base, interval)
        self.errors = 0
        self.unfinished: set[int] = set()  # versions listed at some point without saved_model.pb
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._before: set[str] | None = None
        self.timeline: dict[str, float] = {}

    def mark(self) -> None:
        """Start a new timeline: objects listed from now on that were not there count."""
        with self._lock:
            self._before = set(objects(self.bucket, self.base))
            self._t0 = time.monotonic()
            self.timeline = {}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rels = objects(self.bucket, self.base)
                now = time.monotonic()
                found: dict[int, set[str]] = {}
                for rel in rels:
                    head, _, rest = rel.partition("/")
                    if head.isdigit() and rest:
                        found.setdefault(int(head), set()).add(rest)
                for version, files in found.items():
                    if "saved_model.pb" in files:
                        self.with_marker.setdefault(version, []).append(frozenset(files))
                    else:
                        self.without_marker += 1
                        self.unfinished.add(version)
                with self._lock:
                    if self._before is not None:
                        for rel in set(rels) - self._before:
                            head = rel.split("/", 1)[0]
                            kind = next((k for prefix, k in self.KINDS if rel.startswith(prefix)), None)
                            if head.isdigit():
                                kind = "whole" if rel.endswith("/saved_model.pb") else "version"
                            if kind and kind not in self.timeline:
                                self.timeline[kind] = round(now - self._t0, 2)
                self.polls += 1
            except Exception:  # noqa: BLE001 - a listing refused under load; the next poll counts
                self.errors += 1
            self._stop.wait(self.interval)


def read_json(bucket: GcsBucket, *parts: str) -> dict | None:
    try:
        return json.loads(bucket.fs().cat_file(bucket.path(*parts)))
    except (FileNotFoundError, ValueError):
        return None


def ledger(bucket: GcsBucket, base: str = BASE) -> dict[str, dict]:
    out = {}
    for name in objects(bucket, f"{base}/_exports/ledger"):
        if "/" not in name and not name.startswith("."):
            out[name] = read_json(bucket, base, "_exports/ledger", name) or {"torn": True}
    return out


def manifests(bucket: GcsBucket, base: str = BASE) -> dict[int, dict | None]:
    return {v: read_json(bucket, base, str(v), MANIFEST) for v in versions_in(bucket, base)}


def staging_dirs(bucket: GcsBucket, base: str = BASE) -> set[str]:
    return {rel.split("/", 1)[0] for rel in objects(bucket, base) if rel.startswith("temp-")}


def not_whole(bucket: GcsBucket, base: str = BASE) -> list[str]:
    """Versions that are not whole: saved_model.pb, the manifest, and every file its
    ``files`` map lists, with that size and crc32c."""
    problems = []
    found = versions_in(bucket, base)
    for version, files in sorted(found.items()):
        if "saved_model.pb" not in files:
            problems.append(f"version {version} has no saved_model.pb (files: {sorted(files)})")
            continue
        manifest = read_json(bucket, base, str(version), MANIFEST)
        if manifest is None:
            problems.append(f"version {version} has no readable manifest")
            continue
        if manifest.get("version") != version:
            problems.append(f"version {version} holds the manifest of version {manifest.get('version')}")
        listed = manifest.get("files") or {}
        if "saved_model.pb" not in listed:
            problems.append(f"version {version}: its manifest lists no saved_model.pb")
        for rel, want in sorted(listed.items()):
            have = files.get(rel)
            if have is None:
                problems.append(f"version {version} lacks {rel}")
            elif int(have["size"]) != want["size"] or have.get("crc32c") != want["crc32c"]:
                problems.append(f"version {version}: {rel} is {have['size']} bytes crc32c {have.get('crc32c')}, "
                                f"its manifest says {want['size']} bytes crc32c {want['crc32c']}")
    return problems


def duplicates(bucket: GcsBucket, base: str = BASE) -> list[str]:
    """Checkpoints with more than one ledger entry, or more than one version by the manifests;
    and ledger entries and versions that do not name each other."""
    problems = []
    entries = ledger(bucket, base)
    by_checkpoint = Counter(e.get("checkpoint") for e in entries.values())
    problems += [f"{n} ledger entries for {c}" for c, n in sorted(by_checkpoint.items()) if n > 1]
    found = manifests(bucket, base)
    by_key: dict[str, list[int]] = {}
    by_ckpt: dict[str, list[int]] = {}
    for version, manifest in found.items():
        if manifest is None:
            continue
        by_key.setdefault(manifest.get("ledger_key"), []).append(version)
        by_ckpt.setdefault((manifest.get("checkpoint") or {}).get("path"), []).append(version)
    problems += [f"ledger key {k} has versions {sorted(vs)}" for k, vs in by_key.items() if len(vs) > 1]
    problems += [f"checkpoint {c} has versions {sorted(vs)}" for c, vs in by_ckpt.items() if len(vs) > 1]
    for key, entry in sorted(entries.items()):
        if entry.get("version") not in found:
            problems.append(f"ledger entry {key} names version {entry.get('version')}, which does not exist")
        elif (found[entry["version"]] or {}).get("ledger_key") != key:
            problems.append(f"ledger entry {key} names version {entry['version']}, whose manifest names "
                            f"{(found[entry['version']] or {}).get('ledger_key')}")
    versions_in_ledger = {e.get("version") for e in entries.values()}
    problems += [f"version {v} has no ledger entry" for v in sorted(set(found) - versions_in_ledger)]
    return problems


def state_after_kill(bucket: GcsBucket, base: str = BASE) -> dict:
    """What a kill left behind: stale claims, committed versions not yet whole, staging."""
    found = versions_in(bucket, base)
    entries = ledger(bucket, base)
    committed = {e.get("version") for e in entries.values()}
    claims = {int(n) for n in objects(bucket, f"{base}/_exports/claims") if n.isdigit()}
    return {
        "stale_claims": len(claims - committed - set(found)),
        "committed_not_whole": sorted(v for v in committed if "saved_model.pb" not in found.get(v, {})),
        "staging": len(staging_dirs(bucket, base)),
    }


# -- 1. kills at random instants -------------------------------------------------------
@dataclass
class Kill:
    command: str
    delay: float
    killed: bool  # still running when the signal went out (else it had finished: rc)
    rc: int | None
    left: dict = field(default_factory=dict)


def run_and_kill(args: list[str], config: Path, delay: float, log: Path) -> tuple[bool, int | None]:
    """Start ``tf-export ARGS`` in its own session; SIGKILL its process group after ``delay`` s."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cli_cmd(*args, "--json", "--config", str(config)), env=cli_env(),
                                stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is not None:
            return False, proc.returncode
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        return True, None


PUBLISH_DELAY = 0.15  # seconds the proxy holds each request of a publish's writes (claims, ledger, copies, deletes)


def is_publish_write(method: str, path: str) -> bool:
    return "/rewriteTo/" in path or method == "DELETE" or (method == "POST" and "ifGenerationMatch=0" in path)


@pytest.mark.alone
def test_kills_at_random_instants_converge_to_each_checkpoint_once(tmp_path, trained_dir, gcs_server, gcs_bucket):
    """SIGKILLs at random instants: half anywhere from the first write to the end of a run, half
    around the instant the uninterrupted run claimed its version. The processes reach the bucket
    through a proxy that injects no fault but holds each write of a publish (claims, ledger entry,
    server-side copies, deletes) for PUBLISH_DELAY s, as a slow network would: the publish then
    lasts long enough for kills to land between the claim, the commit and the last object moved."""
    from tf_export_pipeline.demo import write_config

    rng = random.Random(SEED)
    ws = make_gcs_workspace(tmp_path, trained_dir, gcs_bucket, retention={"keep": 100})
    slow = FaultProxy(gcs_server.url, lifetime=400, max_requests=10**6, delay=PUBLISH_DELAY,
                      delay_match=is_publish_write)
    slow.start()
    via = gcs_bucket.via(slow)
    ws.config = Path(write_config(str(tmp_path), name="via-slow-proxy.yaml", training_dir=via.url("train"),
                                  export_base=via.url(BASE), storage_options=via.storage_options,
                                  retention={"keep": 100}))
    log = tmp_path / "killed.log"
    kills: list[Kill] = []
    started = time.monotonic()
    try:
        with Watcher(gcs_bucket) as watch:
            # Calibration: one uninterrupted run (ckpt-30, versioning timestamp), and when it first
            # wrote to the bucket (before that it only starts Python and TensorFlow and reads).
            watch.mark()
            t0 = time.monotonic()
            calibration = ws.cli("run", "--json")
            uninterrupted = time.monotonic() - t0
            assert calibration.rc == 0 and calibration.json["status"] == "published", calibration.err
            calibrated = dict(watch.timeline)
            first_write = min(calibrated.values())
            busy = uninterrupted - first_write  # export upload, validation, publish, prune
            for i in range(12):
                if sum(k.killed for k in kills) >= 7:
                    break
                command = ("backfill", "run")[i % 2]
                # The training job goes on: a newer checkpoint for each run, older ones left for the backfills.
                ws.train_more(10)
                if i % 4 < 2:
                    # anywhere from just before the first write to the end (a backfill exports several)
                    span = busy * (2.5 if command == "backfill" else 1.0)
                    delay = round(max(first_write - 1.0, 0.5) + rng.uniform(0, span + 1.0), 2)
                else:  # around the instant the calibration run claimed its version
                    delay = round(calibrated["claim"] + rng.uniform(-0.75, 1.25), 2)
                watch.mark()
                killed, rc = run_and_kill([command], ws.config, delay, log)
                time.sleep(0.1)  # one more listing
                left = state_after_kill(gcs_bucket)
                left["reached"] = sorted(watch.timeline, key=watch.timeline.get)
                kills.append(Kill(command, delay, killed, rc, left))
                assert killed or rc == 0, f"{command} failed unkilled (rc {rc}): {log.read_text()[-2000:]}"

            # convergence: the operator runs the same commands again
            converge = [ws.cli("backfill", "--json"), ws.cli("run", "--json")]
    finally:
        slow.stop()

    newest = 30 + 10 * len(kills)
    figures = {
        "seed": SEED, "uninterrupted_run_seconds": round(uninterrupted, 1), "calibration_timeline": calibrated,
        "kills": sum(k.killed for k in kills), "finished_before_the_kill": sum(not k.killed for k in kills),
        "plan": [(k.command, k.delay, "killed" if k.killed else f"rc {k.rc}") for k in kills],
        "left_after_each_kill": [k.left for k in kills],
        "convergence": [(res.rc, res.out if res.rc == 0 else res.err[-500:]) for res in converge],
        "watcher_polls": watch.polls, "watcher_errors": watch.errors,
        "partial_versions_seen": {"listings_without_saved_model_pb": watch.without_marker,
                                  "versions": sorted(watch.unfinished)},
        "violations": watch.violations(), "seconds": round(time.monotonic() - started, 1),
    }
    # Convergence must finish every committed publish by itself: nothing is left for a hand or a named run.
    unfinished = state_after_kill(gcs_bucket)["committed_not_whole"]
    figures["committed_not_whole_after_convergence"] = unfinished
    figures["duplicates"] = duplicates(gcs_bucket)
    figures["not_whole"] = not_whole(gcs_bucket)
    record_figures("kills", figures)

    backfill, run = converge
    assert backfill.rc == 0 and all(r["status"] == "published" for r in backfill.json), figures
    assert run.rc == 0 and run.json["status"] in ("published", "skipped") and run.json["step"] == newest, figures
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import list_pending

    direct_config = write_config(str(tmp_path), name="direct.yaml", training_dir=gcs_bucket.url("train"),
                                 export_base=gcs_bucket.url(BASE), storage_options=gcs_bucket.storage_options,
                                 retention={"keep": 100})
    assert list_pending(load_config(direct_config)) == [], figures  # what a third backfill would export
    assert unfinished == [], figures
    assert 6 <= figures["kills"] <= 8, figures
    assert watch.polls > 100, figures
    assert watch.violations() == [], figures
    assert figures["not_whole"] == [], figures
    assert figures["duplicates"] == [], figures
    entries = ledger(gcs_bucket)
    steps = sorted(e["step"] for e in entries.values())
    assert steps == list(range(10, newest + 1, 10)), figures
    assert len(versions_in(gcs_bucket)) == len(steps)
    # the highest version comes from the newest checkpoint, and versions follow training order
    by_version = sorted((e["version"], e["step"]) for e in entries.values())
    assert [s for _, s in by_version] == sorted(s for _, s in by_version), by_version
    assert not unfinished, f"backfill and run left committed versions {unfinished} unfinished: {figures}"


@pytest.mark.alone
def test_backfill_killed_mid_promotion_is_finished_by_the_next_backfill(tmp_path, trained_dir, gcs_bucket):
    """A backfill killed after the commit of ckpt-10 (in the middle of moving its objects):
    running the same backfill again must finish that version, as the ledger entry promises."""
    ws = make_gcs_workspace(tmp_path, trained_dir, gcs_bucket, retention={"keep": 100})
    proc = subprocess.Popen(cli_cmd("backfill", "--to-step", "10", "--json", "--config", str(ws.config)),
                            env=cli_env({"TF_EXPORT_TEST_HOLD": "promoting"}), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "holding at promoting" in line:
                break
        else:
            pytest.fail(f"the backfill never reached the promotion: rc {proc.wait()}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    [(version, files)] = versions_in(gcs_bucket).items()
    if "saved_model.pb" in files:  # the setup, not the bug: committed, not whole, which TF Serving does not load
        pytest.fail(f"the kill should have left version {version} without saved_model.pb")

    again = ws.cli("backfill", "--json")
    assert again.rc == 0, again.err
    assert not_whole(gcs_bucket) == [], (again.out, sorted(versions_in(gcs_bucket)[version]))
    assert duplicates(gcs_bucket) == []


# -- 2. storage faults of every kind ----------------------------------------------------
FAULT_RATES = {"fail_rate": 0.04, "drop_rate": 0.03, "drop_after_rate": 0.03}
TIMEOUT_RATE = 0.01  # answers held past the client's read timeout (the server acts after the client gave up)
READ_TIMEOUT = 0.4
PUBLISHES = 32  # under FAULT_RATES alone: at most 2 faults in a row, which gcsfs's retries absorb
BURST_PUBLISHES = 16  # then also outages: 7 faults in a row, more than gcsfs's 6 attempts of one request
BURST_RATE = 0.01


class Timeouts:
    """A proxy ``delay``: holds a seeded share of the requests longer than the client's read timeout."""

    def __init__(self, rate: float, seed: int, hold: float = READ_TIMEOUT * 2):
        self.rate, self.hold = rate, hold
        self.rng = random.Random(seed)
        self.count = 0
        self.enabled = True
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str) -> float:
        with self.lock:
            if self.enabled and self.rng.random() < self.rate:
                self.count += 1
                return self.hold
        return 0.0


class BurstyProxy(FaultProxy):
    """:class:`FaultProxy` that can also start, with ``burst_rate`` per request, an outage of
    ``burst_len`` faults in a row of one kind (503, reset, or answer cut after the server acted)."""

    def __init__(self, *args, burst_rate: float = 0.0, burst_len: int = 7, **kwargs):
        super().__init__(*args, **kwargs)
        self.burst_rate, self.burst_len = burst_rate, burst_len
        self.bursts: Counter = Counter()
        self._burst_rng = random.Random(self.seed + 7)
        self._burst_lock = threading.Lock()
        self._burst_left = 0
        self._burst_kind = FAIL_503

    def _decide(self, method: str, path: str) -> str:
        with self._burst_lock:
            if not self._burst_left and self.burst_rate and self._burst_rng.random() < self.burst_rate:
                self._burst_left = self.burst_len
                self._burst_kind = self._burst_rng.choice([FAIL_503, DROP, DROP_AFTER])
                self.bursts[self._burst_kind] += 1
            action = None
            if self._burst_left:
                self._burst_left -= 1
                action = self._burst_kind
        if action is None:
            return super()._decide(method, path)
        with self._lock:
            self.counters.requests += 1
            if action == FAIL_503:
                self.counters.failed_503 += 1
            elif action == DROP:
                self.counters.dropped += 1
            else:
                self.counters.dropped_after += 1
        return action


def step_checkpoint(i: int) -> Checkpoint:
    step = 1000 + 10 * i
    return Checkpoint(prefix=f"gs://elsewhere/train/ckpt-{step}", name=f"ckpt-{step}", step=step,
                      written_at=1_700_000_000.0 + step, complete=True, index_size=1, index_crc32c="AAAAAA==")


def classify(fn) -> tuple[str, str | None]:
    """``(status, message)`` of one publish: its status, ``failed`` with a PipelineError's one
    line, or ``other`` with any other exception (a bug: the contract is a one-line PipelineError)."""
    try:
        result = fn()  # a stage's typed record, or the publisher's own dict
        return str(result["status"] if isinstance(result, dict) else result.status), None
    except PipelineError as err:
        return "failed", f"{type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001 - what the test is looking for
        import traceback

        return "other", "".join(traceback.format_exception(err))[-3000:]


@pytest.mark.alone
def test_publishes_under_every_kind_of_fault_fail_cleanly_and_converge(
        gcs_server, gcs_bucket, fast_gcs_retries, tmp_path):
    import aiohttp

    local = fake_saved_model(tmp_path / "model", big=300_000)
    (local / MANIFEST).unlink()  # the publish writes it; the file list is made before
    files = file_list(str(local))
    direct = open_storage(gcs_bucket.url(BASE), gcs_bucket.storage_options)
    stamp = int(time.time())
    stagings = [direct.join(direct.root, f"temp-{stamp}-{i:08x}") for i in range(PUBLISHES + BURST_PUBLISHES)]
    for staging in stagings:
        direct.upload_dir(str(local), staging)

    timeouts = Timeouts(TIMEOUT_RATE, SEED + 1)
    proxy = BurstyProxy(gcs_server.url, seed=SEED, lifetime=400, max_requests=10**6, delay=timeouts,
                        **FAULT_RATES)
    proxy.start()
    total = PUBLISHES + BURST_PUBLISHES
    try:
        via = gcs_bucket.via(proxy)
        # sock_read: a held answer times out on the client, and gcsfs retries it (a ClientError)
        store = open_storage(via.url(BASE), {**via.storage_options,
                                             "requests_timeout": aiohttp.ClientTimeout(sock_read=READ_TIMEOUT)})

        def publish(i: int):
            return lambda: Publisher(store).publish(
                staging=stagings[i], files=files, checkpoint=step_checkpoint(i), ledger_key=f"key-{i:03d}",
                config_hash="c0ffee", versioning="step", max_claim_attempts=5, validation={"ok": True})

        def faults_so_far() -> dict:
            return {"503": proxy.counters.failed_503, "reset_before_forwarding": proxy.counters.dropped,
                    "answer_cut_after_the_server_acted": proxy.counters.dropped_after,
                    "read_timeout": timeouts.count}

        reported_failed_but_whole: list[int] = []

        def attempt(i: int) -> tuple[str, str | None]:
            outcome = classify(publish(i))
            if outcome[0] == "failed":  # did it fail, or only say so? (read directly, not through the proxy)
                entry = ledger(gcs_bucket).get(f"key-{i:03d}")
                if entry and "saved_model.pb" in versions_in(gcs_bucket).get(entry["version"], {}):
                    reported_failed_but_whole.append(i)
            return outcome

        started = time.monotonic()
        with Watcher(gcs_bucket) as watch:
            first = [attempt(i) for i in range(PUBLISHES)]
            plain = {"faults": faults_so_far(), "requests": proxy.counters.requests}
            proxy.reset_counters()
            timeouts.count = 0
            proxy.burst_rate = BURST_RATE
            first += [attempt(i) for i in range(PUBLISHES, total)]
            bursty = {"faults": faults_so_far(), "requests": proxy.counters.requests,
                      "outages": dict(proxy.bursts)}
            proxy.burst_rate = 0.0
            mid = {"committed_not_whole_after_faults": state_after_kill(gcs_bucket)["committed_not_whole"],
                   "staging_left_after_faults": len(staging_dirs(gcs_bucket))}

            proxy.configure(fail_rate=0.0, drop_rate=0.0, drop_after_rate=0.0)
            timeouts.enabled = False
            failed = [i for i, (status, _) in enumerate(first) if status not in ("published", "skipped")]
            second = {i: classify(publish(i)) for i in failed}
        seconds = round(time.monotonic() - started, 1)
    finally:
        proxy.stop()

    figures = {
        "seed": SEED, "publishes": total,
        "plain": {**plain, "publishes": PUBLISHES,
                  "fault_share": round(sum(plain["faults"].values()) / max(plain["requests"], 1), 3),
                  "outcomes": dict(Counter(s for s, _ in first[:PUBLISHES]))},
        "with_outages": {**bursty, "publishes": BURST_PUBLISHES,
                         "outcomes": dict(Counter(s for s, _ in first[PUBLISHES:]))},
        "errors": sorted({m for _, m in first if m}),
        "rerun_outcomes": dict(Counter(s for s, _ in second.values())), **mid,
        "reported_failed_but_version_whole": reported_failed_but_whole,
        "partial_versions_seen": {"listings_without_saved_model_pb": watch.without_marker,
                                  "versions": len(watch.unfinished)},
        "violations": watch.violations(), "watcher_polls": watch.polls, "seconds": seconds,
    }
    figures["duplicates"] = duplicates(gcs_bucket)
    figures["not_whole"] = not_whole(gcs_bucket)
    record_figures("faults_in_process", figures)

    others = [m for s, m in [*first, *second.values()] if s == "other"]
    assert others == [], "\n\n".join(others)
    for status, message in [*first, *second.values()]:
        assert status in ("published", "skipped", "failed"), (status, message)
        if message:
            assert "\n" not in message and "Traceback" not in message, message
    assert all(v > 0 for v in plain["faults"].values()), figures
    assert 0.05 <= figures["plain"]["fault_share"] <= 0.2, figures
    assert all(s in ("published", "skipped") for s, _ in second.values()), second
    assert watch.violations() == [] and watch.polls > 50, figures
    assert figures["duplicates"] == [] and figures["not_whole"] == [], figures
    entries = ledger(gcs_bucket)
    assert sorted(entries) == [f"key-{i:03d}" for i in range(total)]
    # versioning "step": each version is its step, or just above it when a stale claim held the step
    for key, entry in entries.items():
        step = 1000 + 10 * int(key.split("-")[1])
        assert step <= entry["version"] < step + 10, (key, entry)


@pytest.mark.alone
def test_cli_runs_through_faults_fail_in_one_line_and_converge(tmp_path, trained_dir, gcs_server, gcs_bucket):
    """The real ``tf-export`` through the fault proxy: discovery, checkpoint download, staging upload,
    validation download and publish all see the faults; gcsfs's own back-off applies."""
    from tf_export_pipeline.demo import write_config

    ws = make_gcs_workspace(tmp_path, trained_dir, gcs_bucket, retention={"keep": 100})
    proxy = FaultProxy(gcs_server.url, seed=SEED + 2, lifetime=400, max_requests=10**6, **FAULT_RATES)
    proxy.start()
    results = []
    started = time.monotonic()
    try:
        via = gcs_bucket.via(proxy)
        config = write_config(str(tmp_path), name="via-proxy.yaml", training_dir=via.url("train"),
                              export_base=via.url(BASE), storage_options=via.storage_options,
                              retention={"keep": 100})
        with Watcher(gcs_bucket) as watch:
            results.append(("backfill", run_cli("backfill", "--json", "--config", config, timeout=240)))
            ws.train_more(10)  # ckpt-40, for the run (versioning timestamp)
            results.append(("run", run_cli("run", "--json", "--config", config, timeout=240)))
            faults = {"503": proxy.counters.failed_503, "reset_before_forwarding": proxy.counters.dropped,
                      "answer_cut_after_the_server_acted": proxy.counters.dropped_after}
            requests = proxy.counters.requests
            proxy.configure(fail_rate=0.0, drop_rate=0.0, drop_after_rate=0.0)
            # with the faults off, what failed is run again (the commands whose run failed)
            converge = [ws.cli(command, "--json") for command, res in results if res.rc != 0]
    finally:
        proxy.stop()

    statuses = []
    for _command, res in results:
        tf_lines = [line for line in res.err.splitlines() if line.startswith("tf-export:")]
        assert "Traceback" not in res.err and "unexpected" not in res.err, res.err
        if res.rc == 0:
            records = res.json if isinstance(res.json, list) else [res.json]
            statuses += [r["status"] for r in records]
            assert all(r["status"] in ("published", "skipped") for r in records), res.out
        else:
            assert res.rc == 1 and len(tf_lines) == 1 and tf_lines[0].startswith("tf-export: error: "), res.err
            statuses.append("failed")
    for res in converge:
        assert res.rc == 0, res.err
    figures = {
        "seed": SEED + 2, "cli_runs": len(results), "requests": requests, "faults": faults,
        "outcomes": dict(Counter(statuses)),
        "errors": [res.err.strip().splitlines()[-1] for _, res in results if res.rc != 0],
        "convergence": [res.out for res in converge],
        "partial_versions_seen": {"listings_without_saved_model_pb": watch.without_marker,
                                  "versions": sorted(watch.unfinished)},
        "violations": watch.violations(), "seconds": round(time.monotonic() - started, 1),
    }
    figures["duplicates"] = duplicates(gcs_bucket)
    figures["not_whole"] = not_whole(gcs_bucket)
    record_figures("faults_cli", figures)

    assert sum(faults.values()) > 0, figures
    assert watch.violations() == [], figures
    assert figures["duplicates"] == [] and figures["not_whole"] == [], figures
    assert sorted(e["step"] for e in ledger(gcs_bucket).values()) == [10, 20, 30, 40], figures


# -- targeted: a commit whose answer was lost and could not be read back -------------------
class ScriptedProxy(FaultProxy):
    """:class:`FaultProxy` whose ``script(method, path)`` may impose an action on a request."""

    def __init__(self, *args, script=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.script = script

    def _decide(self, method: str, path: str) -> str:
        action = self.script(method, path) if self.script else None
        if action is None:
            return super()._decide(method, path)
        with self._lock:
            self.counters.requests += 1
            if action == FAIL_503:
                self.counters.failed_503 += 1
            elif action == DROP:
                self.counters.dropped += 1
            elif action == DROP_AFTER:
                self.counters.dropped_after += 1
        return action


def test_ledger_entry_that_landed_unseen_keeps_its_claim(gcs_server, gcs_bucket, fast_gcs_retries, tmp_path):
    """The ledger entry of checkpoint A lands but every answer to it is lost, and reading it back fails
    too (an outage of a few seconds). The publish fails, cleanly; but the ledger entry stands, so
    version V is A's: no other checkpoint may take V, and the next run must finish A into V."""
    local = fake_saved_model(tmp_path / "model", big=50_000)
    (local / MANIFEST).unlink()
    files = file_list(str(local))
    direct = open_storage(gcs_bucket.url(BASE), gcs_bucket.storage_options)
    record_verdict(direct, check_storage(direct))  # checked before the outage: the writes it counts are A's
    stamp = int(time.time())
    staging_a = direct.join(direct.root, f"temp-{stamp}-0000000a")
    staging_b = direct.join(direct.root, f"temp-{stamp}-0000000b")
    direct.upload_dir(str(local), staging_a)
    direct.upload_dir(str(local), staging_b)
    # two checkpoints written within the same second: versioning checkpoint_time proposes one number
    a = Checkpoint(prefix="gs://elsewhere/train/ckpt-10", name="ckpt-10", step=10, written_at=1_700_000_000.2,
                   complete=True, index_size=1, index_crc32c="AAAAAA==")
    b = Checkpoint(prefix="gs://elsewhere/train/ckpt-20", name="ckpt-20", step=20, written_at=1_700_000_000.7,
                   complete=True, index_size=1, index_crc32c="BBBBBB==")

    outage = {"on": False, "creates": 0}

    def script(method: str, path: str):
        if not outage["on"]:
            return None
        # A's create-only writes are its claim, then its ledger entry (the name travels in the body)
        if method == "POST" and path.startswith("/upload/") and "ifGenerationMatch=0" in path:
            outage["creates"] += 1
            if outage["creates"] >= 2:
                return DROP_AFTER  # the ledger entry lands; its answer (and every retry's) is lost
        if method == "GET" and "key-a" in path and outage["creates"] >= 2:
            return FAIL_503  # and, for a while, it cannot be read back
        return None

    proxy = ScriptedProxy(gcs_server.url, lifetime=120, max_requests=10**5, script=script, max_consecutive_faults=100)
    proxy.start()
    try:
        via = gcs_bucket.via(proxy)
        store = open_storage(via.url(BASE), via.storage_options)

        def publish(ckpt, key, staging):
            return Publisher(store).publish(staging=staging, files=files, checkpoint=ckpt, ledger_key=key,
                                            config_hash="c0ffee", versioning="checkpoint_time",
                                            max_claim_attempts=5, validation={"ok": True})

        outage["on"] = True
        with pytest.raises(PipelineError) as failed:
            publish(a, "key-a", staging_a)
        assert "\n" not in str(failed.value)
        outage["on"] = False
        entries = ledger(gcs_bucket)
        if "key-a" not in entries:  # the setup, not the bug
            pytest.fail("the ledger entry should have landed (only its answers were lost)")
        v = entries["key-a"]["version"]
        claims = {int(n) for n in objects(gcs_bucket, f"{BASE}/_exports/claims") if n.isdigit()}

        rec_b = publish(b, "key-b", staging_b)
        rec_a = publish(a, "key-a", staging_a)
    finally:
        proxy.stop()
    found = manifests(gcs_bucket)
    detail = {"v": v, "claims_after_failure": sorted(claims), "a": rec_a, "b": rec_b,
              "manifests": {k: (m or {}).get("ledger_key") for k, m in found.items()}}
    assert v in claims, f"the claim of a committed version was released: {detail}"
    assert rec_b["version"] != v, detail
    assert (found.get(rec_a["version"]) or {}).get("ledger_key") == "key-a", detail
    assert duplicates(gcs_bucket) == [], detail


def test_run_whose_ledger_entry_landed_unseen_keeps_its_claim_and_recovers(
        gcs_server, gcs_bucket, fast_gcs_retries, trained_dir, tmp_path, forked_validation):
    """The same lost commit through the runner (in process, so that gcsfs's back-off is short):
    the claim of the committed version stays, and the next run publishes the checkpoint, once."""
    from tests.test_gcs_end_to_end import upload_tree
    from tf_export_pipeline.config import config_from_dict
    from tf_export_pipeline.stages import export_one

    upload_tree(gcs_bucket, trained_dir, "train")
    direct = open_storage(gcs_bucket.url(BASE), gcs_bucket.storage_options)
    record_verdict(direct, check_storage(direct))  # checked before the outage: the writes it counts are the run's
    outage = {"on": True, "creates": 0}

    def script(method: str, path: str):
        if not outage["on"]:
            return None
        if method == "POST" and path.startswith("/upload/") and "ifGenerationMatch=0" in path:
            outage["creates"] += 1  # the claim, then the ledger entry
            if outage["creates"] >= 2:
                return DROP_AFTER
        if method == "GET" and "ledger" in path and outage["creates"] >= 2:
            return FAIL_503
        return None

    proxy = ScriptedProxy(gcs_server.url, lifetime=200, max_requests=10**5, script=script,
                          max_consecutive_faults=100)
    proxy.start()
    try:
        via = gcs_bucket.via(proxy)
        cfg = config_from_dict({"training_dir": via.url("train"), "export_base": via.url(BASE),
                                "model": {"factory": "tf_export_pipeline.demo:build"},
                                "storage_options": via.storage_options,
                                "retention": {"keep": 100}}, str(tmp_path))
        with pytest.raises(PipelineError) as failed:
            export_one(cfg)
        assert "\n" not in str(failed.value)
        outage["on"] = False
        [(key, entry)] = ledger(gcs_bucket).items()  # the commit stands
        left = {"claims": sorted(objects(gcs_bucket, f"{BASE}/_exports/claims")),
                "staging": sorted(staging_dirs(gcs_bucket))}
        outcome = classify(lambda: export_one(cfg))
    finally:
        proxy.stop()
    detail = {"ledger": entry, "left_after_failure": left, "rerun": outcome}
    assert str(entry["version"]) in left["claims"], f"the claim of a committed version was released: {detail}"
    assert outcome[0] == "published", detail
    assert not_whole(gcs_bucket) == [] and duplicates(gcs_bucket) == [], detail


def test_two_finishers_of_one_commit_both_succeed(gcs_server, gcs_bucket, fast_gcs_retries, tmp_path):
    """Two processes finish the same committed publish at once (an Airflow retry and a run, say).
    B checks the version (not whole yet) and lists staging; in between, A moves the last object
    and starts deleting staging, saved_model.pb first. B must find the version whole, not fail."""
    local = fake_saved_model(tmp_path / "model", big=50_000)
    (local / MANIFEST).unlink()
    files = file_list(str(local))
    direct = open_storage(gcs_bucket.url(BASE), gcs_bucket.storage_options)
    staging = direct.join(direct.root, f"temp-{int(time.time())}-0000000c")
    direct.upload_dir(str(local), staging)
    ckpt = step_checkpoint(0)

    # the first attempt commits, then fails to move saved_model.pb: a committed publish to finish
    first = FaultProxy(gcs_server.url, lifetime=60, fail_rate=1.0, max_consecutive_faults=1000,
                       match=lambda m, p: "/rewriteTo/" in p and "saved_model.pb" in p)
    # A deletes staging's saved_model.pb at once and the other objects 2 s later
    a_proxy = FaultProxy(gcs_server.url, lifetime=60, delay=2.0,
                         delay_match=lambda m, p: m == "DELETE" and "temp-" in p and "saved_model.pb" not in p)
    # B's listing of staging reaches the server 1 s after B sent it
    b_proxy = FaultProxy(gcs_server.url, lifetime=60, delay=1.0,
                         delay_match=lambda m, p: m == "GET" and "prefix=serving/demo_regressor/temp-" in p)
    for proxy in (first, a_proxy, b_proxy):
        proxy.start()
    try:
        def store_via(proxy):
            via = gcs_bucket.via(proxy)
            return open_storage(via.url(BASE), via.storage_options)

        with pytest.raises(PipelineError):
            Publisher(store_via(first)).publish(staging=staging, files=files, checkpoint=ckpt, ledger_key="key-c",
                                                config_hash="c0ffee", versioning="step", max_claim_attempts=3,
                                                validation={"ok": True})
        if "saved_model.pb" in versions_in(gcs_bucket)[1000]:  # the setup, not the bug
            pytest.fail("the first attempt should have left version 1000 without saved_model.pb")
        results: dict[str, tuple] = {}

        def finish(name: str, proxy: FaultProxy) -> None:
            results[name] = classify(lambda: {"status": Publisher(store_via(proxy)).resolve("key-c")["state"]})

        b = threading.Thread(target=finish, args=("b", b_proxy))
        b.start()
        time.sleep(0.3)  # B has looked at the version and is listing staging
        finish("a", a_proxy)
        b.join(30)
    finally:
        for proxy in (first, a_proxy, b_proxy):
            proxy.stop()
    assert results["a"][0] in ("published", "rolled_forward"), results
    assert results["b"][0] in ("published", "rolled_forward"), results
    assert not_whole(gcs_bucket) == [] and duplicates(gcs_bucket) == []


def test_a_lease_left_behind_does_not_fail_a_publish_that_is_whole(gcs_server, gcs_bucket, fast_gcs_retries,
                                                                   tmp_path):
    """Removing the staging lease is housekeeping (gc removes leftover leases): when it fails after
    the version is whole, the publish must still say ``published``, as a failed staging delete does."""
    local = fake_saved_model(tmp_path / "model", big=50_000)
    (local / MANIFEST).unlink()
    files = file_list(str(local))
    direct = open_storage(gcs_bucket.url(BASE), gcs_bucket.storage_options)
    staging = direct.join(direct.root, f"temp-{int(time.time())}-0000000d")
    direct.upload_dir(str(local), staging)
    proxy = FaultProxy(gcs_server.url, lifetime=60, fail_rate=1.0, max_consecutive_faults=1000,
                       match=lambda m, p: m == "DELETE" and "_exports%2Fleases%2F" in p)
    proxy.start()
    try:
        via = gcs_bucket.via(proxy)
        store = open_storage(via.url(BASE), via.storage_options)
        outcome = classify(lambda: Publisher(store).publish(
            staging=staging, files=files, checkpoint=step_checkpoint(0), ledger_key="key-d", config_hash="c0ffee",
            versioning="step", max_claim_attempts=3, validation={"ok": True}))
    finally:
        proxy.stop()
    if not_whole(gcs_bucket) or sorted(versions_in(gcs_bucket)) != [1000]:  # the setup, not the bug
        pytest.fail(f"version 1000 should be whole: {not_whole(gcs_bucket)}")
    assert outcome == ("published", None), outcome
