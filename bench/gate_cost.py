"""What the performance gate adds to a publish: validation with the gate beside validation alone, in one run.

For each reference model of ``bench/backfill.py`` (small: ~1M parameters; large: ~50M, ~200 MB) it
publishes two checkpoints with the gate off (``validation.max_latency_ratio: null``), then validates the
newer version, REPEAT times each, in a fresh validation process as ``tf-export run`` does:

1. alone: the checks without timing (the baseline);
2. gated: the same checks, then the reference version loaded beside it and both timed in
   interleaved rounds (``validation.latency_rounds``, 30 by default).

The gate's cost per publish is the difference of the medians. The backfill path validates many
versions in one long-lived process that keeps the reference loaded: its cost per checkpoint is the
mean over validations after the first, against the same process validating without the gate.

    python bench/gate_cost.py                  # both models, REPEAT=3; writes bench/RESULTS.md
    python bench/gate_cost.py --models small --repeat 2 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backfill import MODELS, REPO, WRITE_CHECKPOINTS, _env, _run, write_results  # noqa: E402

START, END = "<!-- gate-cost:begin -->", "<!-- gate-cost:end -->"
SESSION_RUNS = 6


def _published(name: str, workdir: str, env: dict) -> tuple[str, str]:
    """Two versions of model ``name`` published with the gate off: (reference dir, candidate dir)."""
    base = os.path.join(workdir, name)
    os.makedirs(base, exist_ok=True)
    _run([sys.executable, "-c", WRITE_CHECKPOINTS, name, os.path.join(base, "train"), "2"], env)
    config = os.path.join(base, "export.yaml")
    with open(config, "w") as fh:
        json.dump({"training_dir": "./train", "export_base": "./serving", "model": {"factory": f"bench_models:{name}"},
                   "versioning": "step", "validation": {"max_latency_ratio": None}}, fh)
    _run([sys.executable, "-m", "tf_export_pipeline", "backfill", "--config", config, "--json"], env)
    serving = os.path.join(base, "serving")
    older, newer = sorted((n for n in os.listdir(serving) if n.isdigit()), key=int)
    return os.path.join(serving, older), os.path.join(serving, newer)


def _seconds(fn) -> float:
    started = time.perf_counter()
    report = fn()
    assert report.get("ok") or report.get("latency"), report.get("reason")
    return time.perf_counter() - started


def bench_model(name: str, workdir: str, env: dict, repeat: int) -> dict:
    from tf_export_pipeline.config import ValidationConfig
    from tf_export_pipeline.validate import ValidationSession, validate_saved_model
    from tf_export_pipeline.validate.performance import timing_request

    print(f"[{name}] publishing two versions", file=sys.stderr, flush=True)
    reference, candidate = _published(name, workdir, env)
    gate = ValidationConfig()
    timing = timing_request(gate, reference)
    alone, gated, figures = [], [], {}
    print(f"[{name}] {repeat} x (fresh validation alone, then gated)", file=sys.stderr, flush=True)
    for _ in range(repeat):
        alone.append(_seconds(lambda: validate_saved_model(candidate, timeout=900)))

        def with_gate():
            report = validate_saved_model(candidate, timeout=900, timing=timing)
            figures.update(report["latency"])
            return report

        gated.append(_seconds(with_gate))
    print(f"[{name}] one long-lived process, {SESSION_RUNS} validations each way", file=sys.stderr, flush=True)
    session_times = {}
    for label, timing_of in (("alone", None), ("gated", timing)):
        with ValidationSession() as session:
            def once(session=session, timing_of=timing_of):
                return session.validate(candidate, timeout=900, timing=timing_of)

            once()  # start-up and the reference's load
            runs = [_seconds(once) for _ in range(SESSION_RUNS - 1)]
        session_times[label] = statistics.mean(runs)
    fresh_alone, fresh_gated = statistics.median(alone), statistics.median(gated)
    return {"model": name, "repeat": repeat, "rounds": figures.get("rounds"),
            "reference_load_s": figures.get("reference_load_seconds"),
            "median_ms": {label: f["median"] for label, f in (figures.get("candidate") or {}).items()},
            "latency_ratio_same_weights_family": figures.get("latency_ratio"),
            "fresh_alone_s": fresh_alone, "fresh_gated_s": fresh_gated, "fresh_added_s": fresh_gated - fresh_alone,
            "fresh_ratio": fresh_gated / fresh_alone,
            "session_alone_s": session_times["alone"], "session_gated_s": session_times["gated"],
            "session_added_s": session_times["gated"] - session_times["alone"],
            "session_ratio": session_times["gated"] / session_times["alone"]}


def table(rows: list[dict]) -> str:
    lines = ["| model | validation alone (s) | with the gate (s) | gate adds (s) | ratio | reference load (s) "
             "| backfill: alone per version (s) | backfill: gated (s) | gate adds (s) | ratio | medians (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        medians = ", ".join(f"{k.replace('_', ' ')}: {v:.3g}" for k, v in r["median_ms"].items())
        lines.append(f"| {r['model']} | {r['fresh_alone_s']:.2f} | {r['fresh_gated_s']:.2f} | "
                     f"**{r['fresh_added_s']:.2f}** | {r['fresh_ratio']:.2f}x | {r['reference_load_s'] or 0:.2f} | "
                     f"{r['session_alone_s']:.2f} | {r['session_gated_s']:.2f} | **{r['session_added_s']:.2f}** | "
                     f"{r['session_ratio']:.2f}x | {medians} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,large", help="comma-separated: small, large")
    ap.add_argument("--repeat", type=int, default=3, help="fresh validations of each kind (default 3)")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-gate-")
    with open(os.path.join(workdir, "bench_models.py"), "w") as fh:
        fh.write(MODELS)
    env = _env(workdir)
    os.environ.update({"PYTHONPATH": env["PYTHONPATH"], "TF_CPP_MIN_LOG_LEVEL": "2"})
    try:
        rows = [bench_model(name.strip(), workdir, env, args.repeat) for name in args.models.split(",")]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = table(rows)
    print(out)
    host = f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    text = (f"## The performance gate's cost per publish ({time.strftime('%Y-%m-%d')}, {host}; "
            "`python bench/gate_cost.py`)\n\n" + out + "\n\n"
            "validation alone: a fresh validation process (TensorFlow import, the load as TF Serving loads, every "
            "check), median of the repeats; with the gate: the same, plus the reference version loaded in the "
            "same process and both timed over interleaved rounds of the sample batch and of a batch of one. "
            "backfill: one long-lived validation process (as `tf-export backfill` uses), mean over the versions "
            "after the first; with the gate it keeps the reference loaded, so only the timing is added.\n\n"
            "```json\n" + json.dumps(rows, indent=1) + "\n```")
    if not args.no_write:
        write_results(text, os.path.join(REPO, "bench", "RESULTS.md"), START, END)
        print("wrote bench/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
