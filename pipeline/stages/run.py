"""One export end to end: export, validate and publish a checkpoint, then apply retention.

Example::

    from tf_export_pipeline.config import load_config
    from tf_export_pipeline.stages import run_once
    record = run_once(load_config("serving.yaml"))
    print(record.status, record.version)
"""

from __future__ import annotations

import dataclasses
import time

from tf_export_pipeline.config import Config
from tf_export_pipeline.records import Discovered, ExportRecord, PublishRecord, Status
from tf_export_pipeline.stages.context import after_commit, discard
from tf_export_pipeline.stages.export import stage_export
from tf_export_pipeline.stages.prune import stage_prune
from tf_export_pipeline.stages.publish import stage_publish
from tf_export_pipeline.stages.validate import stage_validate
from tf_export_pipeline.storage import open_storage
from tf_export_pipeline.validate import ValidationSession


def export_and_validate(cfg: Config, checkpoint: str | Discovered | None = None, force: bool = False,
                        session: ValidationSession | None = None, allow_regression: bool = False) -> ExportRecord:
    """Export and validate one checkpoint; the record carries ``timings`` in seconds."""
    t0 = time.monotonic()
    staged = stage_export(cfg, checkpoint, force=force, session=session)
    t1 = time.monotonic()
    if staged.status != Status.STAGED or staged.staging is None or staged.work is None:
        return staged
    try:
        validated = stage_validate(cfg, staged, session=session, allow_regression=allow_regression)
    except BaseException:
        # Nothing validates this staging again (the next run exports anew): it would only wait for gc.
        base = open_storage(cfg.export_base, cfg.storage_options)
        discard(base, base.strip(staged.staging), base.strip(staged.work))
        raise
    return dataclasses.replace(validated, timings={"export": round(t1 - t0, 4),
                                                   "validate": round(time.monotonic() - t1, 4)})


def export_one(cfg: Config, checkpoint: str | Discovered | None = None, versioning: str | None = None,
               allow_outrank: bool = False, force: bool = False, session: ValidationSession | None = None,
               allow_regression: bool = False) -> PublishRecord:
    """Export, validate and publish one checkpoint. Without a ``session``, one validation process is
    started as the export begins, so that Python and TensorFlow start up in it while the export runs.
    A checkpoint that export leaves nothing to do for (gated, skipped, finished) is passed on as it is."""
    if session is None:
        with ValidationSession() as own:
            return export_one(cfg, checkpoint, versioning, allow_outrank, force, session=own,
                              allow_regression=allow_regression)
    validated = export_and_validate(cfg, checkpoint, force=force, session=session,
                                    allow_regression=allow_regression)
    if validated.status != Status.VALIDATED:
        return PublishRecord.passed_on(validated)
    return publish_timed(cfg, validated, versioning, allow_outrank)


def publish_timed(cfg: Config, validated: ExportRecord, versioning: str | None,
                  allow_outrank: bool) -> PublishRecord:
    """:func:`stage_publish`, with the publish's seconds added to the record's ``timings``."""
    t0 = time.monotonic()
    record = stage_publish(cfg, validated, versioning=versioning, allow_outrank=allow_outrank)
    record.timings = {**(validated.timings or {}), "publish": round(time.monotonic() - t0, 4)}
    return record


def run_once(cfg: Config, checkpoint: str | None = None, versioning: str | None = None, force: bool = False,
             allow_outrank: bool = False, allow_regression: bool = False) -> PublishRecord:
    """Export the newest unexported complete checkpoint (or the one named), then prune.

    ``force`` publishes a checkpoint the metric gate would hold back;
    ``allow_outrank`` one whose version would break training order;
    ``allow_regression`` one above ``validation.max_size_ratio``. The
    version this run publishes is kept by its own prune, whatever its rank
    (the next prune applies retention to it as to any other).
    A prune that fails after a publish does not undo it: the record says
    ``published`` and carries the prune's error.
    """
    record = export_one(cfg, checkpoint, versioning, allow_outrank=allow_outrank, force=force,
                        allow_regression=allow_regression)
    if record.status == Status.PUBLISHED and record.version is not None:
        try:
            record.pruned = stage_prune(cfg, keep_versions=(record.version,))["removed_versions"]
        except Exception as err:  # noqa: BLE001 - the publish stands, whatever retention meets
            record.prune_error = after_commit(err)
    return record
