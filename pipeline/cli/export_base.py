"""Commands over what an export base holds: discover, status, gc and check-storage; and the finishing of
promotions cut short, which every command that reads the export base does first."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tf_export_pipeline import redaction
from tf_export_pipeline.cli.output import EXIT_OK, emit, table, when
from tf_export_pipeline.records import to_json
from tf_export_pipeline.serving import newest_advice
from tf_export_pipeline.stages import discover, finish_cut_short, stage_prune, status
from tf_export_pipeline.storage import open_storage


@contextlib.contextmanager
def finishing_cut_short(cfg) -> Iterator[list[int]]:
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


def _version_cell(item: dict) -> str:
    if item["version"] is not None:
        return str(item["version"])
    if item.get("removed"):
        return f"removed (was {item['removed']['version']}, {when(item['removed']['removed_at'])})"
    return "pending (committed)" if item.get("committed") else "none"


def cmd_discover(args, cfg) -> int:
    items = [to_json(item) for item in discover(cfg)]
    rows = [[i["name"], i["step"], when(i["written_at"]),
             "yes" if i["complete"] else "NO: missing " + ", ".join(i["missing"]),
             _version_cell(i), i.get("run") or "-"] for i in items]
    emit(args, items,
         table(rows, ["CHECKPOINT", "STEP", "WRITTEN", "COMPLETE", "VERSION", "MADE BY"]) if rows
         else "no checkpoints")
    return EXIT_OK


def cmd_status(args, cfg) -> int:
    with finishing_cut_short(cfg) as finished:
        return _status(args, cfg, finished)


def _status(args, cfg, finished: list[int]) -> int:
    st = status(cfg)
    if finished:
        st["finished"] = finished
    rows = [[v["version"], v["step"], v["checkpoint"] or "(no manifest)", ",".join(v.get("labels") or []) or "-",
             v.get("run") or "-", "<- serving" if v["version"] == st["serving"] else ""] for v in st["versions"]]
    human = (table(rows, ["VERSION", "STEP", "CHECKPOINT", "LABELS", "MADE BY", ""]) if rows
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
    emit(args, st, human)
    return EXIT_OK


def cmd_gc(args, cfg) -> int:
    result = stage_prune(cfg, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    human = (f"{verb} versions: {result['removed_versions'] or 'none'}\n"
             f"{verb} staging: {result['removed_staging'] or 'none'}")
    emit(args, result, human)
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
    human = table(rows, ["GUARANTEE", "HOLDS", "DETAIL"]) + \
        f"\npromotion: {verdict.promotion}\nversions become visible: {visibility}\nexport base: {verdict.url}"
    out = verdict.to_dict()
    advice = None if verdict.one_step_visibility else newest_advice(verdict.promotion, cfg.serving)
    if advice:
        human += f"\nrecommended: {advice}"
        out["recommendation"] = advice
    emit(args, out, human)
    return EXIT_OK
