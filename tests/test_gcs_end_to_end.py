"""The pipeline on gs://, against a real GCS server (fake-gcs-server), through the real `tf-export`.

The local end-to-end scenarios run here with ``training_dir`` and ``export_base``
in a bucket; a watcher polls the bucket as TF Serving would while versions are
promoted; separate processes race on one export base; a fault-injecting proxy
fails, drops and cuts answers to requests while versions are published.

What the test reads back, it reads through the emulator's own JSON API (or a
fresh gcsfs instance), never through the pipeline's storage layer.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CliResult, cli_env, cli_popen, kill_at_hold, release_together, run_cli
from tests.support.gcs_fixtures import (  # noqa: F401  (fixtures)
    GcsBucket,
    fast_gcs_retries,
    gcs_bucket,
    gcs_fault_proxy,
    gcs_server,
)
from tf_export_pipeline.checkpoints import Checkpoint, crc32c_b64, discover_checkpoints
from tf_export_pipeline.config import config_from_dict
from tf_export_pipeline.errors import CheckpointError, PipelineError
from tf_export_pipeline.publish import Publisher
from tf_export_pipeline.publish.staging import file_list
from tf_export_pipeline.storage import open_storage

pytestmark = pytest.mark.timeout(180)

SECRET = f"credential-{uuid.uuid4().hex}"
BASE = "serving/demo_regressor"
REQUIRED = ("saved_model.pb", "variables/variables.index", "assets.extra/export_manifest.json")


# -- helpers -------------------------------------------------------------------------
def objects(bucket: GcsBucket, prefix: str) -> dict[str, dict]:
    """Objects under ``prefix/`` by path relative to it, from the emulator's JSON API."""
    prefix = prefix.strip("/") + "/"
    return {o["name"][len(prefix):]: o for o in bucket.server.list_objects(bucket.name, prefix)}


def versions_in(bucket: GcsBucket, base: str = BASE) -> dict[int, dict[str, dict]]:
    """Integer-named children of ``base`` (TF Serving's rule) with their files."""
    out: dict[int, dict[str, dict]] = {}
    for rel, obj in objects(bucket, base).items():
        head, _, rest = rel.partition("/")
        if head.isdigit() and rest:
            out.setdefault(int(head), {})[rest] = obj
    return out


def assert_whole_versions(bucket: GcsBucket, base: str = BASE) -> None:
    for version, files in versions_in(bucket, base).items():
        missing = [f for f in REQUIRED if f not in files]
        assert not missing, f"partial version {version}: no {missing}"


def upload_tree(bucket: GcsBucket, local: Path, prefix: str, names: list[str] | None = None) -> None:
    fs = bucket.fs()
    for name in names or sorted(p.name for p in local.iterdir()):
        fs.put_file(str(local / name), bucket.path(prefix, name))


class BucketWatcher:
    """Lists the export base every few milliseconds, like TF Serving polling its base path.

    It keeps, per integer version, every file set it saw while that version held
    ``saved_model.pb``; :meth:`violations` compares them with the final files.
    """

    def __init__(self, bucket: GcsBucket, base: str = BASE, interval: float = 0.002):
        self.bucket, self.base, self.interval = bucket, base, interval
        self.with_marker: dict[int, list[frozenset]] = {}
        self.without_marker = 0  # snapshots of a version seen before it was whole
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for version, files in versions_in(self.bucket, self.base).items():
                if "saved_model.pb" in files:
                    self.with_marker.setdefault(version, []).append(frozenset(files))
                else:
                    self.without_marker += 1
            self.polls += 1
            self._stop.wait(self.interval)

    def violations(self) -> list[str]:
        final = {v: set(files) for v, files in versions_in(self.bucket, self.base).items()}
        out = []
        for version, seen in self.with_marker.items():
            for files in seen:
                missing = final.get(version, set()) - files
                if missing:
                    out.append(f"version {version} had saved_model.pb but not {sorted(missing)}")
        return out

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass
class GcsWorkspace:
    root: Path
    bucket: GcsBucket
    local_train: Path       # a local mirror of the training directory in the bucket
    config: Path
    results: list[CliResult]

    @property
    def base_url(self) -> str:
        return self.bucket.url(BASE)

    def train_url(self, name: str) -> str:
        return self.bucket.url("train", name)

    def cli(self, *args: str, env: dict | None = None) -> CliResult:
        res = run_cli(*args, "--config", str(self.config), env=env, timeout=240)
        self.results.append(res)
        return res

    def versions(self) -> list[int]:
        return sorted(versions_in(self.bucket))

    def children(self) -> set[str]:
        return {rel.split("/", 1)[0] for rel in objects(self.bucket, BASE)}

    def read(self, rel: str) -> bytes:
        return self.bucket.fs().cat_file(self.bucket.path(BASE, rel))

    def train_more(self, steps: int = 10) -> None:
        """The training job writes a newer checkpoint into the bucket: data, index, then state file."""
        from tf_export_pipeline.demo import train

        before = {p.name: p.stat().st_mtime_ns for p in self.local_train.iterdir()}
        train(str(self.local_train), steps=steps, checkpoint_every=10)
        changed = [p.name for p in self.local_train.iterdir() if before.get(p.name) != p.stat().st_mtime_ns]
        order = sorted(changed, key=lambda n: (n == "checkpoint", n.endswith(".index"), n))
        upload_tree(self.bucket, self.local_train, "train", order)


