"""``NewCheckpointTrigger``: polls a training directory, on local disk or gs://, from the triggerer.

The triggerer runs many triggers on one event loop, so every blocking call
(reading the config, listing the directory, reading the ledger) runs in a
thread with :func:`asyncio.to_thread`. The trigger ends itself after
``max_polls`` polls: a deadline that does not depend on the scheduler
enforcing the deferral's timeout (``dag.test()`` does not).

No secret goes through the triggerer: the serialized kwargs name the
connection, never its options (they are looked up in :meth:`run`), and every
event and log line is redacted (a storage error can hold a token in a URL).

Example::

    self.defer(trigger=NewCheckpointTrigger(config_path=path, poll_interval=10, max_polls=360),
               method_name="execute_complete")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from tf_export_pipeline.config import load_config
from tf_export_pipeline.errors import CheckpointError, CheckpointMissingError, ConfigError
from tf_export_pipeline.operators.connections import ConnectionOptionsError, astorage_options, protect, with_options
from tf_export_pipeline.operators.selection import in_progress, matches, missing, new_checkpoint, newest_name
from tf_export_pipeline.redaction import redact, redact_value

# Storage errors in a row after which the trigger gives up (single ones are retried at the next poll).
MAX_ERRORS_IN_A_ROW = 5
# How long a checkpoint named by an event or conf may match nothing before the wait fails.
MISSING_GRACE_SECONDS = 300.0


def look(cfg, wanted: str | None = None, missing_since: float | None = None,
         grace: float = MISSING_GRACE_SECONDS) -> tuple[dict | None, str | None]:
    """One poll: ``(checkpoint, None)`` when there is one to export, else ``(None, why not yet)``.

    Raises :class:`CheckpointMissingError` when ``wanted`` names no checkpoint
    and is older than the newest one present, or has named none since
    ``missing_since`` for longer than ``grace`` seconds.
    """
    from tf_export_pipeline import stages  # numpy and storage: in the triggerer's thread, not at DAG parsing
    from tf_export_pipeline.records import to_json

    try:
        records = [to_json(item) for item in stages.discover(cfg)]
    except CheckpointError as err:  # nothing there yet, or a checkpoint still arriving
        return None, str(err)
    found = new_checkpoint(records, wanted)
    if found is not None:
        return found, None
    if wanted:
        why = missing(records, wanted)
        if why is None and missing_since is not None and time.time() - missing_since > grace \
                and not any(matches(r, wanted) for r in records):
            why = (f"checkpoint {wanted} matches nothing in {cfg.training_dir} after {grace:.0f} s; "
                   f"the newest is {newest_name(records)}")
        if why is not None:
            raise CheckpointMissingError(why)
    writing = [r["name"] for r in records if in_progress(r)]
    if wanted:
        return None, f"checkpoint {wanted} is not complete yet" + (f" (being written: {writing})" if writing else "")
    if writing:
        return None, f"checkpoint(s) still being written: {', '.join(writing)}"
    return None, f"no complete checkpoint in {cfg.training_dir} is newer than the newest one with a version"


def look_at(config_path: str, wanted: str | None, options: dict[str, Any], missing_since: float | None = None,
            grace: float = MISSING_GRACE_SECONDS) -> tuple[dict | None, str | None]:
    """:func:`look` for a config file, with the connection's storage options already resolved."""

    return look(with_options(load_config(config_path), options), wanted, missing_since, grace)


class NewCheckpointTrigger(BaseTrigger):
    """Fires once there is a checkpoint to export (see :func:`tf_export_pipeline.operators.selection.new_checkpoint`).

    Events: ``{"status": "found", "checkpoint": {...}, "polls": n}``;
    ``{"status": "timeout", "reason": ..., "polls": n}`` after ``max_polls``;
    ``{"status": "missing", "message": ...}`` when the checkpoint asked for
    does not exist and will not (see :func:`look`);
    ``{"status": "error", "message": ...}`` for a bad config or connection, or
    storage failing ``MAX_ERRORS_IN_A_ROW`` polls in a row. Every string in
    an event is redacted.
    """

    def __init__(self, config_path: str, checkpoint: str | None = None, conn_id: str | None = None,
                 poll_interval: float = 30.0, max_polls: int | None = 120,
                 missing_grace: float = MISSING_GRACE_SECONDS) -> None:
        super().__init__()
        self.missing_grace = float(missing_grace)
        self.config_path = config_path
        self.checkpoint = checkpoint
        self.conn_id = conn_id
        self.poll_interval = float(poll_interval)
        self.max_polls = max_polls

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"config_path": self.config_path, "checkpoint": self.checkpoint, "conn_id": self.conn_id,
                 "poll_interval": self.poll_interval, "max_polls": self.max_polls,
                 "missing_grace": self.missing_grace})

    async def run(self) -> AsyncIterator[TriggerEvent]:

        def event(payload: dict[str, Any]) -> TriggerEvent:
            return TriggerEvent(redact_value(payload))

        protect()
        try:
            options = await astorage_options(self.conn_id) if self.conn_id else {}
        except Exception as err:  # noqa: BLE001 - any lookup failure ends the wait with its reason
            yield event({"status": "error", "message": f"connection '{self.conn_id}': {err}"})
            return
        polls = errors = 0
        reason: str | None = None
        started = time.time()
        while True:
            polls += 1
            try:
                found, reason = await asyncio.to_thread(look_at, self.config_path, self.checkpoint, options,
                                                        started, self.missing_grace)
                errors = 0
            except CheckpointMissingError as err:
                yield event({"status": "missing", "message": str(err), "polls": polls})
                return
            except (ConfigError, ConnectionOptionsError) as err:
                yield event({"status": "error", "message": str(err), "polls": polls})
                return
            except Exception as err:  # noqa: BLE001 - storage hiccups are retried at the next poll
                errors += 1
                reason = redact(f"{type(err).__name__}: {err}")
                self.log.warning("poll %d failed (%d in a row): %s", polls, errors, reason)
                if errors >= MAX_ERRORS_IN_A_ROW:
                    yield event({"status": "error", "message": reason, "polls": polls})
                    return
                found = None
            if found is not None:
                self.log.info("found %s after %d poll(s)", found["prefix"], polls)
                yield event({"status": "found", "checkpoint": found, "polls": polls})
                return
            if self.max_polls is not None and polls >= self.max_polls:
                yield event({"status": "timeout", "reason": reason, "polls": polls, "checkpoint": self.checkpoint})
                return
            self.log.info("poll %d: %s", polls, redact(reason))
            await asyncio.sleep(self.poll_interval)
