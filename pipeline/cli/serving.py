"""Commands over TF Serving's model config file: labels, promote, rollback and history."""

from __future__ import annotations

import sys

from tf_export_pipeline.cli.export_base import finishing_cut_short
from tf_export_pipeline.cli.output import EXIT_OK, emit, table, when
from tf_export_pipeline.serving import ServingControl


def _labels_line(view: dict) -> str:
    rows = [[label, v, (view["sources"].get(v) or {}).get("checkpoint") or "-",
             (view["sources"].get(v) or {}).get("step")] for label, v in sorted(view["labels"].items())]
    head = (table(rows, ["LABEL", "VERSION", "CHECKPOINT", "STEP"]) if rows else "no labels") + \
        f"\nlisted versions: {view['versions'] or 'none (' + view['entry_policy'] + ')'}" + \
        f"\nrollback goes to: {view['rollback_to'] if view['rollback_to'] is not None else 'nothing earlier'}" + \
        f"\nmodel config file: {view['file']} (model {view['model']}, policy {view['policy']})"
    return head


def cmd_labels(args, cfg) -> int:
    control = ServingControl.from_config(cfg)  # a config without a serving: section is refused first
    with finishing_cut_short(cfg):
        view = control.view()
        emit(args, view, _labels_line(view))
    return EXIT_OK


def _change_line(rec: dict) -> str:
    before, after = rec.get("labels_before") or {}, rec.get("labels_after") or {}
    moved = [f"{k}: {before.get(k, '-')} -> {after.get(k, '-')}" for k in sorted(set(before) | set(after))
             if before.get(k) != after.get(k)]
    listed = f"versions {rec.get('versions_before')} -> {rec.get('versions_after')}"
    return f"{when(rec.get('at'))}  {rec.get('command'):<9} {rec.get('phase'):<7} " + \
        ("; ".join(moved) + "; " if moved else "") + listed


def _say_wait(args, control) -> None:
    """A label move may wait for the server to load the version: say so, on stderr."""
    wait = control.reload_wait()
    if not args.now and wait > 0:
        print(f"tf-export: a version not yet listed is listed first; the label then moves after {wait:.0f} s "
              f"(the server's reload interval and a margin; --now skips the wait)", file=sys.stderr)


def cmd_promote(args, cfg) -> int:
    control = ServingControl.from_config(cfg)
    with finishing_cut_short(cfg):
        _say_wait(args, control)
        rec = control.promote(args.version, label=args.label, now=args.now)
        emit(args, rec, f"{args.label} -> version {args.version}\n" + _labels_line(control.view()))
    return EXIT_OK


def cmd_rollback(args, cfg) -> int:
    control = ServingControl.from_config(cfg)
    with finishing_cut_short(cfg):
        _say_wait(args, control)
        rec = control.rollback(to=args.to, now=args.now)
        emit(args, rec, f"stable -> version {rec['labels_after'].get('stable')}\n" + _labels_line(control.view()))
    return EXIT_OK


def cmd_history(args, cfg) -> int:
    control = ServingControl.from_config(cfg)
    with finishing_cut_short(cfg):
        records = control.history()
        emit(args, records, "\n".join(_change_line(r) for r in records) or "no changes recorded")
    return EXIT_OK
