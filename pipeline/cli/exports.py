"""Commands that export checkpoints into versions: run (one) and backfill (a step range)."""

from __future__ import annotations

import json
import os
import sys

from tf_export_pipeline import runs
from tf_export_pipeline.backfill import BackfillInterrupted, backfill, backfill_versioning, pending_for_backfill
from tf_export_pipeline.cli.output import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, emit, error
from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.records import PublishRecord, public, to_json
from tf_export_pipeline.redaction import redact
from tf_export_pipeline.stages import run_once


def run_line(r: dict) -> str:
    """What one run did, on one line: the human form of a run's record."""
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


def cmd_run(args, cfg) -> int:
    record = to_json(run_once(cfg, checkpoint=args.checkpoint, versioning=args.versioning, force=args.force,
                              allow_outrank=args.allow_outrank, allow_regression=args.allow_regression))
    advice = record.get("serving_advice")
    emit(args, public(record), run_line(record) + (f"\nrecommended: {advice}" if advice else ""))
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

    def progress(rec: PublishRecord) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"step {rec.step} {rec.status}", refresh=False)

    try:
        finished = backfill(cfg, args.from_step, args.to_step, versioning=versioning,
                            allow_outrank=args.allow_outrank, progress=progress, jobs=args.jobs,
                            include_removed=args.include_removed, allow_regression=args.allow_regression)
    except BackfillInterrupted as stop:
        if bar is not None:
            bar.close()  # its last state goes out before what follows, never after it
        done = [to_json(r) for r in stop.records]
        if done or args.json:
            emit(args, [public(r) | ({"error": r["error"]} if "error" in r else {}) for r in done],
                 "\n".join(run_line(r) for r in done))
        published = sum(1 for r in done if r["status"] == "published")
        print(f"tf-export: interrupted; {published} version(s) published before it "
              f"{'(listed on stdout) ' if done else ''}stay, the exports it had started were removed; nothing "
              f"partial was published", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if bar is not None:
            bar.close()
    records = [to_json(r) for r in finished]
    runs.note(records)  # validated in a thread or in worker processes: not seen as stage calls here
    timings_file = os.environ.get("TF_EXPORT_TIMINGS")
    if timings_file:  # per-stage seconds of each checkpoint, for bench/backfill.py
        with open(timings_file, "w", encoding="utf-8") as fh:
            json.dump([{"step": r.get("step"), "status": r["status"], **(r.get("timings") or {})} for r in records], fh)
    out = [public(r) | ({"error": r["error"]} if "error" in r else {}) for r in records]
    human = "\n".join(run_line(r) for r in records) or "nothing to backfill: every checkpoint in range has a version"
    emit(args, out, human)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        error(f"{len(failed)} of {len(records)} checkpoints failed; first: {failed[0]['error']}")
        return EXIT_FAILED
    return EXIT_OK
