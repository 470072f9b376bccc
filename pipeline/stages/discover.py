"""Discovery: the training directory's checkpoints, each with what the export base knows of it.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import discover, list_pending
    cfg = load_config("serving.yaml")
    print([(d.step, d.version) for d in discover(cfg)], len(list_pending(cfg, from_step=1000)))
"""

from __future__ import annotations

from tf_export_pipeline.checkpoints import Checkpoint, find_checkpoint
from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.observe import stage as observed
from tf_export_pipeline.records import Discovered
from tf_export_pipeline.run_info import RUN_KEY, summary_of
from tf_export_pipeline.stages.context import Context, in_progress, require_complete


@observed("discover")
def discover(cfg: Config) -> list[Discovered]:
    """Every checkpoint with the version it was exported to under this config (or None).

    A checkpoint whose publish was committed but whose version is not there
    (killed before its promotion) has no version here and ``committed``: it
    is pending, and exporting it finishes or redoes the publish. A checkpoint
    whose version retention removed has no version and ``removed``
    (``version``, ``removed_at``); a backfill leaves it out unless asked to
    export removed checkpoints again. ``run`` names, in one line, the run
    that published it (see :mod:`tf_export_pipeline.run_info`). Three
    listings, whatever the history's length.
    """
    ctx = Context(cfg)
    out = []
    ledger = ctx.publisher.ledger()
    removed = ctx.publisher.removed()
    listed = set(ctx.publisher.whole_versions())
    for ckpt in ctx.checkpoints():
        key = ckpt.ledger_key(cfg.config_hash) if ckpt.index_crc32c else None
        entry = ledger.get(key) if key else None
        version = entry.get("version") if entry else None
        gone = removed.get(key) if key and entry is None else None
        out.append(Discovered(
            ckpt, ledger_key=key, version=version if version in listed else None,
            run=summary_of((entry or gone or {}).get(RUN_KEY)),
            committed=entry is not None and version not in listed,
            removed={"version": gone.get("version"), "removed_at": gone.get("removed_at")} if gone else None))
    return out


def list_pending(cfg: Config, from_step: int | None = None, to_step: int | None = None,
                 include_removed: bool = False, items: list[Discovered] | None = None) -> list[Discovered]:
    """Complete checkpoints in the step range that have no version for this config yet, oldest first.

    Checkpoints whose version retention removed are left out unless
    ``include_removed``. ``items`` is a discovery already made.
    """
    pending = []
    for item in discover(cfg) if items is None else items:
        step = item.step
        if from_step is not None and (step is None or step < from_step):
            continue
        if to_step is not None and (step is None or step > to_step):
            continue
        if item.removed and not include_removed:
            continue
        if item.complete and item.version is None:
            pending.append(item)
    return pending


def choose(ctx: Context, wanted: str | None) -> Checkpoint | None:
    """The checkpoint ``wanted`` names (a prefix, a name or a step), or the newest one not being written."""
    found = ctx.checkpoints()
    if wanted:
        ckpt = find_checkpoint(found, wanted)
        if ckpt is None:
            raise ConfigError(f"checkpoint not found: {wanted}")
        require_complete(ckpt)
        return ckpt
    settled = [c for c in found if not in_progress(c)]
    if not settled:
        return None
    newest = settled[-1]
    # An index without its data is broken, not in progress: say so rather than
    # quietly serving an older model. Older unexported checkpoints are left to backfill.
    require_complete(newest)
    return newest
