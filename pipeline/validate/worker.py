"""Entry point of the fresh validation process: ``python -m tf_export_pipeline.validate.worker DIR --report FILE``.

It loads the SavedModel from disk with nothing of the exporting process in
memory, checks the serving signature, runs a smoke inference and writes a JSON
report. Exit status 0 whether or not the model passed; the report says which.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import numpy as np

from tf_export_pipeline.export import sample_inputs
from tf_export_pipeline.export.examples import check_example_signature
from tf_export_pipeline.layout import ASSETS_EXTRA, PREDICT_METHOD, SAVED_MODEL_PB, SERVING_KEY, WARMUP_FILE
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
from tf_export_pipeline.validate.parity import compare_outputs
from tf_export_pipeline.validate.signatures import signatures_of
from tf_export_pipeline.validate.warmup import read_warmup


class _Checks:
    def __init__(self):
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append({"name": name, "ok": bool(ok), "detail": detail})
        return ok

    def first_failure(self) -> str | None:
        for item in self.items:
            if not item["ok"]:
                return item["detail"] or item["name"]
        return None


def run(path: str, samples: str | None, expected: str | None, rtol: float, atol: float) -> dict:
    checks = _Checks()
    report: dict = {"saved_model": path, "checks": checks.items}

    def done() -> dict:
        reason = checks.first_failure()
        report["ok"] = reason is None
        if reason:
            report["reason"] = reason
        return report

    if not checks.add("saved_model_pb", os.path.isfile(os.path.join(path, SAVED_MODEL_PB)),
                      "" if os.path.isfile(os.path.join(path, SAVED_MODEL_PB)) else "saved_model.pb is missing"):
        return done()
    try:
        sigs = signatures_of(path)
    except Exception as err:  # a truncated or foreign protobuf
        checks.add("parse_saved_model", False, f"saved_model.pb does not parse ({type(err).__name__})")
        return done()
    report["signatures"] = sigs
    serving = sigs.get(SERVING_KEY)
    if not checks.add("serving_default_present", serving is not None,
                      "" if serving else f"no '{SERVING_KEY}' signature (found: {sorted(sigs) or 'none'})"):
        return done()
    valid = serving["method"] == PREDICT_METHOD and serving["inputs"] and serving["outputs"]
    if not checks.add("predict_signature", bool(valid),
                      "" if valid else f"'{SERVING_KEY}' is not a valid Predict signature "
                      f"(method {serving['method']!r}, {len(serving['inputs'])} inputs, "
                      f"{len(serving['outputs'])} outputs)"):
        return done()


    tf = import_tensorflow_quietly()
    try:
        loaded = tf.saved_model.load(path)
        fn = loaded.signatures[SERVING_KEY]
    except Exception as err:
        text = " ".join(str(err).split())[:240]
        checks.add("fresh_process_load", False, f"SavedModel does not load ({type(err).__name__}: {text})")
        return done()
    checks.add("fresh_process_load", True)

    _args, kw_specs = fn.structured_input_signature
    if samples:
        with np.load(samples, allow_pickle=False) as data:
            inputs = {k: data[k] for k in data.files}
    else:

        inputs = sample_inputs([kw_specs[k] for k in sorted(kw_specs)])
    missing = sorted(set(kw_specs) - set(inputs))
    if not checks.add("sample_inputs", not missing, f"samples lack inputs {missing}" if missing else ""):
        return done()
    try:
        outputs = fn(**{k: tf.constant(inputs[k], dtype=kw_specs[k].dtype) for k in kw_specs})
    except Exception as err:
        text = " ".join(str(err).split())[:240]
        checks.add("smoke_inference", False, f"inference failed ({type(err).__name__}: {text})")
        return done()
    outputs = {k: v.numpy() for k, v in outputs.items()}
    checks.add("smoke_inference", True, f"batch of {len(next(iter(inputs.values())))}")
    bad = [k for k, v in outputs.items() if v.dtype.kind in "fc" and not np.all(np.isfinite(v))]
    checks.add("finite_outputs", not bad, f"non-finite values in output(s) {bad}" if bad else "")
    warmup = os.path.join(path, ASSETS_EXTRA, WARMUP_FILE)
    if os.path.exists(warmup):
        try:

            logs = read_warmup(warmup)
            bad = [i for i, log in enumerate(logs)
                   if set(log.predict_log.request.inputs) != set(kw_specs)]
            checks.add("warmup_records", bool(logs) and not bad,
                       f"{len(logs)} PredictionLog records" if logs and not bad else
                       f"warmup records do not match the inputs of '{SERVING_KEY}' (records {bad or 'none'})")
        except Exception as err:
            checks.add("warmup_records", False, f"warmup file does not parse ({type(err).__name__})")
    if expected:
        with np.load(expected, allow_pickle=False) as data:
            want = {k: data[k] for k in data.files}
        mismatches, diffs = compare_outputs(outputs, want, rtol, atol)
        worst = max(diffs.values(), default=0.0)
        problems = [f"output '{name}' {why}" if why != "values" else
                    f"output '{name}' differs from the restored checkpoint by up to {diffs[name]:.3g}"
                    f" (rtol={rtol}, atol={atol})" for name, why in mismatches.items()]
        report["parity_max_abs_diff"] = worst
        checks.add("parity_with_checkpoint", not problems, "; ".join(problems))

    # A tf.Example-parsing signature must give serving_default's outputs for the same samples.
    check_example_signature(loaded, path, inputs, outputs, checks.add, rtol, atol)
    return done()


def _run_safely(path, samples, expected, rtol, atol) -> dict:
    try:
        return run(path, samples, expected, rtol, atol)
    except Exception as err:
        traceback.print_exc()
        return {"ok": False, "saved_model": path,
                "reason": f"validation crashed ({type(err).__name__}: {str(err)[:200]})", "checks": []}


def serve() -> int:
    """Validate one SavedModel per JSON request line on stdin; answer one line each on stdout.

    Used by backfills: one process loads each version in turn, from disk, with
    nothing of the exporting process in memory, and pays for Python and the
    TensorFlow import once.
    """

    import_tensorflow_quietly()
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the channel
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        report = _run_safely(req["saved_model"], req.get("samples"), req.get("expected"),
                             req.get("rtol", 1e-5), req.get("atol", 1e-6))
        print(json.dumps(report), file=out, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["--serve"]:
        return serve()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("saved_model")
    parser.add_argument("--report", required=True)
    parser.add_argument("--samples")
    parser.add_argument("--expected")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-6)
    args = parser.parse_args(argv)

    import_tensorflow_quietly()
    report = _run_safely(args.saved_model, args.samples, args.expected, args.rtol, args.atol)
    with open(args.report, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
