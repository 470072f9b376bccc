"""``NewCheckpointSensor``: waits for a complete checkpoint that has no version yet.

Deferrable when ``deferrable=True`` (the default follows Airflow's
``[operators] default_deferrable``; the DAGs of this package pass True): after
one look of its own it hands the wait to
:class:`tf_export_pipeline.operators.triggers.NewCheckpointTrigger` in the triggerer and frees
its worker slot. ``deferrable=False`` waits in the worker instead, in the
``poke`` or ``reschedule`` mode of any sensor.

With ``checkpoint`` (a prefix, a name or a step) it waits for that one to be
complete; it fails if it is not within ``timeout``, and fails at once, without
retries, when no checkpoint matches it and it is older than the newest one
present, or when none has matched it for ``missing_grace`` seconds (a typo in
an event or a conf must not hold every later export back). Without, it waits for a
complete checkpoint with no version, once no newer one is still being
written; a wait that ends with nothing new skips the task, since no new
checkpoint is not a failure. It returns the checkpoint it found:
``{"prefix", "name", "step", "written_at", "version", "pending"}``
(``pending``: how many complete checkpoints have no version).

Example::

    NewCheckpointSensor(task_id="wait_for_checkpoint", config_path=CONFIG,
                        checkpoint="{{ params.checkpoint or '' }}", poke_interval=10, timeout=3600)
"""

from __future__ import annotations

import time
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.configuration import conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSensorTimeout, AirflowSkipException

from tf_export_pipeline.operators.base import stage_errors, xcom
from tf_export_pipeline.operators.hooks import ExportHook
from tf_export_pipeline.operators.triggers import MISSING_GRACE_SECONDS, NewCheckpointTrigger


class NewCheckpointSensor(BaseSensorOperator):
    template_fields = ("config_path", "checkpoint")
    ui_color = "#fef7e0"

    def __init__(self, *, config_path: str, checkpoint: str | None = None, conn_id: str | None = None,
                 deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
                 poke_interval: float | timedelta = 30, timeout: float | timedelta = 3600,
                 missing_grace: float = MISSING_GRACE_SECONDS, **kwargs: Any) -> None:
        super().__init__(poke_interval=poke_interval, timeout=timeout, **kwargs)
        self.config_path = config_path
        self.checkpoint = checkpoint
        self.conn_id = conn_id
        self.deferrable = deferrable
        self.missing_grace = missing_grace
        self._started: float | None = None

    @property
    def wanted(self) -> str | None:
        if self.checkpoint in (None, "", "None"):
            return None
        return str(self.checkpoint).strip() or None

    @cached_property
    def hook(self) -> ExportHook:
        """Made when the task runs, after ``config_path`` is rendered."""
        return ExportHook(self.config_path, self.conn_id)

    def _look(self) -> tuple[dict | None, str | None]:
        if self._started is None:
            self._started = time.time()
        with stage_errors():
            found, reason = self.hook.look(self.wanted, self._started, self.missing_grace)
        return xcom(found), xcom(reason)

    def poke(self, context: Context) -> bool | PokeReturnValue:
        found, reason = self._look()
        if found is None:
            self.log.info("not yet: %s", reason)
            return False
        return PokeReturnValue(is_done=True, xcom_value=found)

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            try:
                return super().execute(context)
            except AirflowSensorTimeout as err:
                self._timed_out(str(err))
        found, reason = self._look()
        if found is not None:  # there already: no need to bother the triggerer
            return found
        self.log.info("deferring: %s", reason)
        max_polls = max(1, int(self.timeout // max(self.poke_interval, 0.001)))
        self.defer(
            trigger=NewCheckpointTrigger(config_path=str(self.config_path), checkpoint=self.wanted,
                                         conn_id=self.conn_id or self.hook.config.airflow.conn_id,
                                         poll_interval=self.poke_interval, max_polls=max_polls,
                                         missing_grace=self.missing_grace),
            method_name="execute_complete",
            # The trigger ends itself after max_polls; this deadline only covers a triggerer that is gone.
            timeout=timedelta(seconds=self.timeout + 2 * self.poke_interval + 60),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        event = xcom(event or {})  # redacted by the trigger already; a trigger of an older release did not
        status = event.get("status")
        if status == "found":
            self.log.info("found %s after %s poll(s)", event["checkpoint"]["prefix"], event.get("polls"))
            return event["checkpoint"]
        if status == "missing":
            raise AirflowFailException(event.get("message"))
        if status == "timeout":
            self._timed_out(f"waited {self.timeout:.0f} s ({event.get('polls')} polls): {event.get('reason')}")
        raise AirflowException(f"waiting for a checkpoint failed: {event.get('message') or event!r}")

    def _timed_out(self, detail: str) -> None:
        if self.wanted is None or self.soft_fail:
            raise AirflowSkipException(f"no new checkpoint: {detail}")
        raise AirflowSensorTimeout(f"checkpoint {self.wanted} is not complete: {detail}")
