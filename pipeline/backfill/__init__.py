"""Backfills: every pending checkpoint of a step range exported, validated and published in checkpoint order.

Example::

    from tf_export_pipeline.backfill import backfill
    from tf_export_pipeline.config import load_config
    for record in backfill(load_config("serving.yaml"), from_step=1000, jobs=2):
        print(record.step, record.status, record.version)

A backfill is the historic counterpart of :func:`tf_export_pipeline.stages.run_once`:
it builds and traces the model once per worker process, exports checkpoint
i+1 while version i is being validated, and publishes one by one in
checkpoint order. It does not apply retention, and refuses up front a range
whose versions the next run's retention would remove.
"""

from __future__ import annotations

from collections.abc import Callable

from tf_export_pipeline.backfill.chunks import export_chunk
from tf_export_pipeline.backfill.overlap import Checks, Result, failed_record, in_this_process
from tf_export_pipeline.backfill.plan import (
    backfill_versioning,
    check_retention_keeps,
    default_versioning,
    held_versioning,
    pending_for_backfill,
)
from tf_export_pipeline.backfill.workers import CANCELLED, DRAIN_SECONDS, in_workers
from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.records import Discovered, PublishRecord, Status
from tf_export_pipeline.stages import performance_baseline, publish_timed


def backfill(cfg: Config, from_step: int | None = None, to_step: int | None = None,
             versioning: str | None = None, allow_outrank: bool = False,
             progress: Callable[[PublishRecord], None] | None = None, jobs: int = 1,
             include_removed: bool = False, allow_regression: bool = False) -> list[PublishRecord]:
    """Export every pending checkpoint in the step range, oldest first.

    The model is built and traced once per worker process; each checkpoint then
    costs a restore, a write of the variables (see
    :mod:`tf_export_pipeline.export.writer`) and a load in a shared validation process.
    ``jobs`` > 1 exports and validates in that many worker processes, each with
    its own model; versions are still published one by one in checkpoint order.

    A failure of one checkpoint is recorded and the backfill goes on. Retention
    is not applied: the point of a backfill is to keep what it writes, so a
    backfill whose versions the next run's retention would remove is refused
    up front (:func:`check_retention_keeps`). Checkpoints whose versions
    retention removed before are left out unless ``include_removed``. The
    metric gate does not hold back a backfill: historic checkpoints land below
    the live version, and the gate guards what is served. The performance gate
    measures the reference version once, for every checkpoint; ``allow_regression``
    lets versions above ``validation.max_size_ratio`` through.

    ``versioning`` None is the config's, with ``timestamp`` taken as
    ``checkpoint_time`` (see :func:`backfill_versioning`, which refuses a
    versioning that would mix units in the export base).

    Ctrl-C (SIGINT, in the main thread) raises :class:`BackfillInterrupted`
    with the records of the checkpoints finished before it: a publish under
    way is finished first, workers stop (they leave SIGINT to this process,
    which passes it on), and every export started and not published is removed
    with its lease.
    """
    versioning, _note = backfill_versioning(cfg, versioning, allow_outrank)
    pending = pending_for_backfill(cfg, from_step, to_step, include_removed, allow_outrank)
    records: list[PublishRecord] = []
    checks = Checks(allow_regression, performance_baseline(cfg) if pending else None)

    def finish(item: Discovered, validated: Result) -> None:
        if isinstance(validated, PipelineError):
            record = PublishRecord.passed_on(failed_record(item, validated))
        elif isinstance(validated, BaseException):
            raise validated
        elif validated.status != Status.VALIDATED:
            record = PublishRecord.passed_on(validated)
        else:
            try:
                record = publish_timed(cfg, validated, versioning, allow_outrank)
            except PipelineError as err:
                record = PublishRecord.passed_on(failed_record(item, err))
        records.append(record)
        if progress:
            progress(record)

    try:
        if jobs <= 1 or len(pending) <= 1:
            in_this_process(cfg, pending, finish, checks)
        else:
            in_workers(cfg, pending, jobs, finish, records, checks)
    except KeyboardInterrupt:
        raise BackfillInterrupted(records) from None
    return records


class BackfillInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a backfill. ``records`` are those of the checkpoints it finished
    before, in order; every export it had started and not published is removed, with its lease."""

    def __init__(self, records: list[PublishRecord]):
        super().__init__("backfill interrupted")
        self.records = records


__all__ = ["backfill", "export_chunk", "pending_for_backfill", "backfill_versioning", "default_versioning",
           "held_versioning", "check_retention_keeps", "BackfillInterrupted", "CANCELLED", "DRAIN_SECONDS"]
