"""Backfill through Airflow against the command line, on the same checkpoints, in one run.

N checkpoints (default 24) of the small model of bench/backfill.py, then:

1. ``tf-export backfill`` over them (one process, as a user runs it);
2. ``export_backfill__<model>`` on the LocalExecutor (SQLite, the four
   components of tests/airflow/live.py), once per ``--chunk-sizes`` value, each
   into a fresh export base with a copy of the same checkpoints;
3. the same DAG on the Celery cluster (tests/airflow/celery_cluster.py:
   CeleryExecutor, PostgreSQL, Redis, workers of concurrency 2) with two
   workers, then with ``worker-b`` stopped, at the default chunk size;
4. on the LocalExecutor, the time from an event of the training directory's
   Asset (``POST /api/v2/assets/events``) to the version published by
   ``export_after_training__<model>``, split by task.

For each DAG run it reads the task instances back (REST API) and reports

* wall: the run's start to its end;
* the chunk tasks' span (first start to last end) and the other tasks;
* scheduling gaps: the run's wall less the time some task of the run was
  running (the scheduler's and executor's fixed overhead, reported apart);
* DAG / CLI, and (DAG less its gaps) / CLI.

    .venv/bin/python bench/celery_scale.py                # 24 checkpoints; writes bench/RESULTS.md
    .venv/bin/python bench/celery_scale.py --checkpoints 8 --chunk-sizes 4 --no-write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BEGIN, END = "<!-- celery-scale:begin -->", "<!-- celery-scale:end -->"


def _when(value: str | None) -> float | None:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def _busy(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of ``spans``."""
    total, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def measure(airflow, dag: str, run_id: str, base: Path) -> dict:
    """The figures of one finished run, from the REST API."""
    run = airflow.get(f"/api/v2/dags/{dag}/dagRuns/{run_id}")
    tis = [t for t in airflow.get(f"/api/v2/dags/{dag}/dagRuns/{run_id}/taskInstances", limit=1000)["task_instances"]
           if t["start_date"] and t["end_date"]]
    start, end = _when(run["start_date"]), _when(run["end_date"])
    spans = [(_when(t["start_date"]), _when(t["end_date"])) for t in tis]
    chunks = [t for t in tis if t["task_id"] == "export_chunk"]
    others = {t["task_id"]: _when(t["end_date"]) - _when(t["start_date"])
              for t in tis if t["task_id"] != "export_chunk"}
    wall = end - start
    gaps = wall - _busy(spans)
    chunk_times = [_when(t["end_date"]) - _when(t["start_date"]) for t in chunks]
    return {
        "wall_s": wall,
        "gaps_s": gaps,
        "chunks": len(chunks),
        "chunk_span_s": (max(_when(t["end_date"]) for t in chunks) - min(_when(t["start_date"]) for t in chunks))
        if chunks else 0.0,
        "chunk_mean_s": sum(chunk_times) / len(chunk_times) if chunk_times else 0.0,
        "other_tasks_s": others,
        "hosts": sorted({t["hostname"] for t in chunks}),
        "versions": sum(1 for p in base.iterdir() if p.name.isdigit()),
    }


def run_dag(airflow, dag: str, conf: dict, base: Path, limit: float) -> dict:
    run_id = airflow.post(f"/api/v2/dags/{dag}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]
    done = airflow.wait_run_done(dag, run_id, limit)
    if done["state"] != "success":
        raise SystemExit(f"{dag} {run_id}: {done['state']}\n{airflow.tails()}")
    return measure(airflow, dag, run_id, base)


def after_training_latency(airflow, dag: str, train: Path, base: Path, limit: float) -> dict:
    """An Asset event for the training directory, then the run it starts: seconds from the event, per task."""
    asset = airflow.asset_id("file://" + str(train))
    t_event = time.time()
    airflow.post("/api/v2/assets/events", {"asset_id": asset, "extra": {}})

    def started():
        runs = [r for r in airflow.runs(dag) if (_when(r.get("queued_at")) or 0) >= t_event - 1]
        return runs[0] if runs else None

    from tests.airflow.live import wait_for

    run = wait_for(f"a run of {dag} after the event", started, limit, interval=0.2)
    done = airflow.wait_run_done(dag, run["dag_run_id"], limit)
    if done["state"] != "success":
        raise SystemExit(f"{dag}: {done['state']}\n{airflow.tails()}")
    tis = airflow.get(f"/api/v2/dags/{dag}/dagRuns/{run['dag_run_id']}/taskInstances")["task_instances"]
    rows = []
    for t in sorted((t for t in tis if t["start_date"]), key=lambda t: _when(t["start_date"])):
        rows.append({"task": t["task_id"], "queued": (_when(t["queued_when"]) or _when(t["start_date"])) - t_event,
                     "start": _when(t["start_date"]) - t_event, "end": _when(t["end_date"]) - t_event})
    publish = next(r for r in rows if r["task"] == "publish")
    return {"run_queued": _when(done["queued_at"]) - t_event, "tasks": rows, "published": publish["end"],
            "versions": sum(1 for p in base.iterdir() if p.name.isdigit())}


def write_models(workdir: Path) -> None:
    from bench.backfill import MODELS

    (workdir / "bench_models.py").write_text(MODELS)


def train_small(workdir: Path, out: Path, k: int) -> None:
    from bench.backfill import WRITE_CHECKPOINTS

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir), str(REPO)])}
    subprocess.run([sys.executable, "-c", WRITE_CHECKPOINTS, "small", str(out), str(k)], env=env, check=True,
                   capture_output=True)


