"""What each task of the nightly and after-training DAGs costs on one worker: process start, TensorFlow, work.

Each stage of one export (discover, export, validate, publish, prune) runs as
its task does when nothing was imported before it (the LocalExecutor; a Celery
worker with ``celery_worker.CELERY_CONFIG`` forks its tasks with TensorFlow
already imported): a fresh Python process imports the operators (what the DAG
file's parse costs a task), then makes the stage's hook call, with the record
of the stage before read from a file. ``-X importtime`` says whether the stage
imported TensorFlow and how long that took; work is the rest of the call.

    .venv/bin/python bench/task_costs.py          # prints the table (demo model, median of --reps)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGE = r"""
import json, sys, time
t0 = time.monotonic()
from tf_export_pipeline.operators.hooks import ExportHook
import tf_export_pipeline.operators.export
t1 = time.monotonic()
hook = ExportHook(sys.argv[1])
stage, given, out = sys.argv[2], sys.argv[3], sys.argv[4]
record = json.load(open(given)) if given != "-" else None
if stage == "discover":
    result = hook.newest()
elif stage == "export":
    result = hook.export(record["prefix"])
elif stage == "validate":
    result = hook.validate(record)
elif stage == "publish":
    result = hook.publish(record)
else:
    result = hook.prune(keep_versions=(record["version"],))
t2 = time.monotonic()
json.dump(result, open(out, "w"), default=str)
print(json.dumps({"imports": t1 - t0, "call": t2 - t1}))
"""

STAGES = ("discover", "export", "validate", "publish", "prune")


def tf_import_seconds(stderr: str) -> float:
    """The cumulative time of the first top-level ``import tensorflow`` in ``-X importtime`` output."""
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)tensorflow$", line)
        if m:
            return int(m.group(1)) / 1e6
    return 0.0


def one_export(workdir: Path, config: str) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    given, out = "-", ""
    figures = {}
    for stage in STAGES:
        out = str(workdir / f"{stage}.json")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", STAGE, config, stage, given, out],
                              env=env, capture_output=True, text=True)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{stage} failed:\n{proc.stderr[-3000:]}")
        inner = json.loads(proc.stdout.strip().splitlines()[-1])
        tf = tf_import_seconds(proc.stderr)
        figures[stage] = {"process_start": wall - inner["imports"] - inner["call"], "task_imports": inner["imports"],
                          "tensorflow_import": tf, "work": inner["call"] - tf, "wall": wall}
        given = out
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from tf_export_pipeline.demo import train, write_config

    root = Path(tempfile.mkdtemp(prefix="tf-export-task-costs-"))
    try:
        source = root / "source"
        train(str(source / "train"), steps=10, checkpoint_every=10)
        runs = []
        for i in range(args.reps):
            ws = root / f"ws{i}"
            shutil.copytree(source, ws)
            config = write_config(str(ws))
            runs.append(one_export(ws, config))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    keys = ("process_start", "task_imports", "tensorflow_import", "work", "wall")
    print("| task | process start | operators import | TensorFlow import | work | total |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage in STAGES:
        med = {k: statistics.median(r[stage][k] for r in runs) for k in keys}
        print(f"| {stage} | " + " | ".join(f"{med[k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
