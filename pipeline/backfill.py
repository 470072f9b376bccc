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

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tf_export_pipeline import faults
from tf_export_pipeline.config import Config
from tf_export_pipeline.errors import CheckpointError, ConfigError, PipelineError
from tf_export_pipeline.layout import BACKFILL_VERSIONING, EXPORTS_DIR, RESUME_NAME, WORK_DIR
from tf_export_pipeline.publish.staging import drop_lease, staging_name
from tf_export_pipeline.quiet_tf import import_tensorflow_quietly
from tf_export_pipeline.records import Status
from tf_export_pipeline.stages import (
    discover,
    list_pending,
    performance_baseline,
    publish_timed,
    stage_export,
    stage_validate,
)
from tf_export_pipeline.storage import open_storage
from tf_export_pipeline.validate import ValidationSession
from tf_export_pipeline.validate.performance import Baseline


def pending_for_backfill(cfg: Config, from_step: int | None = None, to_step: int | None = None,
                         include_removed: bool = False, allow_outrank: bool = False) -> list[dict]:
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
    from tf_export_pipeline.stages import Context

    publisher = Context(cfg).publisher
    live = publisher.live_version()
    policy = (publisher.manifest(live) or {}).get("versioning") if live is not None else None
    return (live, policy) if policy in _UNITS else None


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
             versioning: str | None = None, allow_outrank: bool = False,
             progress: Callable[[dict], None] | None = None, jobs: int = 1,
             include_removed: bool = False, allow_regression: bool = False) -> list[dict]:
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
    records: list[dict] = []
    checks = _Checks(allow_regression, performance_baseline(cfg) if pending else None)

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

    try:
        if jobs <= 1 or len(pending) <= 1:
            _in_this_process(cfg, pending, finish, checks)
        else:
            _in_workers(cfg, pending, jobs, finish, records, checks)
    except KeyboardInterrupt:
        raise BackfillInterrupted(records) from None
    return records


def export_chunk(cfg: Config, checkpoints: list[dict | str], run_key: str, resume: bool = False,
                 allow_regression: bool = False) -> list[dict]:
    """Export and validate a chunk of a backfill's checkpoints, as :func:`backfill` does in one process, without
    publishing; one record per checkpoint, in the order given (``validated``, ``failed``, or ``skipped`` /
    ``published`` for a checkpoint that has a version meanwhile).

    This is a backfill task's work: one TensorFlow import, one trace of the
    model, one validation process, checkpoint i+1 exported while version i is
    validated. Each export's work folder records, under ``run_key``, how far it
    got (staged, then validated), so that with ``resume`` (a retry of the task,
    on any host) a checkpoint already validated is taken as it is and one
    already staged is only validated: nothing is exported twice. A checkpoint
    that fails for good (a permanent error: the wrong model, a failed
    validation) is recorded and the chunk goes on; any other error is raised,
    for a retry.
    """
    found = {item["prefix"]: item for item in discover(cfg)}
    wanted: list[tuple[str, dict | None]] = []
    for ref in checkpoints:
        prefix = ref.get("prefix") or ref.get("checkpoint") if isinstance(ref, dict) else ref
        wanted.append((str(prefix), found.get(prefix)))
    earlier = _resumable(cfg, run_key) if resume else {}
    results: dict[str, dict] = {}
    todo: list[dict] = []
    prestaged: dict[str, dict] = {}
    for prefix, item in wanted:
        if item is None:
            results[prefix] = _failed_record({"prefix": prefix, "step": None},
                                              CheckpointError(f"checkpoint not found: {prefix}"))
            continue
        before = earlier.get(item["ledger_key"])
        if before is not None and before.get("status") == Status.VALIDATED:
            results[prefix] = {**before, "resumed": True}
            continue
        if before is not None:  # staged by the try before: validated here, not exported again
            prestaged[item["ledger_key"]] = {**before, "resumed": True}
        todo.append(item)
    checks = _Checks(allow_regression, performance_baseline(cfg) if todo else None)

    def finish(item: dict, validated: dict | BaseException) -> None:
        if isinstance(validated, PipelineError) and validated.permanent:
            record = _failed_record(item, validated)
        elif isinstance(validated, BaseException):
            raise validated  # storage, a race: the task's retry resumes from the records kept
        else:
            record = validated
        results[item["prefix"]] = record

    if todo:
        _in_this_process(cfg, todo, finish, checks, keep=lambda record: _remember(cfg, run_key, record),
                         prestaged=prestaged)
    return [results[prefix] for prefix, _item in wanted]