def make_gcs_workspace(root: Path, trained_dir: Path, bucket: GcsBucket, **overrides) -> GcsWorkspace:
    import shutil

    from tf_export_pipeline.demo import write_config

    local_train = root / "train-mirror"
    shutil.copytree(trained_dir, local_train)
    upload_tree(bucket, local_train, "train")
    options = dict(bucket.storage_options, session_kwargs={"headers": {"X-Test-Credential": SECRET}})
    config = write_config(str(root), training_dir=bucket.url("train"), export_base=bucket.url(BASE),
                          storage_options=options, **overrides)
    return GcsWorkspace(root, bucket, local_train, Path(config), [])


@pytest.fixture
def gcs_ws(tmp_path, trained_dir, gcs_bucket) -> GcsWorkspace:
    return make_gcs_workspace(tmp_path, trained_dir, gcs_bucket)


def fake_saved_model(directory: Path, big: int = 6 << 20) -> Path:
    """Files shaped like a SavedModel (the watcher's rule is about files, not their meaning)."""
    rng = np.random.default_rng(0)
    files = {
        "saved_model.pb": 40_000, "fingerprint.pb": 60, "variables/variables.index": 900,
        "variables/variables.data-00000-of-00001": big, "assets/vocab.txt": 5_000,
        "assets/labels.txt": 700, "assets.extra/export_manifest.json": 300,
    }
    for rel, size in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return directory


def fake_checkpoint(step: int) -> Checkpoint:
    return Checkpoint(prefix=f"gs://elsewhere/train/ckpt-{step}", name=f"ckpt-{step}", step=step,
                      written_at=1_700_000_000.0 + step, complete=True, index_size=1, index_crc32c="AAAAAA==")


