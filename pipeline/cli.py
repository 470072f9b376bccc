"""``tf-export``: the export pipeline from a command line, no Airflow needed.

Example::

    tf-export demo --workdir /tmp/tf-export-demo
    tf-export run --config /tmp/tf-export-demo/export.yaml --json
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from tf_export_pipeline import __version__, redaction, runs
from tf_export_pipeline.backfill import BackfillInterrupted, backfill, backfill_versioning, pending_for_backfill
from tf_export_pipeline.config import ValidationConfig, load_config
from tf_export_pipeline.demo import SERVING, train, write_config
from tf_export_pipeline.errors import ConfigError, ExportError, PipelineError
from tf_export_pipeline.layout import SAVED_MODEL_PB, VERSIONINGS
from tf_export_pipeline.predict import format_outputs, predict, resolve_target, to_json
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
from tf_export_pipeline.redaction import redact
from tf_export_pipeline.serving import ServingControl, newest_advice
from tf_export_pipeline.stages import discover, finish_cut_short, public, run_once, stage_prune, status
from tf_export_pipeline.storage import open_storage
from tf_export_pipeline.validate import check_signatures, format_report, signatures_of, validate_saved_model
from tf_export_pipeline.validate.performance import apply_performance_gate, local_sizes, timing_request

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Turn TensorFlow checkpoints into TensorFlow Serving versions, safely.

Each export restores a checkpoint, writes a SavedModel into a staging directory
beside the versions (temp-..., which TF Serving ignores), validates it in a fresh
process, claims a version number with a create-only write and renames staging
into <export_base>/<version>/ in one step. An integer-named directory appears
only when it is complete; each checkpoint is published once per model config.

Exit status: 0 success (published, skipped, gated or nothing new; once published,
later problems are warnings), 1 a pipeline failure (nothing was published), 2 a
usage or config error (no retry mends it), 130 interrupted."""

EPILOG = "Run 'tf-export COMMAND --help' for the options of a command."


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("--config", "-c", required=config_required, metavar="PATH",
                   help="YAML config (paths in it are relative to the file)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and TensorFlow's logs")