def _remember(cfg: Config, run_key: str, record: dict) -> None:
    """Keep ``record`` in its export's work folder, for a retry of the task under ``run_key``."""
    store = open_storage(cfg.export_base, cfg.storage_options)
    data = {"run_key": run_key, "record": {k: v for k, v in record.items() if k != "resumed"}}
    store.write_bytes(store.join(store.strip(record["work"]), RESUME_NAME), json.dumps(data).encode())


def _resumable(cfg: Config, run_key: str) -> dict[str, dict]:
    """What earlier tries under ``run_key`` exported, by ledger key: staged or validated records whose
    staging is still there. One listing of the work folders, one read for each (exports not yet published)."""
    store = open_storage(cfg.export_base, cfg.storage_options)
    root = store.join(store.root, EXPORTS_DIR, WORK_DIR)
    out: dict[str, dict] = {}
    for entry in store.list_dir(root):
        if not entry.is_dir:
            continue
        try:
            data = json.loads(store.read_bytes(store.join(root, entry.name, RESUME_NAME)))
        except (FileNotFoundError, ValueError, OSError, PipelineError):
            continue  # not a backfill task's, cut short, or removed meanwhile
        record = data.get("record") if isinstance(data, dict) and data.get("run_key") == run_key else None
        if not isinstance(record, dict) or not record.get("ledger_key") or not record.get("staging"):
            continue
        if not store.exists(store.strip(record["staging"])):
            continue  # removed by gc: exported again
        kept = out.get(record["ledger_key"])
        if kept is None or record.get("status") == Status.VALIDATED:
            out[record["ledger_key"]] = record
    return out


@dataclass(frozen=True)
class _Checks:
    """What every validation of one backfill shares: the override and the reference version's figures."""

    allow_regression: bool
    baseline: Baseline | None

    def validate(self, cfg: Config, staged: dict, session) -> dict:
        return stage_validate(cfg, staged, session=session, allow_regression=self.allow_regression,
                              baseline=self.baseline)


class BackfillInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a backfill. ``records`` are those of the checkpoints it finished
    before, in order; every export it had started and not published is removed, with its lease."""

    def __init__(self, records: list[dict]):
        super().__init__("backfill interrupted")
        self.records = records


#: What a worker returns for a checkpoint it was interrupted on, or did not start after an interrupt.
CANCELLED = "cancelled"
#: How long an interrupted backfill waits for its workers to give back what they hold.
DRAIN_SECONDS = 120.0


class _Interrupts:
    """SIGINT in the main thread: a KeyboardInterrupt where work in progress may be dropped (an
    export, a wait), held back inside :meth:`held` (a result being published and recorded) and
    raised when it ends. Inactive outside the main thread or when SIGINT is not Python's default."""

    def __init__(self):
        self.pending = False
        self.holding = 0
        self._previous = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
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


def _in_this_process(cfg: Config, pending: list[dict], finish: Callable, checks: _Checks,
                     keep: Callable[[dict], None] | None = None,
                     prestaged: dict[str, dict] | None = None) -> None:
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
    with ValidationSession().start() as session, ThreadPoolExecutor(1) as validator, _Interrupts() as interrupts:
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
                try:
                    staged = (prestaged or {}).get(item.get("ledger_key"))
                    if staged is None:
                        # An interrupt during the export removes its staging (see stage_export).
                        staged = stage_export(cfg, item, force=True)
                        staged["timings"] = {"export": round(time.monotonic() - t0, 4)}
                        if keep is not None and staged.get("status") == Status.STAGED:
                            keep(staged)
                            faults.hold("staged")
                except PipelineError as err:
                    staged = err
                with interrupts.held():
                    if isinstance(staged, dict) and staged.get("status") == Status.STAGED:
                        ticket = validator.submit(_validate_timed, cfg, staged, session, checks, keep)
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
                    _discard_unpublished(cfg, result)
            raise


