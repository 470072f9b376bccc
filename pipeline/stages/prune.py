"""Retention and finishing: old versions removed, and publishes cut short before their promotion finished.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import finish_cut_short, stage_prune
    cfg = load_config("serving.yaml")
    finish_cut_short(cfg)
    print(stage_prune(cfg, dry_run=True)["removed_versions"])
"""

from __future__ import annotations

from typing import Any

from tf_export_pipeline.config import Config
from tf_export_pipeline.retention import prune
from tf_export_pipeline.stages.context import Context


def stage_prune(cfg: Config, dry_run: bool = False, keep_versions: tuple[int, ...] = ()) -> dict[str, Any]:
    """Apply retention; ``keep_versions`` are kept whatever their rank (the version a run just published)."""
    ctx = Context(cfg)
    control = ctx.serving()
    named = tuple(sorted(control.protected_versions())) if control is not None else ()
    return prune(ctx.base, keep=cfg.retention.keep, pinned=(*cfg.retention.pinned, *keep_versions, *named),
                 lease_seconds=cfg.retention.lease_seconds, dry_run=dry_run)


def finish_cut_short(cfg: Config) -> list[int]:
    """Finish every publish that was committed but whose promotion was cut short; the versions finished.

    On an object store a move cut short (a process killed while it copied the
    version's objects) leaves ``<base>/<V>/`` listed without ``saved_model.pb``,
    which TF Serving may try to load under plain directory watching. ``status``
    and the serving commands run this first, as ``run``, ``backfill`` and ``gc``
    do, so the version does not stay partial until the next export. Safe beside
    any other process: each promotion step happens once or finds it done.
    """
    return Context(cfg).publisher.finish_committed()["finished"]
