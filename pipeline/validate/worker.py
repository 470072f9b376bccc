"""Entry point of the fresh validation process: ``python -m tf_export_pipeline.validate.worker DIR --report FILE``.

It loads the SavedModel from disk the way TF Serving does, with nothing of the
exporting process in memory: the meta graph tagged ``serve`` imported into a
Session of its own, its restore op and its init op (tables, assets) run, each
signature run by the tensor names of its SignatureDef. It checks the serving
signature, runs every signature on the samples, times the model against the
reference version (loaded the same way, in the same process; see
:mod:`tf_export_pipeline.validate.latency`) and writes a JSON report. Exit
status 0 whether or not the model passed; the report says which.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

import numpy as np

from tf_export_pipeline.export import sample_inputs
from tf_export_pipeline.export.examples import check_example_signature
from tf_export_pipeline.layout import ASSETS_EXTRA, PREDICT_METHOD, SAVED_MODEL_PB, SERVE_TAG, SERVING_KEY, WARMUP_FILE
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
from tf_export_pipeline.validate import LOADER
from tf_export_pipeline.validate.latency import DEFAULT_ROUNDS, measure_latency
from tf_export_pipeline.validate.parity import compare_outputs
from tf_export_pipeline.validate.signatures import signatures_from_bytes, tag_sets_from_bytes
from tf_export_pipeline.validate.warmup import read_warmup


class _Checks:
    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append({"name": name, "ok": bool(ok), "detail": detail})
        return ok

    def first_failure(self) -> str | None:
        for item in self.items:
            if not item["ok"]:
                return item["detail"] or item["name"]
        return None


def _text(err: BaseException) -> str:
    """An error on one line, without the "Graph execution error:" every failed Session run starts with."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text.removeprefix('Graph execution error: ')[:240]}"


_NOT_LOADED = "SavedModel does not load as TF Serving loads it"


class _LoadFailed(Exception):
    pass