def _in_workers(cfg: Config, pending: list[dict], jobs: int, finish: Callable, records: list[dict],
                checks: _Checks) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    cancel = ctx.Event()
    with _sigint_ignored():  # a Ctrl-C while a worker starts up is then not a traceback of its own
        pool = ctx.Pool(processes=min(jobs, len(pending)), initializer=_worker_init, initargs=(cancel,))
    with pool, _Interrupts() as interrupts:
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
                try:
                    os.kill(child.pid, signal.SIGINT)  # and drop what they are doing (if Ctrl-C missed them)
                except ProcessLookupError:
                    pass
            with interrupts.held():
                _drain(cfg, results, len(pending) - taken, records)
            # Then the pool ends its workers at once; a validation process of theirs ends with its
            # current load, when it reads the end of its input.
            raise


def _next_result(results, interrupts: _Interrupts):
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


def _drain(cfg: Config, results, count: int, records: list[dict]) -> None:
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
        if isinstance(result, dict) and result.get("status") == Status.PUBLISHED:
            records.append(result)
        _discard_unpublished(cfg, result)


def _discard_unpublished(cfg: Config, result) -> None:
    """Remove the staging and work files of an export that will not be published, and its lease."""
    if not isinstance(result, dict) or result.get("status") not in (Status.STAGED, Status.VALIDATED):
        return
    store = open_storage(cfg.export_base, cfg.storage_options)
    for key in ("staging", "work"):
        if result.get(key):
            try:
                store.rm(store.strip(result[key]), recursive=True)
            except (OSError, PipelineError):
                pass  # gc removes it after the lease
    drop_lease(store, staging_name(store.strip(result["staging"])))


def _validate_timed(cfg: Config, staged: dict, session, checks: _Checks,
                    keep: Callable[[dict], None] | None = None) -> dict | PipelineError:
    t0 = time.monotonic()
    try:
        validated = checks.validate(cfg, staged, session)
    except BaseException as err:
        _discard_unpublished(cfg, staged)  # nothing validates this staging again
        if isinstance(err, PipelineError):
            return err
        raise
    validated["timings"] = {**staged.get("timings", {}), "validate": round(time.monotonic() - t0, 4)}
    if keep is not None:
        keep(validated)
    return validated


def _failed_record(item: dict, err: BaseException) -> dict:
    return {"status": Status.FAILED.value, "version": None, "path": None, "checkpoint": item["prefix"],
            "step": item["step"], "error": str(err)}


_WORKER_SESSION = None
_WORKER_CANCEL = None  # the pool's event: set when the backfill was interrupted
_BUSY = False          # exporting or validating a checkpoint
_CANCELLED = False     # this worker had a SIGINT


class _Cancelled(BaseException):
    """A SIGINT in a worker while it exports or validates: unwinds the stage (which removes what it wrote)."""


def _on_sigint(signum, frame) -> None:
    global _CANCELLED
    first = not _CANCELLED
    _CANCELLED = True
    # Only once and only inside a stage: a second SIGINT (the parent forwards one) must not cut the
    # clean-up short, and outside a stage there is nothing to stop.
    if first and _BUSY:
        raise _Cancelled


def _worker_init(cancel=None) -> None:
    import atexit

    global _WORKER_SESSION, _WORKER_CANCEL
    _WORKER_CANCEL = cancel
    # The parent handles Ctrl-C: the validation process started here inherits the ignored SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_SESSION = ValidationSession().start()
    atexit.register(_WORKER_SESSION.close)
    import_tensorflow_quietly()
    signal.signal(signal.SIGINT, _on_sigint)


def _worker_export(task: tuple) -> dict | BaseException | str:
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
            if staged["status"] != Status.STAGED:
                return staged
            validated = checks.validate(cfg, staged, _WORKER_SESSION)
            validated["timings"] = {"export": round(t1 - t0, 4), "validate": round(time.monotonic() - t1, 4)}
            return validated
        finally:
            _BUSY = False
    except BaseException as err:
        # Nothing validates this staging again (a later run exports the checkpoint anew); an export cut
        # short removed its own, and one interrupted just after it returned is named by the error.
        _discard_unpublished(cfg, staged or getattr(err, "stage_result", None))
        if isinstance(err, _Cancelled):
            return CANCELLED
        if isinstance(err, PipelineError):
            return err
        raise