# -- the local end-to-end scenarios, on gs:// -----------------------------------------------
def test_gcs_publish_skip_backfill_newer_prune_gc(tmp_path, trained_dir, gcs_bucket):
    ws = make_gcs_workspace(tmp_path, trained_dir, gcs_bucket, retention={"keep": 3, "lease_seconds": 3600})

    first = ws.cli("run", "--json")
    assert first.rc == 0, first.err
    rec = first.json
    v30 = rec["version"]
    assert rec["status"] == "published" and rec["step"] == 30
    assert rec["checkpoint"] == ws.train_url("ckpt-30")
    assert rec["path"] == f"{ws.base_url}/{v30}"
    assert ws.versions() == [v30]
    assert_whole_versions(gcs_bucket)
    assert ws.children() == {str(v30), "_exports"}  # no staging left behind
    assert not objects(gcs_bucket, f"{BASE}/_exports/work")

    # provenance, the ledger entry and the claim
    manifest = json.loads(ws.read(f"{v30}/assets.extra/export_manifest.json"))
    index = (ws.local_train / "ckpt-30.index").read_bytes()
    assert manifest["checkpoint"]["path"] == rec["checkpoint"]
    assert manifest["checkpoint"]["index_size"] == len(index)
    assert manifest["checkpoint"]["index_crc32c"] == crc32c_b64(index)
    assert manifest["validation"]["ok"] is True
    ledger = objects(gcs_bucket, f"{BASE}/_exports/ledger")
    assert len(ledger) == 1
    assert json.loads(ws.bucket.fs().cat_file(ws.bucket.path(BASE, "_exports/ledger", *ledger)))["version"] == v30
    assert set(objects(gcs_bucket, f"{BASE}/_exports/claims")) == {str(v30)}

    # what TF Serving would load is the model restored from the checkpoint
    import tensorflow as tf

    from tf_export_pipeline.demo import build

    local = tmp_path / "downloaded"
    ws.bucket.fs().get(ws.bucket.path(BASE, str(v30)) + "/", str(local) + "/", recursive=True)
    x = np.random.default_rng(7).standard_normal((5, 4)).astype("float32")
    served = tf.saved_model.load(str(local)).signatures["serving_default"](features=tf.constant(x))["score"]
    model = build()
    tf.train.Checkpoint(model=model).read(str(ws.local_train / "ckpt-30")).assert_existing_objects_matched()
    np.testing.assert_allclose(served.numpy(), model(x, training=False).numpy(), rtol=1e-6, atol=1e-6)

    again = ws.cli("run", "--json")
    assert again.rc == 0, again.err
    assert again.json == {**rec, "status": "skipped"}

    refused = ws.cli("backfill", "--versioning", "timestamp", "--to-step", "10", "--json")
    assert refused.rc == 1
    assert "newer checkpoint ckpt-30" in refused.err and "ckpt-10" in refused.err
    assert ws.versions() == [v30]
    assert ws.children() == {str(v30), "_exports"}  # the refused staging is gone too

    in_range = ws.cli("backfill", "--from-step", "5", "--to-step", "15", "--json")
    assert in_range.rc == 0, in_range.err
    assert [(r["step"], r["status"]) for r in in_range.json] == [(10, "published")]
    rest = ws.cli("backfill", "--json")
    assert rest.rc == 0, rest.err
    assert [(r["step"], r["status"]) for r in rest.json] == [(20, "published")]
    assert "backfill" in rest.err  # the progress bar
    v10, v20 = in_range.json[0]["version"], rest.json[0]["version"]
    assert v10 < v20 < v30  # checkpoint_time: training order, below the live version

    ws.train_more(10)  # the training job writes ckpt-40 into the bucket
    newer = ws.cli("run", "--json")
    assert newer.rc == 0, newer.err
    assert newer.json["status"] == "published" and newer.json["step"] == 40
    v40 = newer.json["version"]
    assert v40 > v30
    assert ws.versions() == [v20, v30, v40]  # keep: 3; the oldest was pruned
    assert not objects(gcs_bucket, f"{BASE}/{v10}")
    assert_whole_versions(gcs_bucket)

    status = ws.cli("status", "--json")
    assert status.rc == 0, status.err
    assert [v["version"] for v in status.json["versions"]] == [v20, v30, v40]
    assert [v["step"] for v in status.json["versions"]] == [20, 30, 40]
    assert status.json["serving"] == v40

    discovered = ws.cli("discover", "--json")
    assert discovered.rc == 0, discovered.err
    assert {d["name"] for d in discovered.json} == {"ckpt-10", "ckpt-20", "ckpt-30", "ckpt-40"}
    assert all(d["complete"] for d in discovered.json)
    # retention retired v10's ledger entry: discovery names no version that does not exist
    assert {d["step"]: d["version"] for d in discovered.json} == {10: None, 20: v20, 30: v30, 40: v40}

    # gc: abandoned staging goes after the lease, fresh staging stays
    fs = ws.bucket.fs()
    fresh = f"temp-{int(time.time())}-cafe0001"
    fs.pipe_file(ws.bucket.path(BASE, "temp-1000-deadbeef/variables/variables.index"), b"old")
    fs.pipe_file(ws.bucket.path(BASE, fresh, "saved_model.pb"), b"new")
    dry = ws.cli("gc", "--dry-run", "--json")
    assert dry.rc == 0, dry.err
    assert dry.json["removed_staging"] == ["temp-1000-deadbeef"]
    assert objects(gcs_bucket, f"{BASE}/temp-1000-deadbeef")
    done = ws.cli("gc", "--json")
    assert done.rc == 0, done.err
    assert not objects(gcs_bucket, f"{BASE}/temp-1000-deadbeef")
    assert objects(gcs_bucket, f"{BASE}/{fresh}")
    assert ws.versions() == [v20, v30, v40]

    # the credential in storage_options went nowhere: not into output, manifests, ledger or claims
    for res in ws.results:
        assert SECRET not in res.out and SECRET not in res.err
    small = [o["name"] for o in gcs_bucket.server.list_objects(gcs_bucket.name) if int(o["size"]) < 1_000_000]
    for name, blob in fs.cat([gcs_bucket.path(n) for n in small]).items():
        assert SECRET.encode() not in blob, name