class _ServeGraph:
    """The ``serve`` meta graph in a Session, loaded step by step as TF Serving's SavedModel loader does:
    import the graph, run the restore op on ``variables/``, run the init op with the asset paths fed.

    Each step that fails raises :class:`_LoadFailed` naming it. ``signature_defs`` are those of the
    meta graph, ``__*`` keys (the TF2 init op) left out; :meth:`run` runs one by its tensor names.
    """

    def __init__(self, tf, path: str):
        from tensorflow.python.saved_model import loader_impl

        self._graph = tf.Graph()
        self._session = tf.compat.v1.Session(graph=self._graph)
        try:
            with self._graph.as_default():
                try:
                    loader = loader_impl.SavedModelLoader(path)
                    saver, _ = loader.load_graph(self._graph, [SERVE_TAG])
                except Exception as err:
                    raise _LoadFailed(f"the meta graph tagged '{SERVE_TAG}' does not import ({_text(err)})") from err
                try:
                    loader.restore_variables(self._session, saver)
                except Exception as err:
                    raise _LoadFailed(f"its restore op failed on variables/ ({_text(err)})") from err
                try:
                    loader.run_init_ops(self._session, [SERVE_TAG])
                except Exception as err:
                    raise _LoadFailed(f"its init op (tables, assets) failed ({_text(err)})") from err
            meta = loader.get_meta_graph_def_from_tags([SERVE_TAG])
        except BaseException:
            self.close()
            raise
        self.signature_defs = {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}

    def run(self, key: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Signature ``key`` on ``feeds`` (its input names to arrays): its outputs by name, as TF Serving's
        Predict runs it, feeding and fetching the tensor names of the SignatureDef."""
        sig = self.signature_defs[key]
        for kind, infos in (("input", sig.inputs), ("output", sig.outputs)):
            for name, info in infos.items():
                if info.WhichOneof("encoding") != "name":
                    raise ValueError(f"{kind} '{name}' is not a dense tensor (TF Serving runs tensors by name)")
        fetches = {name: info.name for name, info in sig.outputs.items()}
        feed_dict = {info.name: feeds[name] for name, info in sig.inputs.items()}
        return self._session.run(fetches, feed_dict=feed_dict)

    def close(self) -> None:
        self._session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _tensor_specs(tf, sig) -> dict:
    """The inputs of a SignatureDef as TensorSpecs (for generated samples), by input name."""
    specs = {}
    for name, info in sig.inputs.items():
        shape = None if info.tensor_shape.unknown_rank else [d.size if d.size >= 0 else None
                                                            for d in info.tensor_shape.dim]
        specs[name] = tf.TensorSpec(shape, tf.as_dtype(info.dtype), name=name)
    return specs


def _nonconforming(tf, sig, outputs: dict) -> list[str]:
    """Outputs whose dtype or shape is not the one their SignatureDef declares (what clients are told)."""
    problems = []
    for name, info in sorted(sig.outputs.items()):
        value = np.asarray(outputs[name])
        want = tf.as_dtype(info.dtype)
        dtype_ok = value.dtype.kind in "OSU" if want == tf.string else value.dtype == want.as_numpy_dtype
        dims = None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]
        shape_ok = dims is None or (len(dims) == value.ndim and all(d < 0 or d == n for d, n in zip(dims, value.shape)))
        if not (dtype_ok and shape_ok):
            shown = "?" if dims is None else dims
            problems.append(f"output '{name}' is {value.dtype.name} {list(value.shape)}, its SignatureDef says "
                            f"{want.name} {shown}")
    return problems


def _non_finite(outputs: dict) -> list[str]:
    return [k for k, v in outputs.items() if np.asarray(v).dtype.kind in "fc" and not np.all(np.isfinite(v))]


def _batch(inputs: dict) -> int:
    return len(next(iter(inputs.values())))


def run(path: str, samples: str | None, expected: str | None, rtol: float, atol: float,
        timing: dict | None = None) -> dict:
    """Check the SavedModel at ``path``; with ``timing`` ({"reference": path or None, "rounds",
    "max_ratio"}), time it (against the reference version when one is given) once every check passed."""
    checks = _Checks()
    report: dict = {"saved_model": path, "loader": LOADER, "checks": checks.items}

    def done() -> dict:
        reason = checks.first_failure()
        report["ok"] = reason is None
        if reason:
            report["reason"] = reason
        return report

    pb = os.path.join(path, SAVED_MODEL_PB)
    if not checks.add("saved_model_pb", os.path.isfile(pb), "" if os.path.isfile(pb) else "saved_model.pb is missing"):
        return done()
    try:
        with open(pb, "rb") as fh:
            data = fh.read()
        tag_sets = tag_sets_from_bytes(data)
    except Exception as err:  # a truncated or foreign protobuf
        checks.add("parse_saved_model", False, f"saved_model.pb does not parse ({type(err).__name__})")
        return done()
    # TF Serving loads the meta graph of exactly this tag-set; tf.saved_model.load would take another.
    if not any(set(tags) == {SERVE_TAG} for tags in tag_sets):
        checks.add("load_as_tf_serving", False, f"{_NOT_LOADED}: no meta graph tagged '{SERVE_TAG}' "
                                                f"(tag-sets found: {tag_sets or 'none'})")
        return done()
    sigs = signatures_from_bytes(data)
    report["signatures"] = sigs
    serving = sigs.get(SERVING_KEY)
    if not checks.add("serving_default_present", serving is not None,
                      "" if serving else f"no '{SERVING_KEY}' signature (found: {sorted(sigs) or 'none'})"):
        return done()
    assert serving is not None  # the check above returned otherwise
    valid = serving["method"] == PREDICT_METHOD and serving["inputs"] and serving["outputs"]
    if not checks.add("predict_signature", bool(valid),
                      "" if valid else f"'{SERVING_KEY}' is not a valid Predict signature "
                      f"(method {serving['method']!r}, {len(serving['inputs'])} inputs, "
                      f"{len(serving['outputs'])} outputs)"):
        return done()

    tf = import_tensorflow_quietly()
    try:
        model = _ServeGraph(tf, path)
    except _LoadFailed as err:
        checks.add("load_as_tf_serving", False, f"{_NOT_LOADED}: {err}")
        return done()
    with model:
        checks.add("load_as_tf_serving", True, f"tag {SERVE_TAG}, {len(model.signature_defs)} signatures")
        inputs = _run_signatures(tf, model, path, samples, expected, rtol, atol, checks, report)
        if timing is not None and inputs is not None and checks.first_failure() is None:
            report["latency"] = _time_against_reference(tf, model, inputs, timing)
    return done()


# The reference version stays loaded between requests of a long-lived worker (a backfill compares every
# checkpoint with the same version): one path, one Session.
_REFERENCE: dict[str, _ServeGraph] = {}


def _reference_graph(tf, path: str) -> _ServeGraph:
    if path not in _REFERENCE:
        for old in _REFERENCE.values():
            old.close()
        _REFERENCE.clear()
        _REFERENCE[path] = _ServeGraph(tf, path)
    return _REFERENCE[path]


def _time_against_reference(tf, model: _ServeGraph, inputs: dict, timing: dict) -> dict:
    """Latency figures of ``model`` (see :func:`measure_latency`), against the reference when it loads and
    takes the samples; otherwise the candidate's alone, with a ``note`` saying why nothing was compared."""
    note = None
    reference_run = None
    path = timing.get("reference")
    load_seconds = None
    if path:
        started = time.monotonic()
        try:
            reference = _reference_graph(tf, path)
            load_seconds = round(time.monotonic() - started, 3)
            if SERVING_KEY not in reference.signature_defs:
                raise ValueError(f"it has no '{SERVING_KEY}' signature")
            reference_run = functools.partial(reference.run, SERVING_KEY)
            reference_run(inputs)
        except Exception as err:  # removed by retention meanwhile, or inputs changed (an allowed breaking change)
            note = f"reference version not timed: {err if isinstance(err, _LoadFailed) else _text(err)}"
            reference_run = None
    figures = measure_latency(functools.partial(model.run, SERVING_KEY), reference_run, inputs,
                              rounds=int(timing.get("rounds") or DEFAULT_ROUNDS), max_ratio=timing.get("max_ratio"))
    if note:
        figures["note"] = note
    # 0 when a long-lived worker still held the reference from an earlier request
    figures["reference_load_seconds"] = load_seconds
    return figures


def _run_signatures(tf, model: _ServeGraph, path: str, samples: str | None, expected: str | None,
                    rtol: float, atol: float, checks: _Checks, report: dict) -> dict | None:
    """The signature checks; the sample inputs, or None when serving_default could not run them."""
    serving = model.signature_defs[SERVING_KEY]
    specs = _tensor_specs(tf, serving)
    if samples:
        with np.load(samples, allow_pickle=False) as data:
            inputs = {k: data[k] for k in data.files}
    else:
        inputs = sample_inputs([specs[k] for k in sorted(specs)])
    missing = sorted(set(specs) - set(inputs))
    if not checks.add("sample_inputs", not missing, f"samples lack inputs {missing}" if missing else ""):
        return None
    try:
        outputs = model.run(SERVING_KEY, inputs)
    except Exception as err:
        checks.add("smoke_inference", False, f"signature '{SERVING_KEY}' failed to run ({_text(err)})")
        return None
    problems = _nonconforming(tf, serving, outputs)
    if not checks.add("smoke_inference", not problems,
                      f"signature '{SERVING_KEY}' {'; '.join(problems)}" if problems else f"batch of {_batch(inputs)}"):
        return None
    bad = _non_finite(outputs)
    checks.add("finite_outputs", not bad, f"non-finite values in output(s) {bad}" if bad else "")
    warmup = os.path.join(path, ASSETS_EXTRA, WARMUP_FILE)
    if os.path.exists(warmup):
        try:
            logs = read_warmup(warmup)
            mismatched = [i for i, log in enumerate(logs)
                          if set(log.predict_log.request.inputs) != set(specs)]
            checks.add("warmup_records", bool(logs) and not mismatched,
                       f"{len(logs)} PredictionLog records" if logs and not mismatched else
                       f"warmup records do not match the inputs of '{SERVING_KEY}' (records {mismatched or 'none'})")
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

    runners = {key: functools.partial(model.run, key) for key in model.signature_defs}
    # A tf.Example-parsing signature must give serving_default's outputs for the same samples.
    example_key = check_example_signature(runners, path, inputs, outputs, checks.add, rtol, atol)
    # TF Serving serves every signature, so each must run; the samples are serving_default's and feed
    # another only when its inputs have the same names.
    for key in sorted(set(model.signature_defs) - {SERVING_KEY, example_key}):
        sig = model.signature_defs[key]
        lacking = sorted(set(sig.inputs) - set(inputs))
        if lacking:
            checks.add(f"run_signature_{key}", True, f"not run: the samples lack its input(s) {lacking}")
            continue
        try:
            got = model.run(key, inputs)
        except Exception as err:
            checks.add(f"run_signature_{key}", False, f"signature '{key}' failed to run ({_text(err)})")
            continue
        problems = _nonconforming(tf, sig, got)
        bad = _non_finite(got)
        if bad:
            problems.append(f"non-finite values in output(s) {bad}")
        checks.add(f"run_signature_{key}", not problems,
                   f"signature '{key}' {'; '.join(problems)}" if problems else f"batch of {_batch(inputs)}")
    return inputs


def _run_safely(path, samples, expected, rtol, atol, timing=None) -> dict:
    try:
        return run(path, samples, expected, rtol, atol, timing)
    except Exception as err:
        traceback.print_exc()
        return {"ok": False, "saved_model": path, "loader": LOADER,
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
                             req.get("rtol", 1e-5), req.get("atol", 1e-6), req.get("timing"))
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
    parser.add_argument("--timing", help="JSON: {\"reference\": DIR or null, \"rounds\": N, \"max_ratio\": R}")
    args = parser.parse_args(argv)

    import_tensorflow_quietly()
    report = _run_safely(args.saved_model, args.samples, args.expected, args.rtol, args.atol,
                         json.loads(args.timing) if args.timing else None)
    with open(args.report, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: TensorFlow's atexit work costs most of a second per process and the
    # report is already written and closed.
    os._exit(code)