def model_config(configs: Path, source: Path, name: str, limit: int, keep_last: int | None = None) -> Path:
    """``<name>.yaml`` of the small model over a copy of ``source`` (only its last ``keep_last`` checkpoints)."""
    train = configs / name / "train"
    shutil.copytree(source, train)
    if keep_last is not None:
        prefixes = sorted({p.name.split(".")[0] for p in train.glob("ckpt-*")}, key=lambda n: int(n.split("-")[1]))
        drop = prefixes[:-keep_last]
        for p in train.glob("ckpt-*"):
            if p.name.split(".")[0] in drop:
                p.unlink()
        kept = prefixes[-keep_last:]
        (train / "checkpoint").write_text(f'model_checkpoint_path: "{kept[-1]}"\n'
                                          + "".join(f'all_model_checkpoint_paths: "{n}"\n' for n in kept))
    (configs / f"{name}.yaml").write_text(json.dumps({
        "training_dir": f"./{name}/train", "export_base": f"./{name}/serving",
        "model": {"factory": "bench_models:small"}, "retention": {"keep": 1000},
        "airflow": {"schedule": None, "max_active_tis_per_dagrun": limit}}))
    return configs / name / "serving"


def cli_backfill(workdir: Path, config: Path) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir), str(REPO)])}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tf_export_pipeline", "backfill", "--config", str(config), "--json"],
                          env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"tf-export backfill failed:\n{proc.stderr[-2000:]}")
    records = json.loads(proc.stdout)
    assert all(r["status"] == "published" for r in records), records
    return wall


