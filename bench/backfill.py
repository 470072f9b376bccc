"""Backfill throughput: `tf-export backfill` beside the naive way and the floor, in one run.

For each reference model (small: ~1M parameters; large: ~50M parameters, ~200 MB)
it writes K checkpoints, then measures:

1. naive: one fresh Python process per checkpoint that builds the model,
   restores the checkpoint and calls ``tf.saved_model.save``;
2. ``tf-export backfill`` over the same K checkpoints, validation included,
   with the time spent exporting (restore + SavedModel write) and validating
   reported separately from its per-stage timings;
3. floor: ``tf.train.Checkpoint.write`` of the same variables K times in one process.

Peak memory of the backfill worker (its resident set, polled) is compared with a
process that only imported TensorFlow, plus twice the model's bytes.

    python bench/backfill.py                 # K=20, both models; writes bench/RESULTS.md
    python bench/backfill.py --k 5 --models small --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = textwrap.dedent('''
    import keras

    def small():
        """~1.05M parameters."""
        x = keras.Input(shape=(256,), name="features")
        h = keras.layers.Dense(1024, activation="relu")(x)
        h = keras.layers.Dense(768, activation="relu")(h)
        return keras.Model(x, keras.layers.Dense(1, name="score")(h))

    def large():
        """~50.3M parameters, ~201 MB of float32."""
        x = keras.Input(shape=(1024,), name="features")
        h = keras.layers.Dense(4096, activation="relu")(x)
        h = keras.layers.Dense(8192, activation="relu")(h)
        h = keras.layers.Dense(1536, activation="relu")(h)
        return keras.Model(x, keras.layers.Dense(1, name="score")(h))
''')

WRITE_CHECKPOINTS = textwrap.dedent('''
    import sys, tensorflow as tf, bench_models
    name, train_dir, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = getattr(bench_models, name)()
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), train_dir, max_to_keep=None)
    for i in range(k):
        for v in model.trainable_variables:
            v.assign_add(tf.fill(v.shape, 0.001))
        manager.save(checkpoint_number=(i + 1) * 100)
    print(model.count_params())
''')

NAIVE_ONE = textwrap.dedent('''
    import sys, tensorflow as tf, bench_models
    name, prefix, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = getattr(bench_models, name)()
    tf.train.Checkpoint(model=model).read(prefix).expect_partial()
    root = tf.Module()
    root.model = model
    spec = tf.TensorSpec([None] + list(model.inputs[0].shape[1:]), tf.float32, name="features")
    serve = tf.function(lambda x: {"score": model(x, training=False)}, input_signature=[spec])
    root.serve = serve
    tf.saved_model.save(root, out, signatures={"serving_default": serve.get_concrete_function()})
''')

FLOOR = textwrap.dedent('''
    import sys, time, json, tensorflow as tf, bench_models
    name, prefix, out, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = getattr(bench_models, name)()
    ckpt = tf.train.Checkpoint(model=model)
    ckpt.read(prefix).expect_partial()
    ckpt.write(out + "/warm")
    t = time.perf_counter()
    for i in range(k):
        ckpt.write(f"{out}/c{i}")
    print(json.dumps({"seconds": time.perf_counter() - t}))
''')

# The TensorFlow baseline: TensorFlow and its Keras imported, an op run, no model.
TF_ONLY = "import tensorflow as tf, keras, time; tf.constant(0) + 0; time.sleep(1.5)"


def _env(workdir: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([workdir, REPO, env.get("PYTHONPATH", "")])
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _run(cmd, env, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"bench: command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc


def _peak_rss(cmd, env) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in bytes of the process itself (not its children), stdout."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"bench: command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return time.perf_counter() - t, peak, out


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def bench_model(name: str, k: int, workdir: str, env: dict) -> dict:
    base = os.path.join(workdir, name)
    train = os.path.join(base, "train")
    os.makedirs(base, exist_ok=True)
    print(f"[{name}] writing {k} checkpoints", file=sys.stderr, flush=True)
    params = int(_run([sys.executable, "-c", WRITE_CHECKPOINTS, name, train, str(k)], env).stdout.split()[-1])
    prefixes = [os.path.join(train, f"ckpt-{(i + 1) * 100}") for i in range(k)]
    model_bytes = params * 4

    print(f"[{name}] naive: {k} fresh processes", file=sys.stderr, flush=True)
    naive_dir = os.path.join(base, "naive")
    t = time.perf_counter()
    for i, prefix in enumerate(prefixes):
        _run([sys.executable, "-c", NAIVE_ONE, name, prefix, os.path.join(naive_dir, str(i))], env)
    naive = time.perf_counter() - t
    saved_model_bytes = _dir_bytes(os.path.join(naive_dir, "0"))
    shutil.rmtree(naive_dir)

    print(f"[{name}] tf-export backfill", file=sys.stderr, flush=True)
    config = os.path.join(base, "export.yaml")
    with open(config, "w") as fh:
        json.dump({"training_dir": "./train", "export_base": "./serving",
                   "model": {"factory": f"bench_models:{name}"}, "retention": {"keep": 100}}, fh)
    timings_file = os.path.join(base, "timings.json")
    wall, peak, out = _peak_rss([sys.executable, "-m", "tf_export_pipeline", "backfill", "--config", config, "--json"],
                                {**env, "TF_EXPORT_TIMINGS": timings_file})
    records = json.loads(out)
    assert len(records) == k and all(r["status"] == "published" for r in records), records
    with open(timings_file) as fh:
        timings = json.load(fh)
    export_s = sum(t_["export"] for t_ in timings)
    export_steady = sum(t_["export"] for t_ in timings[1:]) * k / max(1, k - 1)
    validate_s = sum(t_["validate"] for t_ in timings)
    publish_s = sum(t_["publish"] for t_ in timings)
    shutil.rmtree(os.path.join(base, "serving"))

    print(f"[{name}] floor: {k} x tf.train.Checkpoint.write", file=sys.stderr, flush=True)
    floor = json.loads(_run([sys.executable, "-c", FLOOR, name, prefixes[-1], os.path.join(base, "floor"), str(k)],
                            env).stdout.strip().splitlines()[-1])["seconds"]
    shutil.rmtree(os.path.join(base, "floor"))
    _, tf_rss, _ = _peak_rss([sys.executable, "-c", TF_ONLY], env)
    shutil.rmtree(train)
    return {
        "model": name, "params": params, "model_mb": model_bytes / 2**20, "saved_model_mb": saved_model_bytes / 2**20,
        "k": k, "naive_s": naive, "backfill_s": wall, "export_s": export_s, "export_steady_s": export_steady,
        "validate_s": validate_s, "publish_s": publish_s, "floor_s": floor,
        "speedup_vs_naive": naive / wall, "export_vs_floor": export_s / floor,
        "peak_rss_mb": peak / 2**20, "tf_rss_mb": tf_rss / 2**20,
        "memory_budget_mb": (tf_rss + 2 * model_bytes) / 2**20,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | params | K | naive (s) | backfill, validated (s) | of which export (s) | validation (s) "
        "| publish (s) "
        "| floor (s) | backfill vs naive | export vs floor | steady export vs floor | worker peak RSS (MB) "
        "| TF-only RSS + 2 x model (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M ({r['model_mb']:.0f} MB) | {r['k']} | {r['naive_s']:.1f} | "
            f"{r['backfill_s']:.1f} | {r['export_s']:.2f} | {r['validate_s']:.2f} | {r['publish_s']:.2f} | "
            f"{r['floor_s']:.2f} | **{r['speedup_vs_naive']:.1f}x faster** | **{r['export_vs_floor']:.2f}x** | "
            f"{r['export_steady_s'] / r['floor_s']:.2f}x | {r['peak_rss_mb']:.0f} | {r['memory_budget_mb']:.0f} |")
    return "\n".join(lines)


def write_results(text: str, path: str, start: str = "<!-- backfill:start -->",
                  end: str = "<!-- backfill:end -->") -> None:
    """Replace the block between ``start`` and ``end`` in ``path`` with ``text`` (appended when absent)."""
    block = f"{start}\n{text}\n{end}"
    old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=20, help="checkpoints per model (default 20)")
    ap.add_argument("--models", default="small,large", help="comma-separated: small, large")
    ap.add_argument("--workdir", help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-backfill-")
    with open(os.path.join(workdir, "bench_models.py"), "w") as fh:
        fh.write(MODELS)
    env = _env(workdir)
    rows = []
    try:
        for name in args.models.split(","):
            rows.append(bench_model(name.strip(), args.k, workdir, env))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    out = table(rows)
    print(out)
    host = f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    text = (f"## Backfill ({time.strftime('%Y-%m-%d')}, {host}; `python bench/backfill.py`)\n\n{out}\n\n"
            "naive: a fresh process per checkpoint (build, restore, `tf.saved_model.save`). backfill: "
            "`tf-export backfill` end to end, process start-up and the fresh-process validation of every version "
            "included; export = restore + SavedModel write summed over checkpoints; floor: "
            "`tf.train.Checkpoint.write` of the same variables K times in one warm process; steady export: the "
            "checkpoints after the first (which also builds the model and does the one full save), scaled to K. "
            "Goals: small model >= 15x faster than naive; large model export within 2x the floor; worker peak RSS "
            "<= TF-only RSS + 2 x model bytes.\n\n"
            "```json\n" + json.dumps(rows, indent=1) + "\n```")
    if not args.no_write:
        write_results(text, os.path.join(REPO, "bench", "RESULTS.md"))
        print("wrote bench/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
