"""A backfill worker that a Ctrl-C reaches mid-stage reports the checkpoint cancelled and removes its staging,
whatever TensorFlow raises while it unwinds."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import make_workspace


@pytest.fixture
def worker_state(monkeypatch):
    """This process as a fresh backfill worker: no SIGINT had yet, no pool event, its SIGINT handler in place."""
    from tf_export_pipeline.backfill import workers

    monkeypatch.setattr(workers, "_CANCELLED", False)
    monkeypatch.setattr(workers, "_WORKER_CANCEL", None)
    previous = signal.signal(signal.SIGINT, workers._on_sigint)
    try:
        yield workers
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_interrupt_that_tensorflow_unwinds_into_another_error_is_a_cancel(tmp_path, trained_dir,
                                                                               worker_state, monkeypatch):
    from tf_export_pipeline.backfill.overlap import Checks
    from tf_export_pipeline.backfill.plan import pending_for_backfill
    from tf_export_pipeline.config import load_config

    workers = worker_state
    ws = make_workspace(tmp_path / "ws", trained_dir)
    cfg = load_config(str(ws.config))
    item = pending_for_backfill(cfg)[0]
    real_export = workers.stage_export
    staged_at = []

    def interrupted_export(cfg, item, force=False):
        # A real export (its staging on disk), then the SIGINT while the stage is still busy: the worker's
        # handler raises its cancel there, and TensorFlow's unwinding raises another error in its place, as
        # an interrupted trace does (the cancel stays the new error's context, carrying the stage's result).
        result = real_export(cfg, item, force=force)
        staged_at.append(result.staging)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
        except BaseException as cancel:
            cancel.stage_result = result
            raise AttributeError("'dict' object has no attribute '_type_spec'")  # noqa: B904
        pytest.fail("the worker's SIGINT handler did not interrupt the stage")

    monkeypatch.setattr(workers, "stage_export", interrupted_export)
    got = workers._worker_export((cfg, item, Checks(allow_regression=False, baseline=None)))

    assert got == workers.CANCELLED, got
    assert staged_at and staged_at[0], "the export wrote no staging"
    assert not [p.name for p in ws.base.iterdir() if p.name.startswith("temp-")], "staging left behind"
    assert not [p for p in ws.base.iterdir() if p.name.isdigit()], "something was published"
    # The next task of this worker starts nothing.
    assert workers._worker_export((cfg, item, Checks(allow_regression=False, baseline=None))) == workers.CANCELLED
