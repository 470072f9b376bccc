"""Each stage's outcome, told to the metrics and to whoever watches (a command's lineage events).

:func:`stage` wraps a stage function (its first argument is the config): it
times the call and hands a :class:`StageOutcome` (the stage, the record it was
given, the record it returned or the error it raised) to
:func:`tf_export_pipeline.metrics.record_stage` and to every list opened by
:func:`watching` in this context. What the stage returns or raises is passed
on unchanged; telling never fails a stage.

Example::

    from tf_export_pipeline.observe import watching
    from tf_export_pipeline.stages import run_once
    with watching() as outcomes:
        run_once(cfg)
    print([(o.stage, o.status) for o in outcomes])
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from tf_export_pipeline.metrics import FAILED, record_stage
from tf_export_pipeline.records import json_of
from tf_export_pipeline.redaction import redact

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class StageOutcome:
    """One call of a stage: what it was given, what it returned or why it failed, and how long it took;
    records in their JSON form (:func:`tf_export_pipeline.records.json_of`), as metrics and run records read them."""

    stage: str
    seconds: float
    given: Any = None
    result: Any = None
    error: str | None = None

    @property
    def status(self) -> str | None:
        if self.error is not None:
            return FAILED
        return self.result.get("status") if isinstance(self.result, dict) else None


_WATCHERS: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("tf_export_watchers", default=())


@contextlib.contextmanager
def watching() -> Iterator[list[StageOutcome]]:
    """Collect the outcomes of the stages called inside, in order."""
    seen: list[StageOutcome] = []
    token = _WATCHERS.set((*_WATCHERS.get(), seen))
    try:
        yield seen
    finally:
        _WATCHERS.reset(token)


def _tell(cfg, outcome: StageOutcome) -> None:
    try:
        record_stage(cfg, outcome.stage, outcome.seconds, outcome.result, outcome.error is not None, outcome.given)
        for seen in _WATCHERS.get():
            seen.append(outcome)
    except Exception as err:  # noqa: BLE001 - observing never fails a stage
        log.warning("stage outcome not recorded (%s)", err)


def stage(name: str) -> Callable[[F], F]:
    """Time and tell every call of the decorated stage function (``fn(cfg, given=None, ...)``)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(cfg, *args: Any, **kwargs: Any):
            given = args[0] if args else None
            t0 = time.monotonic()
            try:
                result = fn(cfg, *args, **kwargs)
            except BaseException as err:
                _tell(cfg, StageOutcome(name, time.monotonic() - t0, json_of(given),
                                        error=redact(str(err)) or type(err).__name__))
                raise
            try:
                _tell(cfg, StageOutcome(name, time.monotonic() - t0, json_of(given), json_of(result)))
            except BaseException as err:
                # An interrupt while telling (a backfill worker's Ctrl-C): the caller must still learn
                # what the stage made, to remove the staging it wrote.
                err.stage_result = result  # type: ignore[attr-defined]  # read with getattr by the caller
                raise
            return result

        return run  # type: ignore[return-value]

    return wrap
