"""The grammar of ``tf-export``: its commands, their arguments and their ``--help``.

Example::

    args = build_parser().parse_args(["status", "--config", "export.yaml", "--json"])
"""

from __future__ import annotations

import argparse

from tf_export_pipeline import __version__
from tf_export_pipeline.layout import VERSIONINGS

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
