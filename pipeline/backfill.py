"""Backfills: every pending checkpoint of a step range exported, validated and published in checkpoint order.

Example::

    from tf_export_pipeline.backfill import backfill
    from tf_export_pipeline.config import load_config
    for record in backfill(load_config("serving.yaml"), from_step=1000, jobs=2):
        print(record["step"], record["status"], record["version"])

A backfill is the historic counterpart of :func:`tf_export_pipeline.stages.run_once`:
it builds and traces the model once per worker process, exports checkpoint
i+1 while version i is being validated, and publishes one by one in
checkpoint order. It does not apply retention, and refuses up front a range
whose versions the next run's retention would remove.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import ConfigError, PipelineError
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
from tf_export_pipeline.records import Status
from tf_export_pipeline.stages import (
    discover,
    export_and_validate,
    list_pending,
    publish_timed,
    stage_export,
    stage_validate,
)
from tf_export_pipeline.validate import ValidationSession


def pending_for_backfill(cfg: Config, from_step: int | None = None, to_step: int | None = None,
                         include_removed: bool = False, allow_outrank: bool = False) -> list[dict]:
    """What a backfill exports (:func:`list_pending`), refused when retention would remove it at once."""
    discovered = discover(cfg)
    pending = list_pending(cfg, from_step, to_step, include_removed, items=discovered)
    if not allow_outrank:  # outranking versions do not follow training order; retention then removes others
        check_retention_keeps(cfg, discovered, pending)
    return pending


def check_retention_keeps(cfg: Config, discovered: list[dict], pending: list[dict]) -> None:
    """Refuse a backfill whose versions the next run's retention would remove at once.

    Versions follow training order (the serving-order rule), so after the
    backfill retention keeps the ``retention.keep`` newest checkpoints that
    have a version; a pending checkpoint below them would be published only
    to be removed by the next prune.
    """
    keys = {item["ledger_key"] for item in pending}
    having = [item for item in discovered if item["version"] is not None or item["ledger_key"] in keys]
    kept = {item["ledger_key"] for item in having[-cfg.retention.keep:]}
    doomed = [item for item in pending if item["ledger_key"] not in kept]
    if doomed:
        needed = len(having)
        raise ConfigError(
            f"backfill of {len(pending)} checkpoint(s): the next run's retention (retention.keep: "
            f"{cfg.retention.keep}) would remove {len(doomed)} of them, {doomed[0]['name']} first; set "
            f"retention.keep to at least {needed} in {cfg.source or 'the config'}, or narrow the step range")


def backfill(cfg: Config, from_step: int | None = None, to_step: int | None = None,
             versioning: str = "checkpoint_time", allow_outrank: bool = False,
             progress: Callable[[dict], None] | None = None, jobs: int = 1,
             include_removed: bool = False) -> list[dict]:
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
    the live version, and the gate guards what is served.
    """
    pending = pending_for_backfill(cfg, from_step, to_step, include_removed, allow_outrank)
    records: list[dict] = []

    def finish(item: dict, validated: dict | BaseException) -> None:
        if isinstance(validated, PipelineError):
            record = _failed_record(item, validated)
        elif isinstance(validated, BaseException):
            raise validated
        elif validated.get("status") != Status.VALIDATED:
            record = validated
        else:
            try:
                record = publish_timed(cfg, validated, versioning, allow_outrank)
            except PipelineError as err:
                record = _failed_record(item, err)
        records.append(record)
        if progress:
            progress(record)

    if jobs <= 1 or len(pending) <= 1:
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor


        # The validation process starts first so that its TensorFlow import
        # overlaps this one's; then checkpoint i+1 is exported while version i
        # is being validated (the thread only waits on the other process).
        with ValidationSession().start() as session, ThreadPoolExecutor(1) as validator:
            import_tensorflow_quietly()
            inflight: deque = deque()
            for item in pending:
                t0 = time.monotonic()
                try:
                    staged = stage_export(cfg, item, force=True)
                    staged["timings"] = {"export": round(time.monotonic() - t0, 4)}
                except PipelineError as err:
                    staged = err
                if isinstance(staged, dict) and staged.get("status") == Status.STAGED:
                    ticket = validator.submit(_validate_timed, cfg, staged, session)
                else:
                    ticket = Future()
                    ticket.set_result(staged)
                inflight.append((item, ticket))
                while len(inflight) > 1:
                    done_item, done = inflight.popleft()
                    finish(done_item, done.result())
            while inflight:
                done_item, done = inflight.popleft()
                finish(done_item, done.result())
        return records

    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes=min(jobs, len(pending)), initializer=_worker_init) as pool:
        results = pool.imap(_worker_export, [(cfg, item) for item in pending], chunksize=1)
        for item, validated in zip(pending, results):
            finish(item, validated)
    return records


def _validate_timed(cfg: Config, staged: dict, session) -> dict | PipelineError:
    t0 = time.monotonic()
    try:
        validated = stage_validate(cfg, staged, session=session)
    except PipelineError as err:
        return err
    validated["timings"] = {**staged.get("timings", {}), "validate": round(time.monotonic() - t0, 4)}
    return validated


def _failed_record(item: dict, err: BaseException) -> dict:
    return {"status": Status.FAILED.value, "version": None, "path": None, "checkpoint": item["prefix"],
            "step": item["step"], "error": str(err)}


_WORKER_SESSION = None


def _worker_init() -> None:
    import atexit


    global _WORKER_SESSION
    _WORKER_SESSION = ValidationSession().start()
    atexit.register(_WORKER_SESSION.close)
    import_tensorflow_quietly()


def _worker_export(task: tuple) -> dict | BaseException:
    cfg, item = task
    try:
        return export_and_validate(cfg, item, force=True, session=_WORKER_SESSION)
    except PipelineError as err:
        return err
