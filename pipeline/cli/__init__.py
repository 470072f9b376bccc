"""``tf-export``: the export pipeline from a command line, no Airflow needed.

Example::

    tf-export demo --workdir /tmp/tf-export-demo
    tf-export run --config /tmp/tf-export-demo/export.yaml --json

:mod:`.parser` holds the commands' arguments and help; the commands live by what they act on
(:mod:`.exports`, :mod:`.export_base`, :mod:`.saved_models`, :mod:`.serving`, :mod:`.reports`,
:mod:`.demo`), and :mod:`.output` is how each of them prints, fails and exits. :func:`main` runs one.
"""

from __future__ import annotations

import errno
import os
import sys

from tf_export_pipeline import redaction, runs
from tf_export_pipeline.cli.demo import cmd_demo
from tf_export_pipeline.cli.export_base import cmd_check_storage, cmd_discover, cmd_gc, cmd_status
from tf_export_pipeline.cli.exports import cmd_backfill, cmd_run
from tf_export_pipeline.cli.output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    emit,
    failed,
    one_line,
    warn,
)
from tf_export_pipeline.cli.parser import build_parser
from tf_export_pipeline.cli.reports import cmd_lineage, cmd_report
from tf_export_pipeline.cli.saved_models import cmd_predict, cmd_validate
from tf_export_pipeline.cli.serving import cmd_history, cmd_labels, cmd_promote, cmd_rollback
from tf_export_pipeline.config import load_config
from tf_export_pipeline.errors import ExportError
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly


def _observed(args, cfg, argv: list[str] | None) -> int:
    """Run the command as this run (:mod:`tf_export_pipeline.run_info`); an export sends its OpenLineage
    events when OpenLineage is configured, and never waits long for them."""
    from tf_export_pipeline import lineage, observe
    from tf_export_pipeline.run_info import bound, cli_run

    run = cli_run(sys.argv[1:] if argv is None else argv).with_config(cfg.source if cfg is not None else None)
    with bound(run), runs.for_command(args.command, cfg):
        if args.command not in LINEAGE_COMMANDS or cfg is None or not lineage.configured():
            return COMMANDS[args.command](args, cfg)
        events = lineage.CommandEvents(cfg, args.command, run, warn=warn)
        events.start()
        rc, error = EXIT_FAILED, None
        with observe.watching() as outcomes:
            try:
                rc = COMMANDS[args.command](args, cfg)
            except BaseException as err:
                error = redaction.redact(one_line(str(err))) or type(err).__name__
                raise
            finally:
                if error is None and rc != EXIT_OK:
                    error = next((o.error for o in outcomes if o.error), None) or f"exit status {rc}"
                events.finish(outcomes, error)
                events.close()
        return rc


LINEAGE_COMMANDS = ("run", "backfill")
COMMANDS = {"discover": cmd_discover, "run": cmd_run, "backfill": cmd_backfill, "status": cmd_status,
            "check-storage": cmd_check_storage, "validate": cmd_validate, "gc": cmd_gc,
            "labels": cmd_labels, "promote": cmd_promote, "rollback": cmd_rollback, "history": cmd_history,
            "lineage": cmd_lineage, "predict": cmd_predict, "demo": cmd_demo, "report": cmd_report}
_emit = emit  # a command put into COMMANDS from outside prints as the others do, through cli._emit


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
        return failed(args, str(err), err.exit_code)
    except Exception as err:  # noqa: BLE001 - the one-line contract holds for surprises too
        if args.verbose:
            sys.stderr.write(redaction.format_exception(err))
        if isinstance(err, OSError) and err.errno is not None:
            # A full disk, a read-only mount, a permission: the cause and the path, on one line.
            cause = "disk full (no space left on device)" if err.errno == errno.ENOSPC else \
                (err.strerror or type(err).__name__).lower()
            path = err.filename or (cfg.export_base if cfg is not None else None) or \
                getattr(args, "config", None) or getattr(args, "path", None) or ""
            return failed(args, f"{cause}: {redaction.redact(str(path))}", EXIT_FAILED)
        where = getattr(args, "config", None) or getattr(args, "path", None) or getattr(args, "workdir", "")
        # Redacted before it is cut: a cut could leave the head of a secret that no longer matches.
        text = " ".join(redaction.redact(str(err)).split())[:300]
        return failed(args, f"unexpected {type(err).__name__} ({text}; rerun with --verbose): {where}", EXIT_FAILED)
    except KeyboardInterrupt:
        print("tf-export: interrupted; nothing partial was published", file=sys.stderr)
        return EXIT_INTERRUPTED
