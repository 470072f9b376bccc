"""Latency of one `tf-export run`, and of the CLI runs the test suite makes, each beside its baseline in one run.

1. ``run``: `tf-export run` (its validation process starts as the export
   begins) beside the same stages with the validation process started after
   the export (``stage_export``, then ``stage_validate`` with no session, then
   ``stage_publish``), each in a fresh Python process on a fresh copy of the
   demo's checkpoints.
2. test CLI: `tf-export run` forked from a process that imported TensorFlow
   once (``tests/support/cli_forkserver.py``, what the suite does) beside
   ``python -m tf_export_pipeline run`` started anew.

Medians of ``--reps`` runs each, alternating, on an otherwise idle machine.

    python bench/run_latency.py            # 3 repetitions; prints the table
    python bench/run_latency.py --reps 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

AFTER_EXPORT = textwrap.dedent("""
    import sys
    from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
    import_tensorflow_quietly()
    from tf_export_pipeline.config import load_config
    from tf_export_pipeline import stages
    cfg = load_config(sys.argv[1])
    staged = stages.stage_export(cfg, None)
    validated = stages.stage_validate(cfg, staged)
    published = stages.stage_publish(cfg, validated)
    assert published.status == "published", published
""")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    from tests.support.cli_forkserver import CliForkServer
    from tf_export_pipeline.demo import train, write_config

    work = tempfile.mkdtemp(prefix="tf-export-bench-run-")
    trained = os.path.join(work, "trained")
    train(trained, steps=30, checkpoint_every=10)

    def workspace(name: str) -> str:
        root = os.path.join(work, name)
        shutil.copytree(trained, os.path.join(root, "train"))
        return write_config(root)

    times: dict[str, list[float]] = {k: [] for k in ("prewarmed", "after_export", "forked", "fresh")}
    server = CliForkServer.start(_env())
    try:
        for i in range(args.reps):
            times["prewarmed"].append(_timed([sys.executable, "-m", "tf_export_pipeline", "run", "--config",
                                              workspace(f"pre{i}")]))
            times["after_export"].append(_timed([sys.executable, "-c", AFTER_EXPORT, workspace(f"after{i}")]))
            config = workspace(f"fork{i}")
            t0 = time.monotonic()
            rc, _, err = server.run(["run", "--config", config], _env(), work, 600)
            if rc != 0:
                raise SystemExit(f"forked run failed:\n{err[-2000:]}")
            times["forked"].append(time.monotonic() - t0)
            times["fresh"].append(_timed([sys.executable, "-m", "tf_export_pipeline", "run", "--config",
                                          workspace(f"fresh{i}")]))
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"one `tf-export run` of the demo model, median of {args.reps} (seconds)")
    print("| what | this | baseline | ratio |")
    print("|---|---|---|---|")
    print(f"| run: validation process started with the export / after it | {med['prewarmed']:.1f} | "
          f"{med['after_export']:.1f} | {med['prewarmed'] / med['after_export']:.2f} |")
    print(f"| test CLI: forked from an imported TensorFlow / started anew | {med['forked']:.1f} | "
          f"{med['fresh']:.1f} | {med['forked'] / med['fresh']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