# -- TF Serving's view during promotion ----------------------------------------------------
def test_watcher_never_sees_a_partial_version_while_objects_move(gcs_bucket, gcs_fault_proxy, tmp_path):
    """Every listing in which a version has saved_model.pb shows all of its files.

    The proxy holds each server-side copy for 20 ms, those of the variables for
    60 ms, so promotion takes long enough for the watcher to list the bucket
    many times in the middle of it, and a marker copied alongside the variables
    instead of after them would be seen without them.
    The seed's way (copy and delete object by object in name order) is run
    under the same watcher first, to show that the watcher does catch it.
    """
    via = gcs_bucket.via(gcs_fault_proxy)
    gcs_fault_proxy.configure(delay=lambda m, p: 0.06 if "variables" in p else 0.02,
                              delay_match=lambda m, p: "/rewriteTo/" in p)
    store = open_storage(via.url(BASE), via.storage_options)
    local = fake_saved_model(tmp_path / "model", big=300_000)

    # the seed's way: gfile.Rename on GCS, one object after the other
    seed_staging = store.join(store.root, "temp-1700000000")
    store.upload_dir(str(local), seed_staging)
    fs = via.fs()
    with BucketWatcher(gcs_bucket) as seed_watch:
        for entry in store.walk(seed_staging):
            fs.copy(entry.path, store.join(store.root, "1700000000", entry.name))
            fs.rm_file(entry.path)
    assert seed_watch.violations(), "the watcher should catch saved_model.pb before variables/"

    from tf_export_pipeline.publish.promotion import ObjectMove, choose_strategy

    strategy = choose_strategy(store, "auto")
    assert isinstance(strategy, ObjectMove)
    staging = store.join(store.root, "temp-1700000100-ab12cd34")
    store.upload_dir(str(local), staging)
    with BucketWatcher(gcs_bucket) as watch:
        strategy.promote(store, staging, store.join(store.root, "1700000100"))
    assert watch.violations() == []
    assert watch.without_marker > 0, "the watcher should have seen the version while it was being moved"
    assert 1700000100 in watch.with_marker
    final = versions_in(gcs_bucket)[1700000100]
    assert set(final) == {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert not objects(gcs_bucket, f"{BASE}/temp-1700000100-ab12cd34")
    # server-side: the copies carried no object bytes through the client
    assert strategy.stats["bytes_copied"] == sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    rewrites = [e for e in gcs_fault_proxy.log if "/rewriteTo/" in e.path and "1700000100" in e.path]
    assert len(rewrites) == len(final) and all(e.request_bytes == 0 for e in rewrites)
    assert "saved_model.pb" in rewrites[-1].path  # strictly last


# -- separate processes racing on one export base --------------------------------------------
def test_concurrent_exporters_one_version_per_checkpoint(gcs_ws, tmp_path):
    release = tmp_path / "release"
    env = cli_env({"TF_EXPORT_TEST_HOLD": f"publishing@{release}"})
    jobs = ["ckpt-30", "ckpt-30", "ckpt-20"]
    # Released together under versioning timestamp, ckpt-20 may claim the number above ckpt-30's, which
    # the serving-order check refuses; --allow-outrank keeps this test about claims and the ledger.
    procs = [cli_popen("run", "--checkpoint", name, "--allow-outrank", "--json", "--config", str(gcs_ws.config),
                       env=env)
             for name in jobs]
    outs, errs, held = release_together(procs, release, limit=150)  # one instant: same timestamp
    for p, e in zip(procs, errs):
        assert p.returncode == 0, e
    assert held == len(procs), "every exporter should have reached the publish step"

    records = [json.loads(o) for o in outs]
    r30 = [r for r in records if r["step"] == 30]
    r20 = [r for r in records if r["step"] == 20]
    assert sorted(r["status"] for r in r30) == ["published", "skipped"]
    assert r30[0]["version"] == r30[1]["version"]
    assert r20[0]["status"] == "published" and r20[0]["version"] != r30[0]["version"]
    assert gcs_ws.versions() == sorted({r30[0]["version"], r20[0]["version"]})
    assert len(objects(gcs_ws.bucket, f"{BASE}/_exports/ledger")) == 2
    # the loser's claim was released: claims name exactly the published versions
    assert set(objects(gcs_ws.bucket, f"{BASE}/_exports/claims")) == {str(v) for v in gcs_ws.versions()}
    assert gcs_ws.children() == {*(str(v) for v in gcs_ws.versions()), "_exports"}
    assert not objects(gcs_ws.bucket, f"{BASE}/_exports/work")
    assert_whole_versions(gcs_ws.bucket)


# -- a publisher killed in the middle of moving objects ----------------------------------------
def test_killed_mid_promotion_leaves_no_loadable_partial_and_next_run_finishes(gcs_ws):
    kill_at_hold("promoting", "run", "--json", "--config", str(gcs_ws.config))
    # every object but saved_model.pb was copied: TF Serving's rule holds, the version does not load
    [(version, files)] = versions_in(gcs_ws.bucket).items()
    assert "saved_model.pb" not in files and "variables/variables.index" in files

    rerun = gcs_ws.cli("run", "--json")
    assert rerun.rc == 0, rerun.err
    assert rerun.json["version"] == version and rerun.json["status"] in ("published", "skipped")
    assert_whole_versions(gcs_ws.bucket)
    assert "saved_model.pb" in versions_in(gcs_ws.bucket)[version]
    assert gcs_ws.children() == {str(version), "_exports"}


# -- injected faults ------------------------------------------------------------------------
FAULT_MIXES = [  # seed, 503, dropped before forwarding, dropped after forwarding
    (1, 0.25, 0.0, 0.0),
    (2, 0.0, 0.2, 0.0),
    (3, 0.0, 0.0, 0.2),
    (4, 0.15, 0.1, 0.1),
    (5, 0.15, 0.1, 0.1),
]


def test_publishes_under_faults_succeed_or_fail_cleanly(gcs_bucket, gcs_fault_proxy, fast_gcs_retries, tmp_path):
    via = gcs_bucket.via(gcs_fault_proxy)
    store = open_storage(via.url(BASE), via.storage_options)
    local = fake_saved_model(tmp_path / "model")
    # the file list made at export time: the manifest is written later, by the publish itself
    files = {k: v for k, v in file_list(str(local)).items() if k != "assets.extra/export_manifest.json"}
    expected = {str(p.relative_to(local)): crc32c_b64(p.read_bytes()) for p in local.rglob("*") if p.is_file()}

    with BucketWatcher(gcs_bucket, interval=0.005) as watch:
        for i, (seed, fail, drop, drop_after) in enumerate(FAULT_MIXES):
            gcs_fault_proxy.configure(fail_rate=fail, drop_rate=drop, drop_after_rate=drop_after, seed=seed)
            staging = store.join(store.root, f"temp-{int(time.time())}-{i:08x}")
            store.upload_dir(str(local), staging)
            rec = Publisher(store).publish(staging=staging, files=files, checkpoint=fake_checkpoint(100 + i),
                                           ledger_key=f"key-{i}", config_hash="c0ffee", versioning="step",
                                           max_claim_attempts=3, validation={"ok": True})
            assert rec["status"] == "published" and rec["version"] == 100 + i

        # a permanent failure in the middle of promotion: it fails cleanly, and the next run finishes it
        gcs_fault_proxy.configure(fail_rate=1.0, drop_rate=0.0, drop_after_rate=0.0, max_consecutive_faults=1000,
                                  match=lambda m, p: "/rewriteTo/" in p and "saved_model.pb" in p)
        staging = store.join(store.root, f"temp-{int(time.time())}-deadbeef")
        store.upload_dir(str(local), staging)
        with pytest.raises(PipelineError) as failed:
            Publisher(store).publish(staging=staging, files=files, checkpoint=fake_checkpoint(200),
                                     ledger_key="key-200", config_hash="c0ffee", versioning="step",
                                     max_claim_attempts=3, validation={"ok": True})
        message = str(failed.value)
        assert "\n" not in message and "HTTP 503" in message and gcs_bucket.name in message
        # the ledger entry was written before the promotion: nothing is undone, the copy stays partial
        # without saved_model.pb (TF Serving does not load it), and staging is kept for the roll-forward
        partial = versions_in(gcs_bucket)[200]
        assert "saved_model.pb" not in partial and "variables/variables.index" in partial
        assert objects(gcs_bucket, staging.split("/", 1)[1])

        gcs_fault_proxy.configure(fail_rate=0.0, match=None)
        done = Publisher(store).resolve("key-200")
        assert done["state"] == "rolled_forward" and done["version"] == 200

    c = gcs_fault_proxy.counters
    assert c.failed_503 > 0 and c.dropped > 0 and c.dropped_after > 0
    assert watch.violations() == []
    assert watch.polls > 20
    found = versions_in(gcs_bucket)
    assert sorted(found) == [100, 101, 102, 103, 104, 200]
    for version, files in found.items():
        body = {k: v["crc32c"] for k, v in files.items() if k != "assets.extra/export_manifest.json"}
        assert body == {k: v for k, v in expected.items() if k != "assets.extra/export_manifest.json"}, version
        manifest = json.loads(gcs_bucket.fs().cat_file(gcs_bucket.path(BASE, str(version), "assets.extra",
                                                                       "export_manifest.json")))
        assert manifest["version"] == version
    assert {rel.split("/", 1)[0] for rel in objects(gcs_bucket, BASE)} == {*(str(v) for v in found), "_exports"}


def test_whole_pipeline_from_gs_under_faults(trained_dir, gcs_bucket, gcs_fault_proxy, fast_gcs_retries, tmp_path,
                                             forked_validation):
    """Checkpoint download, upload, validation download and publish, in process, with faults."""
    from tf_export_pipeline.stages import export_one

    upload_tree(gcs_bucket, trained_dir, "train")
    via = gcs_bucket.via(gcs_fault_proxy)
    cfg = config_from_dict({"training_dir": via.url("train"), "export_base": via.url(BASE),
                            "model": {"factory": "tf_export_pipeline.demo:build"},
                            "storage_options": via.storage_options},
                           str(tmp_path))
    gcs_fault_proxy.configure(fail_rate=0.1, drop_rate=0.05, drop_after_rate=0.05, seed=21)
    rec = export_one(cfg)
    assert rec.status == "published" and rec.step == 30, rec
    again = export_one(cfg)
    assert again.status == "skipped" and again.version == rec.version
    assert gcs_fault_proxy.counters.faults > 0
    assert sorted(versions_in(gcs_bucket)) == [rec.version]
    assert_whole_versions(gcs_bucket)
    assert {rel.split("/", 1)[0] for rel in objects(gcs_bucket, BASE)} == {str(rec.version), "_exports"}


# -- storage primitives the guarantees rest on ------------------------------------------------
def test_create_only_tells_a_lost_answer_from_a_rival(gcs_bucket, gcs_fault_proxy, fast_gcs_retries):
    via = gcs_bucket.via(gcs_fault_proxy)
    store = open_storage(via.url(BASE), via.storage_options)
    claim = store.join(store.root, "_exports", "claims", "17")
    gcs_fault_proxy.configure(drop_after_rate=1.0, max_faults=1,
                              match=lambda m, p: m == "POST" and p.startswith("/upload/"))
    assert store.create_only(claim, b"same bytes") is True  # our write landed; its answer was lost
    assert gcs_fault_proxy.counters.dropped_after == 1
    assert store.create_only(claim, b"same bytes") is False  # a second writer, even with equal bytes

    # metadata given to a create-only write comes back with the listing: no read per object
    ledger = store.join(store.root, "_exports", "ledger")
    for i in range(5):
        assert store.create_only(store.join(ledger, f"key-{i}"), b"{}", metadata={"version": str(100 + i)})
    gcs_fault_proxy.reset_counters()
    listed = {e.name: e.metadata["version"] for e in store.list_dir(ledger)}
    assert listed == {f"key-{i}": str(100 + i) for i in range(5)}
    assert gcs_fault_proxy.counters.requests == 1


def test_discovery_costs_a_fixed_number_of_requests(gcs_bucket, gcs_fault_proxy):
    fs = gcs_bucket.fs()
    via = gcs_bucket.via(gcs_fault_proxy)
    costs = []
    for n in (3, 60):
        state = [f'model_checkpoint_path: "ckpt-{n}"']
        for k in range(1, n + 1):
            fs.pipe_file(gcs_bucket.path(f"train{n}", f"ckpt-{k}.data-00000-of-00001"), b"d" * k)
            fs.pipe_file(gcs_bucket.path(f"train{n}", f"ckpt-{k}.index"), b"i" * k)
            state.append(f'all_model_checkpoint_paths: "ckpt-{k}"')
        fs.pipe_file(gcs_bucket.path(f"train{n}", "checkpoint"), "\n".join(state).encode())
        store = open_storage(via.url(f"train{n}"), via.storage_options)
        gcs_fault_proxy.reset_counters()
        found = discover_checkpoints(store)
        costs.append(gcs_fault_proxy.counters.requests)
        assert [c.step for c in found] == list(range(1, n + 1)) and all(c.complete for c in found)
        assert found[-1].index_crc32c == crc32c_b64(b"i" * n)  # from the listing, not a read
    assert costs[0] == costs[1] == 2  # one listing page and the state file, however many checkpoints


def test_restore_copy_is_checked_against_the_discovered_index(gcs_bucket, trained_dir, tmp_path):
    from tf_export_pipeline.stages import local_checkpoint

    upload_tree(gcs_bucket, trained_dir, "train")
    store = open_storage(gcs_bucket.url("train"), gcs_bucket.storage_options)
    ckpt = [c for c in discover_checkpoints(store) if c.name == "ckpt-20"][0]
    local = local_checkpoint(store, ckpt, str(tmp_path / "a"))
    assert Path(local + ".index").read_bytes() == (trained_dir / "ckpt-20.index").read_bytes()

    fs = gcs_bucket.fs()
    fs.pipe_file(gcs_bucket.path("train", "ckpt-20.index"), b"rewritten by someone")
    with pytest.raises(CheckpointError, match="changed since it was discovered"):
        local_checkpoint(store, ckpt, str(tmp_path / "b"))
    fs.put_file(str(trained_dir / "ckpt-20.index"), gcs_bucket.path("train", "ckpt-20.index"))
    fs.rm_file(gcs_bucket.path("train", "ckpt-20.data-00000-of-00001"))
    with pytest.raises(CheckpointError, match="vanished"):
        local_checkpoint(store, ckpt, str(tmp_path / "c"))


# -- permanent errors ------------------------------------------------------------------------
def one_line_error(res: CliResult) -> str:
    lines = res.err.strip().splitlines()
    assert res.rc == 1 and len(lines) == 1, res.err
    assert lines[0].startswith("tf-export: error: ")
    return lines[0][len("tf-export: error: "):]


def test_permanent_errors_are_one_clear_line(gcs_bucket, gcs_fault_proxy, tmp_path):
    from tf_export_pipeline.demo import write_config

    missing = f"missing-{uuid.uuid4().hex[:10]}"
    gcs_bucket.fs().pipe_file(gcs_bucket.path("train", "ckpt-1.index"), b"i")

    def config(name: str, bucket: GcsBucket = gcs_bucket, **keys) -> str:
        data = {"training_dir": bucket.url("train"), "export_base": bucket.url(BASE),
                "storage_options": dict(bucket.storage_options)}
        data.update(keys)
        return write_config(str(tmp_path), name=name, **data)

    res = run_cli("discover", "--config", config("a.yaml", training_dir=f"gs://{missing}/train"))
    assert one_line_error(res) == f"bucket '{missing}' does not exist: gs://{missing}/train"

    res = run_cli("status", "--config", config("b.yaml", export_base=f"gs://{missing}/models/m"))
    assert one_line_error(res) == f"bucket '{missing}' does not exist: gs://{missing}/models/m"

    res = run_cli("status", "--config", config("c.yaml", promotion="rename"))
    line = one_line_error(res)
    assert "hierarchical namespace" in line and line.endswith(gcs_bucket.url(BASE))

    gcs_fault_proxy.configure(fail_rate=1.0, fail_status=403, max_consecutive_faults=1000)
    res = run_cli("discover", "--config", config("d.yaml", bucket=gcs_bucket.via(gcs_fault_proxy)))
    line = one_line_error(res)
    assert line.startswith("permission denied (HTTP 403") and gcs_bucket.name in line
    assert gcs_fault_proxy.counters.failed_503 == 1  # a permanent error is not retried