def report(r: dict, checkpoints: int, concurrency: int) -> str:
    cli = r["cli_s"]

    def row(label: str, m: dict) -> str:
        net = m["wall_s"] - m["gaps_s"]
        others = ", ".join(f"{k} {v:.1f}" for k, v in m["other_tasks_s"].items())
        return (f"| {label} | {m['chunks']} | {m['wall_s']:.1f} | {m['gaps_s']:.1f} | {m['chunk_span_s']:.1f} "
                f"({m['chunk_mean_s']:.1f} each) | {others} | **{m['wall_s'] / cli:.2f}x** | **{net / cli:.2f}x** |")

    default = r["default_chunk"]
    lines = [
        BEGIN,
        f"## Backfill in Airflow against the command line ({dt.date.today().isoformat()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.machine()})",
        "",
        f"{checkpoints} checkpoints of the small model (bench/backfill.py, 1.05M parameters), the same for every "
        f"row, each into a fresh export base. `tf-export backfill`: **{cli:.1f} s** (one process: start-up, "
        "TensorFlow import, one trace, validation overlapped, publish). DAG rows: `export_backfill__<model>`, "
        "params as given; `max_active_tis_per_dagrun` "
        f"{r['limit']}. Scheduling gaps: the run's wall time during which no task of it was running (the "
        "scheduler and executor's fixed overhead, apart from the work). Times in seconds.",
        "",
        "| run | chunk tasks | wall | scheduling gaps | chunk tasks' span | other tasks | DAG / CLI | "
        "(DAG - gaps) / CLI |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for size, m in r["local"].items():
        lines.append(row(f"LocalExecutor, chunk_size {size}", m))
    lines.append(row(f"Celery, one worker (concurrency {concurrency}), chunk_size {default}", r["one"]))
    lines.append(row(f"Celery, two workers, chunk_size {default}", r["two"]))
    lines += [
        "",
        f"one worker / two workers (Celery wall): {r['one']['wall_s'] / r['two']['wall_s']:.2f}x; two workers "
        f"ran chunk tasks on {r['two']['hosts']}. On {os.cpu_count()} cores the two workers share the same "
        "CPUs, so a second worker adds task slots, not compute.",
        "",
        "Before this layout (a mapped export task and a mapped validate task per checkpoint) the same DAG took "
        "89.8 s on one Celery worker for 24 checkpoints of the demo model, 2.6 s a task.",
        "",
        "### After training: from the Asset event to the version published (LocalExecutor, seconds from the event)",
        "",
        "| task | queued | started | ended | took |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in r["after"]["tasks"]:
        lines.append(f"| {t['task']} | {t['queued']:.1f} | {t['start']:.1f} | {t['end']:.1f} | "
                     f"{t['end'] - t['start']:.1f} |")
    lines += [
        "",
        f"Run queued {r['after']['run_queued']:.1f} s after the event; version published "
        f"{r['after']['published']:.1f} s after it.",
        "",
        "Reproduce: `.venv/bin/python bench/celery_scale.py` (needs redis-server and the PostgreSQL server; "
        "`--checkpoints N`, `--chunk-sizes A,B`, `--no-write`).",
        "",
        "```json",
        json.dumps(r, indent=1, default=str),
        "```",
        END,
    ]
    return "\n".join(lines)


def write(text: str) -> None:
    path = REPO / "bench" / "RESULTS.md"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old:
        old = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, old, flags=re.S)
        path.write_text(old)
    else:
        path.write_text(old.rstrip("\n") + "\n\n" + text + "\n")
    print(f"written to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=2, help="Celery worker concurrency")
    ap.add_argument("--chunk-sizes", default="6,12,24", help="chunk sizes of the LocalExecutor runs")
    ap.add_argument("--limit", type=float, default=900, help="seconds to wait for one run")
    ap.add_argument("--no-celery", action="store_true", help="LocalExecutor and the command line only")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    args = ap.parse_args()

    from tests.airflow.live import LiveAirflow
    from tf_export_pipeline.operators.selection import CHUNK_SIZE

    root = Path(tempfile.mkdtemp(prefix="tf-export-airflow-bench-"))
    write_models(root)
    source = root / "source"
    t0 = time.monotonic()
    train_small(root, source, args.checkpoints)
    print(f"wrote {args.checkpoints} checkpoints in {time.monotonic() - t0:.1f} s", flush=True)
    limit = args.concurrency
    sizes = [int(x) for x in args.chunk_sizes.split(",") if x]
    pythonpath = os.pathsep.join([str(root), str(REPO)])
    results: dict = {"default_chunk": CHUNK_SIZE, "limit": limit, "local": {}}
    try:
        cli_configs = root / "cli"
        cli_configs.mkdir()
        model_config(cli_configs, source, "cli", limit)
        results["cli_s"] = cli_backfill(root, cli_configs / "cli.yaml")
        print(f"tf-export backfill: {results['cli_s']:.1f} s", flush=True)

        configs = root / "local-configs"
        configs.mkdir()
        bases = {size: model_config(configs, source, f"local{size}", limit) for size in sizes}
        after_base = model_config(configs, source, "after", limit, keep_last=1)
        local = LiveAirflow(root / "local-home", {"TF_EXPORT_CONFIG_DIR": str(configs), "PYTHONPATH": pythonpath,
                                                  "TF_EXPORT_POKE_SECONDS": "1", "TF_EXPORT_RETRIES": "0"})
        try:
            local.start()
            for size in sizes:
                local.wait_dag(f"export_backfill__local{size}", limit=180)
            for size in sizes:
                results["local"][size] = run_dag(local, f"export_backfill__local{size}", {"chunk_size": size},
                                                 bases[size], args.limit)
                print(f"LocalExecutor chunk_size {size}:", results["local"][size], flush=True)
            local.wait_dag("export_after_training__after", limit=180)
            results["after"] = after_training_latency(local, "export_after_training__after",
                                                      configs / "after" / "train", after_base, args.limit)
            print("after training:", results["after"], flush=True)
        finally:
            local.stop()

        if not args.no_celery:
            from tests.airflow.celery_cluster import CeleryAirflow

            cconfigs = root / "celery-configs"
            cconfigs.mkdir()
            cbases = {m: model_config(cconfigs, source, m, 2 * args.concurrency) for m in ("two", "one")}
            cluster = CeleryAirflow(root / "celery-home", {
                "TF_EXPORT_CONFIG_DIR": str(cconfigs), "PYTHONPATH": pythonpath,
                "TF_EXPORT_RETRIES": "1", "TF_EXPORT_RETRY_DELAY_SECONDS": "1",
            }, workers=("worker-a", "worker-b"), concurrency=args.concurrency)
            try:
                cluster.start()
                for m in cbases:
                    cluster.wait_dag(f"export_backfill__{m}", limit=180)
                results["two"] = run_dag(cluster, "export_backfill__two", {}, cbases["two"], args.limit)
                print("two workers:", results["two"], flush=True)
                worker_b = cluster.workers["worker-b"]  # stopped: its warm shutdown finishes nothing, it is idle
                os.killpg(worker_b.pid, 15)
                worker_b.wait(timeout=60)
                results["one"] = run_dag(cluster, "export_backfill__one", {}, cbases["one"], args.limit)
                print("one worker:", results["one"], flush=True)
            finally:
                cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(json.dumps(results, indent=1, default=str))
    if not args.no_celery:
        text = report(results, args.checkpoints, args.concurrency)
        print(text)
        if not args.no_write:
            write(text)


if __name__ == "__main__":
    main()