def _allow_regression(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-regression", action="store_true",
                   help="publish even when the model is more than validation.max_size_ratio times the reference "
                        "version's size or validation.max_latency_ratio times its median latency (the reference: "
                        "stable, else the highest version); validation.max_graph_bytes still holds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tf-export", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    parser.add_argument("--version", action="version", version=f"tf-export {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("discover", help="list checkpoints and the version each was exported to",
                       description="List the checkpoints in training_dir: prefix, step, written-at time, whether "
                                   "complete, and the version each was exported to under this config (or none).")
    _common(p)

    p = sub.add_parser("run", help="export the newest unexported checkpoint",
                       description="Export the newest complete checkpoint that has no version yet (or the one "
                                   "named): export into staging, validate, publish, prune. Rerunning is safe: an "
                                   "exported checkpoint reports 'skipped' with its version.")
    _common(p)
    p.add_argument("--checkpoint", metavar="PREFIX", help="a checkpoint prefix, its base name (ckpt-300) or its step")
    p.add_argument("--versioning", choices=VERSIONINGS,
                   help="override the config's version numbering for this run")
    p.add_argument("--force", action="store_true",
                   help="publish even when the metric gate finds the checkpoint worse than the live version")
    p.add_argument("--allow-outrank", action="store_true",
                   help="publish even when the version would break training order (an older checkpoint above "
                        "a newer one, or a newer one below an older one); refused by default")
    _allow_regression(p)

    p = sub.add_parser("backfill", help="export every unexported checkpoint in a step range",
                       description="Export every complete checkpoint in the range that has no version for this "
                                   "config yet, oldest first, with a progress bar on stderr. Versions are numbered "
                                   "by the config's versioning, except that 'timestamp' becomes checkpoint_time "
                                   "(checkpoint write time), so a backfill never serves an old model above the "
                                   "live one. Retention is not applied, and a backfill whose versions "
                                   "the next run's retention would remove is refused up front, naming the "
                                   "retention.keep it needs. Checkpoints whose versions retention removed are "
                                   "left out unless --include-removed.")
    _common(p)
    p.add_argument("--from-step", type=int, metavar="N", help="first step (inclusive)")
    p.add_argument("--to-step", type=int, metavar="M", help="last step (inclusive)")
    p.add_argument("--versioning", choices=VERSIONINGS,
                   help="version numbering (default: the config's; checkpoint_time where it is timestamp); one "
                        "whose numbers are of another unit than the live version's (steps beside seconds) is "
                        "refused unless --allow-outrank")
    p.add_argument("--allow-outrank", action="store_true",
                   help="publish even when a version would break training order (an older checkpoint above a "
                        "newer one), or mix units of numbering; refused by default")
    p.add_argument("--include-removed", action="store_true",
                   help="also export checkpoints whose versions retention removed (discover marks them 'removed')")
    _allow_regression(p)
    p.add_argument("--jobs", "-j", type=int, default=1, metavar="K",
                   help="export and validate in K worker processes, each with its own model (default: 1); "
                        "versions are published in checkpoint order")

    p = sub.add_parser("status", help="list published versions and the one TF Serving serves",
                       description="List the published versions with the checkpoint and step each came from, "
                                   "and the one TF Serving serves: the highest, or with a serving: section what "
                                   "the model config file says (the highest version its entry lists, the "
                                   "highest under a latest entry, none without an entry).")
    _common(p)

    p = sub.add_parser("check-storage", help="check what the export base's store guarantees",
                       description="Probe the export base's store: a create-only write of a name that exists "
                                   "must be refused (a server that ignores the condition is refused), and say "
                                   "whether a version becomes visible to TF Serving in one step (a rename) or "
                                   "object by object (then serve it through the model config file). Writes the "
                                   "verdict to _exports/storage-check.json. Exit 0 when every guarantee holds, "
                                   "2 when one is missing.")
    _common(p)

    p = sub.add_parser("validate", help="validate a SavedModel directory",
                       description="Load a SavedModel in a fresh process, check its serving_default Predict "
                                   "signature and run a smoke inference; with --config also check the signature "
                                   "contract (validation.contract); with --against, diff the signatures against "
                                   "another version. Prints the report.")
    _common(p, config_required=False)
    p.add_argument("path", metavar="PATH", help="SavedModel directory (local)")
    p.add_argument("--against", metavar="VERSION_DIR",
                   help="also diff the signatures against this SavedModel (breaking changes fail "
                        "unless the config's validation.allow_breaking is true), compare the sizes "
                        "(validation.max_size_ratio) and time both (validation.max_latency_ratio)")
    _allow_regression(p)

    p = sub.add_parser("gc", help="apply retention and remove abandoned staging",
                       description="Keep the newest retention.keep versions, every pinned one, the live one and "
                                   "every version the serving config names; remove staging whose lease "
                                   "(retention.lease_seconds, default one day) has run out and that no ledger entry "
                                   "needs, and claims of publishes that died before their commit. Safe to run at "
                                   "any time, beside runs and other gc's.")
    _common(p)
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")

    p = sub.add_parser("labels", help="show the model's entry in TF Serving's model config file",
                       description="Show the versions the model config file (serving.model_config_file) lists "
                                   "for this model, its labels (stable, canary), the checkpoint each came from, "
                                   "and the version 'rollback' would return to.")
    _common(p)

    p = sub.add_parser("promote", help="point a label (default: stable) at a version",
                       description="Point a label at a published version in TF Serving's model config file. "
                                   "TF Serving lets a label point only at a version it has loaded, so the version "
                                   "is listed first, and the label moves after serving.reload_seconds plus a "
                                   "margin (at once with --now). Needs serving.policy: labels.")
    _common(p)
    p.add_argument("version", type=int, metavar="VERSION", help="a published version")
    p.add_argument("--label", default="stable", help="label to move (default: %(default)s)")
    p.add_argument("--now", action="store_true", help="do not wait for the server to load the version")

    p = sub.add_parser("rollback", help="move stable back to the previous stable version",
                       description="Move the stable label back to the stable version before it (from the "
                                   "history; versions rolled back from are skipped), or to --to VERSION.")
    _common(p)
    p.add_argument("--to", type=int, metavar="VERSION", help="the version to make stable")
    p.add_argument("--now", action="store_true", help="do not wait for the server to load the version")

    p = sub.add_parser("history", help="every change of the model config file's entry",
                       description="Every write of this model's entry in the model config file: when, by "
                                   "which command, which versions were listed and labelled before and after.")
    _common(p)

    p = sub.add_parser("lineage", help="where a version came from: checkpoint, config, validation, run",
                       description="Everything behind a version: the checkpoint (path, step, identity, when it "
                                   "was written), the config (hash, file), the validation report in brief, the "
                                   "run that made it (Airflow DAG, run, task and try, or host, user and command; "
                                   "with its OpenLineage run id) and its serving history. For a version retention "
                                   "removed, what its removal record keeps.")
    _common(p)
    p.add_argument("version", type=int, metavar="VERSION", help="a version number, published or removed")

    p = sub.add_parser("predict", help="run a signature of a SavedModel on inputs from a file",
                       description="Run a signature of a SavedModel (a directory, or a published version number "
                                   "with --config) and print its outputs, as 'saved_model_cli run' does. --inputs "
                                   "takes an .npz with one array per input (loaded with allow_pickle=False); "
                                   "--examples takes a JSON list of feature dicts and feeds them as serialized "
                                   "tf.Example protos to a parsing signature.")
    _common(p, config_required=False)
    p.add_argument("path", metavar="PATH|VERSION", help="SavedModel directory, or a version number (needs --config)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--inputs", metavar="FILE.npz", help="one array per input of the signature")
    group.add_argument("--examples", metavar="FILE.json", help="a JSON list of feature dicts, sent as tf.Example")
    p.add_argument("--signature", metavar="NAME",
                   help="signature key (default: serving_default; with --examples, the parsing signature)")

    p = sub.add_parser("demo", help="train a tiny model, export it end to end, move its serving labels",
                       description="Train a tiny Keras model for a few steps (two checkpoints), write its "
                                   "config with a serving: section (policy: labels), run the pipeline twice (the "
                                   "second run reports 'skipped'), train a third checkpoint and publish it as "
                                   "canary, promote it to stable, roll back, printing TF Serving's model config "
                                   "file after each step, and show the result.")
    p.add_argument("--workdir", default="tf-export-demo", metavar="DIR", help="where to put it (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and TensorFlow's logs")

    p = sub.add_parser("report", help="write an HTML page of models: versions, labels, last runs, plots",
                       description="Write one self-contained HTML file (styles and Plotly's script inline: it opens "
                                   "with no network) with a section per model: its versions on a time line "
                                   "(published at, checkpoint step, size), the labels, the version served and the "
                                   "version 'rollback' would return to, the last runs' outcomes with their one-line "
                                   "errors (failed, published, skipped, gated; recorded by run, backfill and the "
                                   "Airflow tasks in _exports/runs/), and plots of export duration, SavedModel size "
                                   "and the latency ratio per version. Reads what 'status' reads; writes nothing to "
                                   "the export base. A model whose storage cannot be read shows its error in the "
                                   "page (and a warning on stderr); a config that does not load is refused (exit 2).")
    p.add_argument("--config", "-c", dest="configs", action="append", required=True, metavar="PATH",
                   help="YAML config of a model; repeat for several models (one section each, in this order)")
    p.add_argument("--html", required=True, metavar="OUT", help="the HTML file to write (replaced whole)")
    p.add_argument("--json", action="store_true", help="also print what the page shows as one JSON document")
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks")
    return parser


def _emit(args, data: Any, human: str) -> None:

    if args.json:
        sys.stdout.write(redact(json.dumps(data, indent=1, default=str)) + "\n")
    else:
        print(redact(human))


# Terminal escapes (CSI colours, OSC links, two-byte escapes) and the other control characters: Keras puts
# some in its messages, and they would reach a log file or an Airflow task log as they are.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]")


def _one_line(message: str) -> str:
    """``message`` as plain text on one line."""
    return re.sub(r"\s*\n\s*", " ", _ESCAPES.sub("", message)).strip()


def _error(message: str) -> None:
    """The one line of a failed command, on stderr; never a secret."""

    print(f"tf-export: error: {redact(_one_line(message))}", file=sys.stderr)


def _failed(args, message: str, code: int) -> int:
    """End a failed command: its one line on stderr and, for ``run --json``, its record on stdout, so a
    script that reads the record learns why as well as that nothing was published."""
    message = _one_line(message)
    _error(message)
    if getattr(args, "json", False) and args.command == "run":
        record = {"status": "failed", "version": None, "path": None, "checkpoint": args.checkpoint, "step": None,
                  "error": message, "exit_code": code}
        sys.stdout.write(redact(json.dumps(record, indent=1)) + "\n")
    return code


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*map(str, r)) for r in rows])


