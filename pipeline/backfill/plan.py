"""What a backfill exports and under which versioning, refused up front where it would do harm.

Example::

    from tf_export_pipeline.backfill import backfill_versioning, pending_for_backfill
    from tf_export_pipeline.config import load_config
    cfg = load_config("serving.yaml")
    versioning, note = backfill_versioning(cfg)
    print(versioning, [d.step for d in pending_for_backfill(cfg, from_step=1000)])
"""

from __future__ import annotations

from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import ConfigError
from tf_export_pipeline.layout import BACKFILL_VERSIONING
from tf_export_pipeline.records import Discovered
from tf_export_pipeline.stages import Context, discover, list_pending


def pending_for_backfill(cfg: Config, from_step: int | None = None, to_step: int | None = None,
                         include_removed: bool = False, allow_outrank: bool = False) -> list[Discovered]:
    """What a backfill exports (:func:`list_pending`), refused when retention would remove it at once."""
    if from_step is not None and to_step is not None and from_step > to_step:
        # Else an empty range reads as "every checkpoint has a version".
        raise ConfigError(f"inverted step range: from step {from_step} is above to step {to_step} "
                          f"(--from-step/--to-step, DAG params from_step/to_step), so it holds no checkpoint: "
                          f"{cfg.source or 'the config'}")
    discovered = discover(cfg)
    pending = list_pending(cfg, from_step, to_step, include_removed, items=discovered)
    if not allow_outrank:  # outranking versions do not follow training order; retention then removes others
        check_retention_keeps(cfg, discovered, pending)
    return pending


#: What each versioning numbers by; numbers of one unit order with each other, of two units never do.
_UNITS = {"timestamp": "seconds since the epoch", "checkpoint_time": "seconds since the epoch", "step": "steps"}


def default_versioning(cfg: Config) -> str:
    """The versioning a backfill numbers by unless told: the config's, but ``checkpoint_time`` for ``timestamp``,
    which would number every historic checkpoint by today's time, above the live version."""
    return BACKFILL_VERSIONING.get(cfg.versioning, cfg.versioning)


def backfill_versioning(cfg: Config, requested: str | None = None,
                        allow_outrank: bool = False) -> tuple[str, str | None]:
    """The versioning a backfill publishes under, and a line to show when it is not the config's.

    ``requested`` None (or the default itself) is :func:`default_versioning`. A
    requested versioning whose numbers are of another unit than those of the
    live version (steps beside seconds since the epoch) is refused unless
    ``allow_outrank``: TF Serving serves the highest number, so one kind would
    outrank the other for good, whatever the training order.
    """
    default = default_versioning(cfg)
    if requested in (None, "", "None", default):
        note = None if default == cfg.versioning else (
            f"versioning checkpoint_time for this backfill (the config's '{cfg.versioning}' would number each "
            f"historic checkpoint by the export time, above the live version): {cfg.source or 'the config'}")
        return default, note
    if requested not in _UNITS:
        raise ConfigError(f"unknown versioning '{requested}' (one of {', '.join(_UNITS)}): "
                          f"{cfg.source or 'the config'}")
    if not allow_outrank:
        held = held_versioning(cfg)
        if held is not None and _UNITS.get(held[1], _UNITS[requested]) != _UNITS[requested]:
            version, policy = held
            raise ConfigError(
                f"versioning '{requested}' numbers versions in {_UNITS[requested]}, but the export base's live "
                f"version {version} is numbered by '{policy}' in {_UNITS[policy]}; mixed, one kind would outrank "
                f"the other for good: leave versioning out (this config's backfill default is '{default}'), or "
                f"--allow-outrank (DAG param allow_outrank) to publish anyway: {cfg.export_base}")
    return requested, None


def held_versioning(cfg: Config) -> tuple[int, str] | None:
    """(live version, the versioning its manifest names), or None: no version, or a manifest without one."""
    publisher = Context(cfg).publisher
    live = publisher.live_version()
    policy = (publisher.manifest(live) or {}).get("versioning") if live is not None else None
    return (live, policy) if live is not None and policy in _UNITS else None


def check_retention_keeps(cfg: Config, discovered: list[Discovered], pending: list[Discovered]) -> None:
    """Refuse a backfill whose versions the next run's retention would remove at once.

    Versions follow training order (the serving-order rule), so after the
    backfill retention keeps the ``retention.keep`` newest checkpoints that
    have a version; a pending checkpoint below them would be published only
    to be removed by the next prune.
    """
    keys = {item.ledger_key for item in pending}
    having = [item for item in discovered if item.version is not None or item.ledger_key in keys]
    kept = {item.ledger_key for item in having[-cfg.retention.keep:]}
    doomed = [item for item in pending if item.ledger_key not in kept]
    if doomed:
        needed = len(having)
        raise ConfigError(
            f"backfill of {len(pending)} checkpoint(s): the next run's retention (retention.keep: "
            f"{cfg.retention.keep}) would remove {len(doomed)} of them, {doomed[0].name} first; set "
            f"retention.keep to at least {needed} in {cfg.source or 'the config'}, or narrow the step range")
