"""A backfill over worker processes: each exports and validates with its own model; Ctrl-C drains them cleanly.

Example::

    from tf_export_pipeline.backfill.overlap import Checks
    from tf_export_pipeline.backfill.plan import pending_for_backfill
    from tf_export_pipeline.backfill.workers import in_workers
    from tf_export_pipeline.config import load_config
    cfg = load_config("serving.yaml")
    records = []
    in_workers(cfg, pending_for_backfill(cfg), 2, lambda item, result: records.append(result), records,
               Checks(allow_regression=False, baseline=None))
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tf_export_pipeline.backfill.overlap import Checks, Interrupts, discard_unpublished
from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
from tf_export_pipeline.records import Discovered, ExportRecord, PublishRecord, StageRecord, Status
from tf_export_pipeline.stages import stage_export
from tf_export_pipeline.validate import ValidationSession

#: What a worker returns for a checkpoint it was interrupted on, or did not start after an interrupt.
CANCELLED = "cancelled"
#: How long an interrupted backfill waits for its workers to give back what they hold.
DRAIN_SECONDS = 120.0


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile: processes started now inherit it, and Python leaves it so in them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def in_workers(cfg: Config, pending: list[Discovered], jobs: int, finish: Callable[[Discovered, Any], None],
               records: list[PublishRecord], checks: Checks) -> None:
    """Export and validate ``pending`` in ``jobs`` worker processes, handing each result to ``finish`` in order."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    cancel = ctx.Event()
    with _sigint_ignored():  # a Ctrl-C while a worker starts up is then not a traceback of its own
        pool = ctx.Pool(processes=min(jobs, len(pending)), initializer=_worker_init, initargs=(cancel,))
    with pool, Interrupts() as interrupts:
        results = pool.imap(_worker_export, [(cfg, item, checks) for item in pending], chunksize=1)
        taken = 0
        try:
            # Interrupts are only taken between results: one taken from the pool is always published
            # or discarded, never dropped.
            with interrupts.held():
                for item in pending:
                    validated = _next_result(results, interrupts)
                    taken += 1
                    finish(item, validated)
        except KeyboardInterrupt:
            cancel.set()  # workers start nothing more
            for child in multiprocessing.active_children():
                if child.pid is None:
                    continue  # not started
                try:
                    os.kill(child.pid, signal.SIGINT)  # and drop what they are doing (if Ctrl-C missed them)
                except ProcessLookupError:
                    pass
            with interrupts.held():
                _drain(cfg, results, len(pending) - taken, records)
            # Then the pool ends its workers at once; a validation process of theirs ends with its
            # current load, when it reads the end of its input.
            raise


def _next_result(results: Any, interrupts: Interrupts) -> Any:
    """The next worker result, waiting in short steps so that a held interrupt is taken while waiting."""
    import multiprocessing

    while True:
        if interrupts.pending:
            raise KeyboardInterrupt
        try:
            result = results.next(timeout=0.2)
        except multiprocessing.TimeoutError:
            continue
        if result == CANCELLED:
            # A worker had a SIGINT (a Ctrl-C often reaches it before this process's handler runs):
            # the backfill stops; that checkpoint left nothing behind.
            raise KeyboardInterrupt
        return result


def _drain(cfg: Config, results: Any, count: int, records: list[PublishRecord]) -> None:
    """After an interrupt: take the ``count`` results still due from the workers and discard what
    they exported; a publish a worker found committed and finished is recorded. Gives up after
    :data:`DRAIN_SECONDS` (a worker stuck in one call): gc removes what it had written once its
    lease runs out."""
    import multiprocessing

    deadline = time.monotonic() + DRAIN_SECONDS
    for _ in range(count):
        try:
            result = results.next(timeout=max(0.0, deadline - time.monotonic()))
        except (StopIteration, multiprocessing.TimeoutError):
            return
        except Exception:  # noqa: BLE001 - a worker's own error: it left nothing behind
            continue
        if isinstance(result, StageRecord) and result.status == Status.PUBLISHED:
            records.append(PublishRecord.passed_on(result))
        discard_unpublished(cfg, result)


_WORKER_SESSION: ValidationSession | None = None
_WORKER_CANCEL: Any = None  # the pool's event: set when the backfill was interrupted
_BUSY = False          # exporting or validating a checkpoint
_CANCELLED = False     # this worker had a SIGINT


class _Cancelled(BaseException):
    """A SIGINT in a worker while it exports or validates: unwinds the stage (which removes what it wrote)."""


def _on_sigint(signum: int, frame: object) -> None:
    global _CANCELLED
    first = not _CANCELLED
    _CANCELLED = True
    # Only once and only inside a stage: a second SIGINT (the parent forwards one) must not cut the
    # clean-up short, and outside a stage there is nothing to stop.
    if first and _BUSY:
        raise _Cancelled


def _stage_result_of(err: BaseException) -> Any:
    """What the stage had returned when the interrupt came (attached to it by the stage's wrapper), found
    also when a later exception replaced the interrupt while TensorFlow unwound."""
    seen: BaseException | None = err
    while seen is not None:
        found = getattr(seen, "stage_result", None)
        if found is not None:
            return found
        seen = seen.__context__
    return None


def _worker_init(cancel: Any = None) -> None:
    import atexit

    global _WORKER_SESSION, _WORKER_CANCEL
    _WORKER_CANCEL = cancel
    # The parent handles Ctrl-C: the validation process started here inherits the ignored SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_SESSION = ValidationSession().start()
    atexit.register(_WORKER_SESSION.close)
    import_tensorflow_quietly()
    signal.signal(signal.SIGINT, _on_sigint)


def _worker_export(task: tuple[Config, Discovered, Checks]) -> ExportRecord | BaseException | str:
    global _BUSY
    cfg, item, checks = task
    if _CANCELLED or (_WORKER_CANCEL is not None and _WORKER_CANCEL.is_set()):
        return CANCELLED
    staged = None
    try:
        _BUSY = True
        try:
            t0 = time.monotonic()
            staged = stage_export(cfg, item, force=True)
            t1 = time.monotonic()
            if staged.status != Status.STAGED:
                return staged
            validated = checks.validate(cfg, staged, _WORKER_SESSION)
            validated.timings = {"export": round(t1 - t0, 4), "validate": round(time.monotonic() - t1, 4)}
            return validated
        finally:
            _BUSY = False
    except BaseException as err:
        # Nothing validates this staging again (a later run exports the checkpoint anew); an export cut
        # short removed its own, and one interrupted just after it returned is named by the error.
        discard_unpublished(cfg, staged or _stage_result_of(err))
        if _CANCELLED:
            # The SIGINT cut this stage short. TensorFlow, cut short mid-call, may raise something else
            # while it unwinds (an AttributeError on a half-built object): a consequence of the interrupt,
            # not a failure of the checkpoint.
            return CANCELLED
        if isinstance(err, PipelineError):
            return err
        raise
