"""A backfill in one process: checkpoint i+1 exported while version i is validated, Ctrl-C taken where it is safe.

Example::

    from tf_export_pipeline.backfill.overlap import Checks, in_this_process
    from tf_export_pipeline.backfill.plan import pending_for_backfill
    from tf_export_pipeline.config import load_config
    cfg = load_config("serving.yaml")
    in_this_process(cfg, pending_for_backfill(cfg), lambda item, result: print(item.step, result),
                    Checks(allow_regression=False, baseline=None))
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

from tf_export_pipeline import faults
from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.publish.staging import drop_lease, staging_name
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
from tf_export_pipeline.records import Discovered, ExportRecord, StageRecord, Status
from tf_export_pipeline.stages import stage_export, stage_validate
from tf_export_pipeline.storage import open_storage
from tf_export_pipeline.validate import ValidationSession
from tf_export_pipeline.validate.performance import Baseline

#: What a finished checkpoint is handed on as: its validated record, or why it failed.
Result: TypeAlias = "ExportRecord | PipelineError"


@dataclass(frozen=True)
class Checks:
    """What every validation of one backfill shares: the override and the reference version's figures."""

    allow_regression: bool
    baseline: Baseline | None

    def validate(self, cfg: Config, staged: ExportRecord, session: ValidationSession | None) -> ExportRecord:
        return stage_validate(cfg, staged, session=session, allow_regression=self.allow_regression,
                              baseline=self.baseline)


class Interrupts:
    """SIGINT in the main thread: a KeyboardInterrupt where work in progress may be dropped (an
    export, a wait), held back inside :meth:`held` (a result being published and recorded) and
    raised when it ends. Inactive outside the main thread or when SIGINT is not Python's default."""

    def __init__(self) -> None:
        self.pending = False
        self.holding = 0
        self._previous: Any = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum: int, frame: object) -> None:
        self.pending = True
        if not self.holding:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if self.pending and not self.holding:
            raise KeyboardInterrupt


def in_this_process(cfg: Config, pending: list[Discovered], finish: Callable[[Discovered, Any], None],
                    checks: Checks, keep: Callable[[ExportRecord], None] | None = None,
                    prestaged: dict[str, ExportRecord] | None = None) -> None:
    """Export and validate ``pending`` in this process, handing each result to ``finish`` in order.

    ``keep`` is given each record as soon as it is staged and again once it is
    validated (in the validating thread, not when ``finish`` gets to it);
    ``prestaged`` (by ledger key) are staged records to validate without
    exporting them again."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    # The validation process starts first so that its TensorFlow import
    # overlaps this one's; then checkpoint i+1 is exported while version i
    # is being validated (the thread only waits on the other process).
    with ValidationSession().start() as session, ThreadPoolExecutor(1) as validator, Interrupts() as interrupts:
        import_tensorflow_quietly()
        inflight: deque = deque()

        def finish_oldest() -> None:
            done_item, done = inflight[0]
            result = done.result()  # an interrupt here leaves the result in its ticket
            with interrupts.held():
                finish(done_item, result)
                inflight.popleft()

        try:
            for item in pending:
                t0 = time.monotonic()
                staged: ExportRecord | PipelineError | None
                try:
                    staged = (prestaged or {}).get(item.ledger_key or "")
                    if staged is None:
                        # An interrupt during the export removes its staging (see stage_export).
                        staged = stage_export(cfg, item, force=True)
                        staged.timings = {"export": round(time.monotonic() - t0, 4)}
                        if keep is not None and staged.status == Status.STAGED:
                            keep(staged)
                            faults.hold("staged")
                except PipelineError as err:
                    staged = err
                with interrupts.held():
                    if isinstance(staged, ExportRecord) and staged.status == Status.STAGED:
                        ticket = validator.submit(validate_timed, cfg, staged, session, checks, keep)
                    else:
                        ticket = Future()
                        ticket.set_result(staged)
                    inflight.append((item, ticket))
                while len(inflight) > 1:
                    finish_oldest()
            while inflight:
                finish_oldest()
        except KeyboardInterrupt:
            with interrupts.held():
                for _item, ticket in inflight:
                    try:
                        result = ticket.result()
                    except Exception:  # noqa: BLE001 - a validation that broke down left nothing to discard
                        continue
                    discard_unpublished(cfg, result)
            raise


def validate_timed(cfg: Config, staged: ExportRecord, session: ValidationSession | None, checks: Checks,
                   keep: Callable[[ExportRecord], None] | None = None) -> Result:
    """Validate ``staged``, its seconds added to its ``timings``; a pipeline error is returned, not raised."""
    t0 = time.monotonic()
    try:
        validated = checks.validate(cfg, staged, session)
    except BaseException as err:
        discard_unpublished(cfg, staged)  # nothing validates this staging again
        if isinstance(err, PipelineError):
            return err
        raise
    validated = dataclasses.replace(validated, timings={**(staged.timings or {}),
                                                         "validate": round(time.monotonic() - t0, 4)})
    if keep is not None:
        keep(validated)
    return validated


def discard_unpublished(cfg: Config, result: Any) -> None:
    """Remove the staging and work files of an export that will not be published, and its lease."""
    if not isinstance(result, ExportRecord) or result.status not in (Status.STAGED, Status.VALIDATED) \
            or result.staging is None:
        return
    store = open_storage(cfg.export_base, cfg.storage_options)
    for url in (result.staging, result.work):
        if url:
            try:
                store.rm(store.strip(url), recursive=True)
            except (OSError, PipelineError):
                pass  # gc removes it after the lease
    drop_lease(store, staging_name(store.strip(result.staging)))


def failed_record(item: Discovered | StageRecord | str, err: BaseException) -> ExportRecord:
    """The record of a checkpoint that failed: its path and step, and the error in one line."""
    if isinstance(item, str):
        return ExportRecord(Status.FAILED, checkpoint=item, error=str(err))
    path = item.prefix if isinstance(item, Discovered) else item.checkpoint
    return ExportRecord(Status.FAILED, checkpoint=path, step=item.step, error=str(err))
