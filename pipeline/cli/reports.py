"""Commands that tell what happened: lineage (behind one version) and report (a page of models)."""

from __future__ import annotations

import os

from tf_export_pipeline.cli.export_base import finishing_cut_short
from tf_export_pipeline.cli.output import EXIT_OK, emit, warn
from tf_export_pipeline.config import load_config


def cmd_lineage(args, cfg) -> int:
    from tf_export_pipeline.trace import format_trace, trace

    with finishing_cut_short(cfg):
        found = trace(cfg, args.version)
        emit(args, found, format_trace(found))
    return EXIT_OK


def cmd_report(args, _cfg) -> int:
    from tf_export_pipeline.report import write_report

    for path in args.configs:
        load_config(path)  # a config that does not load is bad input: one line, before anything is read
    views = write_report(args.configs, args.html)
    for view in views:
        for problem in filter(None, [view["error"], *view["errors"].values()]):
            warn(f"model {view['model']}: {problem}")
    lines = [f"{v['model']}: {len(v['versions'])} version(s), served {v['served'] if v['served'] is not None else '-'}"
             + (f", last run {v['runs'][0]['status']}" if v["runs"] else "") + (" (error shown)" if v["error"] else "")
             for v in views]
    emit(args, views, "\n".join(lines + [f"wrote {os.path.abspath(args.html)}"]))
    return EXIT_OK
