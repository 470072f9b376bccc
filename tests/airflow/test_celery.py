"""The DAGs on a distributed Airflow: CeleryExecutor, PostgreSQL, Redis, two workers on two hostnames.

One cluster for the module (tests/airflow/celery_cluster.py): api-server,
scheduler, dag-processor, triggerer, and Celery workers ``worker-a`` and
``worker-b`` (concurrency 2 each; different hostnames through ``unshare -u``
when root), all on 127.0.0.1, PostgreSQL and Redis started here too.

1. A backfill over 8 checkpoints in chunks of 2 spreads its mapped chunk
   tasks over both workers, publishes each checkpoint once, versions in step
   order.
2. The nightly and after-training DAGs of one model run at the same time on
   the two workers: each checkpoint is published at most once and versions
   still increase with the step (the newest checkpoint is served).
3. ``worker-a`` is killed (SIGKILL, every process of its session) in the
   middle of a chunk task (held once the chunk's second checkpoint is
   exported, the first validated, nothing published): the scheduler notices
   the missing heartbeats, the task is retried on ``worker-b``, which takes
   the two checkpoints the killed try exported as they are and exports only
   the rest, and the backfill ends with each checkpoint exported and
   published once, in order, and nothing partial visible.

Each model has its own config, training directory and export base. Each
checkpoint's publish is read back from the export base (manifests, ledger),
not from the tasks' own reports.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.airflow.conftest import manifest, versions
from tests.airflow.live import wait_for
from tests.conftest import PartialVersionWatcher, assert_no_partial_versions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900, method="thread")]

WORKERS = ("worker-a", "worker-b")
STEPS = list(range(10, 90, 10))  # 8 checkpoints


def _train_many(root: Path, steps: int) -> Path:
    from tf_export_pipeline.demo import train

    out = root / "train"
    train(str(out), steps=steps, checkpoint_every=10, max_to_keep=None)
    return out


def _model(configs: Path, source: Path, model: str, keep: list[int] | None = None,
           **overrides) -> tuple[Path, Path]:
    """A config ``<model>.yaml`` in the shared config folder, with its own training dir (a copy of
    ``source``, only the steps in ``keep``) and export base. Returns (training dir, export base)."""
    from tf_export_pipeline.demo import write_config

    train, base = configs / model / "train", configs / model / "serving"
    shutil.copytree(source, train)
    if keep is not None:
        for f in train.glob("ckpt-*"):
            if int(f.name.split(".")[0].split("-")[1]) not in keep:
                f.unlink()
        names = [f"ckpt-{s}" for s in keep]
        lines = [f'model_checkpoint_path: "{names[-1]}"'] + [f'all_model_checkpoint_paths: "{n}"' for n in names]
        (train / "checkpoint").write_text("\n".join(lines) + "\n")
    write_config(str(configs), name=f"{model}.yaml", training_dir=f"./{model}/train",
                 export_base=f"./{model}/serving", retention={"keep": 50},
                 airflow={"schedule": None, "max_active_tis_per_dagrun": 4}, **overrides)
    return train, base


def published_steps(base: Path) -> dict[int, int]:
    """version -> step of its checkpoint, from the manifests."""
    return {v: manifest(base, v)["checkpoint"]["step"] for v in versions(base)}


def assert_published_once_in_order(base: Path, steps: list[int], killed: int = 0) -> dict[int, int]:
    """Every step in ``steps`` has exactly one version, nothing else is published, higher step -> higher
    version, nothing partial; the ledger names one version per checkpoint. No staging is left but that of
    the ``killed`` exports (a SIGKILLed export leaves its staging to gc), and the ledger names none of it."""
    assert_no_partial_versions(base)
    by_version = published_steps(base)
    counts = Counter(by_version.values())
    assert [s for s, n in counts.items() if n > 1] == [], f"checkpoints published twice: {by_version}"
    assert sorted(counts) == sorted(steps), f"published steps {sorted(counts)}, expected {sorted(steps)}"
    ordered = [by_version[v] for v in sorted(by_version)]
    assert ordered == sorted(ordered), f"versions not in step order: {sorted(by_version.items())}"
    ledger = list((base / "_exports" / "ledger").iterdir())
    assert len(ledger) == len(steps), [p.name for p in ledger]
    left = [p.name for p in base.iterdir() if p.name.startswith("temp-")]
    assert len(left) <= killed, f"staging left behind: {left}"
    committed = {Path(str(e.get("staging", ""))).name for e in
                 (json.loads(p.read_text()) for p in (base / "_exports" / "ledger").iterdir())}
    assert not committed & set(left), f"the ledger names staging that is still there: {left}"
    return by_version


def export_tis(tis: list[dict]) -> list[dict]:
    return [t for t in tis if "export" in t["task_id"].split(".")[-1] and t["map_index"] >= 0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, trained_dir):
    from tests.airflow.celery_cluster import CeleryAirflow

    root = tmp_path_factory.mktemp("celery")
    configs = root / "configs"
    configs.mkdir()
    release = root / "release-worker-a"
    release.touch()
    env = {
        "TF_EXPORT_CONFIG_DIR": str(configs),
        "TF_EXPORT_POKE_SECONDS": "1",
        "TF_EXPORT_WAIT_SECONDS": "300",
        "TF_EXPORT_RETRIES": "2",
        "TF_EXPORT_RETRY_DELAY_SECONDS": "1",
    }
    airflow = CeleryAirflow(root / "home", env, workers=WORKERS, concurrency=2)
    # worker-a's backfill tasks hold once their second checkpoint is exported (the first validated,
    # nothing published) while the release file is missing; worker-b's never hold.
    airflow.worker_env = {"worker-a": {"TF_EXPORT_TEST_HOLD": f"staged#2@{release}"}}
    t0 = time.monotonic()
    try:
        # PostgreSQL, Redis and the migration of the metadata database (which reads no config) while the
        # checkpoints are trained here.
        with ThreadPoolExecutor(1) as pool:
            preparing = pool.submit(airflow.prepare)
            try:
                source = _train_many(root / "source", steps=STEPS[-1])
            finally:
                prepared = preparing.exception()  # waits for it either way
        if prepared is not None:
            raise prepared
        models = {
            "spread": _model(configs, source, "spread"),
            # Two DAGs publishing one model's checkpoints at once: version = step, so whichever publishes
            # first, an older checkpoint lands below a newer one. (With `timestamp`, or `checkpoint_time` and
            # checkpoints written within one second, the later publish of an older checkpoint is refused
            # with ServingOrderError instead, failing that run: order kept, run red.)
            "both": _model(configs, source, "both", keep=[10, 20, 30], versioning="step"),
            "crash": _model(configs, source, "crash", keep=STEPS[:8]),
        }
        airflow.start()
        for model in models:
            for kind in ("backfill", "nightly", "after_training"):
                airflow.wait_dag(f"export_{kind}__{model}", limit=180)
        print(f"celery cluster up in {time.monotonic() - t0:.1f} s (unshare: {airflow.unshare})")
        airflow.models, airflow.release = models, release
        yield airflow
    finally:
        airflow.stop()
        assert airflow.pids() == [], "processes of the cluster left running"
        assert airflow.postgres.proc is None or airflow.postgres.proc.poll() is not None, "postgres left running"
        assert airflow.redis.proc is None or airflow.redis.proc.poll() is not None, "redis-server left running"


def _trigger(cluster, dag_id: str, conf: dict | None = None) -> str:
    return cluster.post(f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})["dag_run_id"]


def _why(cluster, dag_id: str, run_id: str) -> str:
    tis = cluster.task_instances(dag_id, run_id)
    failed = [t for t in tis if t["state"] not in ("success", "skipped")]
    return "\n".join(cluster.task_log(dag_id, run_id, t["task_id"]) for t in failed[:3]) + "\n" + cluster.tails()


def test_components_and_servers_listen_on_loopback_only(cluster):
    addresses = cluster.listening()
    assert f"127.0.0.1:{cluster.port}" in addresses
    assert all(a.startswith("127.0.0.1:") for a in addresses), addresses
    assert cluster.sql("SELECT 1") == [(1,)]  # the metadata DB is this PostgreSQL
    health = cluster.get("/api/v2/monitor/health")
    assert health["metadatabase"]["status"] == "healthy"


def _maps_tensorflow(pid: int) -> bool:
    try:
        return "_pywrap_tensorflow_internal" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # a process that just ended
        return False


def test_workers_and_their_pool_imported_tensorflow_before_any_task(cluster):
    # celery_worker.CELERY_CONFIG: the worker imports TensorFlow at start-up, so its pool processes and
    # every task process forked from them start with it (each task would otherwise import it again).
    # Airflow's own helper process (stale bundle clean-up) is forked before that and does without.
    for name in WORKERS:
        leader = cluster.workers[name].pid
        assert _maps_tensorflow(leader), f"{name}: the Celery worker process has no TensorFlow"
        with_tf = [p for p in cluster.worker_pids(name) if p != leader and _maps_tensorflow(p)]
        assert len(with_tf) >= cluster.concurrency, f"{name}: pool processes with TensorFlow: {with_tf}"


def test_backfill_spreads_mapped_exports_over_both_workers_and_publishes_in_order(cluster):
    train, base = cluster.models["spread"]
    dag = "export_backfill__spread"
    t0 = time.monotonic()
    chunk = 2  # four chunks: as many as the two workers have slots
    run_id = _trigger(cluster, dag, {"chunk_size": chunk})
    done = cluster.wait_run_done(dag, run_id, 420)
    print(f"backfill of {len(STEPS)} checkpoints on two workers: {time.monotonic() - t0:.1f} s")
    assert done["state"] == "success", _why(cluster, dag, run_id)

    exports = export_tis(cluster.task_instances(dag, run_id))
    assert len(exports) == len(STEPS) // chunk == 4, [t["task_id"] for t in exports]
    hosts = Counter(t["hostname"] for t in exports)
    assert set(hosts) == set(WORKERS), f"mapped exports ran on {dict(hosts)}"
    # and the database agrees with the REST API on who ran them
    rows = cluster.sql("SELECT DISTINCT hostname FROM task_instance WHERE dag_id = %s AND run_id = %s", dag, run_id)
    assert {r[0] for r in rows} <= set(WORKERS)
    assert_published_once_in_order(base, STEPS)


def test_nightly_and_after_training_at_once_on_two_workers_keep_serving_order(cluster):
    train, base = cluster.models["both"]
    nightly, after = "export_nightly__both", "export_after_training__both"
    newest = str(train / "ckpt-30")
    runs = {after: _trigger(cluster, after, {"checkpoint": newest}), nightly: _trigger(cluster, nightly)}
    done = {dag: cluster.wait_run_done(dag, run_id, 420) for dag, run_id in runs.items()}
    for dag, run in done.items():
        assert run["state"] == "success", _why(cluster, dag, runs[dag])
    # they ran at the same time
    (a0, a1), (n0, n1) = [(done[d]["start_date"], done[d]["end_date"]) for d in (after, nightly)]
    assert a0 < n1 and n0 < a1, f"the runs did not overlap: {after} {a0}..{a1}, {nightly} {n0}..{n1}"
    tis = [t for dag, run_id in runs.items() for t in cluster.task_instances(dag, run_id)]
    hosts = Counter(t["hostname"] for t in tis if t["state"] == "success")
    assert set(hosts) == set(WORKERS), f"tasks ran on {dict(hosts)}"

    by_version = published_steps(base)
    counts = Counter(by_version.values())
    assert [s for s, n in counts.items() if n > 1] == [], f"checkpoints published twice: {by_version}"
    ordered = [by_version[v] for v in sorted(by_version)]
    assert ordered == sorted(ordered), f"versions not in step order: {sorted(by_version.items())}"
    assert ordered[-1] == 30, f"the newest checkpoint is not the one served: {sorted(by_version.items())}"
    assert_no_partial_versions(base)


def _validated_records(base: Path) -> int:
    """How many exports a backfill task recorded as validated in their work folders (resume.json)."""
    n = 0
    for path in (base / "_exports" / "work").glob("*/resume.json"):
        try:
            n += json.loads(path.read_text())["record"]["status"] == "validated"
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written
    return n


def test_worker_killed_mid_chunk_is_resumed_by_the_retry_on_the_other_worker(cluster):
    train, base = cluster.models["crash"]
    steps = STEPS[:8]
    dag = "export_backfill__crash"
    chunk = 4

    def running_on_a(run_id: str) -> list[dict]:
        return [t for t in export_tis(cluster.task_instances(dag, run_id))
                if t["state"] == "running" and t["hostname"] == "worker-a"]

    def held_on_a(run_id: str):
        # This run's task logs only: the earlier tests' tasks on worker-a printed the hold line too (their
        # release file existed, so they went on at once). Every chunk running there holds.
        holding = sum("holding at staged" in p.read_text(errors="replace")
                      for p in (cluster.home / "workers" / "worker-a" / "logs").rglob("*.log")
                      if f"run_id={run_id}" in str(p))
        running = running_on_a(run_id)
        return running if running and holding >= len(running) else None

    cluster.release.unlink()  # worker-a's chunks now hold after their second export (nothing published)
    # Two chunks would fit worker-b's two slots: with worker-b down while they are queued, both land on
    # worker-a, and worker-b comes back for the retries.
    assert cluster.kill_worker("worker-b"), "worker-b had no processes"
    with PartialVersionWatcher(base, interval=0.02) as watcher:  # looks at the export base as TF Serving would
        run_id = _trigger(cluster, dag, {"chunk_size": chunk})
        wait_for("a chunk task of worker-a to hold after its second export", lambda: held_on_a(run_id), 300,
                 interval=0.5, on_timeout=lambda: _why(cluster, dag, run_id))
        held = running_on_a(run_id)
        # Both chunks run (and hold) on worker-a, nothing of the run is queued: worker-b starts now, its start-up
        # overlapping the rest of the wait and the scheduler's wait for the killed tasks' heartbeats.
        cluster.start_worker("worker-b")
        # Each held chunk's first checkpoint is validated meanwhile (its validation goes on while the chunk
        # holds): wait until the work folders record it, rather than for a fixed time.
        wait_for("each held chunk's first checkpoint to be recorded as validated",
                 lambda: _validated_records(base) >= len(held), 120, interval=0.1,
                 on_timeout=lambda: _why(cluster, dag, run_id))
        held = running_on_a(run_id)
        assert held, "worker-a's export tasks stopped running"
        killed = cluster.kill_worker("worker-a")  # SIGKILL to every process of its session
        assert killed, "worker-a had no processes"
        t_kill = time.monotonic()
        cluster.release.touch()  # nothing on worker-b holds anyway
        done = cluster.wait_run_done(dag, run_id, 420)
    print(f"backfill after killing worker-a ({len(held)} export(s) held there): "
          f"done {time.monotonic() - t_kill:.1f} s after the kill")
    assert done["state"] == "success", _why(cluster, dag, run_id)
    assert watcher.violations == [] and watcher.polls > 100, watcher.violations[:5]

    tries = cluster.tries(dag, run_id)
    for ti in held:
        mine = sorted((t for t in tries if t["task_id"] == ti["task_id"] and t["map_index"] == ti["map_index"]),
                      key=lambda t: t["try_number"])
        assert mine[0]["hostname"] == "worker-a" and mine[0]["state"] != "success", mine
        assert mine[-1]["state"] == "success" and mine[-1]["hostname"] == "worker-b", \
            f"{ti['task_id']}[{ti['map_index']}] was not retried on worker-b: {mine}"
        assert mine[-1]["try_number"] >= 2, mine
        # The retry took the two checkpoints the killed try had exported, and exported the other two.
        records = cluster.xcom(dag, run_id, ti["task_id"], ti["map_index"])
        assert [r["status"] for r in records] == ["validated"] * chunk, records
        assert [bool(r.get("resumed")) for r in records] == [True, True, False, False], records
    final = export_tis(cluster.task_instances(dag, run_id))
    assert len(final) == len(steps) // chunk
    assert all(t["state"] == "success" for t in final), final
    # Nothing exported twice: no staging is left over, not even the killed try's.
    assert_published_once_in_order(base, steps, killed=0)
