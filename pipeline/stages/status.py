"""The export base at a glance: its versions with their provenance, the one served, and those retention removed.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import status
    print(status(load_config("serving.yaml"))["serving"])
"""

from __future__ import annotations

from typing import Any

from tf_export_pipeline.config import Config
from tf_export_pipeline.run_info import RUN_KEY, summary_of
from tf_export_pipeline.serving import served_version
from tf_export_pipeline.stages.context import Context
from tf_export_pipeline.validate.performance import ratios_of


def status(cfg: Config) -> dict[str, Any]:
    """Published versions with their provenance, the one TF Serving serves (the highest, or with a
    ``serving:`` section what the model config file says: see :func:`served_version`), and the
    versions retention removed (``removed``: version, checkpoint, step, removed_at). Each version's ``run``
    names, in one line, the run that published it. Each version's
    ``size_ratio`` and ``latency_ratio`` are those its validation measured against its reference version
    (None before the performance gate, or on a first publish)."""
    ctx = Context(cfg)
    versions = []
    whole = set(ctx.publisher.whole_versions())
    for v in ctx.publisher.versions():
        manifest = ctx.publisher.manifest(v) or {}
        ck = manifest.get("checkpoint") or {}
        # On an object store a version whose promotion was cut short is listed without saved_model.pb:
        # TF Serving cannot load it; the next run that meets its checkpoint finishes it.
        versions.append({"version": v, "checkpoint": ck.get("path"), "step": ck.get("step"),
                         "run": summary_of(manifest.get(RUN_KEY)),
                         "path": ctx.base.url(ctx.publisher.version_path(v)),
                         "manifest": bool(manifest), "whole": v in whole, **ratios_of(manifest)})
    labels: dict[str, int] = {}
    served = served_version(whole)
    control = ctx.serving()
    if control is not None:
        # The server does what the file says, whatever serving.policy says: a changed policy reaches
        # the file at the next publish. Under a specific list the highest version listed is served.
        entry = control.own_state()
        labels = entry.labels
        served = served_version(whole, entry)
    for item in versions:
        item["labels"] = sorted(k for k, v in labels.items() if v == item["version"])
    present = {v["version"] for v in versions}
    removed = sorted(({"version": r.get("version"), "checkpoint": r.get("checkpoint"), "step": r.get("step"),
                       "removed_at": r.get("removed_at")} for r in ctx.publisher.removed().values()
                      if r.get("version") not in present), key=lambda r: r["version"] or 0)
    return {"export_base": cfg.export_base, "versions": versions, "serving": served, "labels": labels,
            "removed": removed}