def _run_line(r: dict) -> str:
    if r["status"] == "published":
        return f"published version {r['version']} from {r['checkpoint']} (step {r['step']}): {r['path']}"
    if r["status"] == "skipped":
        return f"skipped: {r['checkpoint']} (step {r['step']}) is already version {r['version']}"
    if r["status"] == "gated":
        return (f"gated: {r['checkpoint']} (step {r['step']}) has {r['metric']}={r['value']:g}, worse than "
                f"{r['live_value']:g} of live version {r['live_version']}; not published (--force overrides)")
    if r["status"] == "failed":
        return f"failed: {r.get('error')}"
    return "no new checkpoint: every complete checkpoint already has a version"


def _version_cell(item: dict) -> str:
    if item["version"] is not None:
        return str(item["version"])
    if item.get("removed"):
        return f"removed (was {item['removed']['version']}, {_when(item['removed']['removed_at'])})"
    return "pending (committed)" if item.get("committed") else "none"


def cmd_discover(args, cfg) -> int:

    items = discover(cfg)
    rows = [[i["name"], i["step"], _when(i["written_at"]),
             "yes" if i["complete"] else "NO: missing " + ", ".join(i["missing"]),
             _version_cell(i), i.get("run") or "-"] for i in items]
    _emit(args, items,
          _table(rows, ["CHECKPOINT", "STEP", "WRITTEN", "COMPLETE", "VERSION", "MADE BY"]) if rows
          else "no checkpoints")
    return EXIT_OK


