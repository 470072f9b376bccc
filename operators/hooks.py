"""The hook below every operator: a model's config, its storage connection, and the stage calls.

The operators hold templated arguments and hand results to XCom; everything
that reads or writes an export base goes through :class:`ExportHook`, which
loads the config when first asked (never at DAG parsing), lays the
connection's storage options over the config's, and calls
:mod:`tf_export_pipeline.stages`, whose typed records it turns into the JSON
that XCom carries and back (:mod:`tf_export_pipeline.records`).

The connection type ``tf_export_storage`` carries storage credentials for any
backend the pipeline writes to, so no secret has to live in a config file;
``google_cloud_platform`` and ``aws`` connections work too (see
:mod:`tf_export_pipeline.operators.connections` for what each field becomes).

Example::

    from tf_export_pipeline.operators.hooks import ExportHook

    hook = ExportHook("/opt/airflow/dags/configs/demo.yaml", conn_id="tf_export_storage_default")
    print(hook.config.export_base, [c["name"] for c in hook.pending()])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from tf_export_pipeline import runs
from tf_export_pipeline.config import load_config
from tf_export_pipeline.observe import StageOutcome
from tf_export_pipeline.operators.connections import config_with_connection, protect, storage_options
from tf_export_pipeline.operators.selection import new_since_exported, newest
from tf_export_pipeline.operators.telemetry import task_scope
from tf_export_pipeline.operators.triggers import look
from tf_export_pipeline.records import discovered_from_json, from_json, public, to_json


class ExportHook(BaseHook):
    """One model's export pipeline, as the operators, the sensor and the trigger reach it.

    ``conn_id=None`` means the config's ``airflow.conn_id``, and no connection
    at all when that is unset too.
    """

    conn_name_attr = "conn_id"
    default_conn_name = "tf_export_storage_default"
    conn_type = "tf_export_storage"
    hook_name = "TF export storage"

    def __init__(self, config_path: str | None = None, conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_path = config_path
        self.conn_id = conn_id
        # What the stages called through this hook in a task did, for the operator's OpenLineage facets.
        self.outcomes: list[StageOutcome] = []

    @contextlib.contextmanager
    def _in_task(self) -> Iterator[None]:
        """A stage call as this task's (its run in the records, Airflow's stats as the metrics' sink, its
        outcome among the export base's last runs)."""
        with task_scope() as seen, runs.recording(lambda: self.config):
            try:
                yield
            finally:
                self.outcomes.extend(seen)

    # The stages are imported when called: they load fsspec backends, which DAG parsing must not.
    @property
    def _stages(self):
        from tf_export_pipeline import stages

        return stages

    @cached_property
    def config(self):
        """The config at ``config_path`` with the storage options of the connection laid over its own."""

        protect()
        return config_with_connection(load_config(str(self.config_path)), self.conn_id or None)

    def get_conn(self) -> dict[str, Any]:
        """The fsspec ``storage_options`` the connection gives (its secrets registered for redaction)."""

        return storage_options(self.conn_id) if self.conn_id else {}

    # -- discovery ---------------------------------------------------------------
    def newest(self) -> dict | None:
        """The newest checkpoint not being written, with its version (None: no checkpoint)."""

        with self._in_task():
            return newest([to_json(item) for item in self._stages.discover(self.config)])

    def new(self) -> list[dict]:
        """Complete checkpoints with no version, newer than every one with a version, oldest first."""

        with self._in_task():
            return new_since_exported([to_json(item) for item in self._stages.discover(self.config)])

    def pending(self, from_step: int | None = None, to_step: int | None = None, include_removed: bool = False,
                allow_outrank: bool = False) -> list[dict]:
        """What a backfill exports (refused when the next run's retention would remove it)."""
        from tf_export_pipeline.backfill import pending_for_backfill  # as the stages: not at DAG parsing

        return [to_json(item) for item in
                pending_for_backfill(self.config, from_step, to_step, include_removed, allow_outrank)]

    def backfill_versioning(self, requested: str | None, allow_outrank: bool = False) -> tuple[str, str | None]:
        """The versioning a backfill publishes under, and a note when it is not the config's (see
        :func:`tf_export_pipeline.backfill.backfill_versioning`: a mix of units is refused)."""
        from tf_export_pipeline.backfill import backfill_versioning

        return backfill_versioning(self.config, requested, allow_outrank)

    def export_chunk(self, checkpoints: list[str], run_key: str, resume: bool = False,
                     allow_regression: bool = False) -> list[dict]:
        """Export and validate a chunk of a backfill in this process
        (see :func:`tf_export_pipeline.backfill.export_chunk`)."""
        from tf_export_pipeline.backfill import export_chunk

        with self._in_task():
            records = export_chunk(self.config, checkpoints, run_key, resume=resume,
                                   allow_regression=allow_regression)
            runs.note(records)  # validated in a thread of its own: not seen as stage calls here
        return [to_json(record) for record in records]

    def require_complete(self, record: dict) -> None:
        """Raise the one-line error of a checkpoint whose index or data are missing."""
        from tf_export_pipeline.stages.context import require_complete

        require_complete(discovered_from_json(record).checkpoint)

    def look(self, wanted: str | None, missing_since: float | None, grace: float) -> tuple[dict | None, str | None]:
        """One poll of the sensor (see :func:`tf_export_pipeline.operators.triggers.look`)."""

        return look(self.config, wanted, missing_since, grace)

    # -- stages ------------------------------------------------------------------
    def export(self, checkpoint: str | None, force: bool = False) -> dict:
        with self._in_task():
            return to_json(self._stages.stage_export(self.config, checkpoint, force=force))

    def validate(self, staged: dict, allow_regression: bool = False) -> dict:
        with self._in_task():
            return to_json(self._stages.stage_validate(self.config, from_json(staged),
                                                       allow_regression=allow_regression))

    def publish(self, validated: dict, versioning: str | None = None, allow_outrank: bool = False) -> dict:
        with self._in_task():
            return to_json(self._stages.publish_validated(self.config, from_json(validated), versioning,
                                                          allow_outrank))

    def publish_in_order(self, items: list[dict], versioning: str | None = None,
                         allow_outrank: bool = False) -> tuple[list[dict], list[str]]:
        with self._in_task():
            records, failures = self._stages.publish_in_order(self.config, [from_json(item) for item in items],
                                                              versioning, allow_outrank)
        return [to_json(record) for record in records], failures

    def prune(self, dry_run: bool = False, keep_versions: tuple[int, ...] = ()) -> dict:
        return self._stages.stage_prune(self.config, dry_run=dry_run, keep_versions=keep_versions)

    def finish_cut_short(self) -> list[int]:
        """Finish every committed publish whose promotion was cut short; the versions finished."""
        return self._stages.finish_cut_short(self.config)

    def public(self, record: dict) -> dict:
        return public(record)

    # -- serving control ---------------------------------------------------------
    def move_label(self, version: int | None, label: str, rollback: bool = False, to: int | None = None,
                   now: bool = False) -> tuple[dict, list[dict]]:
        """Promote ``version`` to ``label``, or roll stable back (see :func:`tf_export_pipeline.serving.move_label`)."""
        from tf_export_pipeline.serving import ServingControl, move_label  # TF Serving's protos: not at parsing

        return move_label(ServingControl.from_config(self.config), version=version, label=label,
                          rollback=rollback, to=to, now=now)

    def soak_verdict(self, soak_seconds: float) -> dict:
        """Whether the canary may become stable (see :func:`tf_export_pipeline.canary.soak_verdict`)."""
        from tf_export_pipeline.canary import soak_verdict  # loads the stages: not at DAG parsing

        return soak_verdict(self.config, soak_seconds)
