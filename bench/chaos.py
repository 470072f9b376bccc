"""Chaos on local disk: N SIGKILLs of `tf-export` at random instants, then convergence; prints a table.

Six checkpoints of the demo model; `tf-export run`, `backfill` and `gc`
(retention.keep 3, a one-hour lease) processes, each in its own session, are
SIGKILLed as a group after a uniform random delay (ranges from an
uninterrupted first run, see tests/support/chaos.py), every second retry under
another host name (`unshare -u`, as root). A watcher applies TF Serving's
rule all along. Then `backfill` and `run` without kills until nothing is left
to do, a `gc` with a 1 s lease, and the checks: each checkpoint exactly once,
training order, no staging left, every version loaded with
`tf.compat.v1.saved_model.loader.load` and matching its checkpoint.

    .venv/bin/python bench/chaos.py                  # 50 kills
    .venv/bin/python bench/chaos.py --kills 10 --seed 7 --keep

Prints the table (Markdown, for bench/RESULTS.md) and a JSON summary; exits 1
when a check failed. The process log goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs to land (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="seed of the random choices (default: random, printed)")
    parser.add_argument("--workdir", help="where to work (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (its chaos-logs/ too)")
    parser.add_argument("--gap", type=float, default=5.0, help="seconds between checkpoint write times")
    parser.add_argument("--quiet", action="store_true", help="no process log on stderr")
    args = parser.parse_args(argv)

    from tests.support.chaos import Chaos, ServingWatcher, prepare
    from tf_export_pipeline.demo import train

    root = Path(args.workdir or tempfile.mkdtemp(prefix="tf-export-chaos-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    train_dir = root / "train"
    train(str(train_dir), steps=60, checkpoint_every=10)  # ckpt-10 ... ckpt-60
    config = prepare(root, train_dir, gap=args.gap)
    base = root / "serving" / "demo_regressor"
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    chaos = Chaos(root, config, base, train_dir, seed=args.seed, log=log)
    log(f"chaos seed {chaos.seed}; work in {root}")
    with ServingWatcher(base) as watcher:
        chaos.calibrate()
        chaos.run_chaos(kills=args.kills)
        chaos.converge()
        chaos.final_gc()
    problems = chaos.verify(watcher)

    cores = os.cpu_count()
    print(f"## Chaos on local disk ({time.strftime('%Y-%m-%d')}, {cores} cores; "
          f"`python bench/chaos.py --kills {args.kills}`)\n")
    print(chaos.table(watcher, problems))
    print("\n```json")
    print(json.dumps(chaos.summary(watcher), indent=1))
    print("```")
    if args.keep or problems:
        log(f"work directory kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