def cmd_run(args, cfg) -> int:

    record = run_once(cfg, checkpoint=args.checkpoint, versioning=args.versioning, force=args.force,
                      allow_outrank=args.allow_outrank, allow_regression=args.allow_regression)
    advice = record.get("serving_advice")
    _emit(args, public(record), _run_line(record) + (f"\nrecommended: {advice}" if advice else ""))
    if record.get("gate_warning"):
        print(f"tf-export: warning: {redact(record['gate_warning'])}", file=sys.stderr)
    if advice:
        print(f"tf-export: warning: {redact(advice)}", file=sys.stderr)
    if record.get("serving_error"):

        print(f"tf-export: warning: published, but its serving label was not set: "
              f"{redact(record['serving_error'])}", file=sys.stderr)
    if record.get("prune_error"):

        print(f"tf-export: warning: published, but retention failed: {redact(record['prune_error'])}",
              file=sys.stderr)
    return EXIT_OK


def cmd_backfill(args, cfg) -> int:

    if args.jobs < 1:  # before any bar is drawn: a usage error is one line
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}: {cfg.source}")
    versioning, note = backfill_versioning(cfg, args.versioning, args.allow_outrank)
    pending = pending_for_backfill(cfg, args.from_step, args.to_step, args.include_removed, args.allow_outrank)
    if note and pending:
        print(f"tf-export: {redact(note)}", file=sys.stderr)
    bar = None
    if pending:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), unit="ckpt", desc="backfill", file=sys.stderr, mininterval=0.5)

    def progress(rec: dict) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"step {rec['step']} {rec['status']}", refresh=False)

    try:
        records = backfill(cfg, args.from_step, args.to_step, versioning=versioning,
                           allow_outrank=args.allow_outrank, progress=progress, jobs=args.jobs,
                           include_removed=args.include_removed, allow_regression=args.allow_regression)
    except BackfillInterrupted as stop:
        if bar is not None:
            bar.close()  # its last state goes out before what follows, never after it
        done = stop.records
        if done or args.json:
            _emit(args, [public(r) | ({"error": r["error"]} if "error" in r else {}) for r in done],
                  "\n".join(_run_line(r) for r in done))
        published = sum(1 for r in done if r["status"] == "published")
        print(f"tf-export: interrupted; {published} version(s) published before it "
              f"{'(listed on stdout) ' if done else ''}stay, the exports it had started were removed; nothing "
              f"partial was published", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    runs.note(records)  # validated in a thread or in worker processes: not seen as stage calls here
    timings_file = os.environ.get("TF_EXPORT_TIMINGS")
    if timings_file:  # per-stage seconds of each checkpoint, for bench/backfill.py
        with open(timings_file, "w", encoding="utf-8") as fh:
            json.dump([{"step": r.get("step"), "status": r["status"], **(r.get("timings") or {})} for r in records], fh)
    out = [public(r) | ({"error": r["error"]} if "error" in r else {}) for r in records]
    human = "\n".join(_run_line(r) for r in records) or "nothing to backfill: every checkpoint in range has a version"
    _emit(args, out, human)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        _error(f"{len(failed)} of {len(records)} checkpoints failed; first: {failed[0]['error']}")
        return EXIT_FAILED
    return EXIT_OK


@contextlib.contextmanager
def _finishing_cut_short(cfg) -> Iterator[list[int]]:
    """Finish promotions cut short before the command reads the export base (see :func:`finish_cut_short`),
    yielding the versions finished. What it did, or a failure to do it (read-only credentials), is said on
    stderr once the command succeeded; a command that fails says only its own one-line error."""
    try:
        finished, problem = finish_cut_short(cfg), None
    except Exception as err:  # noqa: BLE001 - reading the export base must not depend on writing to it
        finished, problem = [], redaction.redact(str(err))
    yield finished
    if problem:
        print(f"tf-export: warning: a promotion cut short could not be finished: {problem}", file=sys.stderr)
    elif finished:
        print(f"tf-export: finished the promotion of version(s) {', '.join(map(str, finished))}, cut short "
              f"earlier (listed without saved_model.pb until now)", file=sys.stderr)


def cmd_status(args, cfg) -> int:
    with _finishing_cut_short(cfg) as finished:
        return _status(args, cfg, finished)


def _status(args, cfg, finished: list[int]) -> int:
    st = status(cfg)
    if finished:
        st["finished"] = finished
    rows = [[v["version"], v["step"], v["checkpoint"] or "(no manifest)", ",".join(v.get("labels") or []) or "-",
             v.get("run") or "-", "<- serving" if v["version"] == st["serving"] else ""] for v in st["versions"]]
    human = (_table(rows, ["VERSION", "STEP", "CHECKPOINT", "LABELS", "MADE BY", ""]) if rows
             else "no published versions") + \
        f"\nexport base: {st['export_base']}"
    served = next((v for v in st["versions"] if v["version"] == st["serving"]), None)
    if served is not None and served.get("size_ratio") is not None:
        human += f"\nsize ratio of version {served['version']} against its reference: {served['size_ratio']:.2f}"
    if served is not None and served.get("latency_ratio") is not None:
        human += (f"\nlatency ratio of version {served['version']} against its reference: "
                  f"{served['latency_ratio']:.2f}")
    if st["removed"]:
        human += (f"\nremoved by retention: {len(st['removed'])} version(s), steps "
                  f"{', '.join(str(r['step']) for r in st['removed'])} (backfill --include-removed exports them again)")
    _emit(args, st, human)
    return EXIT_OK


def cmd_check_storage(args, cfg) -> int:
    from tf_export_pipeline.publish.storage_check import check_storage, record_verdict, refusal

    store = open_storage(cfg.export_base, cfg.storage_options)
    verdict = check_storage(store, cfg.promotion)
    if not verdict.ok:
        raise refusal(verdict)
    record_verdict(store, verdict)
    rows = [[c.guarantee, "yes" if c.ok else "NO", c.detail] for c in verdict.checks]
    visibility = ("one step (an atomic rename): TF Serving may watch the export base's folders" if
                  verdict.one_step_visibility else
                  "object by object: a version folder is listed from its first copied object, so serve through "
                  "the model config file (serving: section), which names a version only once it is whole")
    human = _table(rows, ["GUARANTEE", "HOLDS", "DETAIL"]) + \
        f"\npromotion: {verdict.promotion}\nversions become visible: {visibility}\nexport base: {verdict.url}"
    out = verdict.to_dict()
    advice = None if verdict.one_step_visibility else newest_advice(verdict.promotion, cfg.serving)
    if advice:
        human += f"\nrecommended: {advice}"
        out["recommendation"] = advice
    _emit(args, out, human)
    return EXIT_OK


def cmd_validate(args, cfg) -> int:

    path = os.path.abspath(args.path)
    if not os.path.isdir(path):
        raise ConfigError(f"not a SavedModel directory: {path}")
    gate = cfg.validation if cfg else ValidationConfig()
    against = os.path.abspath(args.against) if args.against else None
    if against and not os.path.isfile(os.path.join(against, SAVED_MODEL_PB)):
        raise ConfigError(f"--against is not a SavedModel directory: {against}")
    report = validate_saved_model(path, timeout=gate.timeout_seconds, timing=timing_request(gate, against))
    name = os.path.basename(against.rstrip("/")) if against else None
    against_version = int(name) if name and name.isdigit() else name
    if report.get("ok") and (against or (cfg and cfg.validation.contract)):

        check_signatures(report, cfg.validation if cfg else None, signatures_of(against) if against else None,
                         against_version)
    if report.get("ok"):
        reference = {"version": against_version, **local_sizes(against)} if against else None
        apply_performance_gate(report, local_sizes(path), reference, gate, args.allow_regression)
    _emit(args, report, format_report(report))
    if not report.get("ok"):
        _error(f"validation failed: {report.get('reason')}: {path}")
        return EXIT_FAILED
    return EXIT_OK


def cmd_gc(args, cfg) -> int:

    result = stage_prune(cfg, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    human = (f"{verb} versions: {result['removed_versions'] or 'none'}\n"
             f"{verb} staging: {result['removed_staging'] or 'none'}")
    _emit(args, result, human)
    return EXIT_OK


def cmd_predict(args, cfg) -> int:
    import shutil
    import tempfile


    scratch = tempfile.mkdtemp(prefix="tf-export-predict-")
    try:
        path = resolve_target(args.path, cfg, scratch)
        name, outputs = predict(path, inputs_file=args.inputs, examples_file=args.examples, signature=args.signature)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _emit(args, to_json(name, outputs), format_outputs(outputs))
    return EXIT_OK


def cmd_demo(args, _cfg) -> int:

    workdir = os.path.abspath(args.workdir)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    train_dir = os.path.join(workdir, "train")
    say(f"[1/7] training a tiny Keras model in {workdir}/train (2 checkpoints)")
    train(train_dir, steps=20, checkpoint_every=10)
    config_path = write_config(workdir, serving=SERVING)
    say(f"[2/7] wrote config {config_path} (serving: labels in {SERVING['model_config_file']})")
    cfg = load_config(config_path)
    control = ServingControl.from_config(cfg)
    steps: list[dict] = []

    def labelled(record: dict) -> dict:
        if record.get("serving_error"):

            raise PipelineError(f"published, but its serving label was not set: {record['serving_error']}")
        return record

    def show(what: str) -> None:
        """The labels and the model config file as TF Serving reads it, after a step."""
        view = control.view()
        with open(cfg.serving.model_config_file, encoding="utf-8") as fh:
            text = fh.read()
        steps.append({"step": what, "labels": view["labels"], "versions": view["versions"], "file": text})
        labels = ", ".join(f"{k}={v}" for k, v in sorted(view["labels"].items())) or "none"
        say(f"      labels: {labels}; listed: {view['versions']}; {cfg.serving.model_config_file}:")
        say("\n".join("        " + line for line in text.rstrip().splitlines()))

    first = labelled(run_once(cfg))
    say(f"[3/7] first run:  {_run_line(first)}")
    if (first.get("labels") or {}).get("stable") == first.get("version"):
        say("      labelled canary, and stable: no version was stable yet")
    show("publish")
    second = run_once(cfg)
    say(f"[4/7] second run: {_run_line(second)}")
    say("[5/7] training 10 more steps, then a third run:")
    train(train_dir, steps=10, checkpoint_every=10)
    third = labelled(run_once(cfg))
    stable = (third.get("labels") or {}).get("stable")
    say(f"      {_run_line(third)}\n      labelled canary; stable stays {stable}")
    show("publish as canary")
    control.promote(third["version"], label="stable")
    say(f"[6/7] tf-export promote {third['version']}: stable -> {third['version']}")
    show("promote")
    back = control.rollback()
    say(f"[7/7] tf-export rollback: stable -> {back['labels_after'].get('stable')} (the previous stable)")
    show("rollback")

    st = status(cfg)
    labels = steps[-1]["labels"]
    result = {"workdir": workdir, "config": config_path, "runs": [public(first), public(second), public(third)],
              "status": st, "model_config_file": cfg.serving.model_config_file, "serving": steps}
    if args.json:
        _emit(args, result, "")
    else:
        rows = [[v["version"], v["step"], v["checkpoint"],
                 ", ".join(sorted(k for k, n in labels.items() if n == v["version"]))] for v in st["versions"]]
        print("\n" + _table(rows, ["VERSION", "STEP", "CHECKPOINT", "LABELS"]))
        print(f"\nExport base (the model's base_path in the model config file): {cfg.export_base}")
        for root, _dirs, files in sorted(os.walk(cfg.export_base)):
            depth = root[len(cfg.export_base):].count(os.sep)
            if depth > 2 or "/_exports/" in root + "/":
                continue
            print("  " * depth + (os.path.basename(root) or root) + "/")
            for f in sorted(files):
                print("  " * (depth + 1) + f)
        print(f"\nServe the labels: tensorflow_model_server --rest_api_port=8501 "
              f"--model_config_file={cfg.serving.model_config_file} --model_config_file_poll_wait_seconds=60")
        print(f"  with serving.reload_seconds: 60 in {config_path} (the demo moves labels at once: no server "
              f"reads its file); clients POST /v1/models/{cfg.serving.model_name}/labels/stable:predict "
              f"(or labels/canary)")
        print(f"\nTry: tf-export status --config {config_path}")
        print(f"     tf-export labels --config {config_path}")
        print(f"     tf-export history --config {config_path}")
    return EXIT_OK


def _labels_line(view: dict) -> str:
    rows = [[label, v, (view["sources"].get(v) or {}).get("checkpoint") or "-",
             (view["sources"].get(v) or {}).get("step")] for label, v in sorted(view["labels"].items())]
    head = (_table(rows, ["LABEL", "VERSION", "CHECKPOINT", "STEP"]) if rows else "no labels") + \
        f"\nlisted versions: {view['versions'] or 'none (' + view['entry_policy'] + ')'}" + \
        f"\nrollback goes to: {view['rollback_to'] if view['rollback_to'] is not None else 'nothing earlier'}" + \
        f"\nmodel config file: {view['file']} (model {view['model']}, policy {view['policy']})"
    return head


def cmd_labels(args, cfg) -> int:

    control = ServingControl.from_config(cfg)  # a config without a serving: section is refused first
    with _finishing_cut_short(cfg):
        view = control.view()
        _emit(args, view, _labels_line(view))
    return EXIT_OK


def _change_line(rec: dict) -> str:
    before, after = rec.get("labels_before") or {}, rec.get("labels_after") or {}
    moved = [f"{k}: {before.get(k, '-')} -> {after.get(k, '-')}" for k in sorted(set(before) | set(after))
             if before.get(k) != after.get(k)]
    listed = f"versions {rec.get('versions_before')} -> {rec.get('versions_after')}"
    return f"{_when(rec.get('at'))}  {rec.get('command'):<9} {rec.get('phase'):<7} " + \
        ("; ".join(moved) + "; " if moved else "") + listed


def _say_wait(args, control) -> None:
    """A label move may wait for the server to load the version: say so, on stderr."""
    wait = control.reload_wait()
    if not args.now and wait > 0:
        print(f"tf-export: a version not yet listed is listed first; the label then moves after {wait:.0f} s "
              f"(the server's reload interval and a margin; --now skips the wait)", file=sys.stderr)


def cmd_promote(args, cfg) -> int:

    control = ServingControl.from_config(cfg)
    with _finishing_cut_short(cfg):
        _say_wait(args, control)
        rec = control.promote(args.version, label=args.label, now=args.now)
        _emit(args, rec, f"{args.label} -> version {args.version}\n" + _labels_line(control.view()))
    return EXIT_OK


def cmd_rollback(args, cfg) -> int:

    control = ServingControl.from_config(cfg)
    with _finishing_cut_short(cfg):
        _say_wait(args, control)
        rec = control.rollback(to=args.to, now=args.now)
        _emit(args, rec, f"stable -> version {rec['labels_after'].get('stable')}\n" + _labels_line(control.view()))
    return EXIT_OK


def cmd_history(args, cfg) -> int:

    control = ServingControl.from_config(cfg)
    with _finishing_cut_short(cfg):
        records = control.history()
        _emit(args, records, "\n".join(_change_line(r) for r in records) or "no changes recorded")
    return EXIT_OK


def cmd_lineage(args, cfg) -> int:
    from tf_export_pipeline.trace import format_trace, trace

    with _finishing_cut_short(cfg):
        found = trace(cfg, args.version)
        _emit(args, found, format_trace(found))
    return EXIT_OK


def cmd_report(args, _cfg) -> int:
    from tf_export_pipeline.report import write_report

    for path in args.configs:
        load_config(path)  # a config that does not load is bad input: one line, before anything is read
    views = write_report(args.configs, args.html)
    for view in views:
        for problem in filter(None, [view["error"], *view["errors"].values()]):
            _warn(f"model {view['model']}: {problem}")
    lines = [f"{v['model']}: {len(v['versions'])} version(s), served {v['served'] if v['served'] is not None else '-'}"
             + (f", last run {v['runs'][0]['status']}" if v["runs"] else "") + (" (error shown)" if v["error"] else "")
             for v in views]
    _emit(args, views, "\n".join(lines + [f"wrote {os.path.abspath(args.html)}"]))
    return EXIT_OK


def _warn(message: str) -> None:
    print(f"tf-export: warning: {redact(_one_line(message))}", file=sys.stderr)


def _observed(args, cfg, argv: list[str] | None) -> int:
    """Run the command as this run (:mod:`tf_export_pipeline.run_info`); an export sends its OpenLineage
    events when OpenLineage is configured, and never waits long for them."""
    from tf_export_pipeline import lineage, observe
    from tf_export_pipeline.run_info import bound, cli_run

    run = cli_run(sys.argv[1:] if argv is None else argv).with_config(cfg.source if cfg is not None else None)
    with bound(run), runs.for_command(args.command, cfg):
        if args.command not in LINEAGE_COMMANDS or cfg is None or not lineage.configured():
            return COMMANDS[args.command](args, cfg)
        events = lineage.CommandEvents(cfg, args.command, run, warn=_warn)
        events.start()
        rc, error = EXIT_FAILED, None
        with observe.watching() as outcomes:
            try:
                rc = COMMANDS[args.command](args, cfg)
            except BaseException as err:
                error = redact(_one_line(str(err))) or type(err).__name__
                raise
            finally:
                if error is None and rc != EXIT_OK:
                    error = next((o.error for o in outcomes if o.error), None) or f"exit status {rc}"
                events.finish(outcomes, error)
                events.close()
        return rc


LINEAGE_COMMANDS = ("run", "backfill")
COMMANDS = {"labels": cmd_labels, "promote": cmd_promote, "rollback": cmd_rollback, "history": cmd_history,
            "lineage": cmd_lineage,
            "discover": cmd_discover, "run": cmd_run, "backfill": cmd_backfill, "status": cmd_status,
            "check-storage": cmd_check_storage,
            "validate": cmd_validate, "gc": cmd_gc, "predict": cmd_predict, "demo": cmd_demo, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if not args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        if args.command in ("run", "demo", "validate"):  # backfill imports it itself, later

            import_tensorflow_quietly()
    else:
        os.environ["TF_EXPORT_VERBOSE"] = "1"

    redaction.install()  # whatever a library logs or warns goes out redacted too
    cfg = None
    try:
        cfg = load_config(args.config) if getattr(args, "config", None) else None
        return _observed(args, cfg, argv)
    except ExportError as err:
        if args.verbose:
            sys.stderr.write(redaction.format_exception(err))
        return _failed(args, str(err), err.exit_code)
    except Exception as err:  # noqa: BLE001 - the one-line contract holds for surprises too
        if args.verbose:
            sys.stderr.write(redaction.format_exception(err))
        if isinstance(err, OSError) and err.errno is not None:
            # A full disk, a read-only mount, a permission: the cause and the path, on one line.
            cause = "disk full (no space left on device)" if err.errno == errno.ENOSPC else \
                (err.strerror or type(err).__name__).lower()
            path = err.filename or (cfg.export_base if cfg is not None else None) or \
                getattr(args, "config", None) or getattr(args, "path", None) or ""
            return _failed(args, f"{cause}: {redaction.redact(str(path))}", EXIT_FAILED)
        where = getattr(args, "config", None) or getattr(args, "path", None) or getattr(args, "workdir", "")
        # Redacted before it is cut: a cut could leave the head of a secret that no longer matches.
        text = " ".join(redaction.redact(str(err)).split())[:300]
        return _failed(args, f"unexpected {type(err).__name__} ({text}; rerun with --verbose): {where}", EXIT_FAILED)
    except KeyboardInterrupt:
        print("tf-export: interrupted; nothing partial was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
